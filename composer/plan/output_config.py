"""The output config.json: layer-count-dependent keys rewritten, checked against the architecture definition
while planning, then proven loadable by transformers (a check that imports it, which the executor runs beside
the first tensors' writes: `transformers_facts.deferred_loadable_check`)."""

from __future__ import annotations

import copy

import torch

from composer.architecture import (
    Architecture,
    build_meta_model,
    check_sizes,
    checkpoint_shapes,
    tied_parameter_names,
)
from composer.errors import ComposerError
from composer.plan.transformers_facts import config_defaults


def rewrite_config(
    architecture: Architecture,
    config: dict,
    source_layers: list[int],
    out_dtype: torch.dtype | None,
    reference: str = "the model",
) -> dict:
    """`config` (of model `reference`) for a model whose layer i is source layer `source_layers[i]`."""
    output = copy.deepcopy(config)
    source_count = architecture.layer_count(config, reference)
    new_count = len(source_layers)
    # transformers' defaults are asked for (importing it) only for keys the file leaves out and a layer stack that
    # changes; with the same layers in the same order, a key left out keeps meaning what it meant
    missing = tuple(key for key in architecture.per_layer_keys + architecture.threshold_keys if config.get(key) is None)
    same_layers = list(source_layers) == list(range(source_count))
    defaults = config_defaults(config, missing, reference) if missing and not same_layers else {}
    for key in architecture.layer_count_keys:
        if key in output or key == architecture.layer_count_keys[0]:
            output[key] = new_count
    for key in architecture.per_layer_keys:
        values = output.get(key)
        if values is None:
            values = defaults.get(key)
        if isinstance(values, (list, tuple)) and len(values) == source_count:
            output[key] = [values[i] for i in source_layers]
    for key in architecture.threshold_keys:
        threshold = output.get(key, defaults.get(key))
        if isinstance(threshold, int):
            below = [i < threshold for i in source_layers]
            output[key] = next((position for position, flag in enumerate(below) if not flag), new_count)
    if out_dtype is not None:
        name = str(out_dtype).removeprefix("torch.")
        for key in ("torch_dtype", "dtype"):
            if key in output:
                output[key] = name
        if "torch_dtype" not in output and "dtype" not in output:
            output["torch_dtype"] = name
    return output


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


def validate_against_transformers(config: dict, planned_shapes: dict[str, tuple[int, ...]], reference: str) -> None:
    """Build the output model on the meta device and require its tensors to be exactly the planned ones."""
    model = build_meta_model(config, f"the output (config from '{reference}')")
    layer_count = model.config.num_hidden_layers
    in_memory = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    saved = checkpoint_shapes(model)
    # transformers loads either layout: the names its checkpoints hold (per-expert MoE weights) or those it holds in memory
    expected = in_memory if set(planned_shapes) - set(saved) and not set(planned_shapes) - set(in_memory) else saved
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        for target in tied_parameter_names(model):
            expected.pop(target, None)
    for key, value in model.config.to_dict().items():
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
