"""The experts of a mixture-of-experts architecture, as its YAML definition declares them: which layers hold experts,
the tensors of such a layer in each on-disk layout (one tensor per expert, or every expert fused into one tensor),
and the MLP of one expert (for pulling an expert out as a dense model)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict

from composer.errors import ComposerError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FusedTensorFile(_Strict):
    name: str
    pieces: list[str]  # the per-expert tensors ({e}: the expert) one expert's slice holds, in order
    axis: int = 0  # the axis of one expert's slice along which its pieces lie
    interleaved: bool = (
        False  # the pieces alternate along `axis` (gpt-oss's gate and up) instead of following each other
    )


class LayoutFile(_Strict):
    name: str
    tensors: list[str]  # the layer's tensors besides the experts: router, shared experts
    optional: list[str] = []
    each_expert: list[str] = []  # one tensor per expert ({e})
    fused: list[FusedTensorFile] = []


class MLPFile(_Strict):
    """A gated MLP's three weights (nn.Linear layout: [inner, hidden], [inner, hidden], [hidden, inner])."""

    gate: str
    up: str
    down: str


class SharedExpertFile(MLPFile):
    gated_by: str | None = None  # a per-token sigmoid gate on the shared expert (Qwen2-MoE)


class SparseLayersFile(_Strict):
    """Which layers hold experts; with none of these keys, every layer does."""

    first_dense_key: str | None = None  # the first k layers are dense (DeepSeek's first_k_dense_replace)
    dense_list_key: str | None = None  # a list of the dense layers (Qwen-MoE's mlp_only_layers) ...
    step_key: str | None = None  # ... and every step-th layer holds experts (decoder_sparse_step)


STANDARD_MLP = MLPFile(gate="mlp.gate_proj.weight", up="mlp.up_proj.weight", down="mlp.down_proj.weight")


class DenseFormFile(_Strict):
    """The dense family one expert becomes; without a model_type, the family itself with every layer dense."""

    model_type: str | None = None
    architectures: list[str] | None = None
    mlp: MLPFile = STANDARD_MLP  # the dense family's MLP tensors, relative to the layer
    width_key: str = "intermediate_size"
    drop_keys: list[str] = []  # MoE settings the dense family does not have


class ExpertsFile(_Strict):
    count_keys: list[str]
    sparse_layers: SparseLayersFile = SparseLayersFile()
    dense_mlp: MLPFile | None = None  # the MLP of a layer without experts
    layouts: list[LayoutFile]
    expert: MLPFile | None = None  # one expert's MLP, under per-expert names ({e})
    shared: SharedExpertFile | None = None
    routed_scale_key: str | None = None  # a factor on every routed expert's output (DeepSeek's routed_scaling_factor)
    float32: list[str] = []  # router tensors transformers keeps in float32 whatever the model's dtype
    dense_form: DenseFormFile | None = None


@dataclass(frozen=True)
class FusedTensor:
    """One tensor holding every expert of a layer: axis 0 is the expert, and each expert's slice holds `pieces`
    (per-expert names, `{e}` the expert) along `axis` of the slice, one after another or alternating."""

    name: str
    pieces: tuple[str, ...]
    axis: int
    interleaved: bool

    def split(self, expert_slice: torch.Tensor) -> list[torch.Tensor]:
        count = len(self.pieces)
        if count == 1:
            return [expert_slice]
        if self.interleaved:
            grouped = expert_slice.unflatten(self.axis, (-1, count))
            return [grouped.select(self.axis + 1, k) for k in range(count)]
        return list(expert_slice.chunk(count, dim=self.axis))

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if len(parts) == 1:
            return parts[0]
        if self.interleaved:
            return torch.stack(parts, dim=self.axis + 1).flatten(self.axis, self.axis + 1)
        return torch.cat(parts, dim=self.axis)

    def piece_names(self, expert: int) -> list[str]:
        return [piece.format(e=expert) for piece in self.pieces]


@dataclass(frozen=True)
class ExpertLayout:
    """The tensors of a layer with experts, relative to the layer, in one on-disk layout."""

    name: str
    tensors: tuple[str, ...]
    optional: tuple[str, ...]
    each_expert: tuple[str, ...]
    fused: tuple[FusedTensor, ...]

    def tensor_suffixes(self, expert_count: int) -> list[tuple[str, bool, FusedTensor | None]]:
        """(suffix, optional, the fused tensor it is or None) for each tensor of such a layer."""
        suffixes = [(suffix, False, None) for suffix in self.tensors]
        suffixes += [(suffix, True, None) for suffix in self.optional]
        suffixes += [(t.format(e=e), False, None) for e in range(expert_count) for t in self.each_expert]
        return suffixes + [(fused.name, False, fused) for fused in self.fused]

    def described(self) -> str:
        return "one tensor per expert" if self.each_expert else "fused (every expert of a layer in one tensor)"

    def marker(self) -> str:
        """A tensor (relative to the layer) that only this layout holds."""
        return self.each_expert[0].format(e=0) if self.each_expert else self.fused[0].name

    def locate(self, piece: str, expert: int) -> tuple[str, FusedTensor | None, int]:
        """Where the per-expert tensor `piece` ({e} template) of `expert` is held: (suffix, the fused tensor holding it
        or None, its position among that tensor's pieces)."""
        if piece in self.each_expert:
            return piece.format(e=expert), None, 0
        for fused in self.fused:
            if piece in fused.pieces:
                return fused.name, fused, fused.pieces.index(piece)
        raise KeyError(piece)  # a definition that names a piece no layout holds: caught by the definition tests


