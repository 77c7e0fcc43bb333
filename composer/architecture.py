"""Architecture definitions: which tensors sit before, inside and after the layer stack, and which
config keys depend on the layer count. Declared in `architectures/*.yaml`; inferred from a model
built on the meta device for any other causal LM that transformers knows."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from functools import cache

from pydantic import BaseModel, ConfigDict

from composer.architecture_experts import ExpertLayout, Experts, ExpertsFile, FusedTensor, counted
from composer.errors import ComposerError
from composer.output_rules import OutputRules, OutputRulesFile
from composer.yaml_text import load_package_data


class WeightDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    vocab_axis: int | None = None
    tied_to: str | None = None
    optional: bool = False


class LayerDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prefix: str
    tensors: list[str]
    optional: list[str] = []


class ArchitectureFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    model_types: list[str]
    pre: list[WeightDefinition]
    layers: LayerDefinition
    post: list[WeightDefinition]
    layer_count_keys: list[str]
    per_layer_keys: list[str] = []
    threshold_keys: list[str] = []
    tie_word_embeddings: bool | None = None  # transformers' default for the family (None: ask transformers)
    experts: ExpertsFile | None = None
    layer_index_keys: list[str] = []  # lists of layer indices (Llama 4's `moe_layers`)
    output_rules: OutputRulesFile | None = None  # what transformers needs of the output (composer/output_rules.py)


@dataclass(frozen=True)
class LayerWeight:
    """A tensor of layer `index`, as a full name plus its name relative to the layer; `fused`: the tensor holds every
    expert of the layer (its definition says how to split it expert by expert)."""

    name: str
    suffix: str
    optional: bool
    fused: FusedTensor | None = None


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    pre: tuple[WeightDefinition, ...]
    layer_prefix: str
    layer_tensors: tuple[str, ...]
    layer_optional: tuple[str, ...]
    post: tuple[WeightDefinition, ...]
    layer_count_keys: tuple[str, ...]
    per_layer_keys: tuple[str, ...] = ()
    threshold_keys: tuple[str, ...] = ()
    tie_word_embeddings: bool | None = None  # what a config.json without the key means (None: not declared)
    layer_index_keys: tuple[str, ...] = ()
    inferred: bool = False
    notes: tuple[str, ...] = field(default=())
    experts: Experts | None = None  # a mixture-of-experts family: its expert layers; layer_tensors are then the rest
    output_rules: OutputRules | None = None  # None: only transformers can say whether it would load an output

    def layer_weights(self, index: int, moe: MoELayer | None = None) -> list[LayerWeight]:
        """The tensors of layer `index`. For a mixture-of-experts family, without `moe` only those every layer has
        (attention, norms); with it, also the MLP of a dense layer or the router and experts of a layer with experts."""
        prefix = self.layer_prefix.format(i=index)
        suffixes = [(suffix, False, None) for suffix in self.layer_tensors]
        suffixes += [(suffix, True, None) for suffix in self.layer_optional]
        if moe is not None and self.experts is not None:
            if moe.sparse:
                suffixes += moe.layout.tensor_suffixes(moe.expert_count)
            elif self.experts.dense_mlp is not None:
                mlp = self.experts.dense_mlp
                suffixes += [(suffix, False, None) for suffix in (mlp.gate, mlp.up, mlp.down)]
        return [LayerWeight(prefix + suffix, suffix, optional, fused) for suffix, optional, fused in suffixes]

    def vocab_weights(self) -> list[WeightDefinition]:
        return [weight for weight in self.pre + self.post if weight.vocab_axis is not None]

    def layer_count(self, config: dict, reference: str = "the model") -> int:
        return counted(config, self.layer_count_keys, "layer", f"The config.json of {reference}", self.name)


@dataclass(frozen=True)
class MoELayer:
    """What a layer of a mixture-of-experts model holds: experts (in `layout`, `expert_count` of them) or a dense MLP."""

    sparse: bool
    layout: ExpertLayout
    expert_count: int


@cache
def declared_architectures() -> dict[str, Architecture]:
    from architectures import definition_files

    by_model_type: dict[str, Architecture] = {}
    for path in definition_files():
        try:
            spec = ArchitectureFile.model_validate(load_package_data(path.read_text()))
        except Exception as error:
            raise ComposerError(f"Architecture definition {path} is invalid: {error}") from None
        architecture = Architecture(
            name=spec.name,
            model_types=tuple(spec.model_types),
            pre=tuple(spec.pre),
            layer_prefix=spec.layers.prefix,
            layer_tensors=tuple(spec.layers.tensors),
            layer_optional=tuple(spec.layers.optional),
            post=tuple(spec.post),
            layer_count_keys=tuple(spec.layer_count_keys),
            per_layer_keys=tuple(spec.per_layer_keys),
            threshold_keys=tuple(spec.threshold_keys),
            tie_word_embeddings=spec.tie_word_embeddings,
            experts=Experts.from_file(spec.experts) if spec.experts is not None else None,
            layer_index_keys=tuple(spec.layer_index_keys),
            output_rules=_output_rules(spec, path),
        )
        for model_type in spec.model_types:
            by_model_type[model_type] = architecture
    return by_model_type


def _output_rules(spec: ArchitectureFile, path) -> OutputRules | None:
    if spec.output_rules is None:
        return None
    weights = {weight.name for weight in spec.pre + spec.post}
    names = weights | set(spec.layers.tensors) | set(spec.layers.optional) | _expert_tensor_names(spec.experts)
    required = weights | set(spec.layers.tensors)
    try:
        rules = OutputRules(spec.output_rules, names)
        if missing := sorted(required - set(rules.shapes)):
            raise ValueError(f"no shapes are given for {missing}")
    except ValueError as error:
        raise ComposerError(f"Architecture definition {path} is invalid: output_rules: {error}") from None
    return rules


def _expert_tensor_names(experts: ExpertsFile | None) -> set[str]:
    """The layer-relative names a mixture-of-experts layer may hold, per-expert ones with their `{e}`."""
    if experts is None:
        return set()
    names = set()
    for layout in experts.layouts:
        names |= set(layout.tensors) | set(layout.optional) | set(layout.each_expert)
        names |= {fused.name for fused in layout.fused}
    for mlp in (experts.dense_mlp, experts.shared):
        if mlp is not None:
            names |= {mlp.gate, mlp.up, mlp.down} | ({mlp.gated_by} if getattr(mlp, "gated_by", None) else set())
    return names


def architecture_for(config: dict, reference: str = "the model") -> Architecture:
    model_type = config.get("model_type")
    if not model_type:
        raise ComposerError(f"The config.json of {reference} has no 'model_type', so its architecture cannot be known.")
    declared = declared_architectures().get(model_type)
    if declared is not None:
        return declared
    return infer_architecture(config, reference)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:300] + " ..."


_NUMBERED = re.compile(r"^(.*?\.)(\d+)\.(.+)$")


def _numbered(name: str) -> re.Match | None:
    """`model.layers.3.mlp.up_proj.weight` -> (prefix `model.layers.`, index `3`, the rest); None without a number."""
    return _NUMBERED.match(name)


def transformers_config(config: dict, reference: str = "the model"):
    """transformers' config object for a config.json's contents. A config from a stranger can make transformers raise
    almost anything (a string where a bool goes, a dtype torch lacks, heads that do not divide the width): every
    failure is one error naming the model."""
    from transformers import AutoConfig

    check_sizes(config, reference)
    try:
        # a copy: transformers fills in a config's nested dicts (rope_scaling) in place
        return AutoConfig.for_model(**copy.deepcopy(config))
    except Exception as error:  # noqa: BLE001  (see above)
        raise ComposerError(
            f"The config.json of {reference} is not one transformers can build ({type(error).__name__}: {_one_line(error)})."
        ) from None


SIZE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "max_position_embeddings", "n_embd", "n_head", "n_positions",
)  # fmt: skip


def check_sizes(config: dict, reference: str = "the model") -> None:
    """Sizes that must be whole numbers of at least 1 (transformers fails on them in ways that do not say which)."""
    for key in SIZE_KEYS:
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ComposerError(
                f"The config.json of {reference} gives '{key}' as {value!r}; it must be a whole number of at least 1."
            )


def build_meta_model(config: dict, reference: str = "the model"):
    """The transformers causal-LM class for `config`, instantiated on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    model_config = transformers_config(config, reference)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_config)
    except ValueError as error:
        raise ComposerError(
            f"transformers has no causal-LM class for {reference} (model_type '{config.get('model_type')}'): {error}"
        ) from None
    except Exception as error:  # noqa: BLE001  (a config whose sizes cannot build the model: vocab_size 0, ...)
        raise ComposerError(
            f"The config.json of {reference} does not build a model in transformers ({type(error).__name__}: {_one_line(error)})."
        ) from None


