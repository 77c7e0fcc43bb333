"""One streaming pass over a model: for every tensor a digest of its bytes (byte-identical copies are found by
comparing digests, so the common case costs one read) and a sketch, a fixed random projection of some rows.

The projection of a tensor W (rows x cols, higher-rank tensors taken as rows of their last axis) is
W[S] R with S at most SKETCH_ROWS rows at fixed places and R a cols x SKETCH_WIDTH Gaussian matrix, both
depending only on the shape, so every model's tensors of one shape are projected alike: sketches of a blend are
the same blend of the sketches, and the cosine of two sketches estimates the cosine of the tensors. Only sketches
stay in memory (SKETCH_WIDTH numbers a sketched row). Every byte is read for the digest, but only the sketched
rows are converted and multiplied, so the pass costs little more than reading the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from composer.errors import ComposerError
from composer.memory import recycling, release_freed_memory
from composer.native.checksum import checksum_of_pieces
from composer.trace.layout import TracedModel
from composer.trace.prescan import Prescan
from composer.trace.reading import digest_aligned, row_count, rows_within

SKETCH_WIDTH = 16
SKETCH_ROWS = (
    512  # a matrix's rows that are sketched (sketched_rows): cosines to ~0.01, and the 256 rows a test samples
)


@dataclass
class TensorPrint:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    digest: str  # of the bytes as stored, with dtype and shape
    sketch: torch.Tensor | None  # [sketched rows, SKETCH_WIDTH] float32; None for vectors (norms, biases)


@lru_cache(maxsize=32)
def projection(columns: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1_000_003 * columns + 17)
    return torch.randn(columns, SKETCH_WIDTH, generator=generator) / SKETCH_WIDTH**0.5


def sketched_rows(rows: int) -> torch.Tensor:
    """The rows of a matrix that are sketched: all of a small one, else SKETCH_ROWS evenly spaced, at the same
    places in every model (so sketches of one shape compare row for row)."""
    if rows <= SKETCH_ROWS:
        return torch.arange(rows)
    return torch.linspace(0, rows - 1, SKETCH_ROWS).round().long().unique()


def fingerprint(name: str, shape: tuple[int, ...], dtype: torch.dtype, blocks) -> TensorPrint:
    """The print of one tensor given as consecutive [rows, row length] blocks (each but the last a whole number of
    SCAN_BLOCKs of bytes, so the digest is taken piece by piece)."""
    rows, length = row_count(shape)
    chosen = sketched_rows(rows) if len(shape) >= 2 else None
    sketch = torch.empty(len(chosen), SKETCH_WIDTH) if chosen is not None else None
    matrix = projection(length) if chosen is not None else None

    def pieces():
        for start, block in blocks:
            if chosen is not None:
                first, last = torch.searchsorted(chosen, torch.tensor([start, start + block.shape[0]])).tolist()
                if last > first:
                    torch.matmul(block[chosen[first:last] - start].float(), matrix, out=sketch[first:last])
            yield memoryview(block.contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B")

    return TensorPrint(name, tuple(shape), dtype, digest_text(dtype, shape, checksum_of_pieces(pieces())), sketch)


def digest_text(dtype: torch.dtype, shape: tuple[int, ...], checksum: str) -> str:
    return f"{dtype}:{tuple(shape)}:{checksum}"


class Scratch:
    """Buffers reused from tensor to tensor for a pass's temporaries, grown to the largest asked for: fresh memory for
    each tensor's sketched rows and their float32 copy cost more in page faults than the gather and the conversion
    (0.25 against 0.13 CPU seconds a 1.7 GB model)."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of `shape` and `dtype` over the buffer of `role`; its contents are the previous caller's."""
        count = math.prod(shape)
        held = self.buffers.get(role)
        if held is None or held.numel() < count * dtype.itemsize:
            held = self.buffers[role] = torch.empty(count * dtype.itemsize, dtype=torch.uint8)
        return held[: count * dtype.itemsize].view(dtype).view(shape)


def prescanned(model: TracedModel, name: str, prescan: Prescan | None, scratch: Scratch) -> TensorPrint | None:
    """The print of a plainly stored tensor whose checksum the prescan took, reading only its sketched rows; None
    where the prescan has no checksum for it."""
    located = model.reader.stored_range(name) if prescan is not None else None
    checksum = prescan.checksum(*located) if located is not None else None
    if checksum is None:
        return None
    info = model.infos[name]
    rows, length = row_count(info.shape)
    sketch = None
    if len(info.shape) >= 2:
        chosen = sketched_rows(rows)
        # the sketch, which is kept, is allocated before the rows' temporaries, which are not: after them, each
        # sketch would pin the heap's top above the freed temporaries (0.5 GB of heap over a model of 1.7 GB)
        sketch = torch.empty(len(chosen), SKETCH_WIDTH)
        shape = (len(chosen), length)
        picked = model.reader.mapped_rows(name, chosen, out=scratch.take("rows", shape, info.dtype))
        if picked is None:
            return None
        floats = scratch.take("floats", shape, torch.float32)
        floats.copy_(picked)
        torch.matmul(floats, projection(length), out=sketch)
    return TensorPrint(name, tuple(info.shape), info.dtype, digest_text(info.dtype, info.shape, checksum), sketch)


def fingerprint_model(
    model: TracedModel,
    memory_budget: int,
    progress=None,
    prescan: Prescan | None = None,
    names: list[str] | None = None,
) -> dict[str, TensorPrint]:
    """Every tensor of `model` (those in `names` when given), read once, one at a time, a block of rows at a time: a
    block and its float32 copy take at most about half of `memory_budget`. A safetensors block is its file's pages
    mapped in place (no copy out of the page cache: half the pass's CPU time); other blocks are read into recycled
    memory (composer.memory), which spares the page faults of a fresh map per block. A tensor `prescan` has
    checksummed is not read again: only its sketched rows are."""
    prints = {}
    scratch = Scratch()
    with recycling():
        for name in model.infos if names is None else names:
            info = model.infos[name]
            _, length = row_count(info.shape)
            block = digest_aligned(rows_within(memory_budget // 2, length, copies=3), length * info.dtype.itemsize)
            try:
                prints[name] = prescanned(model, name, prescan, scratch) or fingerprint(
                    name, info.shape, info.dtype, model.reader.blocks(name, block, mapped=True)
                )
            except ComposerError as error:
                raise ComposerError(f"The model '{model.reference}' cannot be read: {error}") from None
            if progress is not None:
                progress(model.reference, name)
    release_freed_memory()
    return prints
