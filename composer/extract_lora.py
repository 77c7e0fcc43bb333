"""`compose extract-lora FINETUNE --base BASE OUT --rank R`: a PEFT LoRA adapter approximating FINETUNE - BASE.

Each linear weight inside the layers gets the best rank-r approximation of its task vector (Eckart-Young:
the truncated SVD), split evenly as A = sqrt(S) Vh and B = U sqrt(S), with lora_alpha = r so PEFT's scaling
is 1 and B @ A is the approximation itself. The adapter is a plan like any merge's (`adapter_plan`), which the
executor runs: inputs streamed within its memory budget, each pair read, factored and written before the next,
an output that appears whole or not at all, and a run that died resumed. Its card, which reports the errors, is
written once every factor is.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from composer.architecture import architecture_for, build_meta_model
from composer.errors import ComposerError
from composer.execute.executor import ExecutionOptions, execute
from composer.execute.output_folder import check_output_free, check_output_not_input
from composer.plan.model import COPY, Chain, Operation, Plan, PlannedTensor, TensorRef
from composer.sources import ModelSource, open_source
from composer.sources.lora import ADAPTER_CONFIG, SAVED_PREFIX

ADAPTER_FILE = "adapter_model.safetensors"
OVERSAMPLING = 10  # extra random directions for the randomised SVD
POWER_ITERATIONS = 6  # bench/lora_svd.py: within 0.1% of the exact truncation on flat spectra


@dataclass(frozen=True)
class Target:
    """A weight to factor: `name` in both models, the PEFT module it belongs to, and its layout."""

    name: str
    module: str
    shape: tuple[int, ...]
    transposed: bool  # stored in x out (GPT-2's Conv1D): PEFT's fan_in_fan_out

    @property
    def out_in(self) -> tuple[int, int]:
        return (self.shape[1], self.shape[0]) if self.transposed else (self.shape[0], self.shape[1])


@dataclass
class ExtractionReport:
    out: Path
    rank: int
    errors: dict[str, float] = field(default_factory=dict)  # tensor -> relative Frobenius error of B @ A
    modules_to_save: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean_error(self) -> float:
        return sum(self.errors.values()) / len(self.errors) if self.errors else 0.0

    @property
    def worst(self) -> tuple[str, float]:
        return max(self.errors.items(), key=lambda item: item[1]) if self.errors else ("", 0.0)


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, relative error) with B @ A the best rank-`rank` approximation of `delta` (out x in), in float32."""
    delta = delta.to(torch.float32)
    norm = torch.linalg.matrix_norm(delta).item()
    if norm == 0.0:
        return delta.new_zeros(rank, delta.shape[1]), delta.new_zeros(delta.shape[0], rank), 0.0
    sketch = rank + OVERSAMPLING
    if 2 * sketch >= min(delta.shape):  # a sketch this close to full size saves nothing
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[]):  # the sketch is random: seed it so the output is reproducible
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(delta, q=sketch, niter=POWER_ITERATIONS)
        vh = v.T
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]
    b = u[:, :rank] * root
    error = torch.linalg.matrix_norm(delta - b @ a).item() / norm
    return a.contiguous(), b.contiguous(), error


def _module_kinds(config: dict, reference: str) -> dict[str, str]:
    """Module name -> 'linear', 'conv1d' or 'other', from the model transformers builds for `config` (on the meta device)."""
    from transformers.pytorch_utils import Conv1D

    kinds = {}
    for name, module in build_meta_model(config, reference).named_modules():
        kinds[name] = (
            "linear" if isinstance(module, torch.nn.Linear) else "conv1d" if isinstance(module, Conv1D) else "other"
        )
    return kinds


def _matches(module: str, wanted: str) -> bool:
    """PEFT's target_modules rule: the whole module name, or its end after a dot."""
    return module == wanted or module.endswith("." + wanted)


