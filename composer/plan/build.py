"""Recipe -> Plan. Everything is checked here, from headers and configs alone, before any tensor is read."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from composer.architecture import Architecture, MoELayer, WeightDefinition, architecture_for
from composer.architecture_experts import ExpertLayout, FusedTensor
from composer.errors import ComposerError, ComposerWarning
from composer.methods import MergeMethod, get_method, parameter_names
from composer.plan.calibration import awaiting_calibration, check_whole_models, fallback_method, plan_calibration
from composer.plan.experts import expert_by_expert
from composer.plan.knots import SOURCE as ADAPTERS
from composer.plan.knots import AdapterFactors, adapter_factors, copy_of_base, knots_step
from composer.plan.lines import lines_scale, scaled_by_depth
from composer.plan.model import COPY, Operation, Plan, PlannedTensor, TensorRef
from composer.plan.modules import ModuleInputs, module_inputs
from composer.plan.output_config import (
    check_output_config,
    check_with_output_rules,
    rewrite_config,
    validate_against_transformers,
    validate_language_model,
    with_dtype,
)
from composer.plan.transformers_facts import config_defaults, deferred_loadable_check, loadable_check
from composer.plan.vision_language import (
    LanguageTower,
    check_language_models_agree,
    is_vision_language,
    language_tower,
)
from composer.plan.vocabulary import (
    OutputVocabulary,
    VocabularyKeyError,
    VocabularyMerge,
    VocabularyRequest,
    plan_vocabulary,
)
from composer.recipe.load import RecipeKeyError, path_text
from composer.recipe.parameters import evaluate, layer_t
from composer.recipe.schema import IGNORED_PARAMETERS, Merge, OutputSlice, SliceSource
from composer.sources import ModelSource, TensorInfo, open_source
from composer.sources.built_tokenizer import BuiltTokenizer

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def tensor_seed(recipe_seed: int, tensor_name: str) -> int:
    """A seed for one output tensor: fixed by the recipe's seed and the tensor's name, not by execution order."""
    import zlib

    return (int(recipe_seed) * 1_000_003 + zlib.crc32(tensor_name.encode())) % (1 << 63)


def parse_dtype(name: str | None, where: str) -> torch.dtype | None:
    if name is None:
        return None
    dtype = DTYPES.get(str(name).removeprefix("torch."))
    if dtype is None:
        raise ComposerError(f"{where}: unknown dtype '{name}'; use one of float32, float16, bfloat16.")
    return dtype


@dataclass(frozen=True)
class OutputLayer:
    sources: tuple[tuple[str, int], ...]  # (model, source layer index)
    base_model: str | None
    output_slice: OutputSlice
    t: float


class _Planner:
    def __init__(
        self,
        recipe: Merge,
        recipe_text: str,
        recipe_dir: Path | None,
        sources: dict[str, ModelSource] | None,
        seed_namespace: str | None = None,
        key_prefix: tuple = (),
    ):
        self.recipe = recipe
        self.seed_namespace = seed_namespace
        self.key_prefix = key_prefix  # where this merge sits in the recipe file, e.g. ('stages', 0)
        self.recipe_text = recipe_text
        self.recipe_dir = recipe_dir
        try:
            self.method: MergeMethod = get_method(recipe.merge_method)
        except ComposerError as error:
            import difflib

            from composer.methods import METHODS

            close = difflib.get_close_matches(str(recipe.merge_method), sorted(METHODS), n=1, cutoff=0.6)
            raise RecipeKeyError(
                ("merge_method",), str(error) + (f" Did you mean '{close[0]}'?" if close else "")
            ) from None
        self.fallback: MergeMethod | None = fallback_method(self.method, recipe)
        self.calibrated: set[str] = set()  # the linear weights a calibration method solves (the rest: its fallback)
        self._check_parameter_names()
        self.sources = sources if sources is not None else {}
        for reference in recipe.referenced_models() + recipe.module_models():
            if reference not in self.sources:
                try:
                    self.sources[reference] = open_source(reference, recipe_dir)
                except ComposerError as error:
                    raise RecipeKeyError(model_location(recipe, reference), str(error)) from None
        self.adapters: AdapterFactors | None = None
        if self.method.adapters:
            merged = [ref for ref in recipe.referenced_models() if ref != recipe.base_model]
            self.adapters = self.sources[ADAPTERS] = adapter_factors(
                self.method.name, self.sources, merged, recipe.base_model
            )
        self.configs = {ref: self.sources[ref].config() for ref in recipe.referenced_models()}
        # a vision-language model is planned as its language model, by the text-only model's tensor names
        self.towers: dict[str, LanguageTower | None] = {
            ref: language_tower(config, self.sources[ref].tensor_infos(), ref) if is_vision_language(config) else None
            for ref, config in self.configs.items()
        }
        self.text_configs = {
            ref: tower.text_config() if tower else self.configs[ref] for ref, tower in self.towers.items()
        }
        self.architectures = {
            ref: tower.architecture() if tower else architecture_for(self.configs[ref], ref)
            for ref, tower in self.towers.items()
        }
        self._check_same_architecture()
        self._expert_facts: dict[str, tuple[list[bool], ExpertLayout, int]] = {}
        self._check_language_models()
        self.slices = self._output_slices()
        self.vocabulary: OutputVocabulary | None = None
        self.module_slices: list[OutputSlice] = []  # the recipe modules' models, each module as one slice

    # --- checks -----------------------------------------------------------------------------
    def _check_parameter_names(self) -> None:
        known = {parameter.name for parameter in self.method.parameters}
        known |= {parameter.name for parameter in self.fallback.parameters} if self.fallback else set()
        places = _parameter_places((), self.recipe)  # (where, settings, per model)
        for name, module in (self.recipe.modules or {}).items():
            places += _parameter_places(("modules", name), module)
        for where, parameters, per_model in places:
            for name in list(parameters or {}):
                if name not in known:
                    takes = ", ".join(sorted(known)) or "no parameters"
                    if name not in parameter_names() and name not in IGNORED_PARAMETERS:
                        raise RecipeKeyError(
                            where + (name,),
                            f"merge method '{self.method.name}' does not take '{name}' (it takes {takes}).{_did_you_mean(name)}",
                        )
                    # a parameter of another method: mergekit ignores it, so configs in the wild carry such leftovers
                    warnings.warn(
                        f"Recipe key '{path_text(self.key_prefix + where + (name,))}': merge method '{self.method.name}' does not use '{name}' "
                        f"(it takes {takes}); the value is ignored, as mergekit ignores it.",
                        ComposerWarning,
                        stacklevel=2,
                    )
                    parameters.pop(name)
                    continue
                parameter = self.method.parameter(name) or self.fallback.parameter(name)
                if per_model and not parameter.per_model:
                    if parameter.required and not self._set_per_tensor(name):
                        raise RecipeKeyError(
                            where + (name,),
                            f"'{name}' of '{self.method.name}' is one value per tensor, not per model; "
                            "set it in the slice's parameters or the top-level parameters.",
                        )
                    # mergekit reads a per-tensor parameter only per slice or at the top, and ignores it here
                    warnings.warn(
                        f"Recipe key '{path_text(self.key_prefix + where + (name,))}': '{name}' of '{self.method.name}' "
                        "is one value per tensor, not per model, so it has no effect there (mergekit ignores it there "
                        "too); set it in the slice's parameters or the top-level parameters to use it.",
                        ComposerWarning,
                        stacklevel=2,
                    )
                    parameters.pop(name)

    def _set_per_tensor(self, name: str) -> bool:
        """Whether parameter `name` is set at the top level or in some slice's parameters."""
        places = [self.recipe.parameters] + [output_slice.parameters for output_slice in self.recipe.slices or []]
        return any(name in (place or {}) for place in places)

    def _check_same_architecture(self) -> None:
        first_ref = next(iter(self.configs))
        first = self.architectures[first_ref]
        for ref, architecture in self.architectures.items():
            if architecture.name != first.name:
                raise ComposerError(
                    f"Models '{first_ref}' ({self._described(first_ref)}) and '{ref}' ({self._described(ref)}) have "
                    "different architectures; composer merges and stacks models of one architecture only."
                )

    def _described(self, ref: str) -> str:
        name = self.architectures[ref].name
        return f"a {self.towers[ref].family.name} model whose language model is {name}" if self.towers[ref] else name

    def _check_language_models(self) -> None:
        """A vision-language model's language model and every other model must share their sizes; a vision-language
        output keeps its base's vocabulary, whose token ids its config names for images."""
        towers = [(ref, tower) for ref, tower in self.towers.items() if tower is not None]
        vocabulary_moves = self.recipe.tokenizer_source is not None or self.recipe.tokenizer is not None
        for ref, tower in towers:
            for other in self.configs:
                if other != ref:
                    check_language_models_agree(
                        tower, other, self.text_configs[other], self.towers[other], vocabulary_moves
                    )
        choice = self.recipe.tokenizer.source if self.recipe.tokenizer else self.recipe.tokenizer_source
        if towers and choice not in (None, "base") and not self.recipe.language_model_only:
            raise RecipeKeyError(
                _tokenizer_key(self.recipe),
                f"a vision-language output keeps its base model's vocabulary, whose token ids its config.json names for "
                f"images; use 'base' here (not '{choice}'), or set 'language_model_only: true' to write a text-only model.",
            )

    def name_in(self, model: str, name: str) -> str:
        """Where `model` keeps the text-only model's tensor `name`."""
        tower = self.towers.get(model)
        return tower.on_disk(name) if tower is not None else name

    # --- layers -------------------------------------------------------------------------------
    def _layer_count(self, ref: str) -> int:
        """The model's layer count from its config, which its weights must bear out: a config claiming a trillion
        layers must not make the plan loop a trillion times."""
        architecture = self.architectures[ref]
        count = architecture.layer_count(self.text_configs[ref], f"'{ref}'")
        infos = self.sources[ref].tensor_infos()
        last = [self.name_in(ref, w.name) for w in architecture.layer_weights(count - 1) if not w.optional]
        if infos and last and not any(name in infos for name in last):
            key = next(key for key in architecture.layer_count_keys if key in self.text_configs[ref])
            raise ComposerError(
                f"The config.json of '{ref}' gives '{key}' as {count}, but its weights have no tensors of layer {count - 1} "
                f"(no '{last[0]}'); the config does not describe these weights."
            )
        return count

    def _output_slices(self) -> list[OutputSlice]:
        if self.recipe.slices:
            return self.recipe.slices
        sources = [
            SliceSource(model=e.model, layer_range=(0, self._layer_count(e.model)), parameters=e.parameters)
            for e in self.recipe.models
        ]
        base = self.recipe.base_model
        if base and all(s.model != base for s in sources) and (self._uses_base(base) or self._base_is_an_input(base)):
            sources.append(SliceSource(model=base, layer_range=(0, self._layer_count(base))))
        return [OutputSlice(sources=sources)]

    def _base_is_an_input(self, base: str) -> bool:
        """Whether a `base_model` that the method has no use for is one more model to merge, as mergekit makes it of a
        `models:` merge (karcher's mean, linear's with the top-level weight): where its per-model parameters have
        values and the method takes one more model. Otherwise it is left out, with a warning where mergekit would
        refuse the config."""
        if self.method.adapters or self.method.max_models is not None:
            return False
        top = self.recipe.parameters or {}
        missing = [p.name for p in self.method.parameters if p.per_model and p.required and p.name not in top]
        if missing:
            warnings.warn(
                f"Recipe key '{path_text(self.key_prefix + ('base_model',))}': '{self.method.name}' merges no base model "
                f"and '{base}' has no '{missing[0]}' of its own, so it is left out (mergekit adds it as one more "
                "model and refuses the config).",
                ComposerWarning,
                stacklevel=2,
            )
            return False
        return True

    def base_of(self, output_slice: OutputSlice) -> str | None:
        return output_slice.base_model or self.recipe.base_model

    def output_layers(self) -> list[OutputLayer]:
        layers = []
        for number, output_slice in enumerate(self.slices):
            lengths = []
            for position, source in enumerate(output_slice.sources):
                start, end = source.layer_range
                count = self._layer_count(source.model)
                if not (0 <= start < end <= count):
                    raise RecipeKeyError(
                        ("slices", number, "sources", position, "layer_range"),
                        f"layer_range [{start}, {end}] of model '{source.model}' is out of bounds; "
                        f"that model has {count} layers, so a range must satisfy 0 <= start < end <= {count}.",
                    )
                lengths.append(end - start)
            if len(set(lengths)) > 1:
                raise RecipeKeyError(
                    ("slices", number, "sources"),
                    f"every source of a slice must span the same number of layers (got {lengths}).",
                )
            self._check_model_count(output_slice, number)
            for offset in range(lengths[0]):
                layers.append(
                    OutputLayer(
                        sources=tuple((s.model, s.layer_range[0] + offset) for s in output_slice.sources),
                        base_model=self.base_of(output_slice),
                        output_slice=output_slice,
                        t=layer_t(offset, lengths[0]),
                    )
                )
        return layers

    def _uses_base(self, base: str | None) -> bool:
        """Whether the method gets a base tensor: always when it needs one, and when it can use one that is named."""
        return self.method.needs_base or (self.method.optional_base and base is not None)

    def _check_model_count(self, output_slice: OutputSlice, number: int) -> None:
        base = self.base_of(output_slice)
        models = [s.model for s in output_slice.sources]
        if self.method.needs_base:
            if base is None:
                raise RecipeKeyError(
                    ("base_model",),
                    f"merge method '{self.method.name}' needs a base_model, and the recipe names none. "
                    "Add 'base_model: MODEL' at the top level (or in each slice).",
                )
        if self._uses_base(base) and base not in models:
            where = ("slices", number, "base_model") if output_slice.base_model else ("base_model",)
            raise RecipeKeyError(
                where, f"base_model '{base}' must be one of the sources of slice {number} for '{self.method.name}'."
            )
        others = list(models)
        if self._uses_base(base):
            others.remove(base)  # only the first source of the base model is the base; a second one is blended
        if len(others) < self.method.min_models or (
            self.method.max_models is not None and len(others) > self.method.max_models
        ):
            wanted = (
                f"exactly {self.method.max_models}"
                if self.method.max_models == self.method.min_models
                else f"at least {self.method.min_models}"
            )
            extra = " besides the base model" if self._uses_base(base) else ""
            where = ("slices", number, "sources") if self.recipe.slices else ("models",)
            hint = (
                " The base model is not one of them: list the models whose changes to it are merged (to copy "
                "one model as it is, use merge_method: passthrough)."
                if not others and self._uses_base(base)
                else ""
            )
            raise RecipeKeyError(
                where,
                f"merge method '{self.method.name}' takes {wanted} model(s){extra} per slice, got {len(others)} ({', '.join(others)}).{hint}",
            )

    # --- experts ------------------------------------------------------------------------------
    def _experts_of(self, ref: str) -> tuple[list[bool], ExpertLayout, int]:
        """For a mixture-of-experts model: which of its layers hold experts, the layout its files hold them in, and
        how many a layer holds."""
        known = self._expert_facts.get(ref)
        if known is None:
            architecture, config = self.architectures[ref], self.configs[ref]
            sparse = architecture.experts.sparse_layers(config, self._layer_count(ref), f"'{ref}'")
            infos = self.sources[ref].tensor_infos()
            layout = architecture.experts.layout_of(infos, architecture.layer_prefix, sparse, ref)
            known = self._expert_facts[ref] = (
                sparse,
                layout,
                architecture.experts.count(config, f"'{ref}'", architecture.name),
            )
        return known

    def _moe_layers(self, layers: list[OutputLayer]) -> list[MoELayer | None]:
        """What each output layer holds (None for every layer of a dense family); its sources must agree."""
        models = [model for model in self.recipe.referenced_models() if model in self.architectures]
        if self.architectures[models[0]].experts is None:
            return [None] * len(layers)
        first = models[0]
        _, first_layout, first_count = self._experts_of(first)
        for model in models[1:]:
            _, layout, count = self._experts_of(model)
            if count != first_count:
                raise ComposerError(
                    f"Models '{first}' and '{model}' have {first_count} and {count} experts a layer; composer merges "
                    "mixture-of-experts models expert by expert, so they must have as many experts."
                )
            if layout != first_layout:
                raise ComposerError(
                    f"Model '{first}' holds its experts {first_layout.described()} and model '{model}' holds them "
                    f"{layout.described()}; composer merges models that hold their experts in one layout. Load one of them "
                    "in transformers and save it again in the other's layout."
                )
        moe_layers = []
        for index, layer in enumerate(layers):
            kinds = [(model, source, self._experts_of(model)[0][source]) for model, source in layer.sources]
            sparse = kinds[0][2]
            for model, source, other in kinds[1:]:
                if other != sparse:
                    first_model, first_source = kinds[0][:2]
                    raise ComposerError(
                        f"Output layer {index} would merge layer {first_source} of '{first_model}' "
                        f"({'with experts' if sparse else 'dense'}) with layer {source} of '{model}' "
                        f"({'with experts' if other else 'dense'}); a dense layer and a layer with experts hold "
                        "different tensors. Choose layer ranges whose layers are alike in every source."
                    )
            moe_layers.append(MoELayer(sparse, first_layout, first_count))
        return moe_layers

    # --- parameters ---------------------------------------------------------------------------
    def _parameter(
        self, name: str, tensor_name: str, t: float, output_slice: OutputSlice | None, source: SliceSource | None
    ) -> Any:
        """Precedence: the source's own parameters, then the slice's, then the top level; the first
        setting that gives a value for this tensor (a filter list may give none) wins."""
        settings = []
        if source is not None and source.parameters and name in source.parameters:
            settings.append(source.parameters[name])
        if output_slice is not None and output_slice.parameters and name in output_slice.parameters:
            settings.append(output_slice.parameters[name])
        # (a module's parameters hold the merge's own beneath them; the top level's now are the language model's)
        in_module = any(output_slice is module for module in self.module_slices)
        if self.recipe.parameters and name in self.recipe.parameters and not in_module:
            settings.append(self.recipe.parameters[name])
        for setting in settings:
            value = evaluate(setting, tensor_name, t)
            if value is not None:
                return value
        return None

    def _resolved(self, parameter, value: Any, tensor_name: str, model: str | None) -> Any:
        if value is None:
            if parameter.required:
                for_model = f" for model '{model}'" if model else ""
                raise ComposerError(
                    f"Merge method '{self.method.name}' needs parameter '{parameter.name}'{for_model} (tensor {tensor_name}); none is set."
                )
            return parameter.default
        try:
            return parameter.coerce(value)
        except ValueError as error:
            raise ComposerError(f"Recipe parameters, tensor {tensor_name}: {error}.") from None

    def _operation(
        self,
        tensor_name: str,
        sources: list[SliceSource],
        base: str | None,
        t: float,
        output_slice: OutputSlice,
        method: MergeMethod | None = None,
    ) -> tuple[Operation, list[int]]:
        """The operation for one output tensor, and the positions of its inputs (in `sources`) in the order it wants them.
        `method`: the recipe's (default), or the method a calibration method falls back to for this tensor."""
        method = method or self.method
        models = [source.model for source in sources]
        base_position = models.index(base) if self._uses_base(base) and base in models else None
        others = [i for i in range(len(sources)) if i != base_position]
        params: dict[str, Any] = {}
        for parameter in method.parameters:
            # a fallback's parameter the recipe leaves unset takes the calibration method's default for it (weight 1)
            own = self.method.parameter(parameter.name) if method is not self.method else None
            if parameter.per_model:
                params[parameter.name] = [
                    self._resolved(
                        parameter,
                        _or_default(self._parameter(parameter.name, tensor_name, t, output_slice, sources[i]), own),
                        tensor_name,
                        models[i],
                    )
                    for i in others
                ]
            else:
                value = _or_default(self._parameter(parameter.name, tensor_name, t, output_slice, None), own)
                params[parameter.name] = self._resolved(parameter, value, tensor_name, None)
        if method.random:
            seed_name = f"{self.seed_namespace}/{tensor_name}" if self.seed_namespace else tensor_name
            params["seed"] = tensor_seed(self.recipe.random_seed or 0, seed_name)
        problem = method.check(params) if method.check else None
        if problem:
            raise ComposerError(f"Merge method '{method.name}', tensor {tensor_name}: {problem}.")
        ordered = others + ([base_position] if base_position is not None else [])
        has_base = base_position is not None

        def run(inputs: list[torch.Tensor], _params=params, _count=len(others), _has_base=has_base) -> torch.Tensor:
            return method.apply(inputs[:_count], inputs[_count] if _has_base else None, _params)

        scaled = any(v not in (None, 1) for v in params.get("scale", []))
        compute_dtype = self.compute_dtype if (method.blends or scaled) else None
        temporaries = method.temporaries(len(others), params) if method.temporaries else 2.0
        verbatim = method.copies and not scaled and len(sources) == 1
        working_dtype = (
            torch.promote_types(compute_dtype, torch.float32) if method.float32_work and compute_dtype else None
        )
        return Operation(
            label=method.name,
            fn=run,
            arguments=params,
            compute_dtype=compute_dtype,
            temporaries=temporaries,
            working_dtype=working_dtype,
            light=method.light,
            copies=method.copies,
            verbatim=verbatim,
        ), ordered

    # --- tensors ------------------------------------------------------------------------------
    def plan_tensor(
        self,
        out_name: str,
        inputs: list[tuple[str, str]],
        base: str | None,
        t: float,
        output_slice: OutputSlice,
        vocab_axis: int | None = None,
        depth_scale: float = 1.0,
        fused: FusedTensor | None = None,
    ) -> PlannedTensor:
        """`inputs`: (model, input tensor name) for each source of `output_slice`, in its order. `vocab_axis`: the
        tensor's vocabulary axis when it is vocabulary-indexed (its rows then move into the output vocabulary).
        `depth_scale`: the LiNeS scale of the merge's task vector at this tensor's depth. `fused`: the tensor holds
        every expert of a layer, and is merged expert by expert."""
        infos = []
        for model, in_name in inputs:
            info = self.sources[model].tensor_infos().get(in_name)
            if info is None:
                raise ComposerError(
                    f"Model '{model}' has no tensor '{in_name}', which the output tensor '{out_name}' needs."
                )
            infos.append((model, info))
        if self.adapters is not None:  # KnOTS: the base's tensor, or the base's with the merged update of its factors
            kind = self.adapters.kind(out_name)
            if kind != "whole":
                if kind == "copy":
                    operation, refs = copy_of_base(out_name)
                else:
                    resolved, _ = self._operation(
                        out_name, list(output_slice.sources), base, t, output_slice, self.method
                    )
                    operation, refs = knots_step(self.adapters, out_name, infos[0][1].shape, resolved)
                return PlannedTensor(out_name, infos[0][1].shape, self.out_dtype or infos[0][1].dtype, refs, operation)
        vocabulary = None
        if vocab_axis is not None and self.vocabulary is not None:
            vocabulary = self.vocabulary.for_models([model for model, _ in inputs])
        first_model, first = infos[0]
        for model, info in infos[1:]:
            if not _shapes_agree(info.shape, first.shape, vocab_axis if vocabulary else None):
                hint = ""
                if vocab_axis is not None and self.vocabulary is None:
                    hint = (
                        " The models' vocabularies differ: add 'tokenizer_source: union' (or 'base', or a model) so that each "
                        "model's rows are moved into one output vocabulary before merging."
                    )
                raise ComposerError(
                    f"Tensor '{info.name}' has shape {list(info.shape)} in model '{model}' but {list(first.shape)} in model "
                    f"'{first_model}'; tensors can only be merged when their shapes agree.{hint}"
                )
        if self.fallback is not None and out_name not in self.calibrated:
            operation, order = self._operation(
                out_name, list(output_slice.sources), base, t, output_slice, self.fallback
            )
        else:
            operation, order = self._operation(out_name, list(output_slice.sources), base, t, output_slice)
        if self.fallback is not None and out_name in self.calibrated:
            operation = awaiting_calibration(operation)
        problem = (
            self.method.check_shape(operation.arguments, first.shape)
            if self.method.check_shape and fused is None
            else None
        )
        if problem:
            raise ComposerError(f"Merge method '{self.method.name}', tensor {out_name}: {problem}.")
        if fused is not None and not operation.verbatim:
            layer_prefix = out_name.removesuffix(fused.name)
            steps = [
                [
                    self._operation(layer_prefix + piece, list(output_slice.sources), base, t, output_slice)[0]
                    for piece in fused.piece_names(expert)
                ]
                for expert in range(first.shape[0])
            ]
            operation = expert_by_expert(fused, steps, operation)
        operation = scaled_by_depth(operation, depth_scale)
        if not operation.verbatim:
            _refuse_non_float(infos, out_name, self.method.name)
        refs = tuple(TensorRef(*inputs[i]) for i in order)
        shape = first.shape
        if vocabulary is not None:
            operation = _in_output_vocabulary(operation, vocabulary, [ref.model for ref in refs], vocab_axis)
            shape = shape[:vocab_axis] + (vocabulary.size,) + shape[vocab_axis + 1 :]
        return PlannedTensor(out_name, shape, self.out_dtype or first.dtype, refs, operation)

    def _present_in_any(self, models: list[str], name: str) -> bool:
        return any(self.name_in(m, name) in self.sources[m].tensor_infos() for m in models)

    def _depth_scale(self, index: int, count: int) -> float:
        """The LiNeS scale of output layer `index` of `count` (1 without a `lines` key)."""
        lines = self.recipe.lines
        return 1.0 if lines is None else lines_scale(lines.alpha, lines.beta, index, count)

    def _check_lines(self) -> None:
        if self.recipe.lines is None:
            return
        for output_slice in self.slices:
            if not self._uses_base(self.base_of(output_slice)):
                raise RecipeKeyError(
                    ("lines",),
                    f"LiNeS scales the merge's task vector (its difference from the base model) by depth, and merge "
                    f"method '{self.method.name}' here takes no base model; use a method that merges onto a "
                    "base_model (task_arithmetic, ties, slerp, ...) and name it, or remove 'lines'.",
                )

    def _edge_tensor(
        self, weight: WeightDefinition, output_slice: OutputSlice, t: float, ties: bool, depth_scale: float = 1.0
    ) -> PlannedTensor | None:
        models = [s.model for s in output_slice.sources]
        if weight.tied_to and ties:
            return None
        name = weight.name
        if not self._present_in_any(models, name):
            if weight.tied_to and self._present_in_any(models, weight.tied_to):
                name = weight.tied_to  # untie: the output keeps a separate head, copied from the embeddings
            elif weight.optional:
                return None
        return self.plan_tensor(
            weight.name,
            [(m, self.name_in(m, name)) for m in models],
            self.base_of(output_slice),
            t,
            output_slice,
            weight.vocab_axis,
            depth_scale,
        )

    def _output_tower(self, base_ref: str) -> LanguageTower | None:
        """The vision-language model whose form the output takes (its vision tower and projector copied), or None for
        a text-only output."""
        tower = self.towers[base_ref]
        if self.recipe.language_model_only and tower is None:
            raise RecipeKeyError(
                ("language_model_only",),
                f"'language_model_only' writes the language model of a vision-language base model on its own, and the "
                f"base model '{base_ref}' is a text-only model already; remove the key.",
            )
        return None if self.recipe.language_model_only else tower

    def build(self) -> Plan:
        base_ref = self.recipe.base_model or self.slices[0].sources[0].model
        architecture: Architecture = self.architectures[base_ref]
        output_tower = self._output_tower(base_ref)
        modules = self._modules(base_ref, output_tower)
        self.out_dtype = parse_dtype(self.recipe.out_dtype or self.recipe.dtype, "Recipe key out_dtype")
        self.compute_dtype = parse_dtype(self.recipe.dtype, "Recipe key dtype") or torch.float32
        layers = self.output_layers()
        self._check_lines()
        calibration = None
        if self.method.adapters:
            check_whole_models(self.method, layers, self._layer_count(base_ref), self.recipe, architecture, base_ref)
        if self.method.calibration:
            calibration = plan_calibration(
                self.recipe,
                self.method,
                self.fallback,
                layers,
                architecture,
                base_ref,
                self.configs[base_ref],
                self._layer_count(base_ref),
                self.recipe_dir,
            )
            self.calibrated = {name for names in calibration.linear_names for name in names}
        source_layers = [layer.sources[0][1] for layer in layers]
        text_config = self.text_configs[base_ref]
        if self.towers[base_ref] is not None and output_tower is None:
            text_config = self.towers[base_ref].causal_lm_config(text_config)
        out_dtype = None if output_tower else self.out_dtype  # a vision-language config says it at the top level
        providers = [layer.sources[0][0] for layer in layers]  # the model each output layer comes from
        layer_configs = [text_config if model == base_ref else self.text_configs[model] for model in providers]
        config = rewrite_config(architecture, text_config, source_layers, out_dtype, f"'{base_ref}'", layer_configs)
        moe_layers = self._moe_layers(layers)
        if architecture.experts is not None:
            architecture.experts.rewrite(config, [moe.sparse for moe in moe_layers], f"'{base_ref}'")
        self.vocabulary = self._output_vocabulary(base_ref, architecture)
        if self.vocabulary is not None:
            config.update(vocab_size=self.vocabulary.size, **self._special_token_ids())
        ties = (
            output_tower.ties()
            if output_tower
            else bool(config.get("tie_word_embeddings", _default_tie(architecture, config)))
        )

        tensors: list[PlannedTensor] = []
        for weight in architecture.pre:
            planned = self._edge_tensor(weight, self.slices[0], 0.0, ties, self._depth_scale(0, len(layers)))
            tensors += [planned] if planned else []
        for index, layer in enumerate(layers):
            out_weights = architecture.layer_weights(index, moe_layers[index])
            for out_weight in out_weights:
                inputs = [
                    (model, self.name_in(model, architecture.layer_prefix.format(i=src_index) + out_weight.suffix))
                    for model, src_index in layer.sources
                ]
                if out_weight.optional and not any(name in self.sources[m].tensor_infos() for m, name in inputs):
                    continue
                planned = self.plan_tensor(
                    out_weight.name,
                    inputs,
                    layer.base_model,
                    layer.t,
                    layer.output_slice,
                    depth_scale=self._depth_scale(index, len(layers)),
                    fused=out_weight.fused,
                )
                if architecture.experts is not None and out_weight.suffix in architecture.experts.float32:
                    planned = replace(planned, dtype=torch.float32)
                tensors.append(planned)
        for weight in architecture.post:
            planned = self._edge_tensor(
                weight, self.slices[-1], 0.0, ties, self._depth_scale(len(layers) - 1, len(layers))
            )
            tensors += [planned] if planned else []

        shapes = {t.name: t.shape for t in tensors}
        check_output_config(architecture, config, shapes, base_ref)  # the language model's config, for a VLM
        plan_checks = []
        if output_tower is None:
            layout = next((moe.layout for moe in moe_layers if moe is not None and moe.sparse), None)

            def with_transformers(output_config: dict, output_shapes: dict) -> None:
                validate_against_transformers(output_config, output_shapes, base_ref)

            if check_with_output_rules(architecture, config, shapes, base_ref, layout):
                # checked now, from the definition; transformers' own check is left to `compose plan`
                plan_checks, loadable = [loadable_check(config, shapes, with_transformers)], None
            else:
                loadable = deferred_loadable_check(config, shapes, with_transformers)
        else:
            config = with_dtype(output_tower.with_text_config(config), self.out_dtype)
            loadable = deferred_loadable_check(config, shapes, lambda c, s: validate_language_model(c, s, base_ref))
            tensors = [replace(t, name=output_tower.on_disk(t.name)) for t in tensors]
            tensors += self._vision_tensors(base_ref, modules)
        tokenizer_source = self._tokenizer_source(base_ref)
        parents = list(dict.fromkeys(self.recipe.referenced_models() + self.recipe.module_models()))
        return Plan(
            tensors=tensors,
            sources=self.sources,
            config=config,
            tokenizer_source=tokenizer_source,
            recipe_text=self.recipe_text,
            method=self.method.name,
            parents=parents,
            chat_template=self.recipe.chat_template,
            notes=(self.vocabulary.summary() if self.vocabulary is not None else []) + self._module_notes(modules),
            calibration=calibration,
            deferred_checks=[loadable] if loadable is not None else [],
            plan_checks=plan_checks,
        )

    def _vision_tensors(
        self, base_ref: str, modules: dict[str, tuple[ModuleInputs, OutputSlice]]
    ) -> list[PlannedTensor]:
        """The base vision-language model's tensors outside its language model (vision tower, projector): merged over
        the models of the recipe's module they are in, else copied."""
        infos = self.sources[base_ref].tensor_infos()
        family = self.towers[base_ref].family
        planned = []
        for name in self.towers[base_ref].other_tensors(infos):
            found = family.module_of(name)
            inputs, output_slice = modules.get(found[0], (None, None)) if found else (None, None)
            if inputs is None or len(inputs.models) == 1:
                model = inputs.models[0] if inputs else base_ref
                there = inputs.names[name][model] if inputs else name
                info = self.sources[model].tensor_infos()[there]
                dtype = self.out_dtype if self.out_dtype is not None and info.dtype.is_floating_point else info.dtype
                planned.append(PlannedTensor(name, info.shape, dtype, (TensorRef(model, there),), COPY))
                continue
            models = [source.model for source in output_slice.sources]
            planned.append(
                self.plan_tensor(
                    name,
                    [(model, inputs.names[name][model]) for model in models],
                    self.base_of(output_slice),
                    inputs.t(name),
                    output_slice,
                )
            )
        return planned

    def _modules(
        self, base_ref: str, output_tower: LanguageTower | None
    ) -> dict[str, tuple[ModuleInputs, OutputSlice]]:
        """The recipe's modules besides the language model, each checked, with the slice its models merge as."""
        if not self.recipe.modules:
            return {}
        first = next(iter(self.recipe.modules))
        if self.recipe.language_model_only:
            raise RecipeKeyError(
                ("modules", first),
                "'language_model_only' writes the language model alone, with no vision tower or projector, so a "
                f"module '{first}' has nothing to go into; remove the module or 'language_model_only'.",
            )
        if self.method.adapters:
            raise RecipeKeyError(
                ("modules", first),
                f"merge method '{self.method.name}' merges LoRA adapters of the language model, which have no "
                f"'{first}'; remove the module (the base model's is copied).",
            )
        planned = {}
        for name, inputs in module_inputs(self.recipe.modules, base_ref, output_tower, self.sources).items():
            output_slice = self._module_slice(inputs, base_ref)
            planned[name] = (inputs, output_slice)
        return planned

    def _module_slice(self, inputs: ModuleInputs, base_ref: str) -> OutputSlice:
        """A module's models as one slice: its own, or its models (with the base where the method merges onto it, as a
        `models:` merge adds it)."""
        module, kind = inputs.module, ("slices" if inputs.module.slices else "models")
        if module.slices:
            output_slice = module.slices[0].model_copy(
                update={"parameters": {**(module.parameters or {}), **(module.slices[0].parameters or {})}}
            )
        else:
            sources = [SliceSource(model=e.model, layer_range=(0, 0), parameters=e.parameters) for e in module.models]
            base = self.recipe.base_model
            if base and base not in inputs.models and (self._uses_base(base) or self._base_is_an_input(base)):
                sources.append(SliceSource(model=base, layer_range=(0, 0)))
            output_slice = OutputSlice(sources=sources, parameters=module.parameters)
        self.module_slices.append(output_slice)
        if len(inputs.models) > 1:
            try:
                self._check_model_count(output_slice, 0)
            except RecipeKeyError as error:
                detail = error.detail.replace(" per slice", " in a module")
                raise RecipeKeyError(("modules", inputs.name, kind), detail) from None
        return output_slice

    def _module_notes(self, modules: dict[str, tuple[ModuleInputs, OutputSlice]]) -> list[str]:
        notes = []
        for name, (inputs, output_slice) in modules.items():
            count = len(inputs.names)
            if len(inputs.models) == 1:
                notes.append(f"module {name}: {count} tensors copied from '{inputs.models[0]}'")
            else:
                models = ", ".join(f"'{source.model}'" for source in output_slice.sources)
                notes.append(f"module {name}: {count} tensors merged by {self.method.name} over {models}")
        return notes

    # --- vocabulary -----------------------------------------------------------------------------
    def _output_vocabulary(self, base_ref: str, architecture: Architecture) -> OutputVocabulary | None:
        request = VocabularyRequest.from_recipe(self.recipe.tokenizer_source, self.recipe.tokenizer)
        if request is None:
            return None
        models = self.recipe.referenced_models()
        outside = None
        if request.source not in ("base", "union") and request.source not in models:
            outside = self._open_tokenizer_source(request.source)
        vocab_rows = {model: self._embedding_rows(model, self.architectures[model]) for model in models}
        try:
            return plan_vocabulary(request, models, base_ref, self.sources, vocab_rows, outside)
        except VocabularyKeyError as error:
            raise RecipeKeyError(_vocabulary_key(self.recipe, error.location), error.detail) from None

    def _embedding_rows(self, model: str, architecture: Architecture) -> tuple[str, int]:
        """(name, rows) of the model's first vocabulary-indexed tensor."""
        infos = self.sources[model].tensor_infos()
        for weight in architecture.vocab_weights():
            name = self.name_in(model, weight.name)
            if name in infos:
                return name, infos[name].shape[weight.vocab_axis]
        raise ComposerError(
            f"Model '{model}' has none of the vocabulary-indexed tensors its architecture names ({', '.join(w.name for w in architecture.vocab_weights())})."
        )

    def _special_token_ids(self) -> dict:
        """bos/eos/pad ids when the output speaks another model's vocabulary: that model's config's, else its tokenizer's."""
        vocabulary = self.vocabulary
        base_rows = vocabulary.rows[vocabulary.base]
        if vocabulary.request.source in ("base", "union") or base_rows.same_vocabulary:
            return {}
        try:
            donor_config = self.sources[vocabulary.request.source].config()
        except ComposerError:
            donor_config = {}
        ids = {}
        for role in ("bos", "eos", "pad"):
            key = f"{role}_token_id"
            value = donor_config.get(key)
            if not (isinstance(value, int) and 0 <= value < vocabulary.token_count):
                value = getattr(vocabulary.output, key, None)
            if key in self.text_configs[vocabulary.base] or value is not None:
                ids[key] = value
        return ids

    def _open_tokenizer_source(self, choice: str) -> ModelSource:
        if choice not in self.sources:
            try:
                self.sources[choice] = open_source(choice, self.recipe_dir)
            except ComposerError as error:
                raise RecipeKeyError(_tokenizer_key(self.recipe), str(error)) from None
        if not self.sources[choice].has_tokenizer():
            raise RecipeKeyError(_tokenizer_key(self.recipe), f"model '{choice}' has no tokenizer files.")
        return self.sources[choice]

    def _tokenizer_source(self, base_ref: str) -> str | None:
        """The source whose tokenizer files the output gets (a built tokenizer is registered as a source)."""
        if self.vocabulary is None:
            return base_ref
        if self.vocabulary.files_of is not None:
            return self.vocabulary.files_of
        reference = f"{self.seed_namespace or 'output'}: merged tokenizer"
        self.sources[reference] = BuiltTokenizer(reference, self.vocabulary.output)
        return reference


