"""The output config.json: layer-count-dependent keys rewritten, then proven loadable by transformers."""

from __future__ import annotations

import copy

import torch

from composer.architecture import Architecture, build_meta_model, checkpoint_shapes, tied_parameter_names
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
    settings: dict[
        int, tuple[int, dict, dict]
    ] = {}  # id of a config -> (its layer count, itself, transformers' values)
    for source in layer_configs:
        if id(source) not in settings:
            count = architecture.layer_count(source, reference if source is config else "a source model")
            settings[id(source)] = (count, source, config_defaults(source, keys, reference))
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
    missing = sorted(set(expected) - set(planned_shapes))
    unexpected = sorted(set(planned_shapes) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"the plan lacks {len(missing)} tensor(s) transformers expects, e.g. '{missing[0]}'")
        if unexpected:
            parts.append(f"it has {len(unexpected)} tensor(s) transformers does not know, e.g. '{unexpected[0]}'")
        raise ComposerError(
            f"The output would not load with transformers ({model.__class__.__name__}): {'; '.join(parts)}. Nothing was written."
        )
    for name, shape in planned_shapes.items():
        if expected[name] != shape:
            raise ComposerError(
                f"Output tensor '{name}' would have shape {list(shape)}, but the output config (from '{reference}') makes transformers "
                f"expect {list(expected[name])}, so that config.json does not describe its weights. Nothing was written."
            )
