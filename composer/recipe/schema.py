"""The recipe schema. It is a superset of mergekit's merge YAML, so those configs validate as they are."""

from __future__ import annotations

from typing import Annotated, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, model_validator

Scalar = Union[StrictBool, StrictInt, StrictFloat, str]
# a list of numbers: a gradient, interpolated linearly over the layers of a slice
Gradient = Annotated[list[Union[StrictInt, StrictFloat]], Field(min_length=1)]
# a list of strings (mergekit accepts these): stepped over the layers, no interpolation
Steps = Annotated[list[str], Field(min_length=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConditionalParameter(Strict):
    """One entry of a filtered list: applies to tensors whose name contains `filter` (no filter: all)."""

    filter: Optional[str] = None
    value: Union[Scalar, Gradient, Steps]


ParameterSetting = Union[Scalar, Gradient, Steps, ConditionalParameter, Annotated[list[ConditionalParameter], Field(min_length=1)]]
Parameters = dict[str, ParameterSetting]


class SliceSource(Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Optional[Parameters] = None


class OutputSlice(Strict):
    sources: list[SliceSource]
    base_model: Optional[str] = None
    parameters: Optional[Parameters] = None

    @model_validator(mode="after")
    def _check_sources(self):
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        return self


class ModelEntry(Strict):
    model: str
    parameters: Optional[Parameters] = None


class TokenizerSettings(Strict):
    source: str = "base"
    tokens: Optional[dict] = None
    pad_to_multiple_of: Optional[int] = None


class Recipe(Strict):
    merge_method: str
    base_model: Optional[str] = None
    models: Optional[list[ModelEntry]] = None
    slices: Optional[list[OutputSlice]] = None
    parameters: Optional[Parameters] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerSettings] = None
    chat_template: Optional[str] = None
    random_seed: Optional[int] = None
    # composer's own keys
    output: Optional[str] = None
    name: Optional[str] = None

    @model_validator(mode="after")
    def _check_inputs(self):
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models' (whole models to merge) or 'slices' (layer ranges)")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give 'tokenizer_source' or 'tokenizer', not both")
        return self

    def referenced_models(self) -> list[str]:
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
