"""The output config.json: layer-count-dependent keys rewritten, checked against the architecture definition
while planning, then proven loadable by transformers (a check that imports it, which the executor runs beside
the first tensors' writes: `transformers_facts.deferred_loadable_check`)."""

from __future__ import annotations

import copy
import re

import torch

from composer.architecture import (
    Architecture,
    MoELayer,
    build_meta_model,
    check_sizes,
    checkpoint_shapes,
    tied_parameter_names,
)
from composer.architecture_experts import ExpertLayout
from composer.errors import ComposerError
from composer.plan.transformers_facts import config_defaults
from composer.plan.vision_language import build_meta_vision_language_model, language_model_tensors


def rewrite_config(
    architecture: Architecture,
    config: dict,
    source_layers: list[int],
    out_dtype: torch.dtype | None,
    reference: str = "the model",
    layer_configs: list[dict] | None = None,
) -> dict:
    """`config` (of model `reference`) for a model whose layer i is source layer `source_layers[i]` of the model whose
    config is `layer_configs[i]` (default: `config`): per-layer keys follow the layer, from its own model's config."""
    output = copy.deepcopy(config)
    layer_configs = layer_configs or [config] * len(source_layers)
    keys = architecture.per_layer_keys + architecture.threshold_keys + architecture.layer_index_keys
    # transformers' defaults are asked for (importing it) only for keys a config leaves out, and only when the layer
    # stack changes: with the same layers of the same model in the same order, a key left out keeps its meaning
    same_layers = all(source is config for source in layer_configs) and list(source_layers) == list(
        range(architecture.layer_count(config, reference))
    )
    settings: dict[
        int, tuple[int, dict, dict]
    ] = {}  # id of a config -> (its layer count, itself, transformers' values for the keys it leaves out)
    for source in layer_configs:
        if id(source) not in settings:
            name = reference if source is config else "a source model"
            count = architecture.layer_count(source, name)
            missing = () if same_layers else tuple(key for key in keys if source.get(key) is None)
            settings[id(source)] = (count, source, config_defaults(source, missing, name))
    layers = [(settings[id(source)], index) for source, index in zip(layer_configs, source_layers)]
    new_count = len(source_layers)
    for key in architecture.layer_count_keys:
        if key in output or key == architecture.layer_count_keys[0]:
            output[key] = new_count
    for key in architecture.per_layer_keys:
        values = [
            (source.get(key) if source.get(key) is not None else defaults.get(key), count, index)
            for (count, source, defaults), index in layers
        ]
        if all(isinstance(value, (list, tuple)) and len(value) == count for value, count, _ in values):
            output[key] = [value[index] for value, _, index in values]
    for key in architecture.threshold_keys:
        thresholds = [(source.get(key, defaults.get(key)), index) for (_, source, defaults), index in layers]
        if all(isinstance(threshold, int) for threshold, _ in thresholds):
            below = [index < threshold for threshold, index in thresholds]
            output[key] = next((position for position, flag in enumerate(below) if not flag), new_count)
    for key in architecture.layer_index_keys:  # an output layer is listed when its source layer is
        listed = [(source.get(key, defaults.get(key)), index) for (_, source, defaults), index in layers]
        if all(isinstance(indices, (list, tuple)) for indices, _ in listed):
            output[key] = [position for position, (indices, index) in enumerate(listed) if index in indices]
    return with_dtype(output, out_dtype)


def with_dtype(config: dict, out_dtype: torch.dtype | None) -> dict:
    """`config` (changed in place) saying the weights are `out_dtype` (unchanged for None); a nested text config that
    names a dtype says it too."""
    if out_dtype is None:
        return config
    name = str(out_dtype).removeprefix("torch.")
    for settings in (config, config.get("text_config")):
        for key in ("torch_dtype", "dtype"):
            if isinstance(settings, dict) and key in settings:
                settings[key] = name
    if "torch_dtype" not in config and "dtype" not in config:
        config["torch_dtype"] = name
    return config


def check_output_config(
    architecture: Architecture, config: dict, planned_shapes: dict[str, tuple[int, ...]], reference: str
) -> None:
    """What the architecture definition says the output config must agree with, checked without transformers: its
    sizes are whole numbers, its per-layer lists have an entry per layer, and its vocabulary-indexed tensors have
    `vocab_size` rows."""
    check_sizes(config, f"'{reference}'")
    layer_count = architecture.layer_count(config, f"the output (config from '{reference}')")
    for key in architecture.per_layer_keys:
        values = config.get(key)
        if isinstance(values, list) and len(values) != layer_count:
            raise ComposerError(
                f"Output config key '{key}' (from '{reference}') has {len(values)} entries for {layer_count} layers; "
                f"give it one entry per layer of the model's config.json. Nothing was written."
            )
    vocab_size = config.get("vocab_size")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        return
    for weight in architecture.vocab_weights():
        shape = planned_shapes.get(weight.name)
        if shape is not None and len(shape) > weight.vocab_axis and shape[weight.vocab_axis] != vocab_size:
            raise ComposerError(
                f"Output tensor '{weight.name}' would have {shape[weight.vocab_axis]} vocabulary rows, but the output config "
                f"(from '{reference}') gives vocab_size {vocab_size}, so that config.json does not describe its weights "
                "and transformers would not load it. Correct vocab_size in the model's config.json. Nothing was written."
            )


