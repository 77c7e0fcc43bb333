"""MoE recipe -> Plan. Attention, norms and embeddings come from the base model, each routed expert's MLP from
its own model, and each layer's router from the gate settings. Everything a user can get wrong is checked here,
from configs and headers, before any weights are read.

A router's plan entry lists the base tensors its gate reads (composer.moe.compute says which and why), so the
executor reads them within its budget and `compose plan` counts them; the prompts are tokenized here, and no
model runs until the executor computes the gates."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from composer.architecture import Architecture, architecture_for, build_meta_model
from composer.errors import ComposerError
from composer.moe.compute import GateComputer, GateSettings
from composer.moe.hidden import EMBEDDINGS
from composer.moe.layout import (
    MoETensor,
    OutputArchitecture,
    check_dense,
    checkpoint_names,
    choose_output,
    classify,
    output_config,
)
from composer.moe.schema import Expert, MoEConfig
from composer.plan.build import parse_dtype, tensor_seed
from composer.plan.model import COPY, Operation, Plan, PlannedTensor, TensorRef
from composer.plan.transformers_facts import remembered
from composer.sources import ModelSource, open_source

PROMPT_PREVIEW = 70


@dataclass
class ExpertPrompts:
    positives: list[list[str]]
    negatives: list[list[str]]
    notes: list[str]


def _open(reference: str, key: str, recipe_dir: Path | None, sources: dict[str, ModelSource]) -> ModelSource:
    if reference not in sources:
        try:
            sources[reference] = open_source(reference, recipe_dir)
        except ComposerError as error:
            raise ComposerError(f"Recipe key '{key}': {error}") from None
    return sources[reference]


def _preview(text: str) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= PROMPT_PREVIEW else flat[: PROMPT_PREVIEW - 3] + "...")


def _prompts(config: MoEConfig, recipe_dir: Path | None, prompt_model=None) -> ExpertPrompts:
    """Each expert's positive prompts (its own plus those picked from the corpus) and negatives, with notes."""
    from composer.moe.prompts import load_sentence_model, read_prompt_file, select_prompts

    experts = config.experts
    positives = [list(e.positive_prompts or []) for e in experts]
    negatives = [list(e.negative_prompts or []) for e in experts]
    notes: list[str] = []
    if not config.uses_prompts:
        shared = config.shared_experts or []
        if any(positives) or any(e.description or e.positive_prompts for e in experts + shared):
            notes.append(
                f"gate_mode {config.gate_mode} does not use prompts; the experts' prompts and descriptions are ignored"
            )
        return ExpertPrompts([[] for _ in experts], [[] for _ in experts], notes)
    described = [i for i, e in enumerate(experts) if e.description]
    if described and not config.prompt_corpus:
        raise ComposerError(
            f"Recipe key 'experts[{described[0]}].description': a description picks prompts from a corpus, and the recipe "
            "has no 'prompt_corpus' (a text file with one prompt a line, or a YAML list)."
        )
    if config.prompt_corpus and not described:
        raise ComposerError("Recipe key 'prompt_corpus': no expert has a 'description' to pick corpus prompts by.")
    if described:
        corpus_path = Path(config.prompt_corpus).expanduser()
        if recipe_dir is not None and not corpus_path.is_absolute():
            corpus_path = recipe_dir / corpus_path
        corpus = [p for group in read_prompt_file(corpus_path).values() for p in group]
        model = prompt_model if prompt_model is not None else load_sentence_model(config.prompt_model)
        selection = select_prompts([e.description for e in experts], corpus, config.prompts_per_expert, model)
        for i in described:
            picked = selection.picked[i]
            positives[i] += [text for text, _ in picked]
            notes.append(
                f"{config.expert_label(i)} described as {_preview(experts[i].description)}: {len(picked)} prompt(s) picked from {config.prompt_corpus}"
            )
            notes += [f"    {similarity:.3f}  {_preview(text)}" for text, similarity in picked]
    missing = [i for i, p in enumerate(positives) if not p]
    if missing:
        raise ComposerError(
            f"gate_mode '{config.gate_mode}' needs prompts for every expert, and {', '.join(config.expert_label(i) for i in missing)} "
            "has none: give it 'positive_prompts' (or a 'description' and a 'prompt_corpus'), or use gate_mode random."
        )
    for e in range(len(experts)):
        for f in range(e + 1, len(experts)):
            if sorted(positives[e]) == sorted(positives[f]) and sorted(negatives[e]) == sorted(negatives[f]):
                raise ComposerError(
                    f"{config.expert_label(e)} and {config.expert_label(f)} have the same prompts, so their router rows would be "
                    "identical and the router could never prefer one; give each expert prompts of its own kind."
                )
    for i in range(len(experts)):
        if i not in described:
            count = len(positives[i])
            notes.append(
                f"{config.expert_label(i)}: {count} prompt(s), e.g. {_preview(positives[i][0])}"
                + (f"; {len(negatives[i])} negative" if negatives[i] else "")
            )
    return ExpertPrompts(positives, negatives, notes)


