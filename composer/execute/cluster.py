"""Run a plan's tensors on a Ray cluster, with the bytes of a run on one machine.

The driver plans as always, then splits the plan into units of work (composer.execute.units) and hands them to the
nodes' workers (composer.execute.worker), each of which builds the same plan, opens the sources itself and writes its
units into the shards the driver laid out in the output's partial folder, on storage every node shares. A node that
cannot reach that folder (given --ray-local-disk DIR) writes each unit into DIR on its own disk instead, and the driver
gathers the unit's bytes through Ray's object store, a few pieces at a time. The driver keeps everything else: the
partial folder and its journal, the files beside the weights, the index, the rename.

Models placed on some nodes only (--ray-input-on, composer.execute.placement) are read only there: a unit goes to a node
that holds every model it reads, and the other nodes plan from the models' descriptions (headers and small files).

Before anything is written, every node is asked to read every input file and build the plan; once the partial folder
exists, to see the driver's probe in it and write beside it. A unit that fails or whose worker or node is lost is
tried again (on another node where there is one) up to `unit_retries` times; a finished unit is recorded in the journal
with its tensors' checksums and never done again, so a driver started again with --resume continues from there. The
units are deterministic, so a unit done twice (a worker thought lost that was not) writes the same bytes twice.

Ray is imported here only, and this module only when a run asks for a cluster.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from composer.cluster_address import ADDRESS, LOCAL
from composer.errors import ComposerError
from composer.execute.executor import ExecutionOptions, Streamed, plan_digest
from composer.execute.journal import UNITS_FOLDER, Journal, read_entries, read_identity
from composer.execute.placement import check_placed, lacking, node_tags, placed_models, runs_on
from composer.execute.units import Unit, input_files, partition
from composer.execute.worker import (
    PROBE_FILE,
    PieceReader,
    PlanOrder,
    UnitJob,
    UnitResult,
    check_node,
    check_output,
    check_scratch,
    run_unit,
    scratch_prefix,
    unit_journal_name,
)
from composer.execute.writer import ShardedWriter
from composer.plan.model import Plan
from composer.progress import progress_bar

log = logging.getLogger("composer")

OBJECT_STORE_BYTES = 128 << 20  # a local instance's object store: units hand back small results, never tensors
CONNECT_SECONDS = 5.0
CHECK_SECONDS = 900.0  # a node's checks (reading the inputs' first bytes, building the plan) must end within this
NODES_EVERY = 10.0  # seconds between looks at which nodes are still alive
WARM_WORKERS = 4  # a node's worker processes that build the plan while the inputs are checked, ready for units
STOP_SECONDS = 10.0  # a unit told to stop is given this long before its worker is ended
GATHER_PIECE = 16 << 20  # bytes of a unit on a node's own disk brought to the driver in one object
GATHER_AHEAD = 4  # pieces asked for at once: the driver holds at most this many (64 MB)
GATHER_SECONDS = 600.0  # one piece must arrive within this
# a test's faults, read by the driver: "N:K" makes the first try of unit N end its process after K tensors ("N:K:raise":
# fail with an error); paths (colon-separated) that the workers act as if they could not see
CRASH_HOOK = "COMPOSER_TEST_RAY_CRASH"
HIDDEN_HOOK = "COMPOSER_TEST_RAY_HIDDEN"


@dataclass
class Node:
    id: str
    name: str  # address (and host name where it differs)
    slots: int  # units it runs at once
    threads: int  # torch threads per unit
    tags: set[str] = field(default_factory=set)  # its Ray labels' keys and custom resources
    lacks: frozenset[str] = frozenset()  # models placed on other nodes (--ray-input-on): no unit reading one runs here
    local: bool = False  # it cannot reach the output's partial folder: it writes units on its own disk
    read_files: set[str] = field(default_factory=set)  # input files its units have read (in its page cache, likely)


@dataclass
class NodeSummary:
    node: str
    units: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0  # its units' time, added up
    failures: int = 0  # tries of units that failed there (each tried again)
    opened: set[str] = field(default_factory=set)  # input files it opened (checks, planning and units)
    gathered: int = 0  # bytes the driver brought from its own disk into the output

    def line(self) -> str:
        failed = f", {self.failures} failed and tried again" if self.failures else ""
        gathered = f", {_amount(self.gathered)} gathered from its own disk" if self.gathered else ""
        return (
            f"node {self.node}: {self.units} units, read {_amount(self.bytes_read)}, wrote "
            f"{_amount(self.bytes_written)}, {self.seconds:.1f} s of work, {len(self.opened)} input files opened"
            f"{gathered}{failed}"
        )


def _amount(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"


@dataclass(frozen=True)
class UnitRecord:
    """A unit as it finished: where, its bytes, its time on the worker, and the tries it took."""

    number: int
    node: str
    tensors: int
    bytes_written: int
    bytes_read: int  # read into memory or copied file to file
    seconds: float
    tries: int
    opened: tuple[str, ...] = ()  # the input files it opened to read or copy tensors


@dataclass
class ClusterOutcome:
    streamed: Streamed
    kept: set[str]  # tensors an earlier run finished, checked and kept


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ComposerError(
            "--ray needs Ray, which is not installed here: pip install 'composer-merge[ray]' (on every node of the cluster)."
        ) from None
    return ray


def _check_reachable(address: str) -> None:
    """An address that no server answers is refused in seconds, not after Ray's minute of retries."""
    if address in ("auto", LOCAL):
        return
    match = ADDRESS.match(address)
    if match is None:
        raise ComposerError(
            f"--ray '{address}' is not a Ray address: give the head node's HOST:PORT (its GCS port, 6379 unless set), "
            "ray://HOST:PORT for Ray Client, auto for the cluster this machine belongs to, or --ray alone to start a "
            "local instance. (--ray takes the word after it when it looks like an address; write --ray=ADDRESS to be sure.)"
        )
    host, port = match.group("host").strip("[]"), int(match.group("port"))
    try:
        socket.create_connection((host, port), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        reason = "no answer" if isinstance(error, TimeoutError) else (error.strerror or str(error))
        raise ComposerError(
            f"--ray {address}: no Ray cluster can be reached there ({reason}). Check the head node's address and "
            "port (`ray status` on the head prints it), or give --ray alone to start a local instance."
        ) from None


def _start_or_join(ray, address: str) -> bool:
    """Connect to Ray; True when this run connected (and so disconnects at its end, which ends a local instance)."""
    _check_reachable(address)
    if ray.is_initialized():  # the caller's own connection (a program using composer, the tests)
        return False
    settings = dict(log_to_driver=False, logging_level=logging.ERROR)
    if address == LOCAL:
        settings |= dict(include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES)
    try:
        ray.init(address=address, **settings)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = (
            "a local Ray instance could not be started"
            if address == LOCAL
            else f"could not join the Ray cluster at {address}"
        )
        raise ComposerError(f"--ray {address}: {where} ({text}).") from None
    return True


def _failure_text(error: BaseException) -> str:
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0]}" if first else type(error).__name__


