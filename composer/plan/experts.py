"""A merge of tensors that hold every expert of a layer at once (fused MoE weights), done expert by expert: each
expert's slice is split into the per-expert tensors it holds and each is merged on its own, with the parameters and
random draws that tensor gets in a per-expert checkpoint, so that both layouts of one model merge alike."""

from __future__ import annotations

from dataclasses import replace

import torch

from composer.architecture_experts import FusedTensor
from composer.plan.model import Operation


def expert_by_expert(fused: FusedTensor, steps: list[list[Operation]], whole: Operation) -> Operation:
    """`whole` (the method applied to the fused tensors as they are) applied instead as `steps[e][k]` to piece k of
    expert e of every input, the results put back together in the fused layout."""

    def run(inputs: list[torch.Tensor]) -> torch.Tensor:
        merged = []
        for expert, pieces in enumerate(steps):
            parts = [[part.contiguous() for part in fused.split(tensor[expert])] for tensor in inputs]
            merged.append(fused.join([step.fn([own[k] for own in parts]) for k, step in enumerate(pieces)]))
        return torch.stack(merged)

    return replace(
        whole,
        fn=run,
        arguments=dict(whole.arguments, experts=f"{len(steps)}, each merged on its own"),
        temporaries=whole.temporaries + 2,  # the merged experts and their stack
        verbatim=False,
    )
