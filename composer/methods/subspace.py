"""What the subspace merges (TSV-M, Iso-C, Iso-CTS, CART) share: task vectors in the SVD's working dtype,
the rule for tensors that are not matrices, and the checks of their ranks and fractions.

The papers decompose 2-D weight matrices. Every other tensor (norms, biases; 3-D or larger ones too) is merged
as they merge them: the mean of the task vectors, scaled like the matrices' merged task vector,

    y = base + lambda * (1/n) sum_i tau_i.

A method sees shapes, not names, so an embedding or LM head matrix is a 2-D matrix like any other."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from composer.methods.registry import Parameter
from composer.methods.svd import working_dtype

LAMBDA = Parameter("lambda", default=1.0)  # the scale of the merged task vector (the papers' alpha or lambda)
RANK = Parameter("rank")  # an explicit rank (rounded to a whole number); none: the method's share of the smaller side


def is_matrix(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2


def task_vector(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """x - base in the working dtype (at least float32)."""
    dtype = working_dtype(base.dtype)
    return tensor.to(dtype) - base.to(dtype)


def plus_scaled(base: torch.Tensor, delta: torch.Tensor, lambda_: float) -> torch.Tensor:
    """base + lambda * delta, computed in the working dtype and returned in the base's dtype."""
    dtype = working_dtype(base.dtype)
    return torch.add(base.to(dtype), delta, alpha=lambda_).to(base.dtype)


def mean_task_vector_merge(tensors: Sequence[torch.Tensor], base: torch.Tensor, lambda_: float) -> torch.Tensor:
    """base + lambda * mean_i (x_i - base): the rule for tensors that are not matrices."""
    total = task_vector(tensors[0], base)
    for tensor in tensors[1:]:
        total += task_vector(tensor, base)
    return plus_scaled(base, total.div_(len(tensors)), lambda_)


def resolved_rank(rank: float | None, fraction: float, side: int) -> int:
    """`rank` (rounded) when set, else int(fraction * side) and at least 1."""
    if rank is not None:
        return round(rank)
    return max(1, int(fraction * side))


def rank_problem(params: dict) -> str | None:
    """Why a `rank` parameter cannot work whatever the shape (it must be at least 1)."""
    rank = params.get("rank")
    if rank is not None and round(rank) < 1:
        return f"rank must be at least 1 (it is rounded to a whole number), got {rank}"
    return None


def fraction_problem(params: dict, name: str, allow_zero: bool = False) -> str | None:
    """Why the share `params[name]` cannot work: it must lie in (0, 1] ([0, 1] with `allow_zero`)."""
    value = params.get(name)
    if value is None:
        return None
    if not ((0 <= value if allow_zero else 0 < value) and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        return f"{name} must lie in {interval} (a share of each matrix's rank), got {value}"
    return None


def rank_shape_problem(params: dict, shape: tuple[int, ...]) -> str | None:
    """Why an explicit `rank` cannot work for a tensor of `shape`: larger than the matrix's smaller side."""
    rank = params.get("rank")
    if rank is None or len(shape) != 2 or round(rank) <= min(shape):
        return None
    return (
        f"rank {round(rank)} is larger than this {shape[0]} x {shape[1]} matrix allows (at most {min(shape)}); "
        "lower 'rank', set it per tensor with a filter list, or leave it out to take the method's share of each "
        "matrix's rank"
    )
