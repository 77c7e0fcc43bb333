"""Linear: the weighted average of the models (Wortsman et al. 2022, model soups)."""

from __future__ import annotations

import torch

from composer.memory import empty
from composer.methods.chunks import chunk_bounds
from composer.methods.registry import Parameter, registered


def weights_cancel(weights: list[float]) -> bool:
    """True when the weights sum to zero (up to rounding), so normalising by their sum is undefined."""
    return abs(sum(weights)) <= 1e-12 * max(1.0, sum(abs(w) for w in weights))


def linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    """sum_i w_i x_i, divided by sum_i w_i when `normalize`.

    Accumulates in at least float32 and returns the dtype of the first tensor. On the CPU the sum runs
    over cache-sized chunks (several times faster than whole-tensor passes; the same operations, so the
    same bits).
    """
    if len(tensors) != len(weights):
        raise ValueError(f"linear: {len(tensors)} tensors but {len(weights)} weights")
    if normalize and weights_cancel(weights):
        raise ValueError("linear: the weights sum to zero, so they cannot be normalised")
    first = tensors[0]
    accumulate = torch.promote_types(first.dtype, torch.float32)
    flats = [tensor.reshape(-1) for tensor in tensors]
    out = empty((first.numel(),), first.dtype, first.device)
    total = sum(weights)
    bounds = chunk_bounds(first)
    width = max((end - start for start, end in bounds), default=0)
    result, converted = (
        torch.empty(width, dtype=accumulate, device=first.device) for _ in range(2)
    )  # reused for every chunk
    for start, end in bounds:
        chunk_result = result[: end - start].zero_()
        for flat, weight in zip(flats, weights):
            part = flat[start:end]
            if part.dtype != accumulate:
                part = converted[: end - start].copy_(part)
            chunk_result.add_(part, alpha=weight)
        if normalize:
            chunk_result.div_(total)
        out[start:end] = chunk_result
    return out.view(first.shape)


def _check_linear(params):
    if params["normalize"] and weights_cancel(params["weight"]):
        return f"the weights {params['weight']} sum to zero, so they cannot be normalised (set normalize: false or change a weight)"
    return None


@registered(
    "linear",
    (Parameter("weight", required=True, per_model=True), Parameter("normalize", default=True, kind="bool")),
    description="weighted average of the models",
    check=_check_linear,
    light=True,
)
def apply_linear(tensors, base, params):
    return linear(tensors, params["weight"], params["normalize"])
