"""One streaming pass over a model: for every tensor a digest of its bytes (byte-identical copies are found by
comparing digests, so the common case costs one read) and a sketch, a fixed random projection of each row.

The projection of a tensor W (rows x cols, higher-rank tensors taken as rows of their last axis) is
W R with R a cols x SKETCH_WIDTH Gaussian matrix that depends only on cols, so every model's tensors of one
shape are projected alike: sketches of a blend are the same blend of the sketches, and the cosine of two
sketches estimates the cosine of the tensors. Only sketches stay in memory (SKETCH_WIDTH numbers a row).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from composer.errors import ComposerError
from composer.native.scan import checksum_of_pieces
from composer.trace.layout import TracedModel
from composer.trace.reading import digest_aligned, row_count, rows_within

SKETCH_WIDTH = 16


@dataclass
class TensorPrint:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    digest: str  # of the bytes as stored, with dtype and shape
    sketch: torch.Tensor | None  # [rows, SKETCH_WIDTH] float32; None for vectors (norms, biases)
    norm: float


@lru_cache(maxsize=32)
def projection(columns: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1_000_003 * columns + 17)
    return torch.randn(columns, SKETCH_WIDTH, generator=generator) / SKETCH_WIDTH**0.5


def fingerprint(name: str, shape: tuple[int, ...], dtype: torch.dtype, blocks) -> TensorPrint:
    """The print of one tensor given as consecutive [rows, row length] blocks (each but the last a whole number of
    SCAN_BLOCKs of bytes, so the digest is taken piece by piece)."""
    rows, length = row_count(shape)
    squared = 0.0
    sketch = torch.empty(rows, SKETCH_WIDTH) if len(shape) >= 2 else None
    matrix = projection(length) if sketch is not None else None

    def pieces():
        nonlocal squared
        for start, block in blocks:
            part = block.float()
            squared += float((part * part).sum(dtype=torch.float64))
            if sketch is not None:
                torch.matmul(part, matrix, out=sketch[start : start + block.shape[0]])
            del part
            yield memoryview(block.contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B")

    digest = f"{dtype}:{tuple(shape)}:{checksum_of_pieces(pieces())}"
    return TensorPrint(name, tuple(shape), dtype, digest, sketch, squared**0.5)


def fingerprint_model(model: TracedModel, memory_budget: int, progress=None) -> dict[str, TensorPrint]:
    """Every tensor of `model`, read once, one at a time, a block of rows at a time: a block and its float32 copy
    take at most about half of `memory_budget`."""
    prints = {}
    for name, info in model.infos.items():
        _, length = row_count(info.shape)
        block = digest_aligned(rows_within(memory_budget // 2, length, copies=3), length * info.dtype.itemsize)
        try:
            prints[name] = fingerprint(name, info.shape, info.dtype, model.reader.blocks(name, block))
        except ComposerError as error:
            raise ComposerError(f"The model '{model.reference}' cannot be read: {error}") from None
        if progress is not None:
            progress(model.reference, name)
    return prints