def _or_default(value: Any, parameter: Any) -> Any:
    return parameter.default if value is None and parameter is not None else value


def _shapes_agree(shape: tuple, other: tuple, except_axis: int | None) -> bool:
    if except_axis is None:
        return shape == other
    return len(shape) == len(other) and all(a == b for i, (a, b) in enumerate(zip(shape, other)) if i != except_axis)


def _in_output_vocabulary(operation: Operation, vocabulary: VocabularyMerge, models: list[str], axis: int) -> Operation:
    """`operation` applied after each input's vocabulary rows are moved into the output vocabulary."""

    def run(inputs: list[torch.Tensor]) -> torch.Tensor:
        by_model: dict[str, torch.Tensor] = {}
        for model, tensor in zip(models, inputs):
            by_model.setdefault(model, tensor.movedim(axis, 0))
        rebuilt = vocabulary.rebuild(by_model)
        return operation.fn(
            [rebuilt[model].movedim(0, axis).contiguous() if axis else rebuilt[model] for model in models]
        )

    return replace(
        operation, fn=run, arguments=dict(operation.arguments, vocabulary=f"{vocabulary.size} rows"), verbatim=False
    )  # rows change


def _refuse_non_float(infos: list[tuple[str, TensorInfo]], out_name: str, method: str) -> None:
    """Arithmetic on integer or boolean tensors means nothing: in a checkpoint they are quantised weights (whose scales
    live elsewhere) or masks, and blending them would silently write garbage."""
    for model, info in infos:
        if not info.dtype.is_floating_point:
            raise ComposerError(
                f"Tensor '{info.name}' of model '{model}' is {str(info.dtype).removeprefix('torch.')}, not floating point, so merge method "
                f"'{method}' cannot compute the output tensor '{out_name}' from it (integer tensors in a checkpoint are quantised "
                "weights or masks). Use a floating-point (float32, float16 or bfloat16) copy of the model."
            )


