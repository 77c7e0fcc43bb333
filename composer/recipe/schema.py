"""The recipe schema. It is a superset of mergekit's merge YAML, so those configs validate as they are."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    StrictBool,
    StrictFloat,
    StrictInt,
    model_validator,
)
from pydantic_core import PydanticCustomError

from composer.chat_templates import check_template

Scalar = Union[StrictBool, StrictInt, StrictFloat, str]
# a list of numbers: a gradient, interpolated linearly over the layers of a slice
Gradient = Annotated[list[Union[StrictInt, StrictFloat]], Field(min_length=1)]
# a list of strings (mergekit accepts these): stepped over the layers, no interpolation
Steps = Annotated[list[str], Field(min_length=1)]


# Keys real mergekit configs carry where mergekit ignores them: composer warns, naming them, and runs the config.
# (A typo such as `dype` is still refused: there mergekit would silently run something other than the file says.)
# mergekit 0.1.5's merge-method parameters: written at the top level of a merge, beside `parameters:` instead of under
# it, mergekit ignores them (so the published model was made without them); composer does the same, and says so
MERGEKIT_PARAMETERS = (
    "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "t", "select_topk", "filter_wise",
    "nuslerp_row_wise", "nuslerp_flatten", "normalize_weights", "eps", "max_iter", "tol", "r", "alpha", "scale",
    "embed_slerp",
)  # fmt: skip
IGNORED_TOP_LEVEL_KEYS = {"int8_mask": "it is a parameter of the TIES-family methods, and belongs under 'parameters'"}
IGNORED_TOP_LEVEL_KEYS |= {
    name: "it is a parameter of the merge method, and belongs under 'parameters:'; move it there to use it"
    for name in MERGEKIT_PARAMETERS
}
# the options of mergekit's command line, which its config does not read
MERGEKIT_OPTIONS = (
    "allow_crimes", "unsafe_truncate_embeddings", "transformers_cache", "lora_merge_cache", "lora_merge_dtype", "cuda",
    "device", "low_cpu_memory", "out_shard_size", "copy_tokenizer", "clone_tensors", "trust_remote_code",
    "lazy_unpickle", "write_model_card", "safe_serialization", "verbosity", "quiet", "read_to_gpu", "multi_gpu",
    "num_threads", "gpu_rich", "async_write", "write_threads",
)  # fmt: skip
IGNORED_TOP_LEVEL_KEYS |= {
    name: f"it is an option of mergekit's command line (--{name.replace('_', '-')}), not of its config"
    for name in MERGEKIT_OPTIONS
}
# merge parameters written beside a model entry's, a slice source's or a slice's `parameters:` instead of under it
MISPLACED_PARAMETERS = {
    name: "it is a merge parameter, and belongs under the 'parameters:' beside it; move it there to use it"
    for name in MERGEKIT_PARAMETERS
}
# a slice's keys that mergekit reads and never uses
IGNORED_SLICE_KEYS = {"residual_weight": "mergekit reads it from a slice but never uses it"} | MISPLACED_PARAMETERS
IGNORED_SOURCE_KEYS = MISPLACED_PARAMETERS
# keys of a `models:` entry that mergekit ignores (layer_range: left behind when a `slices:` config is rewritten)
IGNORED_MODEL_ENTRY_KEYS = {
    "layer_range": "a 'models' entry merges the whole model; to merge a range of layers, write the merge with 'slices:'"
} | MISPLACED_PARAMETERS
# mergekit-evolve's settings, left in merge configs; `embed_slerp`, which older mergekit read for the embeddings of a
# merge with a `tokenizer_source` (composer merges those rows with the merge method itself, slerp included)
IGNORED_PARAMETERS = {"smooth", "allow_negative_weights", "embed_slerp"}


class Strict(BaseModel):
    # allow_inf_nan: YAML's .nan, .inf and -.inf are floats, and no recipe number may be one
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ConditionalParameter(Strict):
    """One entry of a filtered list: applies to tensors whose name contains `filter` (no filter: all)."""

    filter: Optional[str] = None
    value: Union[Scalar, Gradient, Steps]


def _non_finite(value: Any) -> float | str | None:
    """The first NaN or infinity in a parameter setting (a number, a list, a {filter, value} entry), as written, or None.
    Strings count too: YAML reads `nan`, `inf` and `1e999` as strings, and methods take numbers written as strings."""
    if isinstance(value, (float, str)):
        try:
            number = float(value.strip()) if isinstance(value, str) else value
        except ValueError:
            return None
        return None if math.isfinite(number) else value
    items = (
        [value.get("value")] if isinstance(value, dict) else value if isinstance(value, list) else ()
    )  # a filter is a name, not a number
    return next((found for found in map(_non_finite, items) if found is not None), None)


def _refuse_non_finite(value: Any) -> Any:
    # before the union is tried: otherwise every member of it reports its own failure
    found = _non_finite(value)
    if found is not None:
        written = (
            repr(found) if isinstance(found, str) else ".nan" if math.isnan(found) else ".inf" if found > 0 else "-.inf"
        )
        raise PydanticCustomError(
            "finite_number", "Input should be a finite number, not {written}", {"written": written}
        )
    return value


ParameterSetting = Annotated[
    Union[Scalar, Gradient, Steps, ConditionalParameter, Annotated[list[ConditionalParameter], Field(min_length=1)]],
    BeforeValidator(_refuse_non_finite),
]
Parameters = dict[str, ParameterSetting]


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):  # YAML's true/false would otherwise pass as 1 and 0
        raise PydanticCustomError(
            "whole_number", "Input should be a whole number, not {value}", {"value": str(value).lower()}
        )
    return value


LayerIndex = Annotated[int, BeforeValidator(_no_bool)]
# a model reference: a path, a hub id or a stage name; '' would be the current folder
ModelReference = Annotated[str, Field(min_length=1)]
ChatTemplate = Annotated[str, AfterValidator(check_template)]
# vocabularies pad to multiples of 64 to 512; a pad of millions of rows only exhausts memory
LARGEST_PAD = 65536


class SliceSource(Strict):
    model: ModelReference
    layer_range: tuple[LayerIndex, LayerIndex]
    parameters: Optional[Parameters] = None


class OutputSlice(Strict):
    sources: list[SliceSource]
    base_model: Optional[ModelReference] = None
    parameters: Optional[Parameters] = None

    @model_validator(mode="after")
    def _check_sources(self):
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        return self


class ModelEntry(Strict):
    model: ModelReference
    parameters: Optional[Parameters] = None


class ModelTokenRow(Strict):
    """The row of one token (by text or id) of one of the merged models."""

    kind: Literal["model_token"]
    model: str
    token: Optional[str] = None
    token_id: Optional[NonNegativeInt] = None

    @model_validator(mode="after")
    def _one_token(self):
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of 'token' and 'token_id'")
        return self


class ZeroRow(Strict):
    kind: Literal["zero"]


class TokenRowSettings(Strict):
    """Where a token's row comes from for the models that lack it (every model, with `force`)."""

    source: Union[str, ModelTokenRow, ZeroRow, None] = None
    force: bool = False