def tied_parameter_names(model) -> dict[str, str]:
    """target -> source for parameters that transformers ties when the config says so."""
    keys = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(keys, dict):
        return dict(keys)
    embeddings = model.get_input_embeddings()
    source = next((name for name, param in model.named_parameters() if param is embeddings.weight), None)
    return {key: source for key in keys} if source else {}


def checkpoint_shapes(model) -> dict[str, tuple[int, ...]]:
    """The tensors (name -> shape) that `model` is saved as. transformers 5 holds some tensors in memory under other
    names than its checkpoints do (Mixtral's per-expert `block_sparse_moe.experts.N.w1` are one fused
    `mlp.experts.gate_up_proj` in memory) and reverts them when it saves; the files hold the saved names."""
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion

        saved = revert_weight_conversion(model, state)
    except Exception:  # noqa: BLE001  (a transformers without weight conversions, or one that cannot revert this model)
        saved = state
    return {name: tuple(tensor.shape) for name, tensor in saved.items()}


def infer_architecture(config: dict, reference: str = "the model") -> Architecture:
    model = build_meta_model(config, reference)
    layer_count = model.config.num_hidden_layers
    saved = checkpoint_shapes(model)
    in_memory = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    # the names in memory give the order (embeddings, layers, head); the names as saved are the ones planned
    names = [name for name in in_memory if name in saved or not _numbered(name)]
    prefix = None
    layer_suffixes: list[str] = []
    first_layer_at = last_layer_at = None
    for position, name in enumerate(names):
        match = _numbered(name)
        if not match:
            continue
        if prefix is None:
            prefix = match.group(1)
        if match.group(1) != prefix:
            continue
        first_layer_at = position if first_layer_at is None else first_layer_at
        last_layer_at = position
        if match.group(2) == "0":
            layer_suffixes.append(match.group(3))
    for name in saved:  # tensors saved under names the model does not hold in memory (per-expert weights)
        match = _numbered(name)
        if match and name not in in_memory and match.group(1) == prefix and match.group(2) == "0":
            layer_suffixes.append(match.group(3))
    if prefix is None:
        raise ComposerError(f"Could not find a layer stack in {reference} (model_type '{config.get('model_type')}').")
    vocab_size = model.config.vocab_size
    tied = tied_parameter_names(model)
    shapes = in_memory | saved

    def weight(name: str) -> WeightDefinition:
        vocab_axis = 0 if len(shapes[name]) >= 1 and shapes[name][0] == vocab_size else None
        return WeightDefinition(name=name, vocab_axis=vocab_axis, tied_to=tied.get(name))

    count_key = model.config.attribute_map.get("num_hidden_layers", "num_hidden_layers")
    count_keys = [count_key] + [
        key
        for key, value in config.items()
        if key != count_key
        and "layer" in key
        and isinstance(value, int)
        and value == layer_count
        and not isinstance(value, bool)
    ]
    per_layer = [
        key for key, value in model.config.to_dict().items() if isinstance(value, list) and len(value) == layer_count
    ]
    return Architecture(
        name=f"inferred:{config.get('model_type')}",
        model_types=(config.get("model_type"),),
        pre=tuple(weight(name) for name in names[:first_layer_at]),
        layer_prefix=prefix + "{i}.",
        layer_tensors=tuple(layer_suffixes),
        layer_optional=(),
        post=tuple(weight(name) for name in names[last_layer_at + 1 :]),
        layer_count_keys=tuple(count_keys),
        per_layer_keys=tuple(per_layer),
        inferred=True,
    )
