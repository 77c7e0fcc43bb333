"""TSV-M, Task Singular Vectors merging (Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri and Rodola,
"Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025, arXiv:2412.00081)."""

from __future__ import annotations

import torch

from composer.methods.registry import Parameter, registered
from composer.methods.subspace import (
    LAMBDA,
    RANK,
    fraction_problem,
    is_matrix,
    mean_task_vector_merge,
    plus_scaled,
    rank_problem,
    rank_shape_problem,
    resolved_rank,
    task_vector,
)
from composer.methods.svd import nonzero_components, orthonormalized, top_singular, working_dtype


def tsv(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    lambda_: float = 1.0,
    rank: float | None = None,
    rank_fraction: float | None = None,
) -> torch.Tensor:
    """For a weight matrix, with task vectors tau_i = x_i - base (i = 1..n) and r the matrix's smaller side:

        tau_i ~ U_i S_i V_i^T                          the top k singular triplets of each (k = r // n)
        U = [U_1 .. U_n],  S = diag(S_1 .. S_n),  V = [V_1 .. V_n]
        U_perp = P_U Q_U^T  for U = P_U D_U Q_U^T       (orthogonal Procrustes: the closest orthonormal basis)
        V_perp = P_V Q_V^T  for V = P_V D_V Q_V^T
        y = base + lambda * U_perp S V_perp^T

    Compressing each task vector to its top singular vectors and then decorrelating the tasks' singular vectors
    removes the interference between them that plain task arithmetic sums up. k is `rank` when given (at most
    r), else int(rank_fraction * r) (at least 1), else the paper's r // n (at least 1); with one model and the
    default k = r the merge returns that model. Where the stacked U (or V) is rank-deficient (equal task
    vectors, say), `orthonormalized` leaves out the directions it does not span, so n equal task vectors give
    their own rank-k truncation instead of arbitrary directions; and components whose singular value is zero
    (a task vector of rank below k) are left out before, as their vectors are arbitrary.

    Every other tensor: base + lambda * mean_i tau_i (the paper's rule for tensors that are not matrices).
    """
    if not is_matrix(base):
        return mean_task_vector_merge(tensors, base, lambda_)
    count = len(tensors)
    rows, columns = base.shape
    side = min(rows, columns)
    k = resolved_rank(rank, rank_fraction if rank_fraction is not None else 1 / count, side)
    if k > side:
        raise ValueError(f"rank {k} is larger than this {rows} x {columns} matrix allows (at most {side})")
    dtype = working_dtype(base.dtype)
    left = torch.empty(rows, count * k, dtype=dtype, device=base.device)
    right = torch.empty(columns, count * k, dtype=dtype, device=base.device)
    values = torch.empty(count * k, dtype=dtype, device=base.device)
    for i, tensor in enumerate(tensors):
        u, s, vh = top_singular(task_vector(tensor, base), k)
        left[:, i * k : (i + 1) * k] = u
        right[:, i * k : (i + 1) * k] = vh.mT
        values[i * k : (i + 1) * k] = s
        del u, s, vh
    left, values, right = nonzero_components(left, values, right, tuple(base.shape))
    left = orthonormalized(left)
    right = orthonormalized(right)
    return plus_scaled(base, (left * values) @ right.mT, lambda_)


def _coverage(count: int, params: dict) -> float:
    """Columns of the stacked U and V as a share of the matrix's smaller side (an explicit rank: at most n)."""
    if params.get("rank") is not None:
        return float(count)
    fraction = params.get("rank_fraction")
    return 1.0 if fraction is None else max(1.0, count * fraction)


def _check(params: dict) -> str | None:
    return rank_problem(params) or fraction_problem(params, "rank_fraction")


@registered(
    "tsv",
    (LAMBDA, RANK, Parameter("rank_fraction")),
    needs_base=True,
    description="TSV-M: each task vector's top singular vectors, decorrelated across tasks (Gargiulo et al. 2025)",
    check=_check,
    check_shape=rank_shape_problem,
    float32_work=True,
    # the stacked U and V and their orthonormal forms (c their share of the matrix), an SVD's copy, factors and
    # LAPACK's workspace, the result's two steps, and the inputs in the compute dtype: measured on a 1500 x 1500
    # matrix (the square case needs most), 8.3 buffers beside the inputs and result for c = 1
    temporaries=lambda count, params: 5 * _coverage(count, params) + 4 + count + 1,
)
def apply_tsv(tensors, base, params):
    return tsv(tensors, base, params["lambda"], params["rank"], params["rank_fraction"])