class TokenizerSettings(Strict):
    source: str = "union"  # mergekit's default when a `tokenizer:` section is given
    tokens: Optional[dict[str, TokenRowSettings]] = None
    pad_to_multiple_of: Optional[Annotated[int, Field(gt=0, le=LARGEST_PAD)]] = None


class LinesScale(Strict):
    """LiNeS: the merge's task vector scaled by depth, `alpha` at the first layer to `beta` at the last."""

    alpha: Union[StrictInt, StrictFloat]
    beta: Union[StrictInt, StrictFloat]


class Module(Strict):
    """One of a vision-language model's modules besides its language model (`vision_tower`, `multi_modal_projector`,
    ...): the models whose tensors of it are merged, tensor by tensor, and its parameters (the merge's own are written
    beneath them when the recipe is read)."""

    models: Optional[list[ModelEntry]] = None
    slices: Optional[list[OutputSlice]] = None
    parameters: Optional[Parameters] = None

    @model_validator(mode="after")
    def _check_inputs(self):
        if bool(self.models) == bool(self.slices):
            raise ValueError(
                "give exactly one of 'models' (the models whose tensors of the module are merged) or 'slices'"
            )
        return self

    def model_references(self) -> list[str]:
        """Its models, in order, each once."""
        listed = [entry.model for entry in self.models or []]
        listed += [source.model for output_slice in self.slices or [] for source in output_slice.sources]
        return list(dict.fromkeys(listed))


