"""The steps that every path of the task-arithmetic family shares: task vectors (of whole tensors or of one
flat chunk), TIES sign election, and masks as factors. Inputs are never modified."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_inputs(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> None:
    """ValueError unless there is at least one model and every model has the base's shape."""
    if not tensors:
        raise ValueError("task arithmetic needs at least one model besides the base")
    for i, tensor in enumerate(tensors):
        if tensor.shape != base.shape:
            raise ValueError(f"model {i + 1} has shape {list(tensor.shape)} but the base has {list(base.shape)}")


def task_vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """The stacked task vectors [n, *base.shape], x_i - base, in the base's dtype."""
    check_inputs(tensors, base)
    deltas = torch.empty((len(tensors), *base.shape), dtype=base.dtype, device=base.device)
    for i, tensor in enumerate(tensors):
        torch.sub(tensor.to(device=base.device, dtype=base.dtype), base, out=deltas[i])
    return deltas


def chunk_delta(flat: torch.Tensor, base_flat: torch.Tensor, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
    """The task vector of one flat chunk, x - base, in the base's dtype, into `out`."""
    return torch.sub(
        flat[start:stop].to(device=base_flat.device, dtype=base_flat.dtype), base_flat[start:stop], out=out
    )


def as_factor(mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The boolean `mask` as 0/1 in `out`'s dtype (a comparison of its bytes: far faster on a CPU
    than a conversion or a multiply by booleans)."""
    return torch.gt(mask.view(torch.uint8), 0, out=out)


def elect_signs_(
    deltas: torch.Tensor,
    weights: Sequence[float] | None = None,
    divisor: bool = True,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """TIES sign election on the stacked (already weighted) deltas, in place: the elected sign of an
    entry is that of the sum over models (+ where the sum is >= 0); entries of the other sign are
    set to zero. With `divisor`, returns per entry the sum of `weights` (ones when None) over the
    models whose entry was kept (nonzero and of the elected sign); otherwise None. `workspace`: a
    buffer of at least 2 * deltas[0].numel() elements of deltas' dtype (allocated when None)."""
    shape = deltas.shape[1:]
    n = deltas[0].numel()
    if workspace is None or workspace.dtype != deltas.dtype or workspace.numel() < 2 * n:
        workspace = torch.empty(2 * n, dtype=deltas.dtype, device=deltas.device)
    sign = workspace.view(-1)[:n].view(shape)
    torch.sum(deltas, dim=0, out=sign)
    torch.ge(sign, 0, out=sign)
    sign.mul_(2).sub_(1)  # +1 / -1
    kept = workspace.view(-1)[n : 2 * n].view(shape)
    # accumulated in float32 or better and rounded once, as a sum over the stacked model axis would be
    kept_weight = None
    if divisor:
        kept_weight = torch.zeros(shape, dtype=torch.promote_types(deltas.dtype, torch.float32), device=deltas.device)
    for i in range(deltas.shape[0]):
        delta = deltas[i]
        delta.mul_(sign).relu_().mul_(sign)  # delta where its sign is the elected one, else 0
        if kept_weight is not None:
            weight = 1.0 if weights is None else float(torch.tensor(float(weights[i]), dtype=deltas.dtype))
            kept_weight.add_(torch.ne(delta, 0, out=kept), alpha=weight)
    return None if kept_weight is None else kept_weight.to(deltas.dtype)
