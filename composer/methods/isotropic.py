"""Iso-C and Iso-CTS, isotropic merging (Marczak, Magistri, Cygert, Twardowski, Bagdanov and van de Weijer,
"No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025,
arXiv:2502.04959)."""

from __future__ import annotations

import torch

from composer.methods.registry import Parameter, registered
from composer.methods.subspace import (
    LAMBDA,
    fraction_problem,
    is_matrix,
    mean_task_vector_merge,
    plus_scaled,
    task_vector,
)
from composer.methods.svd import (
    exact_svd,
    nonzero_components,
    numerical_rank,
    orthonormalized,
    top_singular,
    working_dtype,
)


def _summed_task_vectors(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    total = task_vector(tensors[0], base)
    for tensor in tensors[1:]:
        total += task_vector(tensor, base)
    return total


def iso_c(tensors: list[torch.Tensor], base: torch.Tensor, lambda_: float = 1.0) -> torch.Tensor:
    """For a weight matrix, with task vectors tau_i = x_i - base:

        Delta = sum_i tau_i = U S V^T   (task arithmetic's sum)
        y = base + lambda * sigma_bar U V^T,   sigma_bar = mean of the singular values of Delta

    The spectrum of the summed task vector is made flat (isotropic): every direction the tasks span gets the
    same scale, so the few dominant directions of the sum no longer drown the others. The mean and U V^T are
    taken over Delta's numerical range (singular values above min(shape) * eps * the largest): a direction
    with singular value zero has arbitrary singular vectors, and a rank-deficient sum (low-rank fine-tunes)
    must not gain arbitrary directions. For full-rank sums (fine-tunes of every weight) this is the paper's
    formula. Every other tensor: base + lambda * mean_i tau_i.
    """
    if not is_matrix(base):
        return mean_task_vector_merge(tensors, base, lambda_)
    u, s, vh = exact_svd(_summed_task_vectors(tensors, base))
    kept = numerical_rank(s, tuple(base.shape))
    if kept == 0:
        return base.clone()
    return plus_scaled(base, (u[:, :kept] * s[:kept].mean()) @ vh[:kept], lambda_)


def common_and_task_ranks(side: int, count: int, common_space_fraction: float) -> tuple[int, int]:
    """(k, s): the common subspace's rank and each task's, with k + n s = side: k starts at
    int(side * fraction) and the rest is split evenly among the n tasks (rounded to a multiple of n, the
    remainder going back to the common subspace), as the paper's code does."""
    common = int(side * common_space_fraction)
    per_task = round((side - common) / count)
    per_task = min(per_task, side // count)
    return side - per_task * count, per_task


def iso_cts(
    tensors: list[torch.Tensor], base: torch.Tensor, lambda_: float = 1.0, common_space_fraction: float = 0.8
) -> torch.Tensor:
    """For a weight matrix, with task vectors tau_i = x_i - base (i = 1..n) and r its smaller side:

        Delta = sum_i tau_i,  U_c S_c V_c^T its top k singular triplets        (the common subspace)
        tau_i' = tau_i - U_c U_c^T tau_i,  U_i S_i V_i^T its top s triplets    (what the common subspace misses)
        U = [U_c U_1 .. U_n],  S = diag(S_c S_1 .. S_n),  V = [V_c V_1 .. V_n]  (k + n s = r columns)
        U_perp, V_perp: the orthonormal Procrustes factors of U and V         (as in TSV-M)
        y = base + lambda * sigma_bar U_perp V_perp^T,   sigma_bar = mean of S

    k = int(r * common_space_fraction), adjusted so that the remaining r - k directions split evenly among the
    tasks (`common_and_task_ranks`): the weakest directions of the common subspace are replaced by each task's
    strongest directions outside it, and the spectrum is made flat as in Iso-C. With common_space_fraction 1
    this is Iso-C. Components with a numerically zero singular value are left out (their vectors are
    arbitrary). Every other tensor: base + lambda * mean_i tau_i.
    """
    if not is_matrix(base):
        return mean_task_vector_merge(tensors, base, lambda_)
    count = len(tensors)
    rows, columns = base.shape
    common, per_task = common_and_task_ranks(min(rows, columns), count, common_space_fraction)
    u, s, vh = exact_svd(_summed_task_vectors(tensors, base))
    dtype = working_dtype(base.dtype)
    width = common + count * per_task
    left = torch.empty(rows, width, dtype=dtype, device=base.device)
    right = torch.empty(columns, width, dtype=dtype, device=base.device)
    values = torch.empty(width, dtype=dtype, device=base.device)
    left[:, :common], values[:common], right[:, :common] = u[:, :common], s[:common], vh[:common].mT
    common_basis = left[:, :common]
    del u, s, vh
    for i, tensor in enumerate(tensors):
        if per_task == 0:
            break
        outside = task_vector(tensor, base)
        outside -= common_basis @ (common_basis.mT @ outside)
        u, s, vh = top_singular(outside, per_task)
        place = slice(common + i * per_task, common + (i + 1) * per_task)
        left[:, place], values[place], right[:, place] = u, s, vh.mT
        del outside, u, s, vh
    left, values, right = nonzero_components(left, values, right, tuple(base.shape))
    if values.numel() == 0:
        return base.clone()
    flat = values.mean()
    left = orthonormalized(left)
    right = orthonormalized(right)
    return plus_scaled(base, (left * flat) @ right.mT, lambda_)


def _check_cts(params: dict) -> str | None:
    return fraction_problem(params, "common_space_fraction", allow_zero=True)


@registered(
    "iso_c",
    (LAMBDA,),
    needs_base=True,
    description="Iso-C: task arithmetic's sum with its singular values made equal (Marczak et al. 2025)",
    float32_work=True,
    # the sum, the SVD's copy, factors and LAPACK's workspace, the result's two steps, and the inputs in the
    # compute dtype (measured on a 1500 x 1500 matrix: 6.6 buffers beside the inputs and result)
    temporaries=lambda count, params: 7 + count + 1,
)
def apply_iso_c(tensors, base, params):
    return iso_c(tensors, base, params["lambda"])


@registered(
    "iso_cts",
    (LAMBDA, Parameter("common_space_fraction", default=0.8)),
    needs_base=True,
    description="Iso-CTS: Iso-C with the weakest common directions swapped for task-specific ones (Marczak et al. 2025)",
    check=_check_cts,
    float32_work=True,
    # the stacked U and V, their orthonormal forms, an SVD's copy, factors and LAPACK's workspace, the result's
    # two steps, and the inputs in the compute dtype (measured on a 1500 x 1500 matrix: 12.2 buffers beside the
    # inputs and result)
    temporaries=lambda count, params: 13 + count + 1,
)
def apply_iso_cts(tensors, base, params):
    return iso_cts(tensors, base, params["lambda"], params["common_space_fraction"])
