"""Weighted averages and spherical interpolation of whole tensors."""

from __future__ import annotations

import torch

SLERP_PARALLEL_THRESHOLD = 0.9995


def linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    """sum_i w_i x_i, divided by sum_i w_i when `normalize` (Wortsman et al. 2022, model soups)."""
    result = torch.zeros_like(tensors[0])
    for tensor, weight in zip(tensors, weights):
        result.add_(tensor, alpha=weight)
    if normalize:
        total = sum(weights)
        if total == 0:
            raise ValueError("linear: the weights sum to zero, so they cannot be normalised")
        result.div_(total)
    return result


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from `a` (t=0) to `b` (t=1) (Shoemake 1985), treating each tensor as one vector.

    The angle is measured between the normalised tensors; the weights apply to the originals, so
    magnitudes interpolate too. Nearly parallel tensors fall back to linear interpolation.
    """
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    a_unit = a / (a.norm() + eps)
    b_unit = b / (b.norm() + eps)
    cosine = float((a_unit * b_unit).sum().clamp(-1.0, 1.0))
    if abs(cosine) > SLERP_PARALLEL_THRESHOLD:
        return torch.lerp(a, b, t)
    theta = torch.arccos(torch.tensor(cosine, dtype=torch.float64))
    sin_theta = torch.sin(theta)
    weight_a = float(torch.sin((1 - t) * theta) / sin_theta)
    weight_b = float(torch.sin(t * theta) / sin_theta)
    return a * weight_a + b * weight_b
