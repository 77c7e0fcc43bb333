"""`compose extract-expert MODEL --expert N OUT`: one expert of a mixture-of-experts model as a dense model of the
matching family (a Mixtral expert as Mistral, a Qwen2/3-MoE expert as Qwen2/3, a DeepSeek expert as DeepSeek with
every layer dense).

Each layer keeps its attention and norms. Its MLP becomes expert N's gate, up and down projections, with the layer's
shared experts beside it (every token passes through those, so the expert was trained to work with them; --no-shared
leaves them out) and the router's scale on routed experts (DeepSeek's routed_scaling_factor) folded into the expert's
down projection: the layer computes what the MoE layer computes for a token the router sends to expert N alone.

MLPs of different widths in one model (DeepSeek's dense first layers, an expert beside a shared expert) are padded with
zeros to the widest. Rows of gate and up and columns of down that are zero add nothing (silu(0) * 0 = 0), so each layer
still computes exactly what its parts did.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from composer.architecture import Architecture, architecture_for
from composer.architecture_experts import ExpertLayout, Experts, FusedTensor, MLPFile
from composer.errors import ComposerError, ComposerWarning
from composer.plan.model import COPY, Operation, Plan, PlannedTensor, TensorRef
from composer.plan.output_config import validate_against_transformers
from composer.plan.transformers_facts import config_defaults
from composer.sources import ModelSource, TensorInfo


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _piece(fused: FusedTensor, expert: int, position: int, tensor: torch.Tensor) -> torch.Tensor:
    return fused.split(tensor[expert])[position]


@dataclass(frozen=True)
class View:
    """A weight as a view of a stored tensor: the tensor read, how to take the weight out of it, the weight's shape."""

    ref: TensorRef
    take: Callable[[torch.Tensor], torch.Tensor]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Part:
    """One gated MLP of a layer: its gate, up and down weights, and a factor on its output."""

    gate: View
    up: View
    down: View
    scale: float = 1.0

    @property
    def width(self) -> int:
        return self.gate.shape[0]


class _Reader:
    """Views of one model's tensors, by name or as a piece of a fused tensor, checked against its headers."""

    def __init__(self, source: ModelSource):
        self.source = source
        self.infos: dict[str, TensorInfo] = source.tensor_infos()

    def info(self, name: str) -> TensorInfo:
        info = self.infos.get(name)
        if info is None:
            raise ComposerError(
                f"Model '{self.source.reference}' has no tensor '{name}', which the layout its config.json names holds."
            )
        return info

    def view(self, name: str) -> View:
        return View(TensorRef(self.source.reference, name), _whole, self.info(name).shape)

    def expert_view(self, layout: ExpertLayout, layer_prefix: str, piece: str, expert: int) -> View:
        suffix, fused, position = layout.locate(piece, expert)
        if fused is None:
            return self.view(layer_prefix + suffix)
        info = self.info(layer_prefix + suffix)
        shape = list(info.shape[1:])
        shape[fused.axis] //= len(fused.pieces)
        take = partial(_piece, fused, expert, position)
        return View(TensorRef(self.source.reference, info.name), take, tuple(shape))

    def mlp(self, names: MLPFile, layer_prefix: str, scale: float = 1.0) -> Part:
        gate, up, down = (self.view(layer_prefix + name) for name in (names.gate, names.up, names.down))
        return Part(gate, up, down, scale)


def _joined(views: list[View], axis: int, width: int, scales: list[float], dtype: torch.dtype, inputs) -> torch.Tensor:
    """The views' weights side by side along `axis` (each times its scale), padded with zeros to `width`."""
    parts = []
    for view, scale, tensor in zip(views, scales, inputs):
        weight = view.take(tensor)
        parts.append(weight if scale == 1 else (weight.to(torch.float32) * scale).to(weight.dtype))
    joined = torch.cat(parts, dim=axis) if len(parts) > 1 else parts[0]
    missing = width - joined.shape[axis]
    if missing:
        padding = list(joined.shape)
        padding[axis] = missing
        joined = torch.cat([joined, joined.new_zeros(padding)], dim=axis)
    return joined.to(dtype).contiguous()


def _mlp_tensor(name: str, views: list[View], axis: int, width: int, scales: list[float], dtype) -> PlannedTensor:
    shape = list(views[0].shape)
    shape[axis] = width
    if len(views) == 1 and views[0].take is _whole and scales[0] == 1 and views[0].shape[axis] == width:
        return PlannedTensor(name, tuple(shape), dtype, (views[0].ref,), COPY)
    operation = Operation(
        label="expert MLP",
        fn=partial(_joined, views, axis, width, scales, dtype),
        arguments={"parts": len(views), "width": width},
        light=True,
        copies=True,
    )
    return PlannedTensor(name, tuple(shape), dtype, tuple(view.ref for view in views), operation)


def _experts_of(architecture: Architecture, reference: str) -> Experts:
    experts = architecture.experts
    if experts is None:
        raise ComposerError(
            f"Model '{reference}' ({architecture.name}) is not a mixture of experts that composer knows: extract-expert "
            "takes one expert out of a Mixtral, Qwen2-MoE, Qwen3-MoE or DeepSeek-V2/V3 model."
        )
    if experts.dense_form is None or experts.expert is None:
        raise ComposerError(
            f"Model '{reference}' ({architecture.name}) has experts that no dense family computes (gpt-oss's clamped GLU "
            "with biases), so one of them cannot be written as a dense model."
        )
    return experts