def find_targets(base: ModelSource, config: dict, modules: list[str] | None) -> list[Target]:
    """The 2-D linear weights inside the layers (norms and biases are not low-rank material), limited to `modules`."""
    architecture = architecture_for(config, base.reference)
    infos = base.tensor_infos()
    kinds = _module_kinds(config, base.reference)
    targets = []
    for index in range(architecture.layer_count(config)):
        for weight in architecture.layer_weights(index):
            info = infos.get(weight.name)
            module = weight.name.removesuffix(".weight")
            # a module the checkpoint names differently from transformers' classes is taken for a linear one
            kind = kinds.get(module, "linear")
            if info is not None and weight.name.endswith(".weight") and len(info.shape) == 2 and kind != "other":
                targets.append(Target(weight.name, module, info.shape, kind == "conv1d"))
    if not targets:
        raise ComposerError(
            f"Model '{base.reference}' has no 2-D linear weights inside its layers to extract a LoRA from."
        )
    if modules:
        for wanted in modules:
            if not any(_matches(target.module, wanted) for target in targets):
                names = sorted({target.module.rsplit(".", 1)[-1] for target in targets})
                raise ComposerError(
                    f"--modules '{wanted}' matches no linear layer weight; the layers have {', '.join(names)}."
                )
        targets = [target for target in targets if any(_matches(target.module, wanted) for wanted in modules)]
    return targets


def check_pair(finetune: ModelSource, base: ModelSource, rank: int, modules: list[str] | None) -> list[Target]:
    """Everything that can be refused from configs and headers: architectures, shapes, the rank. Returns the targets."""
    base_config, finetune_config = base.config(), finetune.config()
    base_architecture = architecture_for(base_config, base.reference).name
    finetune_architecture = architecture_for(finetune_config, finetune.reference).name
    if base_architecture != finetune_architecture:
        raise ComposerError(
            f"Models '{finetune.reference}' ({finetune_architecture}) and '{base.reference}' ({base_architecture}) have different "
            "architectures; a LoRA can only be extracted from a fine-tune of the base it is applied to."
        )
    finetune_infos = finetune.tensor_infos()
    for name, info in base.tensor_infos().items():
        other = finetune_infos.get(name)
        if other is not None and other.shape != info.shape:
            raise ComposerError(
                f"Tensor '{name}' has shape {list(other.shape)} in '{finetune.reference}' but {list(info.shape)} in base "
                f"'{base.reference}'; a LoRA can only be extracted between models of the same shapes."
            )
    targets = find_targets(base, base_config, modules)
    for target in targets:
        if target.name not in finetune_infos:
            raise ComposerError(
                f"Model '{finetune.reference}' has no tensor '{target.name}', which base '{base.reference}' has."
            )
        for model, info in ((finetune, finetune_infos[target.name]), (base, base.tensor_infos()[target.name])):
            if not info.dtype.is_floating_point:  # quantised weights: their difference is no task vector
                raise ComposerError(
                    f"Tensor '{target.name}' of '{model.reference}' is {info.dtype}, not floating point; use a float copy of the model."
                )
        if rank > min(target.shape):
            raise ComposerError(
                f"--rank {rank} is larger than tensor '{target.name}' allows (shape {list(target.shape)}: at most rank "
                f"{min(target.shape)}); choose a rank of at most {min(min(t.shape) for t in targets)}."
            )
    return targets


def whole_tensors(finetune: ModelSource, base: ModelSource) -> dict[str, str]:
    """Adapter name -> fine-tune tensor, for the vocabulary tensors (embeddings, output head) the fine-tune changed.

    A head the base ties to its embeddings has no tensor of its own; PEFT (with ensure_weight_tying) still wants
    one in the file, a copy of the changed embeddings, to keep the two tied.
    """
    architecture = architecture_for(base.config(), base.reference)
    infos, finetune_infos = base.tensor_infos(), finetune.tensor_infos()
    present = [
        weight.name for weight in architecture.vocab_weights() if weight.name in infos and weight.name in finetune_infos
    ]
    changed = [name for name in present if not torch.equal(finetune.read(name), base.read(name))]  # one pair at a time
    saved = {name: name for name in changed}
    for weight in architecture.vocab_weights():
        if weight.tied_to in changed and weight.name not in infos:
            saved[weight.name] = weight.tied_to
    return saved


