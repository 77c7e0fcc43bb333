"""KnOTS (Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025, arXiv:2410.19735): LoRA adapters of
one base merged in a shared basis.

Adapter i changes a weight W ([out, in]) by dW_i = L_i R_i (L_i = scaling * B: [out, r_i], R_i = A: [r_i, in]). The
updates, side by side, have one thin SVD

    [dW_1 | dW_2 | ... | dW_n] = U S [V_1^T | V_2^T | ... | V_n^T]       (U: [out, k], S: [k, k], V_i: [in, k])

so every update is U C_i with its coefficient matrix C_i = S V_i^T ([k, in]) in the shared basis U. The C_i are
merged entry by entry (`merge`: "ties", TIES's trim by magnitude to `density`, sign election by the sum of values
and disjoint mean, as the paper's KnOTS-TIES; or "linear", the weighted mean sum_i w_i C_i / sum_i w_i), scaled by
`lambda`, and the merged update is U C:

    W' = W + lambda * U merge(C_1, ..., C_n)

`rank` keeps only the first `rank` directions of the basis (0: every direction whose singular value is above
1e-5 of the largest, the paper's cut). The SVD is computed from the factors, never from the [out, n in] matrix:
with [L_1 .. L_n] = Q T (QR, Q: [out, sum r_i]) the matrix is Q (T blockdiag(R_1 .. R_n)), and the SVD of the small
[sum r_i, n in] middle factor gives U = Q U' exactly (to rounding; tests check it against torch.linalg.svd of the
whole matrix), in O((out + n in) (sum r_i)^2) instead of O(out n in min(out, n in)).
"""

from __future__ import annotations

import torch

from composer.methods.registry import MergeMethod, Parameter, register
from composer.methods.task_arithmetic.chunked import generalized_task_arithmetic

RELATIVE_CUT = 1e-5  # singular values at most this share of the largest carry no update (rounding)
MERGES = ("ties", "linear")


def factored_svd(
    lefts: list[torch.Tensor], rights: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh): the thin SVD of [L_1 R_1 | ... | L_n R_n] ([out, n in]), from the factors, in float64; its
    rank is at most sum_i r_i, and that many triplets are returned (trailing ones may be zero)."""
    left = torch.cat([factor.to(torch.float64) for factor in lefts], dim=1)  # [out, sum r]
    q, t = torch.linalg.qr(left)  # q: [out, min(out, sum r)]
    blocks, start = [], 0
    for right in rights:
        rank = right.shape[0]
        blocks.append(t[:, start : start + rank] @ right.to(torch.float64))  # [q cols, in]
        start += rank
    middle = torch.cat(blocks, dim=1)  # [q cols, n in]
    inner, singular, vh = torch.linalg.svd(middle, full_matrices=False)
    return q @ inner, singular, vh


def merged_factors(
    lefts: list[torch.Tensor | None],
    rights: list[torch.Tensor | None],
    weights: list[float],
    merge: str = "ties",
    densities: list[float] | None = None,
    lambda_: float = 1.0,
    rank: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A the KnOTS-merged update (B: [out, k] the shared basis, A: [k, in] the merged coefficients),
    in float32; k is `rank`, or with rank 0 the count of singular values above RELATIVE_CUT of the largest
    (at least 1). A model whose L_i and R_i are None leaves the tensor alone: its coefficient matrix is zero (exactly:
    it takes no part in the SVD, whose rounding would otherwise leave it tiny entries that TIES counts)."""
    if merge not in MERGES:
        raise ValueError(f"knots: merge must be one of {', '.join(MERGES)}, not '{merge}'")
    present = [i for i, left in enumerate(lefts) if left is not None]
    if not present:
        raise ValueError("knots: no model changes this tensor")
    basis, singular, vh = factored_svd([lefts[i] for i in present], [rights[i] for i in present])
    if rank:
        if rank > singular.numel():
            raise ValueError(
                f"knots: rank {rank} is more than the {singular.numel()} directions the adapters' updates span"
            )
        kept = rank
    else:
        largest = float(singular[0]) if singular.numel() else 0.0
        kept = max(1, int((singular > RELATIVE_CUT * largest).sum())) if largest > 0 else 1
    basis, singular, vh = basis[:, :kept], singular[:kept], vh[:kept]
    inputs = rights[present[0]].shape[1]
    zero = torch.zeros(kept, inputs, dtype=torch.float32, device=basis.device)
    coefficients = [zero] * len(lefts)
    for block, i in enumerate(present):
        coefficients[i] = (singular[:, None] * vh[:, block * inputs : (block + 1) * inputs]).to(torch.float32)
    if merge == "ties":
        merged = generalized_task_arithmetic(
            coefficients,
            zero,
            weights,
            sparsification="magnitude",
            consensus=True,
            densities=densities,
            normalize=True,
            lambda_=lambda_,
        )
    else:
        merged = generalized_task_arithmetic(coefficients, zero, weights, normalize=True, lambda_=lambda_)
    return basis.to(torch.float32).contiguous(), merged.to(torch.float32).contiguous()


def updated(base: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """W + B @ A: the base weight with a merged update (B, A) from merged_factors, in float32."""
    b, a = factors
    return base.to(torch.float32) + b @ a


def _check(params: dict) -> str | None:
    if params["merge"] not in MERGES:
        return f"merge must be one of {', '.join(MERGES)} (how the coefficient matrices are merged), not '{params['merge']}'"
    rank = params["rank"]
    if rank < 0 or rank != int(rank):
        return f"rank must be a whole number of directions, at least 1 (or 0: every direction), got {rank}"
    for density in params["density"]:
        if not 0 < density <= 1:
            return f"density must be in (0, 1] (the share of each coefficient matrix TIES keeps), got {density}"
    if any(weight < 0 for weight in params["weight"]) or sum(params["weight"]) <= 0:
        return f"the models' weights {params['weight']} must be at least 0 and not all 0"
    return None


def apply_knots(tensors, base, params):
    """`tensors`: each model's update factors in turn, L_1, R_1, L_2, R_2, ... (None, None for a model that leaves
    the tensor alone); `base`: the base weight."""
    factors = merged_factors(
        list(tensors[0::2]),
        list(tensors[1::2]),
        params["weight"],
        params["merge"],
        params["density"],
        params["lambda"],
        int(params["rank"]),
    )
    return updated(base, factors)


register(
    MergeMethod(
        name="knots",
        apply=apply_knots,
        parameters=(
            Parameter("merge", default="ties", kind="name"),
            Parameter("density", default=1.0, per_model=True),
            Parameter("weight", default=1.0, per_model=True),
            Parameter("lambda", default=1.0),
            Parameter("rank", default=0),
        ),
        description="LoRA adapters of one base merged in the shared SVD basis of their updates (Stoica et al. 2025)",
        check=_check,
        adapters=True,
    )
)