@dataclass(frozen=True)
class Experts:
    count_keys: tuple[str, ...]
    layouts: tuple[ExpertLayout, ...]
    first_dense_key: str | None = None
    dense_list_key: str | None = None
    step_key: str | None = None
    dense_mlp: MLPFile | None = None
    expert: MLPFile | None = None
    shared: SharedExpertFile | None = None
    routed_scale_key: str | None = None
    float32: tuple[str, ...] = ()
    dense_form: DenseFormFile | None = None

    @classmethod
    def from_file(cls, spec: ExpertsFile) -> Experts:
        layouts = tuple(
            ExpertLayout(
                name=layout.name,
                tensors=tuple(layout.tensors),
                optional=tuple(layout.optional),
                each_expert=tuple(layout.each_expert),
                fused=tuple(FusedTensor(f.name, tuple(f.pieces), f.axis, f.interleaved) for f in layout.fused),
            )
            for layout in spec.layouts
        )
        return cls(
            count_keys=tuple(spec.count_keys),
            layouts=layouts,
            first_dense_key=spec.sparse_layers.first_dense_key,
            dense_list_key=spec.sparse_layers.dense_list_key,
            step_key=spec.sparse_layers.step_key,
            dense_mlp=spec.dense_mlp,
            expert=spec.expert,
            shared=spec.shared,
            routed_scale_key=spec.routed_scale_key,
            float32=tuple(spec.float32),
            dense_form=spec.dense_form,
        )

    def count(self, config: dict, reference: str = "the model", family: str = "its") -> int:
        return counted(config, self.count_keys, "expert", f"The config.json of {reference}", family)

    def sparse_layers(self, config: dict, layer_count: int, reference: str = "the model") -> list[bool]:
        """For each layer, whether it holds experts (as transformers decides it from the config)."""
        flags = [True] * layer_count
        if self.first_dense_key is not None:
            first = _whole(config.get(self.first_dense_key, 0), self.first_dense_key, reference)
            flags = [i >= first for i in range(layer_count)]
        if self.dense_list_key is not None:
            listed = config.get(self.dense_list_key) or []
            if not isinstance(listed, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in listed):
                raise ComposerError(
                    f"The config.json of {reference} gives '{self.dense_list_key}' as {listed!r}; it must be a list of layer numbers."
                )
            flags = [flag and i not in listed for i, flag in enumerate(flags)]
        if self.step_key is not None:
            step = _whole(config.get(self.step_key, 1), self.step_key, reference)
            if step < 1:
                raise ComposerError(
                    f"The config.json of {reference} gives '{self.step_key}' as {step}; it must be at least 1."
                )
            flags = [flag and (i + 1) % step == 0 for i, flag in enumerate(flags)]
        return flags

    def layout_of(self, tensor_names, layer_prefix: str, sparse: list[bool], reference: str) -> ExpertLayout:
        """The layout the model's files hold, told by the first layer with experts."""
        if True not in sparse:
            return self.layouts[0]
        prefix = layer_prefix.format(i=sparse.index(True))
        for layout in self.layouts:
            if prefix + layout.marker() in tensor_names:
                return layout
        wanted = " or ".join(f"'{prefix + layout.marker()}' ({layout.name})" for layout in self.layouts)
        raise ComposerError(
            f"Model '{reference}' holds its experts in no layout composer knows: it has no {wanted}. Check that the "
            "weights are unquantised and in the layout of the model type its config.json names."
        )

    def rewrite(self, config: dict, sparse: list[bool], reference: str) -> None:
        """Set the keys that say which layers hold experts for an output whose layer i holds experts iff sparse[i]."""
        if self.first_dense_key is not None:
            first = sparse.index(True) if True in sparse else len(sparse)
            if not all(sparse[first:]):
                after = sparse.index(False, first)
                raise ComposerError(
                    f"Output layer {after} would be a dense layer after layer {first}, which holds experts, but the "
                    f"'{self.first_dense_key}' of {reference}'s config can only make the first layers dense. Order the "
                    "slices so that every dense layer comes before the first layer with experts."
                )
            config[self.first_dense_key] = first
        if self.dense_list_key is not None:
            dense = [i for i, flag in enumerate(sparse) if not flag]
            if dense or self.dense_list_key in config:
                config[self.dense_list_key] = dense
            if self.step_key is not None and config.get(self.step_key, 1) != 1:
                config[self.step_key] = 1  # the list now names every dense layer


def counted(config: dict, keys: tuple[str, ...], what: str, where: str, family: str) -> int:
    """The first of `keys` that `config` has: a count (of layers, of experts) of at least 1."""
    for key in keys:
        if key in config:
            value = config[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ComposerError(
                    f"{where} gives '{key}' as {value!r}; a {what} count is a whole number of at least 1."
                )
            return value
    raise ComposerError(
        f"{where} has none of the {what}-count keys {list(keys)} that the '{family}' architecture uses."
    )


def _whole(value, key: str, reference: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ComposerError(f"The config.json of {reference} gives '{key}' as {value!r}; it must be a whole number.")
    return value
