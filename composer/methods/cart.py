"""CART, centred arithmetic with rank-reduced task vectors (Choi, Kim, Lee and Hong, "Revisiting Weight Averaging
for Model Merging", arXiv:2412.12153, 2024)."""

from __future__ import annotations

import torch

from composer.methods.registry import Parameter, registered
from composer.methods.subspace import (
    LAMBDA,
    RANK,
    fraction_problem,
    is_matrix,
    rank_problem,
    rank_shape_problem,
    resolved_rank,
)
from composer.methods.svd import top_singular, working_dtype


def cart(
    tensors: list[torch.Tensor], lambda_: float = 1.0, rank: float | None = None, rank_fraction: float = 0.08
) -> torch.Tensor:
    """For a weight matrix, with the models x_1 .. x_n and r the matrix's smaller side:

        x_bar = (1/n) sum_i x_i                          (weight averaging)
        y = x_bar + lambda * sum_i SVD_k(x_i - x_bar)    (SVD_k: the best rank-k approximation)

    The task vectors are centred on the average rather than on the pre-trained model; centred, their top
    singular vectors hold what is specific to each task and the rest is noise between them, so keeping a low
    rank k of each removes the interference. k is `rank` when given (at most r), else int(rank_fraction * r)
    (at least 1); the paper finds about 8% of the rank best. At full rank the centred vectors sum to zero and
    the merge is the average; with two models it is the average at every rank (the two centred vectors are
    each other's negatives, and so are their truncations); one model is returned as it is.

    CART does not use the pre-trained model: a base_model, when the recipe names one, is left out of the
    average and only serves LiNeS. Every other tensor: the average x_bar (the centred vectors of a tensor that
    is not a matrix are kept whole, and they sum to zero).
    """
    dtype = working_dtype(tensors[0].dtype)
    average = tensors[0].to(dtype, copy=True)
    for tensor in tensors[1:]:
        average += tensor
    average /= len(tensors)
    if not is_matrix(average) or len(tensors) == 1:
        return average.to(tensors[0].dtype)
    rows, columns = average.shape
    k = resolved_rank(rank, rank_fraction, min(rows, columns))
    if k > min(rows, columns):
        raise ValueError(
            f"rank {k} is larger than this {rows} x {columns} matrix allows (at most {min(rows, columns)})"
        )
    lefts, rights = [], []  # each truncation's factors, added to the average once all are taken
    for tensor in tensors:
        u, s, vh = top_singular(torch.sub(tensor, average), k)
        lefts.append(u * s)
        rights.append(vh)
        del u, s, vh
    return average.addmm_(torch.cat(lefts, 1), torch.cat(rights), alpha=lambda_).to(tensors[0].dtype)


def _check(params: dict) -> str | None:
    return rank_problem(params) or fraction_problem(params, "rank_fraction")


@registered(
    "cart",
    (LAMBDA, RANK, Parameter("rank_fraction", default=0.08)),
    optional_base=True,
    description="CART: the average plus a low-rank part of each model's difference from it (Choi et al. 2024)",
    check=_check,
    check_shape=rank_shape_problem,
    float32_work=True,
    # the average (which becomes the result), a centred vector, the SVD's copy, factors and workspace (exact at
    # high ranks), and the inputs in the compute dtype (measured at 8%: 2.9 beside inputs and result on a
    # 1500 x 1500 matrix; 2.8 on a 32000 x 2048 one, its bfloat16 sketch copy included)
    temporaries=lambda count, params: 5 + count + 1,
)
def apply_cart(tensors, base, params):
    return cart(tensors, params["lambda"], params["rank"], params["rank_fraction"])
