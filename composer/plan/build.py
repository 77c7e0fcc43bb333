"""Recipe -> Plan. Everything is checked here, from headers and configs alone, before any tensor is read."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from composer.architecture import Architecture, WeightDefinition, architecture_for
from composer.errors import ComposerError, ComposerWarning
from composer.methods import MergeMethod, get_method, parameter_names
from composer.plan.lines import lines_scale, scaled_by_depth
from composer.plan.model import Operation, Plan, PlannedTensor, TensorRef
from composer.plan.output_config import check_output_config, rewrite_config, validate_against_transformers
from composer.plan.transformers_facts import config_defaults, deferred_loadable_check
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
        self._check_parameter_names()
        self.sources = sources if sources is not None else {}
        for reference in recipe.referenced_models():
            if reference not in self.sources:
                try:
                    self.sources[reference] = open_source(reference, recipe_dir)
                except ComposerError as error:
                    raise RecipeKeyError(model_location(recipe, reference), str(error)) from None
        self.configs = {ref: self.sources[ref].config() for ref in recipe.referenced_models()}
        self.architectures = {ref: architecture_for(config, ref) for ref, config in self.configs.items()}
        self._check_same_architecture()
        self.slices = self._output_slices()
        self.vocabulary: OutputVocabulary | None = None

    # --- checks -----------------------------------------------------------------------------
    def _check_parameter_names(self) -> None:
        known = {parameter.name for parameter in self.method.parameters}
        places: list[tuple[tuple, dict | None, bool]] = [
            (("parameters",), self.recipe.parameters, False)
        ]  # (where, settings, per model)
        places += [
            (("models", i, "parameters"), entry.parameters, True) for i, entry in enumerate(self.recipe.models or [])
        ]
        for i, output_slice in enumerate(self.recipe.slices or []):
            places.append((("slices", i, "parameters"), output_slice.parameters, False))
            places += [
                (("slices", i, "sources", j, "parameters"), s.parameters, True)
                for j, s in enumerate(output_slice.sources)
            ]
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
                if per_model and not self.method.parameter(name).per_model:
                    raise RecipeKeyError(
                        where + (name,),
                        f"'{name}' of '{self.method.name}' is one value per tensor, not per model; "
                        "set it in the slice's parameters or the top-level parameters.",
                    )

    def _check_same_architecture(self) -> None:
        first_ref = next(iter(self.configs))
        first = self.architectures[first_ref]
        for ref, architecture in self.architectures.items():
            if architecture.name != first.name:
                raise ComposerError(
                    f"Models '{first_ref}' ({first.name}) and '{ref}' ({architecture.name}) have different architectures; "
                    "composer merges and stacks models of one architecture only."
                )

    # --- layers -------------------------------------------------------------------------------
    def _layer_count(self, ref: str) -> int:
        """The model's layer count from its config, which its weights must bear out: a config claiming a trillion
        layers must not make the plan loop a trillion times."""
        architecture = self.architectures[ref]
        count = architecture.layer_count(self.configs[ref], f"'{ref}'")
        infos = self.sources[ref].tensor_infos()
        last = [weight.name for weight in architecture.layer_weights(count - 1) if not weight.optional]
        if infos and last and not any(name in infos for name in last):
            key = next(key for key in architecture.layer_count_keys if key in self.configs[ref])
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
        if base and self._uses_base(base) and all(s.model != base for s in sources):
            sources.append(SliceSource(model=base, layer_range=(0, self._layer_count(base))))
        return [OutputSlice(sources=sources)]

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
            raise RecipeKeyError(
                where,
                f"merge method '{self.method.name}' takes {wanted} model(s){extra} per slice, got {len(others)} ({', '.join(others)}).",
            )

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
        if self.recipe.parameters and name in self.recipe.parameters:
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
        self, tensor_name: str, sources: list[SliceSource], base: str | None, t: float, output_slice: OutputSlice
    ) -> tuple[Operation, list[int]]:
        """The operation for one output tensor, and the positions of its inputs (in `sources`) in the order it wants them."""
        method = self.method
        models = [source.model for source in sources]
        base_position = models.index(base) if self._uses_base(base) and base in models else None
        others = [i for i in range(len(sources)) if i != base_position]
        params: dict[str, Any] = {}
        for parameter in method.parameters:
            if parameter.per_model:
                params[parameter.name] = [
                    self._resolved(
                        parameter,
                        self._parameter(parameter.name, tensor_name, t, output_slice, sources[i]),
                        tensor_name,
                        models[i],
                    )
                    for i in others
                ]
            else:
                value = self._parameter(parameter.name, tensor_name, t, output_slice, None)
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
        return Operation(
            label=method.name,
            fn=run,
            arguments=params,
            compute_dtype=compute_dtype,
            temporaries=temporaries,
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
    ) -> PlannedTensor:
        """`inputs`: (model, input tensor name) for each source of `output_slice`, in its order. `vocab_axis`: the
        tensor's vocabulary axis when it is vocabulary-indexed (its rows then move into the output vocabulary).
        `depth_scale`: the LiNeS scale of the merge's task vector at this tensor's depth."""
        infos = []
        for model, in_name in inputs:
            info = self.sources[model].tensor_infos().get(in_name)
            if info is None:
                raise ComposerError(
                    f"Model '{model}' has no tensor '{in_name}', which the output tensor '{out_name}' needs."
                )
            infos.append((model, info))
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
        operation, order = self._operation(out_name, list(output_slice.sources), base, t, output_slice)
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
        return any(name in self.sources[m].tensor_infos() for m in models)

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
            [(m, name) for m in models],
            self.base_of(output_slice),
            t,
            output_slice,
            weight.vocab_axis,
            depth_scale,
        )

    def build(self) -> Plan:
        base_ref = self.recipe.base_model or self.slices[0].sources[0].model
        architecture: Architecture = self.architectures[base_ref]
        self.out_dtype = parse_dtype(self.recipe.out_dtype or self.recipe.dtype, "Recipe key out_dtype")
        self.compute_dtype = parse_dtype(self.recipe.dtype, "Recipe key dtype") or torch.float32
        layers = self.output_layers()
        self._check_lines()
        source_layers = [layer.sources[0][1] for layer in layers]
        config = rewrite_config(architecture, self.configs[base_ref], source_layers, self.out_dtype, f"'{base_ref}'")
        self.vocabulary = self._output_vocabulary(base_ref, architecture)
        if self.vocabulary is not None:
            config.update(vocab_size=self.vocabulary.size, **self._special_token_ids())
        ties = bool(config.get("tie_word_embeddings", _default_tie(architecture, config)))

        tensors: list[PlannedTensor] = []
        for weight in architecture.pre:
            planned = self._edge_tensor(weight, self.slices[0], 0.0, ties, self._depth_scale(0, len(layers)))
            tensors += [planned] if planned else []
        for index, layer in enumerate(layers):
            out_weights = architecture.layer_weights(index)
            for out_weight in out_weights:
                inputs = [
                    (model, architecture.layer_prefix.format(i=src_index) + out_weight.suffix)
                    for model, src_index in layer.sources
                ]
                if out_weight.optional and not any(name in self.sources[m].tensor_infos() for m, name in inputs):
                    continue
                tensors.append(
                    self.plan_tensor(
                        out_weight.name,
                        inputs,
                        layer.base_model,
                        layer.t,
                        layer.output_slice,
                        depth_scale=self._depth_scale(index, len(layers)),
                    )
                )
        for weight in architecture.post:
            planned = self._edge_tensor(
                weight, self.slices[-1], 0.0, ties, self._depth_scale(len(layers) - 1, len(layers))
            )
            tensors += [planned] if planned else []

        planned_shapes = {t.name: t.shape for t in tensors}
        check_output_config(architecture, config, planned_shapes, base_ref)
        loadable = deferred_loadable_check(
            config, planned_shapes, lambda c, shapes: validate_against_transformers(c, shapes, base_ref)
        )
        tokenizer_source = self._tokenizer_source(base_ref)
        parents = [ref for ref in self.recipe.referenced_models()]
        return Plan(
            tensors=tensors,
            sources=self.sources,
            config=config,
            tokenizer_source=tokenizer_source,
            recipe_text=self.recipe_text,
            method=self.method.name,
            parents=parents,
            chat_template=self.recipe.chat_template,
            notes=self.vocabulary.summary() if self.vocabulary is not None else [],
            deferred_checks=[loadable] if loadable is not None else [],
        )

    # --- vocabulary -----------------------------------------------------------------------------
    def _output_vocabulary(self, base_ref: str, architecture: Architecture) -> OutputVocabulary | None:
        request = VocabularyRequest.from_recipe(self.recipe.tokenizer_source, self.recipe.tokenizer)
        if request is None:
            return None
        models = self.recipe.referenced_models()
        outside = None
        if request.source not in ("base", "union") and request.source not in models:
            outside = self._open_tokenizer_source(request.source)
        vocab_rows = {model: self._embedding_rows(model, architecture) for model in models}
        try:
            return plan_vocabulary(request, models, base_ref, self.sources, vocab_rows, outside)
        except VocabularyKeyError as error:
            raise RecipeKeyError(_vocabulary_key(self.recipe, error.location), error.detail) from None

    def _embedding_rows(self, model: str, architecture: Architecture) -> tuple[str, int]:
        """(name, rows) of the model's first vocabulary-indexed tensor."""
        infos = self.sources[model].tensor_infos()
        for weight in architecture.vocab_weights():
            if weight.name in infos:
                return weight.name, infos[weight.name].shape[weight.vocab_axis]
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
            if key in self.configs[vocabulary.base] or value is not None:
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
