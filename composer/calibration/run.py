"""The calibration pass of RegMean and RegMean++: the models run over the calibration text one decoder layer at a
time, inside the executor, and each layer's linear weights are solved from the Gram matrices of their inputs.

The layer-by-layer machinery is `compose tune`'s (composer.tune.streamed): the model is built on the meta device,
its own forward runs once with stand-ins in its layers' places to record what each layer is handed (rotary tables,
attention masks, ...), and each layer is then filled with weights, run over the windows' hidden states and emptied.
What is kept from one layer to the next (the hidden states of every window: one set per model for RegMean, the
merged model's for RegMean++; the solved weights of the layer until their steps hand them out) is the chain's
state; a layer's weights, its Gram matrices and activations live only while its first step runs.

RegMean: model i's hidden states pass through model i's own layers, and its Gram matrices are those of its own
inputs. RegMean++: every model's layer l runs on the hidden states the merged layers 0..l-1 produced (the merged
embeddings first), its Gram matrices are taken there, and once layer l is solved the merged layer l (its linear
weights solved, the rest merged by the fallback as the plan says) carries the hidden states on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from composer.architecture import build_meta_model
from composer.errors import ComposerError
from composer.methods.regmean import regmean
from composer.plan import Plan, PlannedTensor, TensorRef
from composer.plan.model import CalibrationRequest
from composer.tune.layer_calls import init_buffers, layers_replaced, record_calls

FLOAT32, FLOAT64 = 4, 8
ROWS = 8  # windows per forward call of a layer


@dataclass
class Batch:
    ids: torch.Tensor  # [rows, tokens]: windows of one length, so no padding
    calls: list[tuple[tuple, dict]] | None = None  # what the model hands each layer: (arguments, keywords)
    hidden: torch.Tensor | None = None


@dataclass
class Layout:
    model: torch.nn.Module  # built on the meta device; its layers are filled one at a time
    path: str  # where the layers' ModuleList sits in the model
    layers: torch.nn.ModuleList
    batches: list[Batch]


def batches_of(windows: list[torch.Tensor]) -> list[Batch]:
    """Windows of one length stacked, ROWS at a time."""
    by_length: dict[int, list[torch.Tensor]] = {}
    for window in windows:
        by_length.setdefault(len(window), []).append(window)
    return [Batch(torch.stack(group[i : i + ROWS])) for group in by_length.values() for i in range(0, len(group), ROWS)]


class CalibrationPass:
    """The state of one calibration pass, shared by the steps of its chain (`step`), which the schedule runs in
    layer order."""

    def __init__(self, plan: Plan, request: CalibrationRequest, batches: list[Batch]):
        self.request = request
        self.by_name = {planned.name: planned for planned in plan.tensors}
        model = build_meta_model(plan.config, "the merged model")
        model.eval()
        path = request.layer_prefix.split("{i}")[0].rstrip(".")
        self.layout = Layout(model, path, model.get_submodule(path), batches)
        self.base = model.base_model
        attribute = getattr(model, "base_model_prefix", "")  # where the base model sits: 'model' in LlamaForCausalLM
        self.base_prefix = f"{attribute}." if attribute and getattr(model, attribute, None) is self.base else ""
        with layers_replaced(model, path, torch.nn.ModuleList()):
            self.outside = [self.base_prefix + name for name in self.base.state_dict()]
        self.positions = {
            name: (layer, index) for layer, names in enumerate(request.linear_names) for index, name in enumerate(names)
        }
        self.streams: list[list[torch.Tensor]] | None = None  # [stream][batch]: hidden states [rows, tokens, width]
        self.next_layer = 0
        self.solved: dict[str, torch.Tensor] = {}

    @property
    def merged(self) -> bool:
        return self.request.source == "merged"

    # --- what each step reads ---------------------------------------------------------------------------
    def layer_suffixes(self, layer: int) -> list[str]:
        return list(self.layout.layers[layer].state_dict())

    def first_inputs(self, layer: int) -> list[TensorRef]:
        """What the first step of `layer` reads: every model's whole layer; for the first layer also what lies before
        the layers (the embeddings); for RegMean++ also the inputs of the layer's other tensors (norms, biases) and of
        the embeddings, which the merged model runs with."""
        prefix = self.request.layer_prefix.format(i=layer)
        refs: list[TensorRef] = []
        if layer == 0:
            for name in self.outside:
                if self.merged:
                    refs += self._planned(name).inputs
                else:
                    refs += [TensorRef(model, name) for model in self.request.models]
        for model in self.request.models:
            refs += [TensorRef(model, prefix + suffix) for suffix in self.layer_suffixes(layer)]
        if self.merged:
            for suffix in self.layer_suffixes(layer):
                if prefix + suffix not in self.positions:
                    refs += self._planned(prefix + suffix).inputs
        return list(dict.fromkeys(refs))

    def _planned(self, name: str) -> PlannedTensor:
        planned = self.by_name.get(name)
        if planned is None:
            raise ComposerError(
                f"The merged model needs tensor '{name}', which the plan does not make; {self.request.method} cannot run it."
            )
        return planned

    # --- the executor's view ------------------------------------------------------------------------------
    def step(self, layer: int, name: str, refs: list[TensorRef], inputs: list[torch.Tensor]) -> torch.Tensor:
        """The solved weight `name` of `layer`; the layer's first step runs the layer and solves all its weights."""
        if self.positions[name][1] == 0:
            if layer != self.next_layer:
                raise ComposerError(
                    f"{self.request.method}: layer {layer} was asked for before layer {self.next_layer}; the calibration "
                    "pass runs the layers in order."
                )
            self._solve_layer(layer, dict(zip(refs, inputs)))
            self.next_layer += 1
        return self.solved.pop(name)

    def _solve_layer(self, layer: int, tensors: dict[TensorRef, torch.Tensor]) -> None:
        device = next(iter(tensors.values())).device
        with torch.no_grad():
            if layer == 0:
                self._start(tensors, device)
            prefix = self.request.layer_prefix.format(i=layer)
            grams = []
            for position, model in enumerate(self.request.models):
                stream = self.streams[0 if self.merged else position]
                state = {
                    suffix: _widened(tensors[TensorRef(model, prefix + suffix)], device)
                    for suffix in self.layer_suffixes(layer)
                }
                grams.append(self._run(layer, state, stream, update=not self.merged, capture=True))
                del state
            for name in self.request.linear_names[layer]:
                arguments = self.by_name[name].operation.arguments
                weights = [tensors[TensorRef(model, name)] for model in self.request.models]
                self.solved[name] = regmean(
                    weights, [found[name] for found in grams], arguments["alpha"], arguments["weight"]
                )
            del grams
            if self.merged:
                state = {}
                for suffix in self.layer_suffixes(layer):
                    planned = self._planned(prefix + suffix)
                    made = self.solved[planned.name] if planned.name in self.solved else _made(planned, tensors)
                    state[suffix] = made.to(planned.dtype).to(device=device, dtype=torch.float32)
                self._run(layer, state, self.streams[0], update=True, capture=False)
                del state
        if layer == len(self.request.linear_names) - 1:
            self.streams = None  # the last layer: nothing is carried on

    def _start(self, tensors: dict[TensorRef, torch.Tensor], device: torch.device) -> None:
        """Each stream's hidden states at the first layer, from the model's own forward with stand-ins for its layers;
        each batch keeps what its layers are handed (the same for every stream: positions and masks)."""
        count = 1 if self.merged else len(self.request.models)
        self.streams = []
        for position in range(count):
            if self.merged:
                state = {name: _made(self._planned(name), tensors) for name in self.outside}
            else:
                state = {name: tensors[TensorRef(self.request.models[position], name)] for name in self.outside}
            self._load_outside(state, device)
            del state
            for batch in self.layout.batches:
                batch.ids = batch.ids.to(device)
                record_calls(self.layout, batch, self.base)
            self.streams.append([batch.hidden for batch in self.layout.batches])
            for batch in self.layout.batches:
                batch.hidden = None
        self.base.to_empty(device="meta")

    def _load_outside(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        """What lies outside the layers of the base model (embeddings, final norm, rotary tables) filled in."""
        model = self.layout.model
        with layers_replaced(model, self.layout.path, torch.nn.ModuleList()):
            for module in self.base.modules():
                if getattr(module, "_non_persistent_buffers_set", None):
                    module.to_empty(device=device, recurse=False)
            init_buffers(model, self.base.modules())
            start = len(self.base_prefix)
            self.base.load_state_dict(
                {name[start:]: _widened(tensor, device) for name, tensor in state.items()}, assign=True
            )

    def _run(self, layer: int, state: dict[str, torch.Tensor], stream: list[torch.Tensor], update: bool, capture: bool):
        """Run layer `layer` filled with `state` over every batch of `stream` (replacing its hidden states with the
        layer's output when `update`); with `capture`, the Gram matrix X^T X of each linear weight's inputs X."""
        module = self.layout.layers[layer]
        module.to_empty(device=stream[0].device)
        init_buffers(self.layout.model, module.modules())
        module.load_state_dict(state, assign=True)
        prefix = self.request.layer_prefix.format(i=layer)
        grams = GramCapture()
        hooks = (
            [
                linear.register_forward_hook(grams.hook(f"{prefix}{name}.weight"))
                for name, linear in module.named_modules()
                if isinstance(linear, torch.nn.Linear)
            ]
            if capture
            else []
        )
        try:
            for index, batch in enumerate(self.layout.batches):
                arguments, keywords = batch.calls[layer]
                output = module(stream[index], *arguments, **keywords)
                grams.forget()
                if update:
                    stream[index] = output[0] if isinstance(output, tuple) else output
        finally:
            for hook in hooks:
                hook.remove()
            module.to_empty(device="meta")
        return grams.grams

    # --- memory, for the plan ---------------------------------------------------------------------------
    def state_bytes(self, config: dict) -> int:
        """What the chain holds between its steps: the streams' hidden states, each batch's recorded positions and
        masks, and one layer's solved weights waiting for their steps."""
        width = config.get("hidden_size") or 0
        heads = config.get("num_attention_heads") or 1
        head = config.get("head_dim") or width // heads
        streams = 1 if self.merged else len(self.request.models)
        tokens = sum(batch.ids.numel() for batch in self.layout.batches)
        recorded = sum(
            batch.ids.numel() * 2 * head * FLOAT32 + 2 * batch.ids.shape[0] * batch.ids.shape[1] ** 2 * FLOAT32
            for batch in self.layout.batches
        )
        solved = max((self._linear_bytes(layer) for layer in range(len(self.request.linear_names))), default=0)
        return streams * tokens * width * FLOAT32 + recorded + solved

    def _linear_bytes(self, layer: int) -> int:
        return sum(_count(self.by_name[name].shape) * FLOAT32 for name in self.request.linear_names[layer])

    def working_bytes(self, layer: int, config: dict) -> int:
        """What a layer's first step holds while it runs, beyond its inputs and the chain's state: one layer widened to
        float32 (two for RegMean++, the merged one too), a batch's activations, every model's Gram matrices and the
        solve's float64 copies; for the first layer also the tensors before the layers, widened."""
        width = config.get("hidden_size") or 0
        inner = config.get("intermediate_size") or 4 * width
        heads = config.get("num_attention_heads") or 1
        rows, length = max(((b.ids.shape[0], b.ids.shape[1]) for b in self.layout.batches), default=(0, 0))
        prefix = self.request.layer_prefix.format(i=layer)
        layer_bytes = sum(_count(self.by_name[prefix + s].shape) * FLOAT32 for s in self.layer_suffixes(layer))
        activations = rows * length * (3 * inner + 8 * width) * FLOAT32 + rows * heads * length * length * FLOAT32
        inputs = [self.by_name[name].shape[1] for name in self.request.linear_names[layer]]
        outputs = [self.by_name[name].shape[0] for name in self.request.linear_names[layer]]
        grams = len(self.request.models) * sum(size * size for size in inputs) * FLOAT32
        solve = max((2 * i * i + 2 * i * o) * FLOAT64 for i, o in zip(inputs, outputs)) if inputs else 0
        held = layer_bytes * (2 if self.merged else 1) + activations + grams + solve
        if layer == 0:
            held += sum(
                _count(self._planned(name).shape) * FLOAT32 * (3 if self.merged else 1) for name in self.outside
            )
        return held


class GramCapture:
    """Forward hooks' target: the Gram matrix of each linear weight's inputs, summed over the batches. Linear layers
    handed the very same tensor (q, k and v; gate and up) share one matrix, computed once."""

    def __init__(self):
        self.grams: dict[str, torch.Tensor] = {}
        self._last: tuple[torch.Tensor, str] | None = None

    def hook(self, name: str):
        def capture(module, arguments, output) -> None:
            inputs = arguments[0]
            last = self._last
            if last is not None and inputs is last[0]:
                if name not in self.grams:
                    self.grams[name] = self.grams[last[1]]  # shared from the first batch on
                elif self.grams[name] is not self.grams[last[1]]:
                    self.grams[name] += _gram(inputs)
            else:
                gram = _gram(inputs)
                if name in self.grams:
                    self.grams[name] += gram
                else:
                    self.grams[name] = gram
            self._last = (inputs, name)

        return capture

    def forget(self) -> None:
        self._last = None  # a batch's inputs are let go; the next batch's are new tensors


def _gram(inputs: torch.Tensor) -> torch.Tensor:
    flat = inputs.reshape(-1, inputs.shape[-1]).to(torch.float32)
    return flat.T @ flat


def _made(planned: PlannedTensor, tensors: dict[TensorRef, torch.Tensor]) -> torch.Tensor:
    """A planned tensor as the executor makes it (its operation on its inputs in its compute dtype), in its dtype."""
    compute = planned.operation.compute_dtype
    inputs = [tensors[ref] for ref in planned.inputs]
    work = [x.to(compute) if compute is not None and x.dtype != compute else x for x in inputs]
    return planned.operation.fn(work).to(planned.dtype)


def _widened(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.to(device=device, dtype=torch.float32)


def _count(shape) -> int:
    total = 1
    for size in shape:
        total *= size
    return total