class Cluster:
    """The driver's side of a run on a cluster: its nodes, their checks, and the units handed out to them."""

    def __init__(self, ray, plan: Plan, options: ExecutionOptions, connected_here: bool):
        self.ray = ray
        self.plan = plan
        self.options = options
        self.connected_here = connected_here
        self.order = PlanOrder(
            plan.replay,
            plan_digest(plan, options),
            dict(plan.shard_metadata),
            os.getcwd(),
            _composer_version(),
        )
        self.hidden = tuple(part for part in os.environ.get(HIDDEN_HOOK, "").split(":") if part)
        self.nodes: dict[str, Node] = {}
        self.summary: dict[str, NodeSummary] = {}
        self.units: list[Unit] = []
        self.finished: list[UnitRecord] = []
        self.retried = 0
        self.placed: dict[str, str] = {}  # model -> the label or resource of the nodes holding it (--ray-input-on)
        self.described: dict[str, object] = {}  # node id -> Ray object: descriptions of the placed models it lacks
        self.readers: dict[str, object] = {}  # node id -> its PieceReader actor (nodes writing on their own disks)
        self._remote_functions: dict = {}

    @classmethod
    def connect(cls, plan: Plan, options: ExecutionOptions) -> Cluster:
        """Join (or start) the cluster and check that each node reads every input and builds the same plan."""
        if plan.replay is None:
            raise ComposerError(
                "this plan was built from models opened by the program that called composer, which a cluster's workers "
                "cannot open again; build it from a recipe (compose_text, compose_file) to run it on a cluster."
            )
        ray = _import_ray()
        cluster = cls(ray, plan, options, _start_or_join(ray, options.ray))
        try:
            cluster.find_nodes()
            cluster.place_inputs()
            cluster.check_inputs()
        except BaseException:
            cluster.close()
            raise
        return cluster

    def _remote(self, function, node: Node, cpus: float = 1):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        resources = dict(num_cpus=cpus, max_retries=0)
        if self.options.device.startswith("cuda"):
            resources["num_gpus"] = 1
        remote = self._remote_functions.get(function)
        if remote is None:
            remote = self._remote_functions[function] = self.ray.remote(function)
        return remote.options(**resources, scheduling_strategy=NodeAffinitySchedulingStrategy(node.id, soft=False))

    def find_nodes(self) -> None:
        """The cluster's live nodes, each with the units it can run at once: one a CPU, within its memory at
        --memory-budget each (and one a GPU with --device cuda)."""
        budget = max(1, self.options.memory_budget)
        for entry in self.ray.nodes():
            if not entry.get("Alive"):
                continue
            resources = entry.get("Resources", {})
            cpus = int(resources.get("CPU", 0))
            slots = min(cpus, int(resources.get("memory", budget) // budget))
            if self.options.device.startswith("cuda"):
                slots = min(slots, int(resources.get("GPU", 0)))
            if slots < 1:
                continue
            address, host = entry.get("NodeManagerAddress", "?"), entry.get("NodeManagerHostname", "")
            name = address if not host or host == address else f"{address} ({host})"
            tags = node_tags(entry.get("Labels"), resources)
            self.nodes[entry["NodeID"]] = Node(entry["NodeID"], name, slots, max(1, cpus // slots), tags)
        names = Counter(node.name for node in self.nodes.values())
        for node in self.nodes.values():  # several nodes of one machine (or behind one address): told apart by id
            if names[node.name] > 1:
                node.name = f"{node.name} [{node.id[:8]}]"
        if not self.nodes:
            raise ComposerError(
                f"--ray: no node of the cluster has a CPU{' and a GPU' if self.options.device.startswith('cuda') else ''} "
                f"free with {self.options.memory_budget / 1e9:.1f} GB of memory for one worker (--memory-budget); add nodes "
                "or lower --memory-budget."
            )
        self.summary = {node.id: NodeSummary(node.name) for node in self.nodes.values()}

    def place_inputs(self) -> None:
        """--ray-input-on: which nodes hold which models, the units split so that each runs where its models are, and
        each node given the descriptions of the placed models it lacks (to build the plan from)."""
        self.placed = placed_models(self.plan, self.options.ray_inputs)
        slots = sum(node.slots for node in self.nodes.values())
        self.units = partition(
            self.plan, self.options.shard_size, slots, self.options.unit_size, frozenset(self.placed)
        )
        if not self.placed:
            return
        from composer.sources.described import describe_model

        for node in self.nodes.values():
            node.lacks = lacking(self.placed, node.tags)
        check_placed(self.placed, self.units, [node.lacks for node in self.nodes.values()])
        descriptions = {reference: describe_model(reference, self.plan.sources[reference]) for reference in self.placed}
        shared: dict[frozenset, object] = {}
        for node in self.nodes.values():
            if node.lacks and node.lacks not in shared:
                shared[node.lacks] = self.ray.put({reference: descriptions[reference] for reference in node.lacks})
            if node.lacks:
                self.described[node.id] = shared[node.lacks]

    def _ask_every_node(self, function, arguments, workers: int = 1, nodes: dict | None = None) -> dict[str, list]:
        """`function(*arguments(node))` run on every node (of `nodes`, when given; by up to `workers` of its worker
        processes at once); the answers by node id. A node that cannot run it at all (composer missing there, say) is an
        error naming it."""
        calls = [
            (node.id, self._remote(function, node).remote(*arguments(node)))
            for node in (nodes if nodes is not None else self.nodes).values()
            for _ in range(min(workers, node.slots))
        ]
        answers: dict[str, list] = {}
        for node_id, call in calls:
            try:
                answers.setdefault(node_id, []).append(self.ray.get(call, timeout=CHECK_SECONDS))
            except self.ray.exceptions.GetTimeoutError:
                raise ComposerError(
                    f"--ray: node {self.nodes[node_id].name} did not answer composer's checks within {CHECK_SECONDS:.0f} s "
                    "(its CPUs are busy with other work, or it cannot start a worker)."
                ) from None
            except self.ray.exceptions.RayError as error:
                cause = getattr(error, "cause", None) or error
                raise ComposerError(
                    f"--ray: node {self.nodes[node_id].name} could not run composer ({_failure_text(cause)}); install "
                    "composer-merge[ray], the driver's version, in every node's Python environment."
                ) from None
        return answers

    def check_inputs(self) -> None:
        """Each node reads the first bytes of every input file it holds (at the size the driver sees) and builds the
        plan: in as many of its worker processes as it will run units in (up to WARM_WORKERS), which keep the plan."""
        held = {node.id: input_files(self.plan, set(self.plan.sources) - node.lacks) for node in self.nodes.values()}

        def arguments(node: Node) -> tuple:
            return self.order, self.options, held[node.id], self.hidden, self.described.get(node.id)

        answers = self._ask_every_node(check_node, arguments, workers=WARM_WORKERS)
        for node_id, found in answers.items():
            self.summary[node_id].opened.update(path for answer in found for path in answer.opened)
        problems = [
            f"node {self.nodes[node_id].name} {problem}"
            for node_id, found in answers.items()
            for problem in dict.fromkeys(problem for answer in found for problem in answer.problems)
        ]
        if problems:
            shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
            where = (
                "the models it holds (--ray-input-on) at the same path as the driver"
                if self.placed
                else "storage every node mounts at the same path (or in each node's hub cache)"
            )
            raise ComposerError(
                f"--ray: not every node of the cluster can read the inputs, so nothing was written: {shown}. Put the "
                f"models on {where}, then run again."
            )

    def check_output(self, partial: Path, out: Path) -> None:
        """Each node sees the driver's probe in the partial folder and can write beside it."""
        token = secrets.token_hex(16)
        probe = partial / PROBE_FILE
        probe.write_text(token)
        try:
            answers = self._ask_every_node(check_output, lambda node: (str(partial), token, self.hidden))
        finally:
            probe.unlink(missing_ok=True)
        problems = [f"node {self.nodes[node_id].name}: {found[0]}" for node_id, found in answers.items() if found[0]]
        scratch = self.options.ray_local_disk
        if problems and scratch is None:
            raise ComposerError(
                f"--ray: the output {out} is on storage that "
                f"not every node can reach ({'; '.join(problems[:6])}). Write OUT to a folder every node mounts at the "
                "same path (a shared file system), or give --ray-local-disk DIR (a folder on each node's own disk: the "
                "driver then gathers what those nodes write), then run again; nothing was left behind."
            )
        for node_id, found in answers.items():
            self.nodes[node_id].local = bool(found[0])
        if scratch is not None and problems:
            self.start_readers()
            local = {node_id: node for node_id, node in self.nodes.items() if node.local}
            answers = self._ask_every_node(check_scratch, lambda node: (scratch,), nodes=local)
            failing = [f"node {self.nodes[node_id].name}: {found[0]}" for node_id, found in answers.items() if found[0]]
            if failing:
                raise ComposerError(
                    f"--ray-local-disk {scratch}: not every node that cannot reach {out} can write there "
                    f"({'; '.join(failing[:6])}). Give a folder that exists (or can be made) on each node's own disk; "
                    "nothing was left behind."
                )
            log.info(
                "%d of %d nodes cannot reach %s: they write their units into %s on their own disks, and the driver "
                "gathers them",
                len(local),
                len(self.nodes),
                out,
                scratch,
            )

    def start_readers(self) -> None:
        """A PieceReader on each node that writes on its own disk: one process for the whole run (tasks of their own
        would each wait for a worker process to start while the node's CPUs run units)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor = self.ray.remote(PieceReader)
        for node in self.nodes.values():
            if node.local:
                strategy = NodeAffinitySchedulingStrategy(node.id, soft=False)
                self.readers[node.id] = actor.options(num_cpus=0, scheduling_strategy=strategy).remote()

    def run(
        self, partial: Path, identity: str, writer: ShardedWriter, journal: Journal, entries: dict[str, dict]
    ) -> ClusterOutcome:
        return _Dispatch(self, partial, identity, writer, journal, entries).run()

    def summaries(self) -> list[NodeSummary]:
        return [summary for summary in self.summary.values() if summary.units or summary.failures]

    def close(self) -> None:
        for reader in self.readers.values():
            self.ray.kill(reader)
        self.readers = {}
        if self.connected_here and self.ray.is_initialized():
            self.ray.shutdown()


def _composer_version() -> str:
    from composer import __version__

    return __version__


def _crash_hook() -> tuple[int, int, bool] | None:
    """(unit, tensors, exits) from CRASH_HOOK's "N:K" (the process exits) or "N:K:raise" (the unit fails)."""
    parts = os.environ.get(CRASH_HOOK, "").split(":")
    if not parts[0].isdigit():
        return None
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 1, parts[2:] != ["raise"]


class _Dispatch:
    """Hands units to nodes with free slots, the unit whose input files a node has read already first; gathers
    what they wrote into the journal; tries failed units again elsewhere."""

    def __init__(
        self, cluster: Cluster, partial: Path, identity: str, writer: ShardedWriter, journal: Journal, entries: dict
    ):
        self.cluster = cluster
        self.ray = cluster.ray
        self.partial = partial
        self.identity = identity
        self.writer = writer
        self.journal = journal
        self.earlier = dict(entries) | _unit_journals(partial, identity)  # what earlier tries and runs journaled
        self.pending: deque[Unit] = deque(cluster.units)
        self.local = any(node.local for node in cluster.nodes.values())
        self.kept_here: set[str] = set()
        if self.local and self.earlier:  # nodes writing on their own disks cannot check the partial folder: done here
            self.kept_here = writer.finished_earlier(self.earlier)
            self.pending = deque(unit for unit in self.pending if not set(unit.tensors) <= self.kept_here)
        self.running: dict[object, tuple[Unit, Node, int, float]] = {}
        self.tries: Counter = Counter()
        self.failed_on: dict[int, set[str]] = {}
        self.crash = _crash_hook()
        self.kept: set[str] = set()
        self.streamed = Streamed(0, 0, Counter())
        self.nodes_seen = time.monotonic()

    def run(self) -> ClusterOutcome:
        plan, options = self.cluster.plan, self.cluster.options
        description = (
            f"writing {len(plan.tensors)} tensors in {len(self.cluster.units)} units on {len(self.cluster.nodes)} nodes"
        )
        with progress_bar(plan.output_bytes(), description, options.progress) as bar:
            self.bar = bar
            self.kept |= self.kept_here
            bar.update(sum(unit.nbytes for unit in self.cluster.units if set(unit.tensors) <= self.kept_here))
            try:
                while self.pending or self.running:
                    self.dispatch()
                    if not self.running:
                        raise ComposerError(
                            f"--ray: {self.pending[0].describe()} has no node left to run on: every node that passed the "
                            "checks has died or already failed it."
                        )
                    ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=NODES_EVERY)
                    for call in ready:
                        self.settle(call)
                    self.forget_dead_nodes()
            except BaseException:
                self.stop()
                raise
            finally:
                self.clear_scratch()
        for summary in self.cluster.summaries():
            log.info(summary.line())
        return ClusterOutcome(self.streamed, self.kept)

    def dispatch(self) -> None:
        busy = Counter(node.id for _, node, _, _ in self.running.values())
        nodes = self.cluster.nodes
        while self.pending:
            free = [node for node in nodes.values() if busy[node.id] < node.slots]
            free.sort(key=lambda node: busy[node.id] / node.slots)
            placed = False
            for node in free:
                unit = self.best_unit(node)
                if unit is not None:
                    self.pending.remove(unit)
                    self.submit(unit, node)
                    busy[node.id] += 1
                    placed = True
                    break
            if not placed:
                return

    def best_unit(self, node: Node) -> Unit | None:
        """The pending unit that suits `node` best among those it holds the models of: one it has not failed (unless
        every live node that could run it has), the one whose input files it has read most of, then the one whose
        files fewest other nodes have read (so that one input is not read on several nodes without need)."""
        nodes = self.cluster.nodes.values()
        elsewhere = {path for other in nodes if other is not node for path in other.read_files}
        best, best_score = None, None
        for unit in self.pending:
            if not runs_on(unit, node.lacks):
                continue
            failed = self.failed_on.get(unit.number, set())
            if node.id in failed and any(other.id not in failed for other in nodes if runs_on(unit, other.lacks)):
                continue
            here = sum(1 for path in unit.files if path in node.read_files)
            score = (here, -sum(1 for path in unit.files if path in elsewhere and path not in node.read_files))
            if best_score is None or score > best_score:
                best, best_score = unit, score
                if here == len(unit.files):
                    break
        return best

    def submit(self, unit: Unit, node: Node) -> None:
        attempt = self.tries[unit.number] + 1
        self.tries[unit.number] = attempt
        crashes = self.crash is not None and self.crash[0] == unit.number and attempt == 1
        job = UnitJob(
            self.cluster.order,
            self.cluster.options,
            str(self.partial),
            self.identity,
            unit,
            attempt,
            {} if node.local else {name: self.earlier[name] for name in unit.tensors if name in self.earlier},
            node.threads,
            self.crash[1] if crashes else None,
            self.crash[2] if crashes else True,
            self.cluster.options.ray_local_disk if node.local else None,
        )
        described = self.cluster.described.get(node.id)
        call = self.cluster._remote(run_unit, node, cpus=node.threads).remote(job, described)
        self.running[call] = (unit, node, attempt, time.monotonic())
        node.read_files.update(unit.files)

    def settle(self, call) -> None:
        unit, node, attempt, started = self.running.pop(call)
        summary = self.cluster.summary[node.id]
        try:
            result = self.ray.get(call)
            if result.folder is not None:
                self.dispatch()  # the slot this unit held works on while its bytes are gathered
                self.gather(unit, node, result)
        except self.ray.exceptions.RayError as error:
            summary.failures += 1
            summary.seconds += time.monotonic() - started
            self.failed(unit, node, attempt, error)
            return
        summary.opened.update(result.opened, result.process_opened)
        for name in unit.tensors:
            self.journal.record(result.entries[name])
        self.writer.mark_written(unit.tensors, result.nonfinite)
        self.kept.update(result.kept)
        self.streamed.bytes_read += result.bytes_read
        self.streamed.copied_bytes += result.copied_bytes
        self.streamed.reads.update(result.reads)
        read = result.bytes_read + result.copied_bytes
        self.cluster.finished.append(
            UnitRecord(
                unit.number,
                node.name,
                len(unit.tensors),
                unit.nbytes,
                read,
                result.seconds,
                attempt,
                tuple(result.opened),
            )
        )
        summary.units += 1
        summary.bytes_read += read
        summary.bytes_written += unit.nbytes
        summary.seconds += result.seconds
        self.bar.update(unit.nbytes)
        self.show()

    def gather(self, unit: Unit, node: Node, result: UnitResult) -> None:
        """Copy a unit that `node` wrote on its own disk into the partial folder: in pieces of GATHER_PIECE bytes
        through Ray's object store, at most GATHER_AHEAD of them asked for at once; then its folder there is removed."""
        pieces = [
            (name, offset + start, min(GATHER_PIECE, length - start))
            for name, offset, length in self.writer.pieces(unit.tensors)
            for start in range(0, length, GATHER_PIECE)
        ]
        reader = self.cluster.readers[node.id]
        asked: deque = deque()

        def write_oldest() -> None:
            (name, offset, length), call = asked.popleft()
            self.writer.write_piece(name, offset, self.ray.get(call, timeout=GATHER_SECONDS))
            self.cluster.summary[node.id].gathered += length

        for name, offset, length in pieces:
            asked.append(((name, offset, length), reader.read.remote(f"{result.folder}/{name}", offset, length)))
            if len(asked) >= GATHER_AHEAD:
                write_oldest()
        while asked:
            write_oldest()
        folder = Path(result.folder)
        reader.remove.remote(str(folder.parent), folder.name)

    def clear_scratch(self) -> None:
        """Remove what this run left on the nodes' own disks (tries that failed, units cut short)."""
        scratch, prefix = self.cluster.options.ray_local_disk, scratch_prefix(self.identity)
        calls = [reader.remove.remote(scratch, prefix) for reader in self.cluster.readers.values()]
        if calls:
            self.ray.wait(calls, num_returns=len(calls), timeout=STOP_SECONDS)

    def failed(self, unit: Unit, node: Node, attempt: int, error: BaseException) -> None:
        cause = getattr(error, "cause", None)
        if isinstance(cause, ComposerError):  # the recipe's or the inputs' fault: another try would only repeat it
            raise ComposerError(f"{unit.describe()} on node {node.name}: {cause}") from None
        exceptions = self.ray.exceptions
        if isinstance(error, exceptions.WorkerCrashedError):
            reason = "its worker process died"
        elif isinstance(error, getattr(exceptions, "NodeDiedError", ())):
            reason = "its node died"
            self.cluster.nodes.pop(node.id, None)
        elif isinstance(error, getattr(exceptions, "OutOfMemoryError", ())):
            reason = "Ray stopped its worker for want of memory (lower --memory-budget)"
        else:
            reason = _failure_text(cause if cause is not None else error)
        # what the try finished before it stopped is kept (checked by the next try)
        self.earlier |= read_entries(self.partial / UNITS_FOLDER, unit_journal_name(unit.number, attempt))
        self.failed_on.setdefault(unit.number, set()).add(node.id)
        if attempt > self.cluster.options.unit_retries:
            raise ComposerError(
                f"--ray: {unit.describe()} failed {attempt} times, the last time on node {node.name} ({reason}); "
                "nothing was left that looks complete."
            )
        self.cluster.retried += 1
        log.info("%s failed on node %s (%s); it is tried again", unit.describe(), node.name, reason)
        self.pending.appendleft(unit)
        self.show()

    def show(self) -> None:
        done = len(self.cluster.finished)
        retried = f", {self.cluster.retried} retried" if self.cluster.retried else ""
        self.bar.set_postfix_str(f"{done}/{len(self.cluster.units)} units{retried}")

    def forget_dead_nodes(self) -> None:
        if time.monotonic() - self.nodes_seen < NODES_EVERY:
            return
        self.nodes_seen = time.monotonic()
        alive = {entry["NodeID"] for entry in self.ray.nodes() if entry.get("Alive")}
        for node_id in [node_id for node_id in self.cluster.nodes if node_id not in alive]:
            del self.cluster.nodes[node_id]

    def stop(self) -> None:
        """Stop every unit still running (the partial folder is about to be removed, or kept as it is): each is
        interrupted as Ctrl-C would, and its worker ended if it has not stopped within STOP_SECONDS."""
        calls = list(self.running)
        self.running.clear()
        for force in (False, True):
            for call in calls:
                try:
                    self.ray.cancel(call, force=force)
                except Exception:  # a unit that has just ended cannot be cancelled
                    pass
            if calls:
                _, calls = self.ray.wait(calls, num_returns=len(calls), timeout=STOP_SECONDS)
            if not calls:
                return


def _unit_journals(partial: Path, identity: str) -> dict[str, dict]:
    """What the unit journals of an earlier run of this output hold (a driver that died left them)."""
    found: dict[str, dict] = {}
    folder = partial / UNITS_FOLDER
    for path in sorted(folder.glob("unit-*.jsonl")) if folder.is_dir() else []:
        if read_identity(folder, path.name) == identity:
            found |= read_entries(folder, path.name)
    return found
