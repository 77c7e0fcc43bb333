"""What a cluster's worker does (composer.execute.cluster sends these functions to it; nothing here knows of Ray).

A worker builds the driver's plan again from the same recipe and inputs (and checks it is the same plan), opens the
sources itself, and runs units of work through the executor's one loop (`stream_tensors`) under its own memory
budget, writing into the shards the driver laid out in the output's partial folder (or, on a node that cannot reach
it, into shards of its own on the node's disk, which the driver gathers piece by piece). Each try of a unit journals
its finished tensors into a file of its own, so a unit cut short is resumed from what it finished.

A node opens the models it does not hold (placed on other nodes) from the descriptions the driver sends, and fetches a
hub model's weights file by file as its units read them. It records which files it opens, so the driver can say what
each node read.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
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
SCRATCH_PREFIX = "composer-unit-"  # a unit's folder on a node's own disk: SCRATCH_PREFIX + run + unit + try
INPUT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


class OpenedFiles:
    """The input files this process opens (a Python audit hook sees every open() and os.open()): all of them since
    they were last taken, and those of the unit being run."""

    def __init__(self):
        self.since_taken: set[str] = set()
        self.unit: set[str] | None = None
        self.ignored: tuple[str, ...] = ()  # folders whose files are the output, not inputs
        sys.addaudithook(self._heard)

    def _heard(self, event: str, arguments: tuple) -> None:
        if event != "open" or not arguments or not isinstance(arguments[0], (str, bytes, os.PathLike)):
            return
        path = os.path.abspath(os.fsdecode(arguments[0]))
        if not path.endswith(INPUT_SUFFIXES) or path.startswith(self.ignored):
            return
        self.since_taken.add(path)
        if self.unit is not None:
            self.unit.add(path)

    def take(self) -> list[str]:
        taken, self.since_taken = self.since_taken, set()
        return sorted(taken)


_OPENED: list[OpenedFiles] = []


def opened_files() -> OpenedFiles:
    """This process's record of the input files it opens (started on first use: a worker's first check or unit)."""
    if not _OPENED:
        _OPENED.append(OpenedFiles())
    return _OPENED[0]


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
    scratch: str | None = None  # a folder on this node's own disk: the unit is written there (for the driver to gather)


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
    folder: str | None = None  # with a scratch folder: where on the node's disk the unit's shards were written
    opened: list[str] = field(default_factory=list)  # input files the unit opened to read or copy tensors
    process_opened: list[str] = field(default_factory=list)  # input files the process opened since it last said


@dataclass
class NodeCheck:
    problems: list[str]  # what this node cannot do of the run; empty when it can do it all
    opened: list[str]  # input files it opened (to check them and to build the plan)


_PLANS: dict[str, Plan] = {}  # this process's plan, by digest: built once, used by every unit it runs


def _hidden(path: str, hidden: tuple[str, ...]) -> bool:
    return any(path == place or path.startswith(place.rstrip("/") + "/") for place in hidden)


def build_plan_again(order: PlanOrder, options: ExecutionOptions, described: dict | None = None) -> Plan:
    """The driver's plan, built here from the same recipe and inputs (those in `described`, which this node does not
    hold, from their descriptions); an error where it comes out otherwise."""
    from composer import __version__
    from composer.execute.executor import plan_digest
    from composer.sources import opened_on_a_node

    if __version__ != order.version:
        raise ComposerError(
            f"this machine runs composer {__version__} and the driver composer {order.version}; install the same "
            "version on every node of the cluster."
        )
    if os.path.isdir(order.cwd):
        os.chdir(order.cwd)
    function, arguments = order.replay
    with opened_on_a_node(described):
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


def plan_here(order: PlanOrder, options: ExecutionOptions, described: dict | None = None) -> Plan:
    """The driver's plan, built once in this process and kept for its next units."""
    plan = _PLANS.get(order.digest)
    if plan is None:
        forget_plan()
        plan = _PLANS[order.digest] = build_plan_again(order, options, described)
    return plan


def forget_plan() -> None:
    for plan in _PLANS.values():
        plan.close()
    _PLANS.clear()


