"""Run a plan: stream inputs from their sources, apply each operation, write each result, free memory.

The executor knows tensors, bytes and devices; it never knows which method or feature made the plan.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from composer.errors import ComposerError, ComposerWarning
from composer.execute.deferred import DeferredChecks
from composer.execute.journal import (
    Journal,
    identity_digest,
    read_entries,
    read_identity,
    remove_unit_journals,
)
from composer.execute.output_folder import OutputFolder, is_write_failure, write_failure
from composer.execute.writer import ShardedWriter
from composer.memory import recycling
from composer.native.scan import holds_nonfinite
from composer.plan.model import Plan, TensorRef
from composer.plan.schedule import chains_to_redo, make_schedule, step_bytes
from composer.progress import progress_bar
from composer.signals import Interrupted, signals_held

GIB = 1024**3
RESUME_CHOICES = ("auto", "require", "never")
log = logging.getLogger("composer")


def resident_bytes() -> int:
    """Memory the process holds now (Linux: /proc/self/statm); 0 where that cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class ExecutionOptions:
    memory_budget: int = 2 * GIB  # bytes of tensors held (inputs kept and read ahead, results being written)
    whole_process: bool = (
        False  # memory_budget bounds the whole process instead: what it holds at the start is subtracted
    )
    shard_size: int = 5 * GIB
    device: str = "cpu"
    force: bool = False
    progress: bool | None = None  # None: only when stderr is a terminal
    overlap: bool = True  # read the next inputs and write the last result while computing; False: one thing at a time
    durable: bool = False  # flush the output to the disk before it appears (survives a power loss; waits for the disk)
    readers: int | None = None  # threads reading ahead (None: one per four cores, at most four)
    copy_files: bool = True  # outputs that are an input's stored bytes go file to file, never read into memory
    resume: str = "auto"  # a dead run's partial output of the same recipe and inputs: auto (resume it), require, never
    keep_partial: bool = False  # an interrupted or failed run keeps its partial output for a later resume
    ray: str | None = None  # run on a Ray cluster: "local" starts one here, else the address of one to join
    unit_retries: int = 3  # on a cluster: how many times a failed or lost unit of work is tried again elsewhere
    unit_size: int | None = None  # on a cluster: the most output bytes in one unit of work (None: chosen from the plan)
    ray_inputs: dict[str, str] = field(default_factory=dict)  # on a cluster: model -> the label or resource of the
    # nodes that hold it (composer.execute.placement); models not named are on storage every node reads
    ray_local_disk: str | None = None  # on a cluster: a folder on each node's own disk where a node that cannot reach
    # the output writes its units, for the driver to gather (None: every node must reach the output)