def _check_experts(config: MoEConfig, configs: dict[str, dict], architectures: dict[str, Architecture]) -> None:
    base = config.base_model
    base_config = configs[base]
    keys = [(f"experts[{i}].source_model", e) for i, e in enumerate(config.experts)]
    keys += [(f"shared_experts[{i}].source_model", e) for i, e in enumerate(config.shared_experts or [])]
    for key, expert in keys:
        ref = expert.source_model
        if architectures[ref].name != architectures[base].name:
            raise ComposerError(
                f"Recipe key '{key}': '{ref}' is a {architectures[ref].name} model but the base '{base}' is {architectures[base].name}; "
                "every expert must share the base model's architecture."
            )
        for setting in ("hidden_size", "num_hidden_layers"):
            if configs[ref].get(setting) != base_config.get(setting):
                raise ComposerError(
                    f"Recipe key '{key}': '{ref}' has {setting} {configs[ref].get(setting)} but the base '{base}' has "
                    f"{base_config.get(setting)}; experts must match the base model's shape."
                )
    sizes = {e.source_model: configs[e.source_model].get("intermediate_size") for e in config.experts}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"'{ref}': {size}" for ref, size in sizes.items())
        raise ComposerError(
            f"The routed experts have different MLP sizes (intermediate_size {listed}); an MoE layer holds experts of one size."
        )


def _check_counts(config: MoEConfig) -> None:
    count = len(config.experts)
    if not 1 <= config.experts_per_token <= count:
        raise ComposerError(
            f"Recipe key 'experts_per_token': {config.experts_per_token} is not between 1 and the number of experts ({count}); "
            "each token is routed to that many experts."
        )
    if len(config.shared_experts or []) > 1:
        raise ComposerError(
            "Recipe key 'shared_experts': the MoE outputs composer writes have one shared expert at most."
        )
    for key, experts in (("experts", config.experts), ("shared_experts", config.shared_experts or [])):
        for i, expert in enumerate(experts):
            for setting in ("noise_scale", "residual_scale"):
                value = getattr(expert, setting)
                if value is not None and (value < 0 or value != value or value == float("inf")):
                    raise ComposerError(f"Recipe key '{key}[{i}].{setting}': {value} must be a finite number >= 0.")


