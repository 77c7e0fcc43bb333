"""A plan split into units of work for a cluster: each unit is a set of output tensors that one worker computes and
writes into the shards the driver laid out. A unit is one output shard, or a run of tensors within a shard when the
shards are too few or too large to keep every worker busy; the steps of a chain (state handed from one step to the
next) always form one unit of their own. Nothing here knows of Ray."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from composer.execute.writer import shard_layout
from composer.plan.model import Plan, PlannedTensor, TensorRef
from composer.sources.digests import weight_files_of

UNITS_PER_SLOT = 4  # units per worker slot at least, so that the last units do not leave most workers idle
SMALLEST_UNIT = 64 << 20  # bytes: below this a unit's fixed costs (a task, opening shards) outweigh its balance


@dataclass(frozen=True)
class Unit:
    number: int
    tensors: tuple[str, ...]
    nbytes: int  # bytes it writes
    read_bytes: int  # bytes of the inputs it reads (each input once)
    files: tuple[str, ...]  # the input files it reads: a node that has read them already is the place for it
    chained: bool  # it holds a chain's steps, which must run in one process, in order

    def describe(self) -> str:
        first = self.tensors[0]
        more = f" and {len(self.tensors) - 1} more" if len(self.tensors) > 1 else ""
        return f"unit {self.number} ('{first}'{more})"


def unit_limit(total_bytes: int, slots: int, unit_size: int | None) -> int:
    """The most output bytes in one unit: `unit_size` if given, else enough units for every slot several times."""
    if unit_size is not None:
        return max(1, unit_size)
    return max(SMALLEST_UNIT, -(-total_bytes // max(1, UNITS_PER_SLOT * slots)))


class InputFiles:
    """The file an input tensor is read from (all of its model's weight files where its source cannot say)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._whole: dict[str, tuple[str, ...]] = {}

    def of(self, ref: TensorRef) -> tuple[str, ...]:
        source = self.plan.sources[ref.model]
        located = source.byte_range(ref.name)
        if located is not None:
            return (str(located[0]),)
        if ref.model not in self._whole:
            paths = weight_files_of(source) or list(source.input_paths().values())
            self._whole[ref.model] = tuple(str(path) for path in paths)
        return self._whole[ref.model]


def _unit(number: int, members: list[PlannedTensor], plan: Plan, files: InputFiles) -> Unit:
    refs = {ref for tensor in members for ref in tensor.inputs}
    infos = {ref: plan.sources[ref.model].tensor_infos()[ref.name] for ref in refs}
    read = sorted({path for ref in refs for path in files.of(ref)})
    return Unit(
        number,
        tuple(tensor.name for tensor in members),
        sum(tensor.nbytes for tensor in members),
        sum(info.nbytes for info in infos.values()),
        tuple(read),
        any(tensor.operation.chain is not None for tensor in members),
    )


def partition(plan: Plan, shard_size: int, slots: int, unit_size: int | None = None) -> list[Unit]:
    """The plan's tensors as units of work: each chain whole (first: a chain runs its steps one after another, so it
    is the longest piece of work), then each shard's other tensors in runs of at most `unit_limit` bytes."""
    limit = unit_limit(plan.output_bytes(), slots, unit_size)
    groups: list[list[PlannedTensor]] = []
    chains: dict[object, list[PlannedTensor]] = {}
    for tensor in plan.tensors:
        if tensor.operation.chain is not None:
            chains.setdefault(tensor.operation.chain, []).append(tensor)
    groups += chains.values()
    for _, members in shard_layout(plan.tensors, shard_size, plan.weights_file):
        run: list[PlannedTensor] = []
        filled = 0
        for tensor in members:
            if tensor.operation.chain is not None:
                continue
            if run and filled + tensor.nbytes > limit:
                groups.append(run)
                run, filled = [], 0
            run.append(tensor)
            filled += tensor.nbytes
        if run:
            groups.append(run)
    files = InputFiles(plan)
    return [_unit(number, members, plan, files) for number, members in enumerate(groups)]


def input_files(plan: Plan) -> dict[str, int]:
    """Every local file the plan's tensors are read from, with its size: what each node must be able to read. Files in
    the hub's cache are left out: each node fetches those into its own cache as it builds the plan."""
    from composer.sources.hub import in_hub_cache

    found: dict[str, int] = {}
    for source in plan.sources.values():
        for path in weight_files_of(source):
            if in_hub_cache(path):
                continue
            try:
                found[str(path)] = Path(path).stat().st_size
            except OSError:
                found[str(path)] = -1
    return found