def factoring_bytes(out_features: int, in_features: int, rank: int) -> int:
    """The most that factoring one [out, in] task vector holds beyond the two weights read: the difference in float32
    and two more of its size (the weights widened, the SVD's copy of it, or B @ A and what is left), and the SVD's factors."""
    sketch = rank + OVERSAMPLING
    kept = min(out_features, in_features) if 2 * sketch >= min(out_features, in_features) else 3 * sketch
    return 3 * out_features * in_features * 4 + (out_features + in_features + 1) * kept * 4


class Factors:
    """The A and B of each target, from one truncated SVD of its task vector: A's step factors it and leaves B for B's
    step, which the schedule runs next (a B asked for on its own factors again). `errors` holds each target's."""

    def __init__(self, rank: int):
        self.rank = rank
        self.errors: dict[str, float] = {}
        self._waiting: dict[str, torch.Tensor] = {}  # target -> its B, from A's step to B's

    def _factor(self, target: Target, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        finetune, base = inputs
        delta = finetune.to(torch.float32) - base.to(torch.float32)
        if not bool(torch.isfinite(delta).all()):  # an SVD of NaN or infinity fails (or returns NaN factors)
            raise ComposerError(
                f"Tensor '{target.name}' holds NaN or infinite values in the fine-tune or the base, so it has no low-rank approximation."
            )
        a, b, self.errors[target.name] = low_rank_factors(delta.T if target.transposed else delta, self.rank)
        return a, b

    def a(self, target: Target, inputs: list[torch.Tensor]) -> torch.Tensor:
        a, self._waiting[target.name] = self._factor(target, inputs)
        return a

    def b(self, target: Target, inputs: list[torch.Tensor]) -> torch.Tensor:
        waiting = self._waiting.pop(target.name, None)
        return waiting if waiting is not None else self._factor(target, inputs)[1]


def adapter_plan(
    finetune: ModelSource,
    base: ModelSource,
    targets: list[Target],
    whole: dict[str, str],
    factors: Factors,
    config: dict,
) -> Plan:
    """The adapter as a plan: each target's lora_A and lora_B (a chain of two steps sharing one SVD), then the whole
    tensors, in PEFT's names; written as one adapter_model.safetensors with `config` as adapter_config.json."""
    infos = finetune.tensor_infos()
    rank = factors.rank
    tensors = []
    for target in targets:
        out_features, in_features = target.out_in
        dtype = infos[target.name].dtype if infos[target.name].dtype.is_floating_point else torch.float32
        inputs = (TensorRef(finetune.reference, target.name), TensorRef(base.reference, target.name))
        chain = Chain(label=f"the factors of {target.name}", state_bytes=out_features * rank * 4)
        working = factoring_bytes(out_features, in_features, rank)
        for link, (factor, shape) in enumerate((("A", (rank, in_features)), ("B", (out_features, rank)))):
            operation = Operation(
                label=f"lora_{factor} (truncated SVD)",
                fn=partial(getattr(factors, factor.lower()), target),
                arguments={"rank": rank},
                working_bytes=working,
                chain=chain,
                link=link,
            )
            tensors.append(
                PlannedTensor(f"{SAVED_PREFIX}{target.module}.lora_{factor}.weight", shape, dtype, inputs, operation)
            )
    for saved, name in whole.items():
        tensors.append(
            PlannedTensor(
                SAVED_PREFIX + saved, infos[name].shape, infos[name].dtype, (TensorRef(finetune.reference, name),), COPY
            )
        )
    sources = {base.reference: base, finetune.reference: finetune}
    return Plan(
        tensors=tensors,
        sources=sources,
        config=config,
        tokenizer_source=None,
        recipe_text="",
        method="extract-lora",
        parents=[finetune.reference, base.reference],
        weights_file=ADAPTER_FILE,
        config_file=None,
    )


def measured_errors(adapter: Path, finetune: ModelSource, base: ModelSource, targets: list[Target]) -> dict[str, float]:
    """Each target's relative error as its factors were written (for those a run that died had finished)."""
    from safetensors import safe_open

    errors = {}
    with safe_open(str(adapter), "pt") as factors:
        for target in targets:
            delta = finetune.read(target.name).to(torch.float32) - base.read(target.name).to(torch.float32)
            delta = delta.T if target.transposed else delta
            a, b = (
                factors.get_tensor(f"{SAVED_PREFIX}{target.module}.lora_{factor}.weight").to(torch.float32)
                for factor in "AB"
            )
            norm = torch.linalg.matrix_norm(delta).item()
            errors[target.name] = torch.linalg.matrix_norm(delta - b @ a).item() / norm if norm else 0.0
    return errors


def adapter_config(
    base_reference: str, rank: int, targets: list[Target], modules: list[str] | None, whole: dict[str, str]
) -> dict:
    target_modules = list(modules) if modules else sorted({target.module.rsplit(".", 1)[-1] for target in targets})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_reference,
        "r": rank,
        "lora_alpha": rank,  # scaling alpha / r = 1: B @ A is the approximation itself
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        "fan_in_fan_out": any(target.transposed for target in targets),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": [name.removesuffix(".weight") for saved, name in whole.items() if saved == name] or None,
        "ensure_weight_tying": any(saved != name for saved, name in whole.items()),
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def adapter_card(finetune_reference: str, base_reference: str, rank: int, report: ExtractionReport) -> str:
    worst_name, worst_error = report.worst
    return (
        f"---\nbase_model: {json.dumps(base_reference)}\nlibrary_name: peft\ntags:\n- composer\n- lora\n- extract-lora\n---\n"
        f"# LoRA extracted from {finetune_reference}\n\n"
        f"A rank-{rank} LoRA adapter for `{base_reference}` that approximates `{finetune_reference}` - `{base_reference}`, "
        f"extracted with no training by composer's `extract-lora` (truncated SVD of each task vector).\n\n"
        f"Relative Frobenius error of the approximation over {len(report.errors)} tensors: mean {report.mean_error:.4f}, "
        f"worst {worst_error:.4f} (`{worst_name}`).\n"
        + (
            f"\nWhole tensors saved (modules_to_save): {', '.join(f'`{m}`' for m in report.modules_to_save)}.\n"
            if report.modules_to_save
            else ""
        )
    )


def source_pair(
    finetune_reference: str, base_reference: str, relative_to: Path | None
) -> tuple[ModelSource, ModelSource]:
    finetune = open_source(finetune_reference, relative_to)
    try:
        return finetune, open_source(base_reference, relative_to)
    except BaseException:
        finetune.close()
        raise


def extract_lora(
    finetune_reference: str,
    base_reference: str,
    out: Path,
    rank: int,
    force: bool = False,
    modules: list[str] | None = None,
    embeddings: bool = False,
    progress: bool | None = None,
    relative_to: Path | None = None,
) -> ExtractionReport:
    """Write into `out` a PEFT LoRA adapter for the base that approximates the fine-tune; report its error."""

    if rank <= 0:
        raise ComposerError(f"--rank must be a positive number of dimensions (got {rank}).")
    check_output_free(out, force)
    started = time.perf_counter()
    finetune, base = source_pair(finetune_reference, base_reference, relative_to)
    try:
        check_output_not_input(out, finetune.input_paths() | base.input_paths())
        targets = check_pair(finetune, base, rank, modules)
        whole = whole_tensors(finetune, base) if embeddings else {}
        config = adapter_config(base_reference, rank, targets, modules, whole)
        report = ExtractionReport(Path(out), rank, modules_to_save=config["modules_to_save"] or [])
        factors = Factors(rank)

        def extra_files(folder: Path) -> None:
            (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

        def closing_files(folder: Path) -> None:
            kept = [target for target in targets if target.name not in factors.errors]  # finished by a run that died
            factors.errors.update(measured_errors(folder / ADAPTER_FILE, finetune, base, kept) if kept else {})
            report.errors = {target.name: factors.errors[target.name] for target in targets}
            (folder / "README.md").write_text(adapter_card(finetune_reference, base_reference, rank, report))

        plan = adapter_plan(finetune, base, targets, whole, factors, config)
        execute(plan, report.out, ExecutionOptions(force=force, progress=progress), extra_files, closing_files)
    finally:
        finetune.close()
        base.close()
    report.seconds = time.perf_counter() - started
    return report