class _MoEPlanner:
    def __init__(
        self,
        config: MoEConfig,
        recipe_text: str,
        recipe_dir: Path | None,
        sources: dict[str, ModelSource] | None,
        prompt_model=None,
    ):
        _check_counts(config)
        self.config = config
        self.recipe_text = recipe_text
        self.sources = sources if sources is not None else {}
        _open(config.base_model, "base_model", recipe_dir, self.sources)
        for i, expert in enumerate(config.experts):
            _open(expert.source_model, f"experts[{i}].source_model", recipe_dir, self.sources)
        for i, expert in enumerate(config.shared_experts or []):
            _open(expert.source_model, f"shared_experts[{i}].source_model", recipe_dir, self.sources)
        self.configs = {ref: self.sources[ref].config() for ref in config.referenced_models()}
        for ref, model_config in self.configs.items():
            check_dense(model_config, ref)
        self.architectures = {ref: architecture_for(c, ref) for ref, c in self.configs.items()}
        _check_experts(config, self.configs, self.architectures)
        base_config = self.configs[config.base_model]
        self.output: OutputArchitecture = choose_output(
            base_config.get("model_type"), config.architecture, bool(config.shared_experts)
        )
        self.shared: Expert | None = None
        self.notes: list[str] = []
        if self.output.shared_expert:
            self.shared = (config.shared_experts or [None])[0] or Expert(source_model=config.base_model)
            if not config.shared_experts:
                self.notes.append(f"{self.output.class_name} needs a shared expert; it is the base model's MLP")
        # mergekit's shared expert (full scale, weighed by its own gate) or composer's fixed split
        self.gated = self.shared is not None and config.gated_shared_expert
        self._check_shared()
        if self.output.name == "deepseek_v3" and len(config.experts) < 2:
            raise ComposerError(
                "Recipe key 'experts': DeepSeek-V3's router picks experts by their two best scores, so it needs two routed experts or more."
            )
        self.prompts = _prompts(config, recipe_dir, prompt_model)
        self.out_dtype = parse_dtype(config.dtype, "Recipe key 'dtype'")
        self.tokenizer_ref = config.tokenizer_source or config.base_model
        if self.tokenizer_ref != config.base_model:
            _open(self.tokenizer_ref, "tokenizer_source", recipe_dir, self.sources)
        if not self.sources[self.tokenizer_ref].has_tokenizer() and config.uses_prompts:
            raise ComposerError(
                f"Model '{self.tokenizer_ref}' has no tokenizer files, and gate_mode '{config.gate_mode}' tokenizes prompts."
            )

    @property
    def base(self) -> str:
        return self.config.base_model

    @property
    def gate_from_prompts(self) -> bool:
        """The shared expert's gate row is computed from its prompts (mergekit's Qwen2-MoE with a prompt gate mode)."""
        return self.gated and self.output.shared_gate and self.config.uses_prompts

    def _check_shared(self) -> None:
        expert = (self.config.shared_experts or [None])[0]
        if expert is None or self.shared is None:
            return
        if expert.description:
            raise ComposerError(
                "Recipe key 'shared_experts[0].description': descriptions pick routed experts' prompts from the corpus; "
                "give the shared expert 'positive_prompts' instead."
            )
        has_prompts = bool(expert.positive_prompts or expert.negative_prompts)
        if not self.gated:
            if has_prompts:
                self.notes.append(
                    f"shared_expert_weight {self.config.shared_weight} fixes the shared expert's share; its prompts are not used"
                )
        elif not self.output.shared_gate:
            if has_prompts:
                raise ComposerError(
                    f"Recipe key 'shared_experts[0]': {self.output.class_name}'s shared expert has no gate (it is added "
                    "to every token at full scale), so its prompts would not be used; remove them (mergekit-moe refuses "
                    "them too), or set 'shared_expert_weight' for a fixed split."
                )
        elif self.config.uses_prompts and not expert.positive_prompts:
            raise ComposerError(
                f"Recipe key 'shared_experts[0]': with gate_mode '{self.config.gate_mode}' the shared expert's gate is "
                "computed from its prompts, as mergekit-moe does, and it has no 'positive_prompts'. Give it some, or set "
                "'shared_expert_weight' (e.g. 0.5) for composer's fixed split with no gate."
            )

    def _dense_name(self, layer: int, suffix: str) -> str:
        return self.architectures[self.base].layer_prefix.format(i=layer) + suffix

    def _info(self, ref: str, name: str):
        info = self.sources[ref].tensor_infos().get(name)
        if info is None:
            raise ComposerError(f"Model '{ref}' has no tensor '{name}', which the MoE output needs.")
        return info

    def build(self) -> Plan:
        config = self.config
        base_config = self.configs[self.base]
        intermediate = self.configs[config.experts[0].source_model].get("intermediate_size")
        shared_intermediate = self.configs[self.shared.source_model].get("intermediate_size") if self.shared else None
        dtype_name = str(self.out_dtype).removeprefix("torch.") if self.out_dtype else None
        # transformers' answers (seconds of imports and model building) are remembered between runs
        layout = (len(config.experts), config.experts_per_token, intermediate, shared_intermediate, dtype_name)
        out_config = remembered(
            "moe-config",
            {"output": self.output.class_name, "dense": base_config, "layout": layout},
            lambda: output_config(self.output, base_config, *layout),
        )
        expected = {
            name: tuple(shape)
            for name, shape in remembered(
                "meta-shapes", out_config, lambda: _meta_shapes(out_config, self.output)
            ).items()
        }
        architecture = self.architectures[self.base]
        suffixes = set(architecture.layer_tensors) | set(architecture.layer_optional)
        names = remembered("checkpoint-names", out_config, lambda: checkpoint_names(out_config))
        kinds = [(name, classify(name, architecture.layer_prefix, suffixes)) for name in names]
        self.computer = GateComputer(
            GateSettings(
                config.gate_mode,
                config.pooling,
                config.gate_rows,
                self.prompts.positives,
                self.prompts.negatives,
                [config.expert_label(i) for i in range(len(config.experts))],
                config.random_seed or 0,
                self.shared.positive_prompts if self.gate_from_prompts else None,
                list(self.shared.negative_prompts or []) if self.gate_from_prompts else [],
            ),
            self.sources[self.base],
            self.sources[self.tokenizer_ref],
            base_config,
            architecture.layer_prefix,
            sorted({what.layer for _, what in kinds if what.kind == "router"}),
        )
        tensors = [self._tensor(name, what) for name, what in kinds]
        self._check_shapes(tensors, expected, intermediate, base_config["hidden_size"])
        notes = [
            f"output: {self.output.class_name}, {len(config.experts)} experts, top-{config.experts_per_token} routing"
            + self._shared_note(),
            f"router gates: {config.gate_mode}"
            + (
                f" ({config.pooling} pooling, {config.gate_rows} rows), computed while writing"
                if config.uses_prompts
                else ""
            ),
        ]
        return Plan(
            tensors=tensors,
            sources=self.sources,
            config=out_config,
            tokenizer_source=self.tokenizer_ref,
            recipe_text=self.recipe_text,
            method="moe",
            parents=config.referenced_models(),
            chat_template=config.chat_template,
            notes=notes + self.notes + self.prompts.notes,
        )

    def _shared_note(self) -> str:
        if self.shared is None:
            return ""
        where = f", shared expert from '{self.shared.source_model}'"
        if not self.gated:
            return (
                where
                + f" weighted {self.config.shared_weight} (shared_expert_weight; routed experts {1 - self.config.shared_weight:g})"
            )
        if not self.output.shared_gate:
            return where + " at full scale, beside the routed experts (mergekit's)"
        gate = "its prompts" if self.config.uses_prompts else f"gate_mode {self.config.gate_mode}"
        return (
            where
            + f" at full scale, gated by a row from {gate} (mergekit's; shared_expert_weight fixes a split instead)"
        )

    # --- tensors ------------------------------------------------------------------------------------
    def _tensor(self, name: str, what: MoETensor) -> PlannedTensor:
        if what.kind == "copy":
            info = self._info(self.base, name)
            return PlannedTensor(name, info.shape, self.out_dtype or info.dtype, (TensorRef(self.base, name),), COPY)
        if what.kind in ("router", "shared_gate"):
            return self._gate_tensor(name, what)
        if what.kind == "router_bias":
            count = len(self.config.experts)
            operation = Operation(label="zeros (no score correction)", fn=partial(_zeros, (count,)))
            return PlannedTensor(name, (count,), torch.float32, (), operation)
        if what.kind in ("expert", "shared"):
            expert = self.shared if what.kind == "shared" else self.config.experts[what.expert]
            source_name = self._dense_name(what.layer, f"mlp.{what.role}.weight")
            info = self._info(expert.source_model, source_name)
            scale, noise = self._expert_scale(expert, what.role, what.kind == "shared"), expert.noise_scale or 0.0
            operation = _expert_operation(scale, noise, tensor_seed(self.config.random_seed or 0, name))
            return PlannedTensor(
                name,
                info.shape,
                self.out_dtype or info.dtype,
                (TensorRef(expert.source_model, source_name),),
                operation,
            )
        return self._fused_tensor(name, what)

    def _expert_scale(self, expert: Expert, role: str, shared: bool) -> float:
        if role != "down_proj":
            return 1.0
        scale = expert.residual_scale if expert.residual_scale is not None else 1.0
        if self.shared is not None and not self.gated:
            # a fixed split: down-projections set it. A Qwen2-MoE shared gate is zero, so sigmoid weighs it 1/2
            weight = self.config.shared_weight
            scale *= (2 if self.output.shared_gate else 1) * weight if shared else 1 - weight
        return scale

    def _fused_tensor(self, name: str, what: MoETensor) -> PlannedTensor:
        """transformers' in-memory layout (experts stacked in one 3-D tensor), for versions that save it as is."""
        roles = ("gate_proj", "up_proj") if what.kind == "experts_gate_up" else ("down_proj",)
        refs, infos = [], []
        for expert in self.config.experts:
            for role in roles:
                source_name = self._dense_name(what.layer, f"mlp.{role}.weight")
                infos.append(self._info(expert.source_model, source_name))
                refs.append(TensorRef(expert.source_model, source_name))
        rows, columns = infos[0].shape
        shape = (len(self.config.experts), rows * len(roles), columns)
        scales = [self._expert_scale(e, role, False) for e in self.config.experts for role in roles]
        noises = [e.noise_scale or 0.0 for e in self.config.experts for _ in roles]
        seed = tensor_seed(self.config.random_seed or 0, name)

        def stack(inputs: list[torch.Tensor], _per=len(roles)) -> torch.Tensor:
            parts = [
                _expert_operation(s, n, seed + i).fn([x]) for i, (x, s, n) in enumerate(zip(inputs, scales, noises))
            ]
            return torch.stack([torch.cat(parts[i : i + _per]) for i in range(0, len(parts), _per)])

        return PlannedTensor(
            name,
            shape,
            self.out_dtype or infos[0].dtype,
            tuple(refs),
            Operation(
                label="stack experts",
                fn=stack,
                arguments={"experts": len(self.config.experts)},
                compute_dtype=torch.float32,
                light=True,
            ),
        )

    def _gate_tensor(self, name: str, what: MoETensor) -> PlannedTensor:
        hidden = self._info(self.base, self._dense_name(what.layer, "post_attention_layernorm.weight")).shape[0]
        dtype = self.out_dtype or self._info(self.base, EMBEDDINGS).dtype
        computer, layer, seed = self.computer, what.layer, tensor_seed(self.config.random_seed or 0, name)
        if what.kind == "shared_gate":
            if not self.gated:
                operation = Operation(label="zeros (shared expert weight fixed)", fn=partial(_zeros, (1, hidden)))
                return PlannedTensor(name, (1, hidden), dtype, (), operation)

            def shared_gate(tensors: list[torch.Tensor]) -> torch.Tensor:
                return computer.shared_row(layer, seed).float()

            if not self.gate_from_prompts:
                operation = Operation(
                    label="shared expert gate", fn=shared_gate, arguments={"mode": self.config.gate_mode}
                )
                return PlannedTensor(name, (1, hidden), dtype, (), operation)
            # made by the router step of its layer: the next step of the chain. It names its layer's post-attention
            # norm as its input only so that the schedule places it beside that router (a step that reads nothing
            # would go first)
            norm = TensorRef(self.base, self._dense_name(layer, "post_attention_layernorm.weight"))
            operation = Operation(
                label="shared expert gate",
                fn=shared_gate,
                arguments={"mode": self.config.gate_mode, "pooling": self.config.pooling, "rows": "average"},
                chain=computer.chain,
                link=2 * layer + 1,
            )
            return PlannedTensor(name, (1, hidden), dtype, (norm,), operation)
        inputs = computer.input_names(layer)

        def router(tensors: list[torch.Tensor]) -> torch.Tensor:
            return computer.rows(layer, seed, tensors).float()

        arguments = {"mode": self.config.gate_mode}
        if self.config.uses_prompts:
            arguments.update(pooling=self.config.pooling, rows=self.config.gate_rows)
        working = computer.working_bytes(layer, [self._info(self.base, input_name) for input_name in inputs])
        operation = Operation(
            label="router gate",
            fn=router,
            arguments=arguments,
            working_bytes=working,
            chain=computer.chain,
            link=2 * layer,
        )
        return PlannedTensor(
            name,
            (len(self.config.experts), hidden),
            dtype,
            tuple(TensorRef(self.base, input_name) for input_name in inputs),
            operation,
        )

    def _check_shapes(
        self, tensors: list[PlannedTensor], expected: dict[str, tuple], intermediate: int, hidden: int
    ) -> None:
        """Tensors saved under the names transformers uses in memory must have its shapes; per-expert tensors
        must add up to its stacked expert tensors."""
        for tensor in tensors:
            want = expected.get(tensor.name)
            if want is not None and want != tuple(tensor.shape):
                raise ComposerError(
                    f"Output tensor '{tensor.name}' would have shape {list(tensor.shape)}, but {self.output.class_name} expects {list(want)}. Nothing was written."
                )
        experts = len(self.config.experts)
        for name, shape in expected.items():
            if name.endswith("experts.gate_up_proj") and shape != (experts, 2 * intermediate, hidden):
                raise ComposerError(
                    f"{self.output.class_name} expects '{name}' of shape {list(shape)}, not the experts' {[experts, 2 * intermediate, hidden]}."
                )


