"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023,
arXiv:2212.09849) and RegMean++ (Nguyen et al. 2025, arXiv:2508.03121): each linear layer merged in closed form
from the Gram matrices of its inputs on a calibration text.

A linear layer y = x W^T (W: [out, in], as torch stores it) of model i sees the inputs X_i ([tokens, in]) on the
calibration text; its Gram matrix is G_i = X_i^T X_i. The merged W minimises sum_i w_i ||X_i W^T - X_i W_i^T||^2,
whose solution is

    W^T = (sum_i w_i G~_i)^-1 sum_i w_i G~_i W_i^T,     G~_i = alpha G_i + (1 - alpha) diag(G_i)

(the paper's W = (sum G_i)^-1 sum G_i W_i in torch's layout, with its off-diagonal scaling alpha of the Gram
matrices, which keeps the sum well conditioned; alpha = 1 is the plain regression, alpha = 0 a per-input-feature
weighted average). With equal weights w_i = 1 this is the paper's formula.

RegMean++ has the same formula; only the inputs differ: RegMean runs each model on the text through its own earlier
layers, RegMean++ runs each model's layer on what the already-merged earlier layers hand it. Where the Gram
matrices come from is the planner's business (`MergeMethod.calibration`); this module only has the formula.
Tensors that are not a linear layer's weight (embeddings, norms, biases, the head) are merged by the `fallback`
method instead.
"""

from __future__ import annotations

import torch

from composer.methods.registry import METHODS, MergeMethod, Parameter, register

DEFAULT_ALPHA = 0.9


def scaled_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha G + (1 - alpha) diag(G): the off-diagonal entries scaled by alpha, the diagonal kept."""
    scaled = gram * alpha
    scaled.diagonal().copy_(gram.diagonal())
    return scaled


def regmean(
    weights: list[torch.Tensor],
    grams: list[torch.Tensor],
    alpha: float = DEFAULT_ALPHA,
    model_weights: list[float] | None = None,
) -> torch.Tensor:
    """The RegMean merge of linear weights `weights` ([out, in] each) whose inputs have Gram matrices `grams`
    ([in, in] each): (sum_i w_i G~_i W_i^T)^T (sum_i w_i G~_i)^-1, solved in float64, returned in float32.

    A sum that is singular (an input feature no token ever used) is solved in the least-squares sense (the
    pseudo-inverse), which leaves the merged weight's column for that feature at zero."""
    if len(weights) != len(grams):
        raise ValueError(f"regmean: {len(weights)} weights but {len(grams)} Gram matrices")
    if not 0 <= alpha <= 1:
        raise ValueError(f"regmean: alpha must be in [0, 1], got {alpha}")
    model_weights = [1.0] * len(weights) if model_weights is None else model_weights
    inputs = weights[0].shape[1]
    total = torch.zeros(inputs, inputs, dtype=torch.float64, device=weights[0].device)
    right = torch.zeros(inputs, weights[0].shape[0], dtype=torch.float64, device=weights[0].device)
    for weight, gram, factor in zip(weights, grams, model_weights):
        if gram.shape != (inputs, inputs) or weight.shape[1] != inputs:
            raise ValueError(
                f"regmean: a weight of shape {list(weight.shape)} needs a Gram matrix of shape [{inputs}, {inputs}], "
                f"got {list(gram.shape)}"
            )
        scaled = scaled_gram(gram.to(torch.float64), alpha) * factor
        total += scaled
        right += scaled @ weight.to(torch.float64).T
        del scaled
    solved, info = torch.linalg.solve_ex(total, right)
    if int(info) != 0 or not bool(torch.isfinite(solved).all()):
        solved = torch.linalg.lstsq(total, right, driver="gelsd" if total.device.type == "cpu" else None).solution
    return solved.T.to(torch.float32).contiguous()


def _check(params: dict) -> str | None:
    if not 0 <= params["alpha"] <= 1:
        return f"alpha must be in [0, 1] (the scale of the Gram matrices' off-diagonal entries), got {params['alpha']}"
    fallback = METHODS.get(params["fallback"])
    if fallback is None or fallback.calibration is not None or fallback.adapters:
        usable = sorted(
            name
            for name, method in METHODS.items()
            if method.calibration is None and not method.adapters and method.blends
        )
        return (
            f"fallback '{params['fallback']}' is not a data-free merge method; the tensors that are not a linear layer's "
            f"weight need one of {', '.join(usable)}"
        )
    if any(weight < 0 for weight in params["weight"]) or sum(params["weight"]) <= 0:
        return f"the models' weights {params['weight']} must be at least 0 and not all 0"
    return None


def apply_regmean(tensors, base, params):
    """The merged linear weight of `tensors`, with their Gram matrices in params["grams"] (same order)."""
    return regmean(tensors, params["grams"], params["alpha"], params["weight"])


PARAMETERS = (
    Parameter("alpha", default=DEFAULT_ALPHA),
    Parameter("fallback", default="linear", kind="name"),
    Parameter("weight", default=1.0, per_model=True),
)

for _name, _source, _paper in (
    ("regmean", "own", "each model's own earlier layers (Jin et al. 2023)"),
    ("regmean_plusplus", "merged", "the already-merged earlier layers (RegMean++, Nguyen et al. 2025)"),
):
    register(
        MergeMethod(
            name=_name,
            apply=apply_regmean,
            parameters=PARAMETERS,
            optional_base=True,
            description=f"each linear layer solved from its inputs' Gram matrices on calibration text, inputs from {_paper}",
            check=_check,
            calibration=_source,
        )
    )