def _routed_scale(experts: Experts, config: dict, reference: str) -> float:
    if experts.routed_scale_key is None:
        return 1.0
    value = config.get(experts.routed_scale_key)
    if value is None:
        value = config_defaults(config, (experts.routed_scale_key,), reference)[experts.routed_scale_key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ComposerError(
            f"The config.json of {reference} gives '{experts.routed_scale_key}' as {value!r}; it must be a number."
        )
    return float(value)


def expert_plan(source: ModelSource, expert: int, shared: bool = True) -> Plan:
    """The plan of the dense model that is expert `expert` of `source`. Everything is checked from its config and
    headers before any tensor is read."""
    reference = source.reference
    config = source.config()
    architecture = architecture_for(config, f"'{reference}'")
    experts = _experts_of(architecture, reference)
    count = experts.count(config, f"'{reference}'", architecture.name)
    if not 0 <= expert < count:
        raise ComposerError(
            f"--expert {expert} is out of range: model '{reference}' has {count} experts a layer, numbered 0 to {count - 1}."
        )
    layer_count = architecture.layer_count(config, f"'{reference}'")
    sparse = experts.sparse_layers(config, layer_count, f"'{reference}'")
    reader = _Reader(source)
    layout = experts.layout_of(reader.infos, architecture.layer_prefix, sparse, reference)
    scale = _routed_scale(experts, config, f"'{reference}'")

    layer_parts: list[list[Part]] = []
    gated_shared = False
    for index, flag in enumerate(sparse):
        prefix = architecture.layer_prefix.format(i=index)
        if not flag:
            layer_parts.append([reader.mlp(experts.dense_mlp, prefix)])
            continue
        names = experts.expert
        views = [reader.expert_view(layout, prefix, piece, expert) for piece in (names.gate, names.up, names.down)]
        parts = [Part(*views, scale)]
        if shared and experts.shared is not None and prefix + experts.shared.gate in reader.infos:
            parts.append(reader.mlp(experts.shared, prefix))
            gated_shared = gated_shared or experts.shared.gated_by is not None
        layer_parts.append(parts)
    if gated_shared:
        warnings.warn(
            f"Model '{reference}' gates its shared expert by a per-token sigmoid, which a dense MLP cannot keep; the shared "
            "expert is taken at full weight beside the expert (--no-shared leaves it out).",
            ComposerWarning,
            stacklevel=2,
        )
    width = max(sum(part.width for part in parts) for parts in layer_parts)

    form = experts.dense_form
    tensors: list[PlannedTensor] = []
    for weight in architecture.pre:
        if weight.name in reader.infos:
            tensors.append(_copy(reader, weight.name))
    for index, parts in enumerate(layer_parts):
        prefix = architecture.layer_prefix.format(i=index)
        for layer_weight in architecture.layer_weights(index):
            if layer_weight.name in reader.infos or not layer_weight.optional:
                tensors.append(_copy(reader, layer_weight.name))
        dtype = reader.info(parts[0].down.ref.name).dtype
        scales = [part.scale for part in parts]
        tensors += [
            _mlp_tensor(prefix + form.mlp.gate, [part.gate for part in parts], 0, width, [1.0] * len(parts), dtype),
            _mlp_tensor(prefix + form.mlp.up, [part.up for part in parts], 0, width, [1.0] * len(parts), dtype),
            _mlp_tensor(prefix + form.mlp.down, [part.down for part in parts], 1, width, scales, dtype),
        ]
    for weight in architecture.post:
        if weight.name in reader.infos:
            tensors.append(_copy(reader, weight.name))

    dense_config = _dense_config(experts, config, layer_count, width, reference)
    validate_against_transformers(dense_config, {t.name: t.shape for t in tensors}, reference)
    shared_note = "" if shared else " --no-shared"
    return Plan(
        tensors=tensors,
        sources={reference: source},
        config=dense_config,
        tokenizer_source=reference,
        recipe_text=f"# compose extract-expert {reference} --expert {expert}{shared_note}\n",
        method="extract-expert",
        parents=[reference],
        notes=[f"expert {expert} of {count}, MLP width {width}"],
    )


def _copy(reader: _Reader, name: str) -> PlannedTensor:
    info = reader.info(name)
    return PlannedTensor(name, info.shape, info.dtype, (TensorRef(reader.source.reference, name),), COPY)


def _dense_config(experts: Experts, config: dict, layer_count: int, width: int, reference: str) -> dict:
    form = experts.dense_form
    dense = copy.deepcopy(config)
    if form.model_type is not None:
        dense["model_type"] = form.model_type
    if form.architectures is not None:
        dense["architectures"] = list(form.architectures)
    for key in form.drop_keys:
        dense.pop(key, None)
    if form.model_type is None:  # the family itself, every layer dense
        experts.rewrite(dense, [False] * layer_count, f"'{reference}'")
    dense[form.width_key] = width
    return dense


def extract_expert(
    reference: str,
    expert: int,
    out: Path,
    options,
    shared: bool = True,
    relative_to: Path | None = None,
):
    """Write expert `expert` of model `reference` into `out` as a dense model; the execution report."""
    from composer.compose import write_plan
    from composer.execute.output_folder import check_output_free
    from composer.sources import open_source

    check_output_free(out, options.force)
    source = open_source(reference, relative_to)
    try:
        plan = expert_plan(source, expert, shared)
    except BaseException:
        source.close()
        raise
    return write_plan(plan, out, options, f"Expert {expert} of {reference}")
