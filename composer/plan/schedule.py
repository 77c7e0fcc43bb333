"""Order the work so that tensors sharing an input run back to back, and predict resident memory: a function of
the plan alone, which `compose plan` shows and the executor follows."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from composer.plan.model import Plan, PlannedTensor, TensorRef


@dataclass
class Schedule:
    order: list[PlannedTensor]
    uses: Counter  # TensorRef -> how many scheduled tensors read it
    peak_bytes: int
    largest_step_bytes: int


def _input_rank(plan: Plan) -> dict[TensorRef, tuple[int, int]]:
    model_rank = {model: i for i, model in enumerate(plan.sources)}
    name_rank = {model: {name: i for i, name in enumerate(source.tensor_infos())} for model, source in plan.sources.items()}
    ranks = {}
    for tensor in plan.tensors:
        for ref in tensor.inputs:
            ranks[ref] = (model_rank[ref.model], name_rank[ref.model].get(ref.name, 0))
    return ranks


def step_bytes(plan: Plan, tensor: PlannedTensor) -> int:
    """Memory one step needs beyond cached inputs: the output, and the buffers its operation holds (inputs converted
    to its compute dtype and its temporaries; for a fused stage, every nested step's as well)."""
    infos = [plan.sources[ref.model].tensor_infos()[ref.name] for ref in tensor.inputs]
    count = tensor.nbytes // tensor.dtype.itemsize
    operation = tensor.operation
    size = (operation.working_dtype or operation.compute_dtype or tensor.dtype).itemsize
    return tensor.nbytes + int(operation.buffers([info.dtype for info in infos]) * count * size)


def make_schedule(plan: Plan, memory_budget: int | None = None) -> Schedule:
    ranks = _input_rank(plan)
    order = sorted(plan.tensors, key=lambda t: min(ranks[ref] for ref in t.inputs))
    uses = Counter(ref for tensor in order for ref in tensor.inputs)
    size = {ref: plan.sources[ref.model].tensor_infos()[ref.name].nbytes for ref in uses}
    remaining = Counter(uses)
    cached: set[TensorRef] = set()
    peak = largest = 0
    for tensor in order:
        cached.update(tensor.inputs)
        step = step_bytes(plan, tensor)
        largest = max(largest, step + sum(size[ref] for ref in set(tensor.inputs)))
        peak = max(peak, step + sum(size[ref] for ref in cached))
        for ref in tensor.inputs:
            remaining[ref] -= 1
            if remaining[ref] == 0:
                cached.discard(ref)
        if memory_budget is not None:
            peak = min(peak, max(memory_budget, largest))
    return Schedule(order, uses, peak, largest)


def describe_dtype(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "-"
