"""WUDI merging (Cheng, Xiong, Wei, Zhu and Yuan, "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors", ICML 2025, arXiv:2503.08099; the authors' code:
github.com/nathanielyvo/WUDI-Merging)."""

from __future__ import annotations

import math

import torch

from composer.methods.registry import Parameter, registered
from composer.methods.subspace import LAMBDA, is_matrix, mean_task_vector_merge, plus_scaled
from composer.methods.svd import working_dtype

STEPS = 300  # the authors' code: iter_num = 300 (vit/wudi_main.py, nlp_roberta/lamassu.py)
LEARNING_RATE = 1e-5  # the authors' ViT code (their RoBERTa code uses 2e-5); Adam's betas and eps are torch's defaults
BETAS = (0.9, 0.999)
EPS = 1e-8


def wudi(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    lambda_: float = 1.0,
    steps: int = STEPS,
    learning_rate: float = LEARNING_RATE,
) -> torch.Tensor:
    """For a weight matrix ([out, in], as torch stores a linear layer's), with task vectors tau_i = x_i - base
    (i = 1..n), the merged task vector tau_m minimises

        L(tau_m) = sum_i (1 / ||tau_i||_F^2) || (tau_m - tau_i) tau_i^T ||_F^2          (the paper's objective)

    by `steps` steps of Adam (lr `learning_rate`, betas (0.9, 0.999), eps 1e-8, no weight decay) from
    tau_m = sum_i tau_i, and y = base + lambda * tau_m. The paper shows that a linear layer's task vector is
    close to a linear combination of the inputs the layer saw in fine-tuning, so the rows of tau_i stand in for
    task i's inputs: L bounds the interference, the change that merging causes in the layer's outputs on each
    task's inputs, each task weighted by 1/||tau_i||^2 so that none dominates by the size of its update. No data and no scaling
    coefficient are needed (lambda is 1 in the paper).

    The gradient is the exact gradient of L, 2 sum_i w_i (tau_m - tau_i) tau_i^T tau_i with w_i = 1/||tau_i||^2,
    taken from quantities fixed before the first step:

        M = sum_i w_i tau_i^T tau_i ([in, in]),   T = sum_i w_i tau_i tau_i^T tau_i,   grad = 2 (tau_m M - T)

    (one [out, in] x [in, in] product a step, whatever n), or, for a matrix much wider than n times its
    height, 2 ((tau_m S^T) S - T) with S the stacked sqrt(w_i) tau_i ([n out, in]), which is cheaper there.
    The authors' code runs autograd on L itself; the steps are the same up to float rounding. 300 steps of
    1e-5 are an early stop, not convergence: each entry moves at most about steps * lr from the sum. On SmolLM2
    fine-tunes (entries around 5e-4) they lower L about tenfold from the sum's, to within 1.5x of its minimum,
    while the result stays nearer the sum than the exact minimiser tau_m = T M^-1, which lies far out along
    directions L hardly weighs (M is ill-conditioned, singular where n out < in). With one model the sum is the minimiser (L = 0) and the model is
    returned without a step; a task vector that is all zeros (its weight 1/0 undefined) is left out of L; it adds
    nothing to the sum. `steps: 0` gives task arithmetic's sum. Deterministic: there is nothing random.

    Every other tensor (norms, biases, tensors of 3 or more dimensions): base + lambda * mean_i tau_i, the
    rule of FusionBench's WUDI (the authors' ViT script only merges the blocks' linear layers and keeps the
    pre-trained values for the rest). A method sees shapes, not names, so embedding and LM-head matrices are
    optimised as linear layers too; set `steps: 0` for them with a filter to take the sum instead.
    """
    if not is_matrix(base):
        return mean_task_vector_merge(tensors, base, lambda_)
    dtype = working_dtype(base.dtype)
    count, (rows, columns) = len(tensors), base.shape
    work_base = base.to(dtype)
    merged = torch.zeros(rows, columns, dtype=dtype, device=base.device)
    target = torch.zeros_like(merged)
    metric = stacked = None
    if steps > 0 and columns <= 2 * count * rows:
        metric = torch.zeros(columns, columns, dtype=dtype, device=base.device)
    elif steps > 0:
        stacked = torch.zeros(count * rows, columns, dtype=dtype, device=base.device)
    weighted = 0  # task vectors in L (those that are not all zeros)
    for i, tensor in enumerate(tensors):
        # the difference in the working dtype without a converted copy of the input (promotion does it on the fly)
        tau = torch.sub(tensor, work_base, out=None if stacked is None else stacked[i * rows : (i + 1) * rows])
        merged += tau
        norm = float(torch.linalg.vector_norm(tau))
        if steps == 0 or norm == 0:
            continue
        weighted += 1
        unit = tau.div_(norm)  # sqrt(w_i) tau_i; w_i tau_i tau_i^T tau_i = norm * unit unit^T unit
        if columns <= rows:
            gram = unit.mT @ unit
            target.addmm_(unit, gram, alpha=norm)
            if metric is not None:
                metric += gram
            del gram
        else:
            target.addmm_(unit @ unit.mT, unit, alpha=norm)
            if metric is not None:
                metric.addmm_(unit.mT, unit)
        del tau, unit
    if weighted > 1:  # with one task vector in L the sum is its minimiser (L = 0 there)
        _descend(merged, target, metric, stacked, steps, learning_rate)
    del target, metric, stacked
    return plus_scaled(base, merged, lambda_)


