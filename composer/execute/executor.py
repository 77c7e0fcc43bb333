"""Run a plan: stream inputs from their sources, apply each operation, write each result, free memory.

The executor knows tensors, bytes and devices; it never knows which method or feature made the plan.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from composer.errors import ComposerError
from composer.execute.output_folder import OutputFolder
from composer.execute.schedule import make_schedule
from composer.execute.writer import ShardedWriter
from composer.plan.model import Plan, TensorRef

GIB = 1024**3


@dataclass
class ExecutionOptions:
    memory_budget: int = 2 * GIB
    shard_size: int = 5 * GIB
    device: str = "cpu"
    force: bool = False
    progress: bool | None = None  # None: only when stderr is a terminal


@dataclass
class ExecutionReport:
    out: Path
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    reads: Counter = field(default_factory=Counter)


class InputCache:
    """Input tensors kept between their uses, evicting the one needed furthest ahead when over budget."""

    def __init__(self, plan: Plan, budget: int, device: torch.device):
        self.plan = plan
        self.budget = budget
        self.device = device
        self.tensors: dict[TensorRef, torch.Tensor] = {}
        self.resident = 0
        self.reads: Counter = Counter()
        self.bytes_read = 0

    def get(self, ref: TensorRef) -> torch.Tensor:
        tensor = self.tensors.get(ref)
        if tensor is None:
            tensor = self.plan.sources[ref.model].read(ref.name)
            self.reads[ref] += 1
            self.bytes_read += tensor.numel() * tensor.element_size()
            if self.device.type != "cpu":
                tensor = tensor.to(self.device, non_blocking=True)
        return tensor

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


def _progress(total_bytes: int, count: int, enabled: bool | None):
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=f"writing {count} tensors",
                disable=(not sys.stderr.isatty()) if enabled is None else not enabled, file=sys.stderr, dynamic_ncols=True)


def execute(plan: Plan, out: Path, options: ExecutionOptions, extra_files: Callable[[Path], None] | None = None) -> ExecutionReport:
    """Write the plan's output into `out`. `extra_files(folder)` adds the non-tensor files (tokenizer, card)."""
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ComposerError("--device cuda was asked for, but torch sees no CUDA device on this machine.")
    started = time.perf_counter()
    schedule = make_schedule(plan, options.memory_budget)
    folder = OutputFolder(out, options.force)
    writer = None
    try:
        (folder.partial / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
        if extra_files is not None:
            extra_files(folder.partial)
        writer = ShardedWriter(folder.partial, plan.tensors, options.shard_size)
        cache = InputCache(plan, options.memory_budget, device)
        pending_uses: dict[TensorRef, deque[int]] = {}
        for step, tensor in enumerate(schedule.order):
            for ref in tensor.inputs:
                pending_uses.setdefault(ref, deque()).append(step)
        next_use: dict[TensorRef, int] = {}
        with _progress(plan.output_bytes(), len(plan.tensors), options.progress) as bar:
            for step, planned in enumerate(schedule.order):
                inputs = [cache.get(ref) for ref in planned.inputs]
                compute = planned.operation.compute_dtype
                work = [x.to(compute) if compute is not None and x.dtype != compute else x for x in inputs]
                try:
                    result = planned.operation.fn(work)
                except ComposerError as error:
                    raise ComposerError(f"Output tensor '{planned.name}' ({planned.operation.label}): {error}") from None
                if result.dtype != planned.dtype:
                    result = result.to(planned.dtype)
                writer.write(planned.name, result)
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
                bar.set_postfix_str(f"{step + 1}/{len(schedule.order)} tensors", refresh=False)
        writer.finish()
        folder.commit()
    except BaseException:
        if writer is not None:
            writer.close()
        folder.discard()
        raise
    finally:
        plan.close()
    return ExecutionReport(out, len(plan.tensors), cache.bytes_read, plan.output_bytes(), time.perf_counter() - started, cache.reads)