def check_node(
    order: PlanOrder,
    options: ExecutionOptions,
    files: dict[str, int],
    hidden: tuple[str, ...],
    described: dict | None = None,
) -> NodeCheck:
    """What this node cannot do of the run ("cannot read FILE (why)", "cannot build the plan: why"): each input file
    it cannot read or sees at another size, then the plan (models in `described` planned from their descriptions).
    No problems when it can do it all (its plan is kept for the units)."""
    opened = opened_files()
    problems = []
    for path, size in files.items():
        reason = _unreadable(path, size, hidden)
        if reason is not None:
            problems.append(f"cannot read {path} ({reason})")
    if not problems:
        try:
            plan_here(order, options, described)
        except ComposerError as error:
            problems.append(f"cannot build the plan: {error}")
    return NodeCheck(problems, opened.take())


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
    return write_trial(folder)


def write_trial(folder: Path) -> str | None:
    """Why this node cannot write a file into `folder` (None when it can): an empty file written and removed."""
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


def check_scratch(scratch: str) -> str | None:
    """Why this node cannot write units into `scratch` on its own disk (None when it can)."""
    folder = Path(scratch)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"it cannot write into {folder} ({error.strerror or error})"
    return write_trial(folder)


class PieceReader:
    """On a node that writes units on its own disk: hands the driver a unit's bytes piece by piece, and removes the
    unit's folder once gathered (one long-lived process a node: the driver makes it a Ray actor)."""

    def read(self, path: str, offset: int, length: int) -> bytes:
        """`length` bytes of a unit's shard on this node's disk, from `offset`."""
        with open(path, "rb") as handle:
            data = os.pread(handle.fileno(), length, offset)
        if len(data) != length:
            raise RuntimeError(f"{path} ended at {offset + len(data)}, before the {length} bytes asked for at {offset}")
        return data

    def remove(self, scratch: str, prefix: str) -> int:
        """Remove this node's unit folders in `scratch` whose names start with `prefix`; how many there were."""
        folder = Path(scratch)
        found = [path for path in folder.glob(prefix + "*") if path.is_dir()] if folder.is_dir() else []
        for path in found:
            shutil.rmtree(path, ignore_errors=True)
        return len(found)


def scratch_prefix(identity: str) -> str:
    return f"{SCRATCH_PREFIX}{identity[:16]}-"


def unit_journal_name(number: int, attempt: int) -> str:
    return f"unit-{number:05d}-try-{attempt}.jsonl"


def run_unit(job: UnitJob, described: dict | None = None) -> UnitResult:
    """Compute and write one unit of work into the partial folder. A unit holding a chain's steps gets a plan of its
    own: the chain's state lives in the plan's operations, and must start fresh (the plan a check built and no unit
    has used yet will do)."""
    started = time.perf_counter()
    opened_files()
    fresh = job.unit.chained
    if fresh:  # this process's plan if it has one (its chains not yet run), never to be used again
        plan = _PLANS.pop(job.order.digest, None) or build_plan_again(job.order, job.options, described)
    else:
        plan = plan_here(job.order, job.options, described)
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
    if job.scratch is not None:  # this node's own disk: shards of the unit's own, gathered by the driver
        folder = Path(job.scratch) / f"{scratch_prefix(job.identity)}{job.unit.number:05d}-try-{job.attempt}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    journals = folder / UNITS_FOLDER
    journals.mkdir(exist_ok=True)
    opened = opened_files()
    opened.ignored = (str(Path(job.partial).absolute()), str(folder.absolute()))
    for source in plan.sources.values():  # what the unit opens is then what it reads
        source.release_files()
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
            lay_out=job.scratch is not None,
        )
        kept, order = still_to_do(plan, schedule, writer, job.entries, wanted)
        opened.unit = set()
        streamed = stream_tensors(
            plan, schedule, order, writer, options, UnitProgress(job.crash_after, job.crash_exits)
        )
        writer.sync()
    finally:
        unit_opened, opened.unit = opened.unit or set(), None
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
        str(folder) if job.scratch is not None else None,
        sorted(unit_opened),
        opened.take(),
    )
