"""Order the work so that tensors sharing an input run back to back (and the steps of a chain in their order), and
predict resident memory: a function of the plan alone, which `compose plan` shows and the executor follows."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from composer.plan.model import Chain, Plan, PlannedTensor, TensorRef


@dataclass
class Schedule:
    order: list[PlannedTensor]
    uses: Counter  # TensorRef -> how many scheduled tensors read it
    peak_bytes: int
    largest_step_bytes: int
    carried_bytes: int = (
        0  # the most that chains hold at once between their steps (kept out of the input cache's share)
    )


def _input_rank(plan: Plan) -> dict[TensorRef, tuple[int, int]]:
    model_rank = {model: i for i, model in enumerate(plan.sources)}
    name_rank = {
        model: {name: i for i, name in enumerate(source.tensor_infos())} for model, source in plan.sources.items()
    }
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
    return (
        tensor.nbytes + int(operation.buffers([info.dtype for info in infos]) * count * size) + operation.working_bytes
    )


def _chains(order: list[PlannedTensor]) -> dict[Chain, list[int]]:
    """Each chain's steps, as positions in `order`."""
    members: dict[Chain, list[int]] = {}
    for position, tensor in enumerate(order):
        if tensor.operation.chain is not None:
            members.setdefault(tensor.operation.chain, []).append(position)
    return members


def _follow_chains(order: list[PlannedTensor]) -> list[int]:
    """Put each chain's steps in their order (in the places its steps took), and return the bytes that chains hold
    at each step: a chain's state lives from its first step to its last."""
    carried = [0] * len(order)
    for chain, positions in _chains(order).items():
        for position, tensor in zip(positions, sorted((order[p] for p in positions), key=lambda t: t.operation.link)):
            order[position] = tensor
        for position in range(positions[0], positions[-1] + 1):
            carried[position] += chain.state_bytes
    return carried


def chains_to_redo(tensors: list[PlannedTensor], finished: set[str]) -> set[str]:
    """The finished tensors whose chain has steps still to do: those steps need the state the finished ones hand on."""
    open_chains = {t.operation.chain for t in tensors if t.operation.chain is not None and t.name not in finished}
    return {t.name for t in tensors if t.name in finished and t.operation.chain in open_chains}


def make_schedule(plan: Plan, memory_budget: int | None = None) -> Schedule:
    ranks = _input_rank(plan)
    # a step that reads nothing (random numbers, constants) goes first
    order = sorted(plan.tensors, key=lambda t: min((ranks[ref] for ref in t.inputs), default=(-1, 0)))
    carried = _follow_chains(order)
    uses = Counter(ref for tensor in order for ref in tensor.inputs)
    size = {ref: plan.sources[ref.model].tensor_infos()[ref.name].nbytes for ref in uses}
    remaining = Counter(uses)
    cached: set[TensorRef] = set()
    peak = largest = 0
    most_carried = max(carried, default=0)
    for position, tensor in enumerate(order):
        cached.update(tensor.inputs)
        step = step_bytes(plan, tensor)
        largest = max(largest, step + sum(size[ref] for ref in set(tensor.inputs)))
        peak = max(peak, step + sum(size[ref] for ref in cached) + carried[position])
        for ref in tensor.inputs:
            remaining[ref] -= 1
            if remaining[ref] == 0:
                cached.discard(ref)
        if memory_budget is not None:
            peak = min(peak, max(memory_budget, largest + most_carried))
    return Schedule(order, uses, peak, largest, most_carried)


def describe_dtype(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "-"
