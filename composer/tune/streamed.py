"""Bits per byte of a plan's model on text, computed one decoder layer at a time, with no model written.

The model is built on the meta device. For each layer in turn, that layer's tensors are merged as the plan says
(its operations, on its parents' tensors), loaded into the layer, run over the hidden states of every scoring window,
and freed. What the model does around its layers (embeddings and their scaling, rotary tables, the attention masks of
each layer type) is not re-implemented: the model's own forward runs with stand-ins for the layers that record what
each layer is handed, and runs again at the end with the last stand-in handing back the final hidden states, so that
the model's own final norm, head and logit soft-capping make the logits (a few hundred positions at a time: those
are per position). Losses are those of `compose eval` on the windows of composer.tune.texts, so the score is the one
the written model gets on them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from composer.architecture import architecture_for, build_meta_model, tied_parameter_names
from composer.cpu import linears_through_onednn
from composer.errors import ComposerError
from composer.evaluate import TextScore
from composer.memory import map_large_allocations
from composer.plan import Plan, PlannedTensor
from composer.tune.layer_calls import StandIn, init_buffers, layer_attributes, layers_replaced, record_calls
from composer.tune.prepared_ties import MagnitudeTable, is_prepared_ties, prepared_ties
from composer.tune.process_memory import held_bytes
from composer.tune.tensor_cache import TensorCache
from composer.tune.texts import NamedText, Window, windows_of

ROWS = 4  # windows per forward call of a layer
LOGIT_ROWS = 256  # positions whose logits are made at once


@dataclass
class Batch:
    windows: list[Window]
    ids: torch.Tensor  # [rows, tokens]: windows of one length, so no padding
    calls: list[tuple[tuple, dict]] | None = None  # what the model hands each layer: (arguments, keywords)
    hidden: torch.Tensor | None = None


def batches_of(windows: list[Window]) -> list[Batch]:
    by_length: dict[int, list[Window]] = {}
    for window in windows:
        by_length.setdefault(len(window.ids), []).append(window)
    return [
        Batch(group[i : i + ROWS], torch.stack([w.ids for w in group[i : i + ROWS]]))
        for group in by_length.values()
        for i in range(0, len(group), ROWS)
    ]


@dataclass
class Layout:
    model: torch.nn.Module  # built on the meta device; its layers are filled one at a time
    path: str  # where the layers' ModuleList sits in the model
    prefix: str  # a layer's tensor names, with {i} for its index
    layers: torch.nn.ModuleList
    batches: list[Batch]


def working_bytes(layout: Layout, plan: Plan, kept_states: int = 1, graph: bool = False) -> int:
    """An upper estimate of the bytes a scoring pass holds beside the parents' cache: the windows' hidden states
    (`kept_states` copies: 1 for a forward pass, a layer's count and more for the gradient, which keeps every
    layer's input), one batch's activations inside a layer (twice with a graph), the tensors outside the layers and
    one layer's (float32, with their inputs and the merge's temporaries; three times with a graph: merged, loaded and
    their gradients) and one window's logits with their softmax and gradient."""
    config = layout.model.config
    width = getattr(config, "hidden_size", 0) or 0
    inner = getattr(config, "intermediate_size", None) or 4 * width
    heads = getattr(config, "num_attention_heads", 1) or 1
    tokens = sum(batch.ids.numel() for batch in layout.batches)
    rows, length = max(((batch.ids.shape[0], batch.ids.shape[1]) for batch in layout.batches), default=(0, 0))
    hidden = (tokens * kept_states + rows * length) * width * 4
    activations = rows * length * (3 * inner + 8 * width) * 4 + rows * heads * length * length * 4
    layer_prefix = layout.prefix.split("{i}")[0]
    per_layer: dict[str, int] = {}
    outside = 0
    for planned in plan.tensors:
        count = 1
        for size in planned.shape:
            count *= size
        held = count * 4 * (len(planned.inputs) + 2 + (3 if graph else 0))
        if planned.name.startswith(layer_prefix):
            layer = planned.name[len(layer_prefix) :].split(".")[0]
            per_layer[layer] = per_layer.get(layer, 0) + held
        else:
            outside += count * 4 * (3 if graph else 1)
    logits = min(length, LOGIT_ROWS) * (getattr(config, "vocab_size", 0) or 0) * 4 * 3
    return hidden + activations * (2 if graph else 1) + outside + max(per_layer.values(), default=0) + logits