def _descend(
    merged: torch.Tensor,
    target: torch.Tensor,
    metric: torch.Tensor | None,
    stacked: torch.Tensor | None,
    steps: int,
    learning_rate: float,
) -> None:
    """`steps` Adam steps on `merged` in place, with the gradient 2 (merged M - T) (or 2 ((merged S^T) S - T)).

    Adam as torch.optim.Adam takes it (Kingma and Ba's update with bias corrections), written out here because
    torch's optimizer imports torch._dynamo on its first step, seconds of every merge's start-up; the gradient's
    buffer holds Adam's denominator once the moments have taken the gradient in, so the steps need no other."""
    beta1, beta2 = BETAS
    scratch = torch.empty_like(merged)
    first = torch.zeros_like(merged)
    second = torch.zeros_like(merged)
    for step in range(1, steps + 1):
        if metric is not None:
            torch.addmm(target, merged, metric, beta=-2, alpha=2, out=scratch)
        else:
            torch.mul(target, -2, out=scratch)
            scratch.addmm_(merged @ stacked.mT, stacked, alpha=2)
        first.lerp_(scratch, 1 - beta1)
        second.mul_(beta2).addcmul_(scratch, scratch, value=1 - beta2)
        denominator = torch.sqrt(second, out=scratch).div_(math.sqrt(1 - beta2**step)).add_(EPS)
        merged.addcdiv_(first, denominator, value=-learning_rate / (1 - beta1**step))


def _check(params: dict) -> str | None:
    steps = params["steps"]
    if steps != int(steps) or steps < 0:
        return f"'steps' must be a whole number of Adam steps (0 or more), not {steps}"
    if not params["learning_rate"] > 0 or not math.isfinite(params["learning_rate"]):
        return f"'learning_rate' must be a number above 0 (Adam's step size), not {params['learning_rate']}"
    return None


@registered(
    "wudi",
    (LAMBDA, Parameter("steps", default=STEPS), Parameter("learning_rate", default=LEARNING_RATE)),
    needs_base=True,
    description="WUDI: each weight matrix's task vectors merged by minimising their interference on inputs the task "
    "vectors stand in for, with Adam (Cheng et al. 2025)",
    check=_check,
    float32_work=True,
    # the merged task vector, the target, Adam's two moments and the gradient (which then holds Adam's
    # denominator); the [in, in] metric, at most 2n matrices' size (a wider matrix takes the stacked form, n of
    # them); and the base in the working dtype. Measured with two models, beside the inputs and the result: 5.3
    # float32 buffers on a 1500 x 1500 matrix (7.8 from bfloat16), 7.3 on 1000 x 2700, 9.0 on 300 x 3000 (stacked)
    temporaries=lambda count, params: 5 + 2 * count + 1,
)
def apply_wudi(tensors, base, params):
    return wudi(tensors, base, params["lambda"], int(params["steps"]), params["learning_rate"])