class Merge(Strict):
    """One merge: the keys of a mergekit merge config."""

    merge_method: str
    base_model: Optional[ModelReference] = None
    models: Optional[list[ModelEntry]] = None
    slices: Optional[list[OutputSlice]] = None
    parameters: Optional[Parameters] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[ModelReference] = None
    tokenizer: Optional[TokenizerSettings] = None
    chat_template: Optional[ChatTemplate] = None
    random_seed: Optional[int] = None
    lines: Optional[LinesScale] = None
    # a vision-language model's modules besides its language model (whose slices or models are the merge's own)
    modules: Optional[dict[str, Module]] = None
    # composer's own: of a vision-language base model, write only the language model, as a text-only model
    language_model_only: Optional[StrictBool] = None
    # text files (relative to the recipe) whose inputs to each linear layer calibration methods (regmean) merge by
    calibration_text: Optional[
        Union[
            Annotated[str, Field(min_length=1)],
            Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)],
        ]
    ] = None

    @model_validator(mode="after")
    def _check_inputs(self):
        if self.merge_method is not None and bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models' (whole models to merge) or 'slices' (layer ranges)")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give 'tokenizer_source' or 'tokenizer', not both")
        return self

    def tokenizer_models(self) -> list[str]:
        """The model the merge reads for its tokenizer only: `tokenizer_source` or `tokenizer.source`, where either
        names one (not `union` or `base`)."""
        source = self.tokenizer_source if self.tokenizer is None else self.tokenizer.source
        return [source] if source is not None and source not in ("union", "base") else []

    def module_models(self) -> list[str]:
        """The models its `modules:` read (besides the language model's), each once."""
        listed = [model for module in (self.modules or {}).values() for model in module.model_references()]
        return list(dict.fromkeys(listed))

    def referenced_models(self) -> list[str]:
        """The models whose language models the merge reads (not those only its other modules read)."""
        seen: list[str] = []
        candidates = [self.base_model] if self.base_model else []
        candidates += [entry.model for entry in self.models or []]
        for output_slice in self.slices or []:
            candidates += [output_slice.base_model] if output_slice.base_model else []
            candidates += [source.model for source in output_slice.sources]
        for model in candidates:
            if model not in seen:
                seen.append(model)
        return seen


class Stage(Merge):
    """A named merge whose output later stages (and the recipe's own merge) may use as a model."""

    name: str = Field(min_length=1)


class Recipe(Merge):
    """A whole recipe: one merge, or named stages whose last one (or the top-level merge, when given) is the output."""

    merge_method: Optional[str] = None
    stages: Optional[Annotated[list[Stage], Field(min_length=1)]] = None
    # composer's own keys
    output: Optional[str] = None
    name: Optional[str] = None

    @model_validator(mode="after")
    def _check_stages(self):
        if self.stages is None and self.merge_method is None:
            raise ValueError("'merge_method' is missing: name the merge method (or give 'stages')")
        if self.merge_method is None:
            stray = [
                key
                for key in (
                    "base_model",
                    "models",
                    "slices",
                    "parameters",
                    "dtype",
                    "out_dtype",
                    "tokenizer_source",
                    "tokenizer",
                    "chat_template",
                    "lines",
                    "language_model_only",
                    "calibration_text",
                    "modules",
                )
                if getattr(self, key) is not None
            ]
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} at the top level belong to a merge, and there is no top-level 'merge_method'; "
                    "move them into a stage (the last stage is the output)"
                )
        names = [stage.name for stage in self.stages or []]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two stages are named '{name}'; stage names must be unique")
        return self

    def merges(self) -> list[tuple[str | None, Merge]]:
        """(stage name, merge) in order; the output merge comes last with name None."""
        stages: list[tuple[str | None, Merge]] = [(stage.name, stage) for stage in self.stages or []]
        if self.merge_method is not None:
            stages.append((None, self))
        return stages

    def input_models(self) -> list[str]:
        """Every model the recipe reads, in every stage (stage names excluded)."""
        stage_names = {stage.name for stage in self.stages or []}
        seen: list[str] = []
        for _, merge in self.merges():
            for model in merge.referenced_models() + merge.module_models():
                if model not in seen and model not in stage_names:
                    seen.append(model)
        return seen
