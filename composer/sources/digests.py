"""Digests that identify a model's weight files without reading their tensors: the bytes before the tensor data
(a safetensors file's length and header; a GGUF file's header, metadata and tensor table) name every tensor, its
dtype, shape and place, and a sample of the tensor bytes tells apart models saved alike (fine-tunes of one base). Outputs record
their parents' digests (composer.provenance), and `compose trace` compares a candidate's with that record."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from composer.files import open_regular

PIECE = 1 << 20


def _hash_prefix(path: Path, length: int | None) -> str:
    """sha256 of the first `length` bytes of the file (all of it when None)."""
    digest = hashlib.sha256()
    with open(open_regular(path), "rb", closefd=True) as handle:
        remaining = length
        while remaining is None or remaining > 0:
            piece = handle.read(PIECE if remaining is None else min(PIECE, remaining))
            if not piece:
                break
            digest.update(piece)
            if remaining is not None:
                remaining -= len(piece)
    return digest.hexdigest()


def header_length(path: Path) -> int | None:
    """How many leading bytes of a weights file describe its tensors (None: a format with no such part, hashed whole)."""
    if path.suffix == ".safetensors":
        with open(open_regular(path), "rb", closefd=True) as handle:
            prefix = handle.read(8)
        return 8 + struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
    if path.suffix == ".gguf":
        from composer.sources.gguf_format import read_gguf_header

        return read_gguf_header(path).data_start
    return None


def header_digest(path: Path) -> str:
    """The sha256 of a weights file's header (of the whole file where its format has none), as hex."""
    return _hash_prefix(path, header_length(path))


def sample_digest(path: Path, pieces: int = 16, piece: int = 1 << 16) -> str:
    """The sha256 of `pieces` stretches of `piece` bytes spread evenly over the tensor data (1 MiB read in all):
    fine-tunes of one model saved alike share their headers, never these bytes."""
    import os

    start = header_length(path) or 0
    digest = hashlib.sha256()
    with open(open_regular(path), "rb", closefd=True) as handle:
        size = os.fstat(handle.fileno()).st_size
        span = max(0, size - start - piece)
        for number in range(pieces):
            handle.seek(start + span * number // max(1, pieces - 1))
            digest.update(handle.read(piece))
    return digest.hexdigest()


def weight_files_of(source) -> list[Path]:
    """The weight files a model source reads: a folder's shards, or the one GGUF file."""
    paths = list(getattr(source, "weight_paths", ()) or ())
    if not paths and isinstance(getattr(source, "path", None), Path):
        paths = [source.path]
    return paths


def source_digests(source) -> list[dict[str, str]]:
    """[{"file", "header_sha256", "sample_sha256"}] for each of the source's weight files, in file-name order."""
    return [file_digests(path) for path in sorted(weight_files_of(source), key=lambda p: p.name)]


def file_digests(path: Path) -> dict[str, str]:
    return {"file": path.name, "header_sha256": header_digest(path), "sample_sha256": sample_digest(path)}
