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

SKETCH_WIDTH = 16
ROW_CHUNK = 4096  # rows converted to float32 at a time, so a bf16 tensor is never held twice over in float32


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


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() >= 2 else tensor.reshape(1, -1)


def fingerprint(name: str, tensor: torch.Tensor) -> TensorPrint:
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    digest = f"{tensor.dtype}:{tuple(tensor.shape)}:{checksum_of_pieces([memoryview(raw).cast('B')])}"
    rows = as_rows(tensor)
    squared = 0.0
    sketch = None
    if tensor.dim() >= 2:
        matrix = projection(rows.shape[1])
        sketch = torch.empty(rows.shape[0], SKETCH_WIDTH)
        for start in range(0, rows.shape[0], ROW_CHUNK):
            part = rows[start:start + ROW_CHUNK].float()
            squared += float(part.double().pow(2).sum())
            torch.matmul(part, matrix, out=sketch[start:start + ROW_CHUNK])
    else:
        squared = float(rows.double().pow(2).sum())
    return TensorPrint(name, tuple(tensor.shape), tensor.dtype, digest, sketch, squared**0.5)


def fingerprint_model(model: TracedModel, progress=None) -> dict[str, TensorPrint]:
    """Every tensor of `model`, read once, one at a time."""
    prints = {}
    for name in model.infos:
        try:
            tensor = model.source.read(name)
        except ComposerError as error:
            raise ComposerError(f"The model '{model.reference}' cannot be read: {error}") from None
        prints[name] = fingerprint(name, tensor)
        del tensor
        if progress is not None:
            progress(model.reference, name)
    return prints