def reader_count(options: ExecutionOptions) -> int:
    """Reading from the page cache is a memory copy that one thread does at a few GB/s; on a machine with
    cores to spare, several threads read the next step's inputs at once."""
    if options.readers is not None:
        return max(1, options.readers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, max(1, cores // 4))


@dataclass
class ExecutionReport:
    out: Path
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    reads: Counter = field(default_factory=Counter)
    device_peak_bytes: int = 0  # the most device memory torch held at once (CUDA only; 0 elsewhere)
    resumed: int = 0  # tensors a dead run had finished, checked and kept instead of written again
    nonfinite: list[str] = field(default_factory=list)  # output tensors holding NaN or infinity
    units: list = field(default_factory=list)  # on a cluster: each unit of work as it finished (cluster.UnitRecord)
    retried: int = 0  # on a cluster: units tried again after a failure or a lost worker
    nodes: list = field(default_factory=list)  # on a cluster: what each node did (composer.execute.cluster.NodeSummary)
    cluster_seconds: float = 0.0  # on a cluster: joining it and the nodes' checks, before any unit started


CPU = torch.device("cpu")


class InputCache:
    """Input tensors: read ahead by reader threads, kept between their uses, and the one needed furthest
    ahead evicted when the cache would pass its budget. Each is read onto the device its step runs on."""

    def __init__(self, plan: Plan, budget: int, device: torch.device, reader: ThreadPoolExecutor | None):
        self.plan = plan
        self.budget = budget
        self.device = device
        self.reader = reader
        self.tensors: dict[TensorRef, torch.Tensor] = {}
        self.pending: dict[TensorRef, Future] = {}
        self.resident = 0
        self.reads: Counter = Counter()
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._streams = threading.local()  # each reader thread copies to the GPU on a stream of its own

    def _load(self, ref: TensorRef, device: torch.device) -> torch.Tensor:
        tensor = self.plan.sources[ref.model].read(ref.name)
        with self._lock:
            self.reads[ref] += 1
            self.bytes_read += tensor.numel() * tensor.element_size()
        if device.type == "cpu":
            return tensor
        if device.type == "cuda":
            stream = getattr(self._streams, "stream", None)
            if stream is None:
                stream = self._streams.stream = torch.cuda.Stream(device)
            with torch.cuda.stream(stream):  # finished before the tensor is handed over
                tensor = tensor.to(device, non_blocking=True)
            stream.synchronize()
            return tensor
        return tensor.to(device)

    def missing_bytes(self, refs) -> int:
        """Bytes that reading `refs` would add: those neither kept nor already being read."""
        return sum(self._nbytes(ref) for ref in set(refs) if ref not in self.tensors and ref not in self.pending)

    def _nbytes(self, ref: TensorRef) -> int:
        return self.plan.sources[ref.model].tensor_infos()[ref.name].nbytes

    def prefetch(self, refs, device: torch.device) -> None:
        if self.reader is None:
            return
        for ref in refs:
            if ref not in self.tensors and ref not in self.pending:
                self.pending[ref] = self.reader.submit(self._load, ref, device)

    def get(self, ref: TensorRef, device: torch.device) -> torch.Tensor:
        """`ref` on `device` (moved there if it was kept or read ahead for a step on the other one)."""
        tensor = self.tensors.get(ref)
        if tensor is None:
            future = self.pending.pop(ref, None)
            tensor = future.result() if future is not None else self._load(ref, device)
            if tensor.device.type == "cuda":
                tensor.record_stream(torch.cuda.current_stream(self.device))
        return tensor.to(device)

    def keep(self, ref: TensorRef, tensor: torch.Tensor, next_use: dict[TensorRef, int]) -> None:
        if ref in self.tensors:
            return
        size = tensor.numel() * tensor.element_size()
        while self.tensors and self.resident + size > self.budget:
            furthest = max(self.tensors, key=lambda r: next_use.get(r, 1 << 60))
            if next_use.get(furthest, 1 << 60) <= next_use.get(ref, 1 << 60):
                return  # the new tensor is the one needed furthest ahead: do not keep it
            self.drop(furthest)
        if self.resident + size <= self.budget:
            self.tensors[ref] = tensor
            self.resident += size

    def drop(self, ref: TensorRef) -> None:
        tensor = self.tensors.pop(ref, None)
        if tensor is not None:
            self.resident -= tensor.numel() * tensor.element_size()

    def cancel(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()


class BackgroundWriter:
    """Hands results to a writer thread, holding at most `window` bytes of results not yet written."""

    def __init__(
        self,
        writer: ShardedWriter,
        pool: ThreadPoolExecutor | None,
        window: int,
        after_first_write: Callable[[], None] | None = None,
    ):
        self.writer = writer
        self.pool = pool
        self.window = window
        self.queued: deque[tuple[Future, int]] = deque()
        self.queued_bytes = 0
        self.copied_bytes = 0  # written from input files directly, never read into memory
        self.after_first_write = after_first_write  # called once, on the writing thread, when a tensor is written

    def _written(self) -> None:
        if self.after_first_write is not None:
            callback, self.after_first_write = self.after_first_write, None
            callback()

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.write(name, tensor.to("cpu") if tensor.device.type != "cpu" else tensor)
        self._written()

    def _copy(self, name: str, source: Path, offset: int, length: int) -> None:
        self.writer.copy_range(name, source, offset, length)
        self._written()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.pool is None:
            self._write(name, tensor)
            return
        size = tensor.numel() * tensor.element_size()
        while self.queued and self.queued_bytes + size > self.window:
            self._settle_oldest()
        self.queued.append((self.pool.submit(self._write, name, tensor), size))
        self.queued_bytes += size

    def copy(self, name: str, source: Path, offset: int, length: int) -> None:
        """Write tensor `name` from a byte range of an input file (`ShardedWriter.copy_range`)."""
        self.copied_bytes += length
        if self.pool is None:
            self._copy(name, source, offset, length)
            return
        self.queued.append((self.pool.submit(self._copy, name, source, offset, length), 0))

    def _settle_oldest(self) -> None:
        future, size = self.queued.popleft()
        self.queued_bytes -= size
        future.result()  # a failed write raises here

    def flush(self) -> None:
        while self.queued:
            self._settle_oldest()


class ComputeThreads:
    """torch's intra-op threads per operation: all of them for computing, one fewer for a light operation
    while reader and writer threads run beside it (on two cores, copies and simple sums ran 15-25%
    faster on one thread than when contending with the reads and writes on both)."""

    def __init__(self, overlap: bool, device: torch.device):
        self.all = torch.get_num_threads()
        self.light = max(1, self.all - 1) if overlap and device.type == "cpu" else self.all
        self.now = self.all

    def use(self, light: bool) -> None:
        wanted = self.light if light else self.all
        if wanted != self.now:
            torch.set_num_threads(wanted)
            self.now = wanted

    def restore(self) -> None:
        self.use(False)


def _device_of(planned, device: torch.device) -> torch.device:
    """Where a step runs: copies stay on the CPU, where their inputs were read and their result is written."""
    return CPU if planned.operation.copies else device


def _verbatim_range(plan: Plan, planned) -> tuple[Path, int, int] | None:
    """Where the bytes of an output tensor that is one input unchanged lie in that input's file (None
    when the step computes anything, or its input is not stored as it is to be written)."""
    if not planned.operation.verbatim or len(planned.inputs) != 1:
        return None
    ref = planned.inputs[0]
    source = plan.sources[ref.model]
    info = source.tensor_infos().get(ref.name)
    if info is None or info.dtype != planned.dtype or tuple(info.shape) != tuple(planned.shape):
        return None
    return source.byte_range(ref.name)


def _loose_bytes(refs, tensors: list[torch.Tensor], cache: InputCache) -> int:
    """Bytes of this step's inputs that the cache does not count (read for this step only)."""
    seen = set()
    total = 0
    for ref, tensor in zip(refs, tensors):
        if ref not in cache.tensors and ref not in seen:
            seen.add(ref)
            total += tensor.numel() * tensor.element_size()
    return total


def _file_stamps(path: Path) -> object:
    """Size and modification time of a file, or of each file directly in a folder: what says an input changed."""
    try:
        if path.is_dir():
            return {
                entry.name: _file_stamps(Path(entry.path))
                for entry in sorted(os.scandir(path), key=lambda e: e.name)
                if entry.is_file()
            }
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _identity_parts(plan: Plan, options: ExecutionOptions) -> dict:
    """What decides the output's bytes besides the input files: composer, the recipe, the planned tensors and their
    operations, the shard layout, the device."""
    from composer import __version__

    tensors = [
        [t.name, list(t.shape), str(t.dtype), t.operation.label, [[r.model, r.name] for r in t.inputs]]
        for t in plan.tensors
    ]
    return {
        "composer": __version__,
        "recipe": plan.recipe_text,
        "config": plan.config,
        "tensors": tensors,
        "shard_size": options.shard_size,
        "device": torch.device(options.device).type,
        "metadata": plan.shard_metadata,
    }


def run_identity(plan: Plan, options: ExecutionOptions) -> str:
    """A digest of everything that decides the output's bytes: `_identity_parts` and the input files' sizes and times."""
    inputs = {
        str(path): _file_stamps(path) for source in plan.sources.values() for path in source.input_paths().values()
    }
    return identity_digest(_identity_parts(plan, options) | {"inputs": inputs})


def plan_digest(plan: Plan, options: ExecutionOptions) -> str:
    """A digest that two processes' plans of one run share (a cluster's workers check theirs against the driver's):
    `_identity_parts` with every operation's arguments and the plan's notes, not the input files' times."""
    arguments = [t.operation.arguments for t in plan.tensors]
    return identity_digest(_identity_parts(plan, options) | {"arguments": arguments, "notes": plan.notes})


def _open_partial(folder: OutputFolder, identity: str, resume: str) -> bool:
    """Start the partial folder, resuming a dead run's of the same identity unless told not to; True when resumed."""

    def same_run(path: Path) -> bool:
        return read_identity(path) == identity

    if resume not in RESUME_CHOICES:
        raise ComposerError(f"resume must be one of {', '.join(RESUME_CHOICES)}, not '{resume}'.")
    if resume == "require" and not any(same_run(path) for path, _ in folder.abandoned):
        found = [path.name for path, _ in folder.abandoned]
        folder.discard()
        if not found:
            raise ComposerError(
                f"--resume: there is no partial output of an earlier run beside {folder.out} to resume."
            )
        raise ComposerError(
            f"--resume: the partial output beside {folder.out} ({', '.join(found)}) was made from another recipe, other inputs "
            "or other options, so it cannot be resumed; it was left as it is. Run without --resume to start over (which removes it)."
        )
    return folder.open(None if resume == "never" else same_run)


def _warn_nonfinite(names: list[str], plan: Plan) -> None:
    """One warning for the whole run, naming the output tensors with NaN or infinity and the inputs that hold
    them already (read again for this: only when something is wrong)."""
    import warnings

    planned = {tensor.name: tensor for tensor in plan.tensors}

    def described(name: str) -> str:
        refs = [ref for ref in planned[name].inputs if holds_nonfinite(plan.sources[ref.model].read(ref.name))]
        inputs = ", ".join(f"'{ref.name}' of '{ref.model}'" for ref in refs)
        return f"'{name}'" + (
            f" (from {inputs}, which hold{'s' if len(refs) == 1 else ''} them already)" if refs else ""
        )

    shown = "; ".join(described(name) for name in names[:5]) + (
        f"; and {len(names) - 5} more" if len(names) > 5 else ""
    )
    warnings.warn(
        ComposerWarning(
            f"{len(names)} output tensor{'s hold' if len(names) > 1 else ' holds'} NaN or infinite values: {shown}. "
            "A model with them gives NaN outputs; check the inputs named and the recipe's numbers."
        ),
        stacklevel=3,
    )


def _interrupted(error: KeyboardInterrupt, folder: OutputFolder, kept: bool) -> Interrupted:
    reason = str(error) or "interrupted"
    if folder.committed:
        return Interrupted(f"{reason} just after the output was complete; {folder.out} holds the whole model.")
    if kept:
        return Interrupted(
            f"{reason}; nothing was written to {folder.out}. The finished tensors are kept in {folder.partial} "
            "for the same command to resume."
        )
    return Interrupted(f"{reason}; no output was left behind.")


@dataclass
class Streamed:
    """What `stream_tensors` read: bytes read into memory, bytes copied file to file, and each input's reads."""

    bytes_read: int
    copied_bytes: int
    reads: Counter


def stream_tensors(
    plan: Plan,
    schedule,
    order: list,
    writer: ShardedWriter,
    options: ExecutionOptions,
    bar,
    done_before: int = 0,
    checks: DeferredChecks | None = None,
) -> Streamed:
    """Compute and write the planned tensors of `order` (in that order) into `writer`: inputs read ahead and kept
    within the memory budget, results written by a writer thread. The one loop every run goes through, on this
    machine or on a cluster's worker. `bar` gets each tensor's bytes as it is done. `checks` (the plan's deferred
    checks) are started once the first tensor is written, and their memory is left out of the budget."""
    device = torch.device(options.device)
    # with whole_process, what the process already holds (python, torch, the plan) is not available for tensors,
    # nor what the deferred checks and the writer's staging buffer will add; nor is what chains of steps hold
    # between their steps
    checks_bytes = checks.resident_bytes() if checks is not None else 0
    held = resident_bytes() + checks_bytes + writer.staging_bytes if options.whole_process else 0
    tensor_budget = max(0, options.memory_budget - held - schedule.carried_bytes)
    threads = ComputeThreads(options.overlap, device)
    reader = ThreadPoolExecutor(reader_count(options), thread_name_prefix="composer-read") if options.overlap else None
    writes = ThreadPoolExecutor(1, thread_name_prefix="composer-write") if options.overlap else None
    pools = [pool for pool in (reader, writes) if pool is not None]
    # kept inputs leave room for any step; read-ahead and queued writes only use what the current step leaves
    cache = InputCache(plan, max(0, tensor_budget - schedule.largest_step_bytes), device, reader)
    largest_output = max((tensor.nbytes for tensor in plan.tensors), default=0)
    background = BackgroundWriter(writer, writes, largest_output, checks.start if checks is not None else None)
    try:
        # outputs that are an input's stored bytes go file to file, and their inputs are never read
        verbatim = [_verbatim_range(plan, planned) if options.copy_files else None for planned in order]
        next_computed: list[int | None] = [None] * len(order)  # the next step after each that reads its inputs
        for step in range(len(order) - 2, -1, -1):
            next_computed[step] = step + 1 if verbatim[step + 1] is None else next_computed[step + 1]
        pending_uses: dict[TensorRef, deque[int]] = {}
        for step, tensor in enumerate(order):
            for ref in tensor.inputs if verbatim[step] is None else ():
                pending_uses.setdefault(ref, deque()).append(step)
        next_use: dict[TensorRef, int] = {}
        with recycling():
            for step, planned in enumerate(order):
                if verbatim[step] is not None:
                    background.copy(planned.name, *verbatim[step])
                    bar.update(planned.nbytes)
                    continue
                inputs = [cache.get(ref, _device_of(planned, device)) for ref in planned.inputs]
                if next_computed[step] is not None:  # inputs shared with this step are kept, not read again
                    following = order[next_computed[step]]
                    upcoming = [ref for ref in following.inputs if ref not in planned.inputs]
                    held = (
                        cache.resident
                        + _loose_bytes(planned.inputs, inputs, cache)
                        + step_bytes(plan, planned)
                        + background.queued_bytes
                    )
                    if held + cache.missing_bytes(upcoming) <= tensor_budget:
                        cache.prefetch(upcoming, _device_of(following, device))
                compute = planned.operation.compute_dtype
                work = [x.to(compute) if compute is not None and x.dtype != compute else x for x in inputs]
                threads.use(planned.operation.light)
                try:
                    result = planned.operation.fn(work)
                except ComposerError as error:
                    raise ComposerError(
                        f"Output tensor '{planned.name}' ({planned.operation.label}): {error}"
                    ) from None
                if result.dtype != planned.dtype:
                    result = result.to(planned.dtype)
                background.write(planned.name, result)
                for ref, tensor in zip(planned.inputs, inputs):
                    uses = pending_uses[ref]
                    while uses and uses[0] <= step:
                        uses.popleft()
                    if uses:
                        next_use[ref] = uses[0]
                        cache.keep(ref, tensor, next_use)
                    else:
                        next_use.pop(ref, None)
                        cache.drop(ref)
                del inputs, work, result
                bar.update(planned.nbytes)
                bar.set_postfix_str(f"{done_before + step + 1}/{len(plan.tensors)} tensors", refresh=False)
            background.flush()
    except BaseException:
        with signals_held():  # a second Ctrl-C must not cut the clean-up short
            cache.cancel()
            for pool in pools:
                pool.shutdown(wait=True, cancel_futures=True)  # no thread may still write into the folder being removed
        raise
    finally:
        threads.restore()
        for pool in pools:
            pool.shutdown(wait=True)
    return Streamed(cache.bytes_read, background.copied_bytes, cache.reads)


def still_to_do(
    plan: Plan, schedule, writer: ShardedWriter, entries: dict[str, dict], wanted: set[str] | None = None
) -> tuple[set[str], list]:
    """(tensors a dead run finished whose bytes check out, the scheduled steps left to do), of the tensors `wanted`
    (all when None). A chain with steps to do is done again whole: its later steps need the state its earlier ones hand on."""
    tensors = plan.tensors if wanted is None else [t for t in plan.tensors if t.name in wanted]
    names = {t.name for t in tensors}
    finished = writer.finished_earlier({name: entry for name, entry in entries.items() if name in names})
    finished -= chains_to_redo(tensors, finished)
    return finished, [planned for planned in schedule.order if planned.name in names and planned.name not in finished]


def execute(
    plan: Plan,
    out: Path,
    options: ExecutionOptions,
    extra_files: Callable[[Path], None] | None = None,
    closing_files: Callable[[Path], None] | None = None,
    cluster: Callable | None = None,
) -> ExecutionReport:
    """Write the plan's output into `out`. `extra_files(folder)` adds the non-tensor files (tokenizer, card) before
    any tensor is computed; `closing_files(folder)` adds those that depend on the tensors, once all are written.
    With `options.ray`, the tensors are computed by a Ray cluster's workers, which `cluster(plan, options)` reaches
    (composer.execute.cluster.Cluster.connect, handed in by the caller: that module runs this one's loop on the
    workers, so this one never imports it); everything else (the partial folder, the journal, the files beside the
    weights, the rename) stays here."""
    device = torch.device(options.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ComposerError("--device cuda was asked for, but torch sees no CUDA device on this machine.")
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    schedule = make_schedule(plan, options.memory_budget)
    folder = OutputFolder(out, options.force)
    connect, cluster = cluster, None
    writer = journal = None
    checks = DeferredChecks(plan.deferred_checks)
    try:
        if options.ray is not None:
            if connect is None:
                raise ComposerError("this command cannot run on a Ray cluster; run it without --ray.")
            cluster = connect(plan, options)  # every node is checked to read every input before anything is written
            cluster_seconds = time.perf_counter() - started
        identity = run_identity(plan, options)
        resumed = _open_partial(folder, identity, options.resume)
        if cluster is not None:
            cluster.check_output(folder.partial, folder.out)
        journal = Journal(folder.partial, identity, fresh=not resumed)
        if plan.config_file is not None:
            (folder.partial / plan.config_file).write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
        if extra_files is not None:
            extra_files(folder.partial)
        writer = ShardedWriter(
            folder.partial,
            plan.tensors,
            options.shard_size,
            options.durable,
            journal,
            reuse=resumed,
            single=plan.weights_file,
            metadata=plan.shard_metadata,
        )
        entries = read_entries(folder.partial) if resumed else {}
        if cluster is not None:
            if resumed:
                log.info(
                    "resuming the run that stopped in %s: %d of %d tensors were journaled; the workers check them",
                    folder.resumed_from,
                    len(entries),
                    len(plan.tensors),
                )
            checks.start()  # beside the workers
            outcome = cluster.run(folder.partial, identity, writer, journal, entries)
            streamed, finished = outcome.streamed, outcome.kept
        else:
            finished, order = still_to_do(plan, schedule, writer, entries) if resumed else (set(), schedule.order)
            if resumed:
                log.info(
                    "resuming the run that stopped in %s: %d of %d tensors were finished and are kept",
                    folder.resumed_from,
                    len(finished),
                    len(plan.tensors),
                )
            with progress_bar(plan.output_bytes(), f"writing {len(plan.tensors)} tensors", options.progress) as bar:
                bar.update(sum(planned.nbytes for planned in plan.tensors if planned.name in finished))
                streamed = stream_tensors(plan, schedule, order, writer, options, bar, len(finished), checks)
        writer.finish()
        if closing_files is not None:
            closing_files(folder.partial)
        checks.wait()  # the output appears only if transformers would load it
        journal.remove()
        remove_unit_journals(folder.partial)
        folder.commit()
        if writer.nonfinite:  # (as a set: a redone chain step may be listed twice)
            _warn_nonfinite(sorted(set(writer.nonfinite)), plan)
    except BaseException as error:
        with signals_held():  # a second Ctrl-C must not cut the clean-up short and leave the partial folder behind
            if writer is not None:
                writer.close()
            kept = options.keep_partial and not folder.committed and journal is not None
            if journal is not None:
                journal.close()
            if not folder.committed:
                folder.discard(keep=kept)
        if isinstance(error, KeyboardInterrupt):
            raise _interrupted(error, folder, kept) from None
        if isinstance(error, OSError) and is_write_failure(error):
            raise write_failure(out, error) from None
        raise
    finally:
        if cluster is not None:
            cluster.close()
        plan.close()
    device_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    report = ExecutionReport(
        out,
        len(plan.tensors),
        streamed.bytes_read + streamed.copied_bytes,
        plan.output_bytes(),
        time.perf_counter() - started,
        streamed.reads,
        device_peak,
        len(finished),
        sorted(set(writer.nonfinite)),
    )
    if cluster is not None:
        report.units, report.retried, report.nodes = cluster.finished, cluster.retried, cluster.summaries()
        report.cluster_seconds = cluster_seconds
    return report
