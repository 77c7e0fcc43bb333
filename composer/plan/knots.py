"""KnOTS in the plan: LoRA adapters of one base merged by their factors, not by their baked weights.

Every model of a KnOTS recipe is `BASE+ADAPTER` on one base. The plan reads the base's tensors and the adapters'
own factor tensors through one source (`AdapterFactors`), so an output weight that some adapter changes by a
low-rank product is the base weight plus the KnOTS merge of the updates (composer.methods.knots); a weight no
adapter changes is the base's, copied; one an adapter replaces whole (modules_to_save) or changes by a bias is
the mean of the models' baked tensors (the fallback).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from composer.errors import ComposerError
from composer.methods.knots import merged_factors, updated
from composer.plan.model import COPY, Operation, TensorRef
from composer.recipe.load import RecipeKeyError
from composer.sources import ModelSource, TensorInfo
from composer.sources.lora import SAVED_PREFIX, Delta, LoraSource

SOURCE = "knots: the adapters' base and factors"
BASE = "base/"  # name prefix of the base's tensors in AdapterFactors


@dataclass(frozen=True)
class Update:
    """How one model changes one base tensor: `left @ right`, each factor a tensor of AdapterFactors scaled and
    transposed as `deltas` say (several deltas concatenate along the rank)."""

    model: int
    deltas: tuple[Delta, ...]


class AdapterFactors(ModelSource):
    """The base model's tensors ('base/NAME') and each adapter's factor tensors ('I/SAVED', I the model's place)."""

    def __init__(self, adapters: list[LoraSource]):
        super().__init__(SOURCE)
        self.adapters = adapters
        self.base = adapters[0].base
        infos = {
            BASE + name: TensorInfo(BASE + name, info.shape, info.dtype)
            for name, info in self.base.tensor_infos().items()
        }
        for index, adapter in enumerate(adapters):
            for saved, shape in adapter.merge.weights.shapes.items():
                name = f"{index}/{saved}"
                infos[name] = TensorInfo(name, tuple(shape), torch.float32)  # AdapterWeights reads them in float32
        self.infos = infos

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return self.infos

    def read(self, name: str) -> torch.Tensor:
        if name.startswith(BASE):
            return self.base.read(name[len(BASE) :])
        index, _, saved = name.partition("/")
        return self.adapters[int(index)].merge.weights.read(saved)

    def byte_range(self, name: str):
        return self.base.byte_range(name[len(BASE) :]) if name.startswith(BASE) else None

    def config(self) -> dict:
        return self.base.config()

    def save_tokenizer(self, destination: Path) -> list[str]:
        return self.adapters[0].save_tokenizer(destination)

    def close(self) -> None:
        pass  # the adapters' sources are the plan's own and close their bases

    def kind(self, name: str) -> str:
        """'copy' (no adapter changes the tensor), 'low_rank' (adapters change it only by low-rank products) or
        'whole' (an adapter replaces it or adds a bias to it)."""
        edits = [adapter.merge.edits.get(name) for adapter in self.adapters]
        if all(edit is None for edit in edits):
            return "copy"
        if all(
            edit is None or (edit.replacement is None and all(d.b is not None for d in edit.deltas)) for edit in edits
        ):
            return "low_rank"
        return "whole"

    def updates(self, name: str) -> list[Update]:
        return [
            Update(index, tuple(edit.deltas) if edit is not None else ())
            for index, edit in enumerate(adapter.merge.edits.get(name) for adapter in self.adapters)
        ]

    def rank_of(self, update: Update) -> int:
        shapes = self.adapters[update.model].merge.weights.shapes
        return sum(shapes[delta.a][0] for delta in update.deltas)


def adapter_factors(
    method_name: str, sources: dict[str, ModelSource], models: list[str], base: str | None
) -> AdapterFactors:
    """The adapters of `models`, which must all be BASE+ADAPTER references on one base; refused otherwise, before any
    tensor is read."""
    adapters = []
    for reference in models:
        source = sources[reference]
        if not isinstance(source, LoraSource):
            raise ComposerError(
                f"merge method '{method_name}' merges LoRA adapters, and model '{reference}' is not a BASE+ADAPTER "
                "reference; give every model as BASE+ADAPTER (a base model and a PEFT LoRA adapter folder or hub id, "
                "joined by '+'), all on one base."
            )
        adapters.append(source)
    bases = {adapter.base.reference for adapter in adapters}
    if len(bases) > 1:
        raise ComposerError(
            f"merge method '{method_name}' merges LoRA adapters of one base, and these adapters sit on "
            f"{len(bases)} different bases ({', '.join(sorted(bases))}); give every model on the same base."
        )
    if base is not None and base not in bases:
        raise RecipeKeyError(
            ("base_model",),
            f"base_model '{base}' is not the base of the adapters ({bases.pop()}); KnOTS merges onto the adapters' own "
            "base: remove base_model or name that base.",
        )
    return AdapterFactors(adapters)


def _factor_pair(delta: Delta, left_right: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = left_right
    if delta.transposed:  # stored as (scaling B A)^T = A^T (scaling B)^T
        return a.T, delta.scaling * b.T
    return delta.scaling * b, a


def _updates_from_inputs(
    updates: list[Update], shape: tuple[int, int], inputs: list[torch.Tensor]
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Each model's (L_i, R_i) from the factor tensors read (A then B of each delta, model by model); a model that
    does not change the tensor has None for both (a zero update)."""
    lefts, rights, position = [], [], 0
    for update in updates:
        pairs = []
        for delta in update.deltas:
            pairs.append(_factor_pair(delta, inputs[position : position + 2]))
            position += 2
        lefts.append(torch.cat([left for left, _ in pairs], dim=1) if pairs else None)
        rights.append(torch.cat([right for _, right in pairs], dim=0) if pairs else None)
    return lefts, rights


def knots_factors(updates, shape, params, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of the merged update of one tensor, from the inputs of its KnOTS step (the base tensor first)."""
    lefts, rights = _updates_from_inputs(updates, shape, inputs[1:])
    return merged_factors(
        lefts, rights, params["weight"], params["merge"], params["density"], params["lambda"], int(params["rank"])
    )


def _merged_weight(updates, shape, params, inputs: list[torch.Tensor]) -> torch.Tensor:
    return updated(inputs[0], knots_factors(updates, shape, params, inputs))


def knots_step(
    factors: AdapterFactors, name: str, shape: tuple[int, ...], operation: Operation
) -> tuple[Operation, tuple[TensorRef, ...]]:
    """The step (and its inputs) of an output tensor the adapters change by low-rank products: the base tensor and
    every adapter's factors in, base + KnOTS update out. `operation`: the planner's knots operation, whose
    arguments hold the resolved parameters. A rank the matrix cannot have is refused here."""
    if len(shape) != 2:
        raise ComposerError(f"Tensor '{name}' has shape {list(shape)}; KnOTS merges 2-D weights.")
    updates = factors.updates(name)
    spanned = max(1, sum(factors.rank_of(update) for update in updates))
    largest = min(spanned, shape[0], len(updates) * shape[1])
    rank = operation.arguments["rank"]
    if rank > largest:
        raise ComposerError(
            f"merge method 'knots': rank {int(rank)} is larger than the matrix of tensor '{name}' allows: its "
            f"{len(updates)} updates of shape {list(shape)} side by side span at most {largest} directions (the adapters' "
            f"ranks sum to {spanned}); choose a rank of at most {largest}, or 0 for every direction."
        )
    refs = [TensorRef(SOURCE, BASE + name)]
    for update in updates:
        for delta in update.deltas:
            refs += [TensorRef(SOURCE, f"{update.model}/{delta.a}"), TensorRef(SOURCE, f"{update.model}/{delta.b}")]
    out_features, in_features = shape
    step = Operation(
        label="knots",
        fn=partial(_merged_weight, updates, tuple(shape), operation.arguments),
        arguments=operation.arguments,
        compute_dtype=None,
        temporaries=0.0,
        # the base widened, the update and the result (float32); the coefficient matrices with TIES's copies; the
        # factored SVD's float64 pieces
        working_bytes=3 * out_features * in_features * 4
        + spanned * len(updates) * in_features * (3 * 4 + 2 * 8)
        + 2 * out_features * spanned * 8,
    )
    return step, tuple(refs)


def copy_of_base(name: str) -> tuple[Operation, tuple[TensorRef, ...]]:
    return COPY, (TensorRef(SOURCE, BASE + name),)


class _FactorPairs:
    """The (B, A) of each tensor's merged update, made by its lora_A step and handed to its lora_B step (the next
    step of their chain); a B asked for on its own is made again."""

    def __init__(self):
        self.waiting: dict[str, torch.Tensor] = {}

    def _make(self, name, updates, shape, params, rank, inputs):
        b, a = knots_factors(updates, shape, params, inputs)
        kept = b.shape[1]
        if kept < rank:  # fewer directions carry an update than the adapter's rank: the rest are zero
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - kept)], dim=1)
            a = torch.cat([a, a.new_zeros(rank - kept, a.shape[1])], dim=0)
        return b.contiguous(), a.contiguous()

    def a(self, name, updates, shape, params, rank, inputs: list[torch.Tensor]) -> torch.Tensor:
        b, a = self._make(name, updates, shape, params, rank, inputs)
        self.waiting[name] = b
        return a

    def b(self, name, updates, shape, params, rank, inputs: list[torch.Tensor]) -> torch.Tensor:
        waiting = self.waiting.pop(name, None)
        return waiting if waiting is not None else self._make(name, updates, shape, params, rank, inputs)[0]


