"""The checksums of a trace's local safetensors files, taken on a thread from the moment `compose trace` starts.

The fingerprint pass needs every byte of a tensor for its digest but only a few of its rows for its sketch, and
importing torch takes about as long as reading the files once. So the CLI starts a Prescan before it imports
torch (this module needs none): a thread maps each file the trace will read, a piece at a time, and checksums
every tensor's bytes (composer.native.checksum, which lets go of the interpreter's lock), and the fingerprint pass
then reads only the sketched rows of a tensor whose checksum it finds here.

The prescan decides nothing. A reference it does not read (a GGUF file, a hub id not in the hub cache,
BASE+ADAPTER), a file it cannot read or parse, and a file that changed after it was read (another size, inode or
modification time) are read by the fingerprint pass as before, and every error the user sees is that pass's own.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from composer.errors import ComposerError
from composer.files import open_regular, read_bytes
from composer.native.checksum import SCAN_BLOCK, checksum_of_pieces
from composer.safetensors_header import MAX_HEADER_BYTES, header_length, parse_header, tensor_spans

SAFETENSORS_INDEX = "model.safetensors.index.json"
PIECE = 8192 * SCAN_BLOCK  # bytes mapped at a time (32 MiB)


class Stopped(Exception):
    """The trace ended (or failed) before the prescan did."""


@dataclass
class FileChecksums:
    identity: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns when it was read
    checksums: dict[tuple[int, int], str]  # (offset in the file, length) of each tensor's bytes -> their checksum


def identity(status: os.stat_result) -> tuple[int, int, int, int]:
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _open_regular(path: Path) -> int | None:
    """files.open_regular's descriptor (a named pipe is never waited on), or None where it refuses the file."""
    try:
        return open_regular(path)
    except ComposerError:
        return None


def _read_bytes(path: Path, limit: int) -> bytes | None:
    """files.read_bytes's bytes, or None where it refuses the file (not regular, larger than `limit`)."""
    try:
        return read_bytes(path, limit=limit)
    except (ComposerError, OSError):
        return None


def _read_json(path: Path) -> object:
    raw = _read_bytes(path, MAX_HEADER_BYTES)  # an index is read no larger than a header
    try:
        return json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):
        return None


def hub_snapshot(reference: str) -> Path | None:
    """The snapshot folder of a hub id (`org/name`, `org/name@revision`) already in the local hub cache, found from
    the cache's own layout (refs/REVISION holds a commit, snapshots/COMMIT its files); None where there is none. The
    hub is never asked: if the trace then resolves the id to another snapshot, the prescan's files are not its
    files, and the pass reads its own."""
    repo, _, revision = reference.partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(part and part not in (".", "..") for part in parts):
        return None
    from huggingface_hub import constants  # no torch, a few milliseconds

    folder = Path(constants.HF_HUB_CACHE) / f"models--{parts[0]}--{parts[1]}"
    commit = revision or "main"
    if "/" in commit or commit in (".", ".."):
        return None
    named = _read_bytes(folder / "refs" / commit, 4096)
    if named is not None:
        commit = named.decode("utf-8", "replace").strip()
    snapshot = folder / "snapshots" / commit
    return snapshot if commit not in ("", ".", "..") and "/" not in commit and snapshot.is_dir() else None