def _vocabulary_key(recipe: Merge, location: tuple) -> tuple:
    if recipe.tokenizer is not None:
        return ("tokenizer",) + location
    return ("tokenizer_source",)


def _default_tie(architecture: Architecture, config: dict) -> bool:
    """Whether a config.json without 'tie_word_embeddings' ties: as the architecture declares, else as transformers says."""
    if architecture.tie_word_embeddings is not None:
        return architecture.tie_word_embeddings
    return bool(config_defaults(config, ("tie_word_embeddings",))["tie_word_embeddings"])


def _did_you_mean(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(parameter_names()), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _parameter_places(prefix: tuple, holder) -> list[tuple[tuple, dict | None, bool]]:
    """Where `holder` (a merge or one of its modules) sets parameters: (its key path under `prefix`, the settings,
    whether they are one model's)."""
    places: list[tuple[tuple, dict | None, bool]] = [(prefix + ("parameters",), holder.parameters, False)]
    places += [
        (prefix + ("models", i, "parameters"), entry.parameters, True) for i, entry in enumerate(holder.models or [])
    ]
    for i, output_slice in enumerate(holder.slices or []):
        places.append((prefix + ("slices", i, "parameters"), output_slice.parameters, False))
        places += [
            (prefix + ("slices", i, "sources", j, "parameters"), source.parameters, True)
            for j, source in enumerate(output_slice.sources)
        ]
    return places


def model_location(recipe: Merge, reference: str) -> tuple:
    """The first recipe key that names `reference`, for error messages."""
    if recipe.base_model == reference:
        return ("base_model",)
    for i, entry in enumerate(recipe.models or []):
        if entry.model == reference:
            return ("models", i, "model")
    for i, output_slice in enumerate(recipe.slices or []):
        if output_slice.base_model == reference:
            return ("slices", i, "base_model")
        for j, source in enumerate(output_slice.sources):
            if source.model == reference:
                return ("slices", i, "sources", j, "model")
    for name, module in (recipe.modules or {}).items():
        for i, entry in enumerate(module.models or []):
            if entry.model == reference:
                return ("modules", name, "models", i, "model")
        for i, output_slice in enumerate(module.slices or []):
            for j, source in enumerate(output_slice.sources):
                if source.model == reference:
                    return ("modules", name, "slices", i, "sources", j, "model")
    return _tokenizer_key(recipe)


def _tokenizer_key(recipe: Merge) -> tuple:
    return ("tokenizer", "source") if recipe.tokenizer else ("tokenizer_source",)


def plan_merge(
    merge: Merge,
    recipe_text: str = "",
    recipe_dir: Path | None = None,
    sources: dict[str, ModelSource] | None = None,
    seed_namespace: str | None = None,
    key_prefix: tuple = (),
) -> Plan:
    """The plan of one merge. `seed_namespace` (a stage's name) keeps its random draws apart from other stages';
    `key_prefix` is where the merge sits in the recipe, for messages."""
    return _Planner(merge, recipe_text, recipe_dir, sources, seed_namespace, key_prefix).build()
