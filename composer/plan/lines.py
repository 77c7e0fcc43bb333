"""LiNeS (Wang et al. 2024, "LiNeS: Post-training layer scaling prevents forgetting and enhances model merging"): the
task vector of the merge (its output minus the base) is scaled by depth, alpha at the first layer rising linearly
to beta at the last,

    y_l = base_l + s_l (merge_l - base_l),   s_l = alpha + (beta - alpha) l / (L - 1),

l the output layer's index and L the number of output layers (a one-layer model takes beta). Tensors before the
layers (embeddings) take alpha, those after them (final norm, head) beta."""

from __future__ import annotations

from dataclasses import replace

import torch

from composer.plan.model import Operation
from composer.recipe.parameters import layer_t

LINES_SCALE = "lines scale"  # the plan argument holding a tensor's scale


def lines_scale(alpha: float, beta: float, index: int, count: int) -> float:
    return alpha + (beta - alpha) * layer_t(index, count)


def scaled_by_depth(operation: Operation, scale: float) -> Operation:
    """`operation` with its task vector scaled by `scale`; its last input is the base. A scale of 1 changes nothing."""
    if scale == 1:
        return operation

    def run(inputs: list[torch.Tensor]) -> torch.Tensor:
        merged = operation.fn(inputs)
        base = inputs[-1].to(
            torch.float32
        )  # not in place: the inputs (and a merge that returns one of them) stay as read
        return torch.add(base, merged.to(torch.float32) - base, alpha=scale).to(merged.dtype)

    return replace(
        operation,
        fn=run,
        arguments=dict(operation.arguments, **{LINES_SCALE: scale}),
        temporaries=operation.temporaries + 2,
        copies=False,
        verbatim=False,
    )
