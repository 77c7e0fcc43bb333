"""The merges `--optimizer gradient` back-propagates through: the formulas of composer/methods, written with torch
operations that autograd follows, taking tensors (not floats) for the numbers being tuned.

The methods' own paths write into preallocated buffers a cache-sized chunk at a time and read their numbers as
Python floats, which autograd cannot follow; these are the same formulas, whole tensors at a time, in float32:
- linear: sum_i w_i x_i (/ sum_i w_i when normalize);
- passthrough: scale x;
- slerp: sin((1 - t) theta)/sin(theta) base + sin(t theta)/sin(theta) x, theta the angle between the two
  (lerp where they are nearly parallel or one has no direction), as composer.methods.slerp decides;
- the task-arithmetic family: base + lambda * sum_i w_i E_i / D, where E_i is model i's task vector after its
  sparsification and the TIES sign election, and D = sum_i w_i K_i (K_i: where E_i was kept; 1 where nothing
  was) or sum_i w_i without election. Masks and elected signs are those of the start point: they are computed
  once with the start numbers, by the methods' own sparsify_ and sign election, and held fixed, so the merge is a
  smooth function of the weights and lambda around the start point;
- a LiNeS scale s (plan argument `lines scale`): base + s (merge - base).
Tests check each against the method's output at a point."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from composer.methods.slerp import SLERP_PARALLEL_THRESHOLD
from composer.methods.task_arithmetic.draws import make_generator
from composer.methods.task_arithmetic.settings import task_merge
from composer.methods.task_arithmetic.sparsify import sparsify_
from composer.methods.task_arithmetic.steps import task_vectors
from composer.plan.lines import LINES_SCALE

# (sparsification, sign election) of each member of the task-arithmetic family
TASK_MEMBERS = {
    "task_arithmetic": (None, False),
    "ties": ("magnitude", True),
    "dare_ties": ("random", True),
    "dare_linear": ("random", False),
    "breadcrumbs": ("magnitude_outliers", False),
    "breadcrumbs_ties": ("magnitude_outliers", True),
    "della": ("della_magprune", True),
    "della_linear": ("della_magprune", False),
}
# the parameters of each method the merge is differentiable in (a LiNeS scale, of any method, too)
DIFFERENTIABLE = {
    "linear": {"weight"},
    "passthrough": {"scale"},
    "slerp": {"t"},
    **{name: {"weight", "lambda"} for name in TASK_MEMBERS},
}


def _number(value) -> torch.Tensor | float:
    return value if isinstance(value, torch.Tensor) else float(value)


def linear(tensors: Sequence[torch.Tensor], weights: Sequence, normalize: bool) -> torch.Tensor:
    total = sum(_number(weight) * tensor for weight, tensor in zip(weights, tensors))
    return total / sum(_number(weight) for weight in weights) if normalize else total


def slerp(base: torch.Tensor, other: torch.Tensor, t, eps: float = 1e-8) -> torch.Tensor:
    with torch.no_grad():  # the angle depends on the tensors only
        a, b = base.reshape(-1).double(), other.reshape(-1).double()
        norm_a, norm_b = float(a.norm()), float(b.norm())
        cosine = max(-1.0, min(1.0, float(a @ b) / (norm_a * norm_b))) if norm_a >= eps and norm_b >= eps else 1.0
    t = _number(t)
    if abs(cosine) > SLERP_PARALLEL_THRESHOLD:
        return base + t * (other - base)
    theta = math.acos(cosine)
    t = t if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.float64)
    return torch.sin((1 - t) * theta) / math.sin(theta) * base + torch.sin(t * theta) / math.sin(theta) * other


def kept_task_vectors(
    label: str, tensors: Sequence[torch.Tensor], base: torch.Tensor, start: dict
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(E, K): the stacked task vectors as the method keeps them at the start numbers (`start`: its arguments there),
    after sparsification and sign election, and where each was kept (None without a sign election)."""
    sparsification, consensus = TASK_MEMBERS[label]
    with torch.no_grad():
        weights = [float(weight) for weight in start["weight"]]
        merge = task_merge(
            tensors,
            base,
            weights,
            sparsification=sparsification,
            consensus=consensus,
            densities=start.get("density"),
            gammas=start.get("gamma"),
            epsilons=start.get("epsilon"),
            rescale=bool(start.get("rescale")),
            generator=make_generator(start.get("seed", 0) or 0)
            if sparsification in ("random", "della_magprune")
            else None,
        )
        deltas = task_vectors(tensors, base)
        if sparsification is not None:
            for i in range(len(tensors)):
                sparsify_(
                    deltas[i],
                    sparsification,
                    merge.densities[i],
                    merge.rescale,
                    merge.gammas[i],
                    merge.epsilons[i],
                    merge.generator,
                )
        if not consensus:
            return deltas, None
        weighted = deltas * torch.tensor(weights, dtype=deltas.dtype).reshape((-1,) + (1,) * base.dim())
        sign = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
        kept = (weighted * sign) > 0
        return deltas * kept, kept.to(deltas.dtype)


def task_arithmetic(
    label: str, tensors: Sequence[torch.Tensor], base: torch.Tensor, start: dict, arguments: dict
) -> torch.Tensor:
    kept, where = kept_task_vectors(label, tensors, base, start)
    weights = [_number(weight) for weight in arguments["weight"]]
    merged = sum(weight * vector for weight, vector in zip(weights, kept))
    if arguments.get("normalize"):
        if where is None:
            divisor = sum(weights)
            if abs(float(divisor)) < 1e-8:
                divisor = 1.0
        else:
            divisor = sum(weight * mask for weight, mask in zip(weights, where))
            divisor = torch.where(where.sum(dim=0) == 0, torch.ones_like(divisor), divisor)
        merged = merged / divisor
    return base + _number(arguments.get("lambda", 1.0)) * merged


def merge(label: str, inputs: list[torch.Tensor], start: dict, arguments: dict) -> torch.Tensor:
    """The output tensor of a plan operation `label` (a method's name) on `inputs` (float32, in the plan's order: the
    other models, then the base where the method takes one), with `arguments` (numbers or tensors) and the
    operation's arguments at the start point `start`."""
    if label == "linear":
        result = linear(inputs, arguments["weight"], bool(arguments.get("normalize", True)))
    elif label == "passthrough":
        scale = arguments["scale"][0]
        result = inputs[0] if scale is None else _number(scale) * inputs[0]
    elif label == "slerp":
        result = slerp(inputs[-1], inputs[0], arguments["t"])
    else:
        result = task_arithmetic(label, inputs[:-1], inputs[-1], start, arguments)
    if LINES_SCALE in arguments:
        base = inputs[-1]
        result = base + _number(arguments[LINES_SCALE]) * (result - base)
    return result
