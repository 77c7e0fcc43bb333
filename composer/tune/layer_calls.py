"""Running a model's own forward with stand-ins in its decoder layers' places, to learn what each layer is handed
(rotary tables, attention masks, ...), and the helpers that fill a meta model's layers: the layer-by-layer machinery
that `compose tune` (composer.tune.streamed) and the calibration methods (composer.calibration) share. It imports
nothing of composer, so that anything may use it."""

from __future__ import annotations

from contextlib import contextmanager

import torch


class StandIn(torch.nn.Module):
    """Takes a decoder layer's place in the model's own forward: records what the layer is handed, returns the hidden
    states unchanged (or, for the replay, the final hidden states)."""

    def __init__(self, calls: list, attributes: dict, final: torch.Tensor | None = None):
        super().__init__()
        self.calls = calls
        self.final = final
        self.__dict__.update(attributes)

    def forward(self, hidden, *arguments, **keywords):
        self.calls.append((hidden, arguments, keywords))
        return self.final if self.final is not None else hidden


def layer_attributes(layer: torch.nn.Module) -> dict:
    """Plain attributes of a real layer a model's forward may read from it (attention_type, ...)."""
    return {
        key: value
        for key, value in vars(layer).items()
        if not key.startswith("_") and isinstance(value, (str, int, float, bool))
    }


def init_buffers(model, modules) -> None:
    """Non-persistent buffers (rotary tables, embedding scales) are not in any weights file: transformers makes them."""
    for module in modules:
        if getattr(module, "_non_persistent_buffers_set", None):
            model._init_weights(module)


@contextmanager
def layers_replaced(model, path: str, replacement: torch.nn.Module):
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    original = getattr(parent, name)
    setattr(parent, name, replacement)
    try:
        yield
    finally:
        setattr(parent, name, original)


def record_calls(layout, batch, run) -> None:
    """Run the model's own forward (`run`: its base model, or a function calling it) with stand-ins in its layers'
    places: the first layer's input becomes the batch's hidden states, and what each layer is handed is kept.
    `layout`: anything with the meta `model`, the `path` of its layers and the `layers`; `batch`: anything with `ids`,
    whose `hidden` and `calls` are set."""
    calls: list = []
    stand_ins = torch.nn.ModuleList(StandIn(calls, layer_attributes(layer)) for layer in layout.layers)
    with layers_replaced(layout.model, layout.path, stand_ins):
        run(input_ids=batch.ids, use_cache=False)
    batch.hidden = calls[0][0]
    batch.calls = [(arguments, keywords) for _, arguments, keywords in calls]
