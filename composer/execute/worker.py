"""What a cluster's worker does (composer.execute.cluster sends these functions to it; nothing here knows of Ray).

A worker builds the driver's plan again from the same recipe and inputs (and checks it is the same plan), opens the
sources itself, and runs units of work through the executor's one loop (`stream_tensors`) under its own memory
budget, writing into the shards the driver laid out in the output's partial folder. Each try of a unit journals its
finished tensors into a file of its own, so a unit cut short is resumed from what it finished.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

# before torch loads in this process: idle OpenMP threads otherwise spin on the cores the reader and writer threads need
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from composer.errors import ComposerError  # noqa: E402

if TYPE_CHECKING:
    from composer.execute.executor import ExecutionOptions
    from composer.execute.units import Unit
    from composer.plan.model import Plan

PROBE_FILE = ".composer-probe"


@dataclass(frozen=True)
class PlanOrder:
    """How a worker gets the driver's plan: the plan's replay, and what the plan built there must match."""

    replay: tuple
    digest: str  # the driver's plan_digest
    metadata: dict[str, str]  # the shards' header metadata, as the driver wrote it (its provenance record)
    cwd: str  # the driver's working folder: relative model paths are resolved from it
    version: str  # the driver's composer


@dataclass(frozen=True)
class UnitJob:
    order: PlanOrder
    options: ExecutionOptions
    partial: str  # the output's partial folder
    identity: str  # the run's identity (each unit journal starts with it)
    unit: Unit
    attempt: int
    entries: dict[str, dict]  # journaled tensors of this unit from earlier tries or runs: checked, and kept if whole
    threads: int = 1  # torch threads for this unit's arithmetic
    crash_after: int | None = None  # a test's fault: after this many tensors the process exits (or the unit fails)
    crash_exits: bool = True  # the fault ends the process (as a killed worker); False: the unit raises an error


@dataclass
class UnitResult:
    number: int
    entries: dict[str, dict]  # every tensor of the unit, as journaled
    kept: list[str]  # tensors an earlier try or run finished, checked and kept
    bytes_read: int
    copied_bytes: int
    seconds: float
    nonfinite: list[str] = field(default_factory=list)
    reads: Counter = field(default_factory=Counter)


_PLANS: dict[str, Plan] = {}  # this process's plan, by digest: built once, used by every unit it runs


def _hidden(path: str, hidden: tuple[str, ...]) -> bool:
    return any(path == place or path.startswith(place.rstrip("/") + "/") for place in hidden)


def build_plan_again(order: PlanOrder, options: ExecutionOptions) -> Plan:
    """The driver's plan, built here from the same recipe and inputs; an error where it comes out otherwise."""
    from composer import __version__
    from composer.execute.executor import plan_digest

    if __version__ != order.version:
        raise ComposerError(
            f"this machine runs composer {__version__} and the driver composer {order.version}; install the same "
            "version on every node of the cluster."
        )
    if os.path.isdir(order.cwd):
        os.chdir(order.cwd)
    function, arguments = order.replay
    plan = function(*arguments)
    plan.shard_metadata = dict(order.metadata)
    if plan_digest(plan, options) != order.digest:
        plan.close()
        raise ComposerError(
            "the plan built here differs from the driver's, so the inputs it reads here are not the driver's (another "
            "version of a model at the same path, or another hub revision in this machine's cache). Give every node the "
            "same files."
        )
    return plan


def plan_here(order: PlanOrder, options: ExecutionOptions) -> Plan:
    """The driver's plan, built once in this process and kept for its next units."""
    plan = _PLANS.get(order.digest)
    if plan is None:
        forget_plan()
        plan = _PLANS[order.digest] = build_plan_again(order, options)
    return plan


def forget_plan() -> None:
    for plan in _PLANS.values():
        plan.close()
    _PLANS.clear()


def check_node(
    order: PlanOrder, options: ExecutionOptions, files: dict[str, int], hidden: tuple[str, ...]
) -> list[str]:
    """What this node cannot do of the run ("cannot read FILE (why)", "cannot build the plan: why"): each input file
    it cannot read or sees at another size, then the plan. Empty when it can do it all (its plan is kept for the units)."""
    problems = []
    for path, size in files.items():
        reason = _unreadable(path, size, hidden)
        if reason is not None:
            problems.append(f"cannot read {path} ({reason})")
    if problems:
        return problems
    try:
        plan_here(order, options)
    except ComposerError as error:
        return [f"cannot build the plan: {error}"]
    return []