def _meta_shapes(out_config: dict, output: OutputArchitecture) -> dict[str, list[int]]:
    """Each tensor's shape in the output model as transformers builds it."""
    meta = build_meta_model(out_config, f"the {output.class_name} output")
    return {name: list(tensor.shape) for name, tensor in meta.state_dict().items()}


def _zeros(shape: tuple[int, ...], inputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.zeros(shape)


def _expert_operation(scale: float, noise: float, seed: int) -> Operation:
    if scale == 1.0 and noise == 0.0:
        return COPY

    def apply(inputs: list[torch.Tensor]) -> torch.Tensor:
        tensor = inputs[0].float()
        if noise:
            generator = torch.Generator().manual_seed(seed)
            tensor = tensor + torch.randn(tensor.shape, generator=generator) * noise
        return tensor * scale if scale != 1.0 else tensor

    arguments = ({"scale": scale} if scale != 1.0 else {}) | ({"noise_scale": noise} if noise else {})
    return Operation(label="expert", fn=apply, arguments=arguments, compute_dtype=torch.float32, light=True)


def build_moe_plan(
    config: MoEConfig,
    recipe_text: str = "",
    recipe_dir: Path | None = None,
    sources: dict[str, ModelSource] | None = None,
    prompt_model=None,
) -> Plan:
    """The plan of an MoE recipe. `sources` may hold already-opened models (e.g. earlier stages) by reference;
    `prompt_model` a loaded sentence-transformers model for picking corpus prompts (default: load `prompt_model`)."""
    return _MoEPlanner(config, recipe_text, recipe_dir, sources, prompt_model).build()