class StreamedScorer:
    """Scores plans' models on texts, one layer in memory at a time; parents' tensors are read through `cache`."""

    def __init__(self, cache: TensorCache, device: str = "cpu", budget: int | None = None, whole_process: bool = False):
        self.cache = cache
        self.budget = (
            budget  # bytes for everything: the cache gets what the working set leaves (None: the cache's own budget)
        )
        self.whole_process = whole_process  # the budget bounds the whole process, not only the tensors a tune holds
        if whole_process:
            map_large_allocations()
        self.device = torch.device(device)  # where layers run; parents' tensors are read and cached in host memory
        self.models: dict[str, torch.nn.Module] = {}
        self.windows: dict[tuple, list[Window]] = {}
        self.tokenizers: dict[str, object] = {}

    def model_for(self, config: dict):
        key = json.dumps(config, sort_keys=True, default=str)
        if key not in self.models:
            model = build_meta_model(config, "the merged model")
            model.eval()
            self.models = {key: model}  # one at a time: a slice search changes the layer count
        return self.models[key]

    def release(self) -> None:
        """Drop the parents' cache and the model (its tensors outside the layers), and hand the freed pages back."""
        self.cache.shrink_to(0)
        self.models = {}
        held_bytes()

    def _tokenizer(self, plan: Plan):
        from composer.sources.tokenizer import load_source_tokenizer

        if plan.tokenizer_source is None:
            raise ComposerError(
                "The merged model has no tokenizer, so its bits per byte cannot be measured; give the recipe a tokenizer_source."
            )
        if plan.tokenizer_source not in self.tokenizers:
            self.tokenizers[plan.tokenizer_source] = load_source_tokenizer(
                plan.sources[plan.tokenizer_source], "scoring text needs one"
            )
        return self.tokenizers[plan.tokenizer_source]

    def windows_for(self, plan: Plan, texts: list[NamedText], context: int) -> list[Window]:
        key = (plan.tokenizer_source, tuple(text.name for text in texts), context)
        if key not in self.windows:
            self.windows[key] = windows_of(texts, self._tokenizer(plan), context, plan.tokenizer_source)
        return self.windows[key]

    def merged(self, plan: Plan, planned: PlannedTensor) -> torch.Tensor:
        """One output tensor as the executor makes it (its inputs converted to the operation's compute dtype, as the
        cache keeps them), widened to float32 as `compose eval` loads it."""
        compute = planned.operation.compute_dtype
        inputs = [self.to_device(self.cache.get(plan, ref, compute)) for ref in planned.inputs]
        try:
            if is_prepared_ties(planned, inputs):
                base = planned.inputs[-1]
                tables = [
                    self.cache.derived(("magnitudes", ref, base, compute), lambda x=x: MagnitudeTable.of(x, inputs[-1]))
                    for ref, x in zip(planned.inputs, inputs[:-1])
                ]
                result = prepared_ties(planned, inputs, tables)
            else:
                result = planned.operation.fn(inputs)
        except ComposerError as error:
            raise ComposerError(f"Output tensor '{planned.name}' ({planned.operation.label}): {error}") from None
        return result.to(planned.dtype).to(torch.float32)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.device == self.device else tensor.to(self.device)

    def layout(self, plan: Plan, texts: list[NamedText]) -> Layout:
        """The meta model of `plan`, the path and modules of its layers, and the texts' windows in batches."""
        model = self.model_for(plan.config)
        context = getattr(model.config, "max_position_embeddings", 1024) or 1024
        if not isinstance(context, int) or context < 2:
            raise ComposerError(
                f"The merged model's config gives max_position_embeddings {context!r}; scoring text needs a context of at least 2 tokens."
            )
        prefix = architecture_for(plan.config).layer_prefix
        path = prefix.split("{i}")[0].rstrip(".")
        batches = batches_of(self.windows_for(plan, texts, context))
        for batch in batches:
            batch.ids = self.to_device(batch.ids)
        return Layout(model, path, prefix, model.get_submodule(path), batches)

    def fit_budget(self, layout: Layout, plan: Plan, kept_states: int = 1, graph: bool = False) -> int:
        """Give the parents' cache what the memory budget leaves beside the working set (see `working_bytes`) and,
        with `whole_process`, beside what the process already holds outside the cache (the interpreter, libraries,
        tokenizer, the model's tensors outside its layers); an error when those alone are over the budget. Returns
        the working set's bytes."""
        working = working_bytes(layout, plan, kept_states, graph)
        if self.budget is not None:
            held = max(held_bytes() - self.cache.resident, 0) if self.whole_process else 0
            if working + held > self.budget:
                besides = (
                    f", beside {held / 1e9:.2f} GB this process holds already (the interpreter, libraries and model outside its layers)"
                    if held
                    else ""
                )
                raise ComposerError(
                    f"Scoring the text needs about {working / 1e9:.2f} GB for hidden states, one layer's tensors and one window's logits "
                    f"({sum(batch.ids.numel() for batch in layout.batches)} tokens in windows){besides}, more than --memory-budget "
                    f"{self.budget / 1e9:.2f} GB; give a larger --memory-budget or shorter --text files."
                )
            self.cache.shrink_to(self.budget - held - working)
        self.cache.new_pass()
        return working

    def score(self, plan: Plan, texts: list[NamedText]) -> list[TextScore]:
        layout = self.layout(plan, texts)
        self.fit_budget(layout, plan)
        model, path, layers, batches = layout.model, layout.path, layout.layers, layout.batches
        by_name = {planned.name: planned for planned in plan.tensors}
        with torch.no_grad(), layers_replaced(model, path, torch.nn.ModuleList()):
            self.load_outside_layers(model, plan, by_name)
        with torch.no_grad(), linears_through_onednn():  # as `compose eval` runs them: the same scores
            for batch in batches:
                record_calls(layout, batch, model.base_model)
            for index, layer in enumerate(layers):
                self._run_layer(model, plan, by_name, layer, layout.prefix.format(i=index), index, batches)
            return self._losses(layout, texts)

    def load_outside_layers(self, model, plan: Plan, by_name: dict[str, PlannedTensor]) -> None:
        """The embeddings, final norm and head (whatever is not in a layer), merged for this plan."""
        fresh = any(tensor.is_meta for tensor in model.state_dict().values())
        if fresh:
            model.to_empty(device=self.device)
            init_buffers(model, model.modules())
        tied = tied_parameter_names(model)
        state = {}
        for name in model.state_dict():
            planned = by_name.get(name) or by_name.get(tied.get(name, ""))
            if planned is None:
                raise ComposerError(
                    f"The merged model needs tensor '{name}', which its plan does not make; it cannot be scored."
                )
            state[name] = self.merged(plan, planned) if planned.name not in state else state[planned.name]
        model.load_state_dict(state, assign=True)

    def _run_layer(
        self, model, plan: Plan, by_name: dict[str, PlannedTensor], layer, prefix: str, index: int, batches: list[Batch]
    ) -> None:
        names = list(layer.state_dict())
        missing = [prefix + name for name in names if prefix + name not in by_name]
        if missing:
            raise ComposerError(
                f"Layer {index} of the merged model needs tensor '{missing[0]}', which its plan does not make; it cannot be scored."
            )
        state = {name: self.merged(plan, by_name[prefix + name]) for name in names}
        layer.to_empty(device=self.device)
        init_buffers(model, layer.modules())
        layer.load_state_dict(state, assign=True)
        del state
        try:
            for batch in batches:
                arguments, keywords = batch.calls[index]
                output = layer(batch.hidden, *arguments, **keywords)
                batch.hidden = output[0] if isinstance(output, tuple) else output
        finally:
            layer.to_empty(device="meta")  # the next layer's tensors take this one's place

    def window_losses(self, layout: Layout, final: torch.Tensor, window: Window) -> torch.Tensor:
        """The losses (nats) of a window's scored positions, from its final hidden states `final` [1, tokens, width]:
        the window's positions replayed through the model's own forward, `LOGIT_ROWS` at a time, the last layer's
        stand-in handing back their final hidden states, so that the model's final norm, head and logit soft-capping
        (all per position) make the logits."""
        ids = self.to_device(window.ids)
        scored = range(window.first_scored, len(ids) - 1)  # a position's logits score the token after it
        pieces = []
        for start in range(scored.start, scored.stop, LOGIT_ROWS):
            stop = min(start + LOGIT_ROWS, scored.stop)
            stand_ins = [StandIn([], layer_attributes(layer)) for layer in layout.layers]
            stand_ins[-1].final = final[:, start:stop]
            with layers_replaced(layout.model, layout.path, torch.nn.ModuleList(stand_ins)):
                logits = layout.model(input_ids=ids[start:stop].unsqueeze(0), use_cache=False).logits[0].float()
            pieces.append(torch.nn.functional.cross_entropy(logits, ids[start + 1 : stop + 1], reduction="none"))
            del logits
        return torch.cat(pieces) if pieces else final.new_zeros(0)

    def _losses(self, layout: Layout, texts: list[NamedText]) -> list[TextScore]:
        nats = [0.0] * len(texts)
        tokens = [0] * len(texts)
        for batch in layout.batches:
            for row, window in enumerate(batch.windows):
                losses = self.window_losses(layout, batch.hidden[row : row + 1], window)
                nats[window.text] += float(losses.double().sum())
                tokens[window.text] += losses.numel()
            batch.hidden = batch.calls = None
        return [
            TextScore(tokens=count, bytes=text.bytes, nats=total if math.isfinite(total) else math.inf)
            for text, count, total in zip(texts, tokens, nats)
        ]
