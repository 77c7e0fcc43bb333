"""Model Stock (Jang, Yun and Han 2024, "Model Stock: All we need is just a few fine-tuned models",
arXiv:2403.19522): move from the base towards the average of N fine-tunes by a ratio that comes from
the angle between their updates."""

from __future__ import annotations

import torch

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
    shape = base.shape
    if not filter_wise:
        base_rows, rows = base.reshape(-1), [tensor.reshape(-1) for tensor in tensors]
    elif base.dim() == 1:
        base_rows, rows = base.unsqueeze(0), [tensor.unsqueeze(0) for tensor in tensors]
    else:
        base_rows, rows = base, list(tensors)
    cosine = _mean_pairwise_cosine([row - base_rows for row in rows]).unsqueeze(-1)
    count = len(rows)
    denominator = 1 + (count - 1) * cosine
    singular = denominator.abs() < SINGULAR
    ratio = torch.where(singular, torch.zeros_like(cosine), (count * cosine) / torch.where(singular, torch.ones_like(denominator), denominator))
    average = rows[0] + rows[1]
    for row in rows[2:]:
        average += row
    average /= count
    return average.mul_(ratio).add_((1 - ratio) * base_rows).reshape(shape)


def _mean_pairwise_cosine(offsets: list[torch.Tensor]) -> torch.Tensor:
    """mean over pairs i < j of <d_i, d_j> / max(|d_i| |d_j|, 1e-6), each clamped to [-1, 1], along the last axis."""
    norms = [torch.linalg.vector_norm(offset, dim=-1) for offset in offsets]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=COSINE_NORM_FLOOR)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0)