def _unreadable(path: str, size: int, hidden: tuple[str, ...]) -> str | None:
    if _hidden(path, hidden):
        return "No such file or directory"
    try:
        with open(path, "rb") as handle:
            handle.read(1)
            found = os.fstat(handle.fileno()).st_size
    except OSError as error:
        return error.strerror or str(error)
    if size >= 0 and found != size:
        return f"{found} bytes there, {size} bytes where the run was planned"
    return None


def check_output(partial: str, token: str, hidden: tuple[str, ...]) -> str | None:
    """Why this node cannot write the output (None when it can): the driver's probe in the partial folder must be
    there, with the driver's token, and a file must be creatable beside it."""
    folder = Path(partial)
    try:
        if _hidden(partial, hidden):
            raise FileNotFoundError(2, "No such file or directory")
        found = (folder / PROBE_FILE).read_text()
    except OSError as error:
        return f"it cannot see the output's partial folder {folder} ({error.strerror or error})"
    if found != token:
        return f"its {folder} is not the driver's (another run's probe is there)"
    trial = folder / f".composer-write-{secrets.token_hex(4)}"
    try:
        trial.write_bytes(b"")
        trial.unlink()
    except OSError as error:
        return f"it cannot write into {folder} ({error.strerror or error})"
    return None


class UnitProgress:
    """The bar `stream_tensors` advances, on a worker: it only counts (and carries a test's fault)."""

    def __init__(self, crash_after: int | None, exits: bool):
        self.crash_after = crash_after
        self.exits = exits
        self.tensors = 0

    def update(self, _bytes: int) -> None:
        self.tensors += 1
        if self.crash_after is not None and self.tensors >= self.crash_after:
            if self.exits:
                os._exit(70)  # as a killed worker: no clean-up, no exception, the process gone
            raise RuntimeError(f"a test's fault after {self.tensors} tensors")

    def set_postfix_str(self, *_args, **_kwargs) -> None:
        pass


def unit_journal_name(number: int, attempt: int) -> str:
    return f"unit-{number:05d}-try-{attempt}.jsonl"


def run_unit(job: UnitJob) -> UnitResult:
    """Compute and write one unit of work into the partial folder. A unit holding a chain's steps gets a plan of its
    own: the chain's state lives in the plan's operations, and must start fresh (the plan a check built and no unit
    has used yet will do)."""
    started = time.perf_counter()
    fresh = job.unit.chained
    if fresh:  # this process's plan if it has one (its chains not yet run), never to be used again
        plan = _PLANS.pop(job.order.digest, None) or build_plan_again(job.order, job.options)
    else:
        plan = plan_here(job.order, job.options)
    try:
        return _write_unit(plan, job, started)
    except BaseException:
        forget_plan()  # a step cut short may leave state in its operation
        raise
    finally:
        if fresh:
            plan.close()


def _write_unit(plan: Plan, job: UnitJob, started: float) -> UnitResult:
    import torch

    from composer.execute.executor import still_to_do, stream_tensors
    from composer.execute.journal import UNITS_FOLDER, Journal, read_entries
    from composer.execute.writer import ShardedWriter
    from composer.plan.schedule import make_schedule

    options = job.options
    folder = Path(job.partial)
    journals = folder / UNITS_FOLDER
    journals.mkdir(exist_ok=True)
    name = unit_journal_name(job.unit.number, job.attempt)
    wanted = set(job.unit.tensors)
    schedule = make_schedule(plan, options.memory_budget)
    journal = Journal(journals, job.identity, fresh=True, name=name)
    writer = None
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, job.threads))
    try:
        writer = ShardedWriter(
            folder,
            plan.tensors,
            options.shard_size,
            options.durable,
            journal,
            single=plan.weights_file,
            metadata=plan.shard_metadata,
            only=wanted,
        )
        kept, order = still_to_do(plan, schedule, writer, job.entries, wanted)
        streamed = stream_tensors(
            plan, schedule, order, writer, options, UnitProgress(job.crash_after, job.crash_exits)
        )
        writer.sync()
    finally:
        torch.set_num_threads(previous_threads)
        if writer is not None:
            writer.close()
        journal.close()
    entries = {tensor: job.entries[tensor] for tensor in kept} | read_entries(journals, name)
    missing = wanted - set(entries)
    if missing:
        raise RuntimeError(f"{len(missing)} tensors of unit {job.unit.number} were not journaled, e.g. {min(missing)}")
    return UnitResult(
        job.unit.number,
        {tensor: entries[tensor] for tensor in job.unit.tensors},
        sorted(kept),
        streamed.bytes_read,
        streamed.copied_bytes,
        time.perf_counter() - started,
        sorted(set(writer.nonfinite) & wanted),
        streamed.reads,
    )