def adapter_tensors(plan) -> tuple[list, dict[str, int]]:
    """A KnOTS plan's merged update as a PEFT LoRA adapter: for each tensor the adapters change, its lora_A ([k, in])
    and lora_B ([out, k]) in PEFT's names, with B @ A the merged update (scaling 1); and each module's rank k (the
    `rank` parameter, or every direction the updates span). Refused where an adapter cannot hold the merge: a tensor
    an adapter replaces whole or changes by a bias, or a transposed update (fan_in_fan_out, embeddings)."""
    from composer.plan.model import Chain, PlannedTensor

    factors = plan.sources.get(SOURCE)
    if not isinstance(factors, AdapterFactors):
        raise ComposerError(
            f"--as-lora writes the merged adapter of a knots merge, and this recipe's merge method is '{plan.method}', "
            "which merges whole weights; use merge_method: knots (every model BASE+ADAPTER on one base), or drop --as-lora."
        )
    pairs = _FactorPairs()
    tensors, ranks = [], {}
    for planned in plan.tensors:
        name = planned.name
        kind = factors.kind(name)
        if kind == "copy":
            continue
        if kind == "whole":
            raise ComposerError(
                f"--as-lora: an adapter replaces tensor '{name}' whole or changes it by a bias (modules_to_save, lora_bias), "
                "which a merged LoRA adapter cannot hold; write the merged model instead (without --as-lora)."
            )
        updates = factors.updates(name)
        if any(delta.transposed for update in updates for delta in update.deltas):
            raise ComposerError(
                f"--as-lora: the adapters change tensor '{name}' by a transposed update (fan_in_fan_out or an embedding "
                "LoRA), which this merged adapter does not write; write the merged model instead (without --as-lora)."
            )
        out_features, in_features = planned.shape
        spanned = max(1, sum(factors.rank_of(update) for update in updates))
        params = planned.operation.arguments
        rank = int(params["rank"]) or min(spanned, out_features, len(updates) * in_features)
        module = name.removesuffix(".weight")
        ranks[module] = rank
        chain = Chain(label=f"the merged factors of {name}", state_bytes=out_features * rank * 4)
        for link, (factor, shape) in enumerate((("A", (rank, in_features)), ("B", (out_features, rank)))):
            step = Operation(
                label=f"knots lora_{factor}",
                fn=partial(getattr(pairs, factor.lower()), name, updates, tuple(planned.shape), params, rank),
                arguments=params,
                working_bytes=planned.operation.working_bytes,
                chain=chain,
                link=link,
            )
            dtype = planned.dtype if planned.dtype.is_floating_point else torch.float32
            tensors.append(
                PlannedTensor(f"{SAVED_PREFIX}{module}.lora_{factor}.weight", shape, dtype, planned.inputs, step)
            )
    if not tensors:
        raise ComposerError("--as-lora: the adapters change no tensor, so there is no merged adapter to write.")
    return tensors, ranks