def weight_files(reference: str) -> list[Path]:
    """The safetensors files a reference reads, picked as composer.sources.folder picks them (the shards an index
    names, else every *.safetensors file of the folder), for a local file or folder or a hub id already in the hub
    cache; none for any other reference (a GGUF file, BASE+ADAPTER, a hub id not downloaded)."""
    path = Path(reference)
    if path.is_file():
        return [path] if path.suffix == ".safetensors" else []
    if not path.is_dir():
        snapshot = hub_snapshot(reference) if not path.exists() and "+" not in reference else None
        if snapshot is None:
            return []
        path = snapshot
    if (path / SAFETENSORS_INDEX).exists():
        index = _read_json(path / SAFETENSORS_INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            return []
        shards = {name for name in weight_map.values() if isinstance(name, str) and Path(name).name == name}
        return [path / name for name in sorted(shards) if name not in ("", ".", "..")]
    return sorted(path.glob("*.safetensors"))


def _tensor_spans(descriptor: int, size: int) -> list[tuple[int, int]] | None:
    """(offset in the file, length) of every tensor's bytes, or None where the header is not one composer reads
    (the pass then reads the file and says what is wrong)."""
    prefix = os.pread(descriptor, 8, 0)
    try:
        length = header_length("", prefix, size)
        header = parse_header("", os.pread(descriptor, length, 8), size)
    except ComposerError:
        return None
    return tensor_spans(header, 8 + length)


def _mapped_pieces(descriptor: int, offset: int, length: int, stopping: threading.Event):
    """`length` bytes of the file from `offset`, as read-only views of pieces mapped one at a time (each a whole
    number of SCAN_BLOCKs but the last, as checksum_of_pieces needs)."""
    for start in range(0, length, PIECE):
        if stopping.is_set():
            raise Stopped
        size = min(PIECE, length - start)
        at = offset + start
        first = at - at % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(
            descriptor,
            at + size - first,
            flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
            prot=mmap.PROT_READ,
            offset=first,
        ) as pages:
            view = memoryview(pages)[at - first : at - first + size]
            try:
                yield view
            finally:
                view.release()


def file_checksums(path: Path, stopping: threading.Event) -> FileChecksums | None:
    """Every tensor's checksum in one safetensors file, or None where the prescan leaves the file to the pass."""
    descriptor = _open_regular(path)
    if descriptor is None:
        return None
    try:
        status = os.fstat(descriptor)
        spans = _tensor_spans(descriptor, status.st_size)
        if spans is None:
            return None
        checksums = {
            (offset, length): checksum_of_pieces(_mapped_pieces(descriptor, offset, length, stopping))
            for offset, length in spans
        }
        return FileChecksums(identity(status), checksums)
    except (OSError, ValueError, BufferError):  # unreadable or shrunk under us: the pass reads it and says so
        return None
    finally:
        os.close(descriptor)


class Prescan:
    """Checksums of the references' safetensors files, taken in the order given on a daemon thread that starts at
    once: it also finds the files (so the caller's thread touches none of them). `checksum` waits for the file it is
    asked about; `close` stops the thread."""

    def __init__(self, references: list[str]):
        self.references = list(references)
        self.files: dict[str, Path] = {}  # real path -> the path as found; filled by the thread before `_listed`
        self._done: dict[str, threading.Event] = {}
        self._found: dict[str, FileChecksums | None] = {}
        self._listed = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="composer-prescan", daemon=True)
        try:
            self._thread.start()
        except RuntimeError:  # no thread to be had: the pass reads everything, as without a prescan
            self._listed.set()

    def _list(self) -> None:
        for reference in self.references:
            try:
                paths = weight_files(reference)
            except Exception:  # an odd reference: the pass opens it and says what is wrong with it
                paths = []
            for path in paths:
                key = os.path.realpath(path)
                if key not in self.files:
                    self.files[key] = path
                    self._done[key] = threading.Event()

    def _run(self) -> None:
        try:
            self._list()
            self._listed.set()
            for key, path in self.files.items():
                try:
                    self._found[key] = None if self._stopping.is_set() else file_checksums(path, self._stopping)
                except Exception:  # Stopped, or anything unforeseen: the pass reads the file and reports its errors
                    self._found[key] = None
                self._done[key].set()
        finally:  # whatever ends the thread, nobody waits for ever on a file it did not get to
            self._listed.set()
            for done in self._done.values():
                done.set()

    def checksum(self, path: Path, offset: int, length: int) -> str | None:
        """The checksum of `length` bytes of `path` at `offset` if they are one tensor's bytes the prescan read
        and the file is as it was then; else None."""
        self._listed.wait()
        key = os.path.realpath(path)
        done = self._done.get(key)
        if done is None:
            return None
        done.wait()
        found = self._found.get(key)
        if found is None:
            return None
        try:
            if identity(os.stat(path)) != found.identity:
                return None
        except OSError:
            return None
        return found.checksums.get((offset, length))

    def close(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
