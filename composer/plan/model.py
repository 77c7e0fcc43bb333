"""The plan: every output tensor, the input tensors it reads and the pure operation that makes it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from composer.sources import ModelSource


@dataclass(frozen=True)
class TensorRef:
    model: str
    name: str


@dataclass(frozen=True, eq=False)
class Chain:
    """Steps that hand state on from one to the next (a model run over prompts one layer at a time, say): they run in
    the order of their operations' `link`, `state_bytes` are held from the first of them to the last, and a resumed
    run that finds only some of them finished does them all again."""

    label: str
    state_bytes: int


@dataclass(frozen=True, kw_only=True)
class Operation:
    """`fn(inputs) -> tensor`; `label` and `arguments` are only for showing the plan."""

    label: str
    fn: Callable[[list[torch.Tensor]], torch.Tensor]
    arguments: dict[str, Any] = field(default_factory=dict)
    compute_dtype: torch.dtype | None = None
    temporaries: float = (
        2.0  # tensor-sized buffers in compute_dtype it holds at once beyond inputs and result (for the memory budget)
    )
    light: bool = False  # bound by reading and writing, not computing: run on one core fewer than the machine has
    copies: bool = (
        False  # only copies (or scales) what it reads: a merge on a GPU runs it on the CPU, with no round trip
    )
    verbatim: bool = False  # its result is its one input unchanged: the bytes may go file to file, never through memory
    working_dtype: torch.dtype | None = (
        None  # the dtype of its temporaries when it is not compute_dtype (a fused stage's steps)
    )
    working_bytes: int = (
        0  # bytes it holds while it runs that are not tensor-sized buffers (a model's activations, say)
    )
    chain: Chain | None = None  # the chain of steps it belongs to, if any, at place `link`
    link: int = 0

    def buffers(self, input_dtypes) -> float:
        """Tensor-sized buffers the step holds beyond its inputs and result: its temporaries and its inputs converted
        to `compute_dtype` (none without one), or, with a `working_dtype`, its temporaries as declared."""
        if self.working_dtype is not None:
            return self.temporaries
        if self.compute_dtype is None:
            return 0.0
        return self.temporaries + sum(1 for dtype in input_dtypes if dtype != self.compute_dtype)


def first_input(inputs: list[torch.Tensor]) -> torch.Tensor:
    return inputs[0]


COPY = Operation(
    label="copy", fn=first_input, light=True, copies=True, verbatim=True
)  # an output tensor that is one input as read


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    inputs: tuple[TensorRef, ...]
    operation: Operation

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


@dataclass
class CalibrationRequest:
    """What a calibration method's pass runs (composer.calibration): `models` (the merged ones, base excluded, in the
    order of the linear steps' inputs) over `texts` ((file as written, text)), layer by layer; `source`: "own" (each
    model's earlier layers feed its next, RegMean) or "merged" (the merged earlier layers do, RegMean++)."""

    method: str
    source: str
    texts: list[tuple[str, str]]
    digest: str  # of the texts, so that a resumed run never mixes tensors solved from another text
    models: list[str]
    layer_prefix: str
    linear_names: list[list[str]]  # per layer, its linear weights in the order the layer holds them


@dataclass
class Plan:
    tensors: list[PlannedTensor]
    sources: dict[str, ModelSource]
    config: dict
    tokenizer_source: str | None
    recipe_text: str
    method: str
    parents: list[str]
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)
    stages: list[tuple[str, str]] = field(
        default_factory=list
    )  # (stage name, its method), output last; empty for one merge
    weights_file: str | None = (
        None  # all tensors in one file of this name (a PEFT adapter's) instead of model.safetensors shards
    )
    config_file: str | None = (
        "config.json"  # where `config` is written; None: the plan's extra files hold whatever config it has
    )
    shard_metadata: dict[str, str] = field(default_factory=dict)  # each weights file's header metadata (provenance)
    # checks of the output that import transformers (seconds): each raises a ComposerError if the output would not
    # load; the executor runs them beside the first writes and commits the output only when they pass
    deferred_checks: list[Callable[[], None]] = field(default_factory=list)
    # checks that only `compose plan` runs: transformers' own, where the architecture definition's rules answered for a run
    plan_checks: list[Callable[[], None]] = field(default_factory=list)
    # (function, arguments) that build this same plan in another process (a cluster's worker), the function a
    # module-level one; None where the plan holds what another process cannot rebuild (sources opened by a caller)
    replay: tuple[Callable[..., Plan], tuple] | None = None
    calibration: CalibrationRequest | None = None  # a calibration method's pass, still to be attached to the plan

    def run_deferred_checks(self) -> None:
        """Run the deferred checks now, and those only a dry run makes (for a dry run, which writes nothing)."""
        for check in self.deferred_checks + self.plan_checks:
            check()

    def input_bytes(self) -> int:
        seen = {}
        for tensor in self.tensors:
            for ref in tensor.inputs:
                seen[ref] = self.sources[ref.model].tensor_infos()[ref.name].nbytes
        return sum(seen.values())

    def output_bytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors)

    def close(self) -> None:
        for source in self.sources.values():
            source.close()