def check_with_output_rules(
    architecture: Architecture,
    config: dict,
    planned_shapes: dict[str, tuple[int, ...]],
    reference: str,
    expert_layout: ExpertLayout | None = None,
) -> bool:
    """What transformers would check of the output (its config's types, and its tensors exactly those the config
    describes), from the definition's `output_rules:`, without importing it. False when the definition has none for
    the config's model type. `expert_layout`: how a mixture of experts' output holds its experts (transformers loads
    either layout)."""
    if architecture.output_rules is None or not architecture.output_rules.hold_for(config.get("model_type")):
        return False
    expected = shapes_from_rules(architecture, config, reference, expert_layout)
    compare_shapes(f"{architecture.output_rules.config_class} model", expected, planned_shapes, reference)
    return True


_EXPERT_INDEX = re.compile(r"\.\d+\.")


def shapes_from_rules(
    architecture: Architecture, config: dict, reference: str, expert_layout: ExpertLayout | None = None
) -> dict[str, tuple[int, ...]]:
    """The tensors (name -> shape) transformers' model for `config` holds as saved, by the definition's rules (which
    it must have), after the rules' checks of `config` itself. A mixture of experts' layers hold their experts in
    `expert_layout` (default: the definition's first), its rules reading the expert count as `experts`."""
    rules = architecture.output_rules
    values = rules.check_config(config, f"'{reference}'")
    tied = config.get("tie_word_embeddings", values.get("tie_word_embeddings", architecture.tie_word_embeddings))
    weights = [
        (weight.name, weight.name, None)
        for weight in architecture.pre + architecture.post
        if not (weight.tied_to and tied)
    ]
    layer_count = architecture.layer_count(config, f"the output (config from '{reference}')")
    experts = architecture.experts
    layers: list[MoELayer | None] = [None] * layer_count
    if experts is not None:
        # a config without an expert count gets transformers' default, as every other key the rules read
        counts = config if any(key in config for key in experts.count_keys) else values
        values["experts"] = experts.count(counts, f"'{reference}'", architecture.name)
        layout = expert_layout or experts.layouts[0]
        # which layers hold experts, by transformers' defaults for the keys that say it where the config leaves them out
        defaults = {key: value for key, value in values.items() if key not in config and value is not None}
        sparse = experts.sparse_layers(defaults | config, layer_count, f"'{reference}'")
        layers = [MoELayer(flag, layout, values["experts"]) for flag in sparse]
    for index, moe in enumerate(layers):
        for weight in architecture.layer_weights(index, moe):
            key = weight.suffix if weight.suffix in rules.shapes else _EXPERT_INDEX.sub(".{e}.", weight.suffix, count=1)
            if key in rules.shapes:
                weights.append((weight.name, key, index))
    expected = {name: rules.expected(name, key, values, f"'{reference}'", layer) for name, key, layer in weights}
    return {name: shape for name, shape in expected.items() if shape is not None}


def validate_against_transformers(config: dict, planned_shapes: dict[str, tuple[int, ...]], reference: str) -> None:
    """Build the output model on the meta device and require its tensors to be exactly the planned ones."""
    model = build_meta_model(config, f"the output (config from '{reference}')")
    in_memory = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    saved = checkpoint_shapes(model)
    # transformers loads either layout: the names its checkpoints hold (per-expert MoE weights) or those it holds in memory
    expected = in_memory if set(planned_shapes) - set(saved) and not set(planned_shapes) - set(in_memory) else saved
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        for target in tied_parameter_names(model):
            expected.pop(target, None)
    compare_with_transformers(model, expected, planned_shapes, reference)


def validate_language_model(config: dict, planned_shapes: dict[str, tuple[int, ...]], reference: str) -> None:
    """Build the vision-language output on the meta device and require its language model's tensors to be exactly the
    planned ones (`planned_shapes` by their text-only names). The vision tower and projector are the base's, copied."""
    model = build_meta_vision_language_model(config, f"the output (config from '{reference}')")
    expected, tied = language_model_tensors(model)
    if getattr(model.config, "tie_word_embeddings", False):
        for target in tied:
            expected.pop(target, None)
    compare_with_transformers(model, expected, planned_shapes, reference)


def compare_with_transformers(
    model, expected: dict[str, tuple[int, ...]], planned_shapes: dict[str, tuple[int, ...]], reference: str
) -> None:
    text_config = model.config.get_text_config()
    layer_count = text_config.num_hidden_layers
    for key, value in text_config.to_dict().items():
        if key.endswith("layer_types") and isinstance(value, list) and len(value) != layer_count:
            raise ComposerError(f"Output config key '{key}' has {len(value)} entries for {layer_count} layers.")
    compare_shapes(model.__class__.__name__, expected, planned_shapes, reference)


def compare_shapes(
    model_class: str, expected: dict[str, tuple[int, ...]], planned_shapes: dict[str, tuple[int, ...]], reference: str
) -> None:
    """Refuse a plan whose tensors are not exactly `expected` (name -> shape), as transformers' `model_class` holds them."""
    missing = sorted(set(expected) - set(planned_shapes))
    unexpected = sorted(set(planned_shapes) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"the plan lacks {len(missing)} tensor(s) transformers expects, e.g. '{missing[0]}'")
        if unexpected:
            parts.append(f"it has {len(unexpected)} tensor(s) transformers does not know, e.g. '{unexpected[0]}'")
        raise ComposerError(
            f"The output would not load with transformers ({model_class}): {'; '.join(parts)}. Nothing was written."
        )
    for name, shape in planned_shapes.items():
        if expected[name] != shape:
            raise ComposerError(
                f"Output tensor '{name}' would have shape {list(shape)}, but the output config (from '{reference}') makes transformers "
                f"expect {list(expected[name])}, so that config.json does not describe its weights. Nothing was written."
            )
