"""Model Stock (Jang, Yun and Han 2024, "Model Stock: All we need is just a few fine-tuned models",
arXiv:2403.19522): move from the base towards the average of N fine-tunes by a ratio that comes from
the angle between their updates."""

from __future__ import annotations

import torch

from composer.memory import empty
from composer.methods import chunks
from composer.methods.registry import Parameter, registered
from composer.native import bf16 as native_bf16

COSINE_NORM_FLOOR = 1e-6  # |a| |b| is clamped to this before dividing: a zero update has cosine 0 with anything
SINGULAR = 1e-6  # |1 + (N-1) cos| below this: no finite ratio, keep the base


def model_stock(tensors: list[torch.Tensor], base: torch.Tensor, filter_wise: bool = False) -> torch.Tensor:
    """w_H = t * mean_i(w_i) + (1 - t) * w_0,   t = N cos(theta) / (1 + (N - 1) cos(theta)),

    with w_0 the base, w_1..w_N the fine-tunes, and cos(theta) the mean over all pairs i < j of the
    cosine between the updates w_i - w_0 and w_j - w_0 (the paper uses one angle; with more than two
    fine-tunes the pairwise cosines are averaged). One t per tensor, or with `filter_wise` one per
    row (each vector along the last axis; a 1-D tensor is one row). Where 1 + (N - 1) cos(theta) is
    within 1e-6 of zero, t = 0 (the base).
    """
    if len(tensors) < 2:
        raise ValueError(f"model_stock needs at least two tensors besides the base, got {len(tensors)}")
    if not filter_wise and base.dtype in (torch.float16, torch.bfloat16):
        return _half_precision_whole(tensors, base)
    if filter_wise and base.dim() >= 2 and base.device.type == "cpu" and base.numel() > chunks.ROW_BLOCK:
        return _in_row_blocks(tensors, base)
    return _whole(tensors, base, filter_wise)


@registered(
    "model_stock",
    (Parameter("filter_wise", default=False, kind="bool"),),
    needs_base=True,
    min_models=2,
    description="Model Stock: from the base towards the fine-tunes' average by a ratio set by the angle between their updates",
    light=True,
)
def apply_model_stock(tensors, base, params):
    return model_stock(tensors, base, params["filter_wise"])


def _whole(tensors: list[torch.Tensor], base: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    shape = base.shape
    if not filter_wise:
        base_rows, rows = base.reshape(-1), [tensor.reshape(-1) for tensor in tensors]
    elif base.dim() == 1:
        base_rows, rows = base.unsqueeze(0), [tensor.unsqueeze(0) for tensor in tensors]
    else:
        base_rows, rows = base, list(tensors)
    cosine = _mean_pairwise_cosine([row - base_rows for row in rows]).unsqueeze(-1)
    count = len(rows)
    ratio = _ratio(cosine, count)
    average = rows[0] + rows[1]
    for row in rows[2:]:
        average += row
    average /= count
    return average.mul_(ratio).add_((1 - ratio) * base_rows).reshape(shape)


def _in_row_blocks(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """The filter-wise `model_stock` of a matrix a block of rows at a time: every row is merged on its own,
    so each block gives the rows the whole matrix would (the same reductions along each row), with
    temporaries the size of a block."""
    return chunks.by_row_blocks(lambda blocks: _whole(blocks[1:], blocks[0], True), [base, *tensors])


def _ratio(cosine: torch.Tensor, count: int) -> torch.Tensor:
    """t = N cos / (1 + (N - 1) cos), 0 where the denominator is within SINGULAR of zero."""
    denominator = 1 + (count - 1) * cosine
    singular = denominator.abs() < SINGULAR
    return torch.where(
        singular,
        torch.zeros_like(cosine),
        (count * cosine) / torch.where(singular, torch.ones_like(denominator), denominator),
    )


_PIECE = 1 << 17  # elements per step of the half-precision path: float32 copies that stay in cache


def _half_precision_whole(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """`model_stock` of half-precision tensors with one ratio per tensor, a cache-sized piece at a time: the
    updates' norms and dot products summed in float32 within a piece and in float64 across pieces (more
    exact than sums in half precision, and several times faster), then the ratio and the blend in the
    tensors' dtype as in the general path. Off the CPU the piece is the whole tensor (one product)."""
    count = len(tensors)
    base_flat, flats = base.reshape(-1), [tensor.reshape(-1) for tensor in tensors]
    device = base.device
    piece_size = _PIECE if device.type == "cpu" else max(1, base_flat.numel())
    products = torch.zeros(count, count, dtype=torch.float64, device=device)
    work = torch.empty(
        count + 1, min(piece_size, base_flat.numel()), dtype=torch.float32, device=device
    )  # reused for every piece
    for start in range(0, base_flat.numel(), piece_size):
        stop = min(start + piece_size, base_flat.numel())
        piece = work[:, : stop - start]
        piece[count].copy_(base_flat[start:stop])
        for i, flat in enumerate(flats):
            piece[i].copy_(flat[start:stop]).sub_(piece[count])  # exact for half-precision inputs
        offsets = piece[:count]
        products += (offsets @ offsets.T).double()
    products = products.cpu()
    norms = products.diagonal().clamp(min=0).sqrt()
    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    cosine = sum(
        max(-1.0, min(1.0, float(products[i, j]) / max(float(norms[i] * norms[j]), COSINE_NORM_FLOOR)))
        for i, j in pairs
    ) / len(pairs)
    ratio = _ratio(torch.tensor(cosine, dtype=base.dtype), count)
    keep = 1 - ratio
    out = empty(base_flat.shape, base_flat.dtype, device)
    if native_bf16.usable(base_flat, *flats):
        return native_bf16.model_stock_blend_(base_flat, flats, float(ratio), float(keep), out).view(base.shape)
    for start in range(0, base_flat.numel(), piece_size * 4):
        stop = min(start + piece_size * 4, base_flat.numel())
        average = flats[0][start:stop] + flats[1][start:stop]
        for flat in flats[2:]:
            average += flat[start:stop]
        average /= count
        torch.add(average.mul_(ratio), keep * base_flat[start:stop], out=out[start:stop])
    return out.view(base.shape)


def _mean_pairwise_cosine(offsets: list[torch.Tensor]) -> torch.Tensor:
    """mean over pairs i < j of <d_i, d_j> / max(|d_i| |d_j|, 1e-6), each clamped to [-1, 1], along the last axis."""
    norms = [torch.linalg.vector_norm(offset, dim=-1) for offset in offsets]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=COSINE_NORM_FLOOR)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0)
