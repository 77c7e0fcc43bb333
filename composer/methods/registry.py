"""The registry of merge methods: each method's name, the parameters it takes and the function that runs it.

A method module registers its methods when it is imported (`composer.methods` imports them all), either
with `register(MergeMethod(...))` or with `@registered(name, parameters, ...)` above the function that
runs the method. This module imports nothing else of composer's methods, so any of them can use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from composer.errors import ComposerError


@dataclass(frozen=True)
class Parameter:
    """A parameter of a method. `per_model`: set per input model (sources[].parameters or
    models[].parameters), giving a list aligned with the non-base tensors; otherwise one value for the
    tensor, which may only be set per slice or at the top level. `kind`: "number", "bool" or "name" (a word, such as
    the method a calibration method falls back to; `check` says which words a method takes)."""

    name: str
    default: Any = None
    required: bool = False
    per_model: bool = False
    kind: str = "number"

    def coerce(self, value: Any) -> Any:
        """`value` as this parameter's kind; ValueError with a readable reason when it cannot be."""
        if value is None:
            return None
        if self.kind == "name":
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"'{self.name}' must be a name, not {value!r}")
            return value.strip()
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)):
                return bool(value)  # mergekit configs sometimes write `normalize: 1.0`
            raise ValueError(f"'{self.name}' must be true or false, not {value!r}")
        if isinstance(value, str):
            try:  # YAML 1.1 reads `1e-5` (no decimal point) as a string; mergekit takes it as the number
                number = float(value.strip())
            except ValueError:
                pass
            else:  # but not 'nan', 'inf' or '1e999'
                if not math.isfinite(number):
                    raise ValueError(f"'{self.name}' must be a finite number, not {value!r}")
                return number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"'{self.name}' must be a number, not {value!r}")  # noqa: TRY004  (the planner reports ValueErrors)
        if not math.isfinite(value):
            raise ValueError(f"'{self.name}' must be a finite number, not {value!r}")
        return value


@dataclass(frozen=True)
class MergeMethod:
    """`apply(tensors, base, params)`: tensors of the non-base models in recipe order, the base tensor
    (or None), and the resolved parameters: per-model ones as lists aligned with `tensors`.
    `check(params)`, when given, returns why resolved parameters cannot work (checked at plan time);
    `check_shape(params, shape)`, why they cannot work for an output tensor of that shape (a rank larger than
    the matrix, say), also at plan time, before any tensor is read."""

    name: str
    apply: Callable
    parameters: tuple[Parameter, ...]
    needs_base: bool = False
    optional_base: bool = False  # a base_model, when the recipe names one, is passed as `base` (else None)
    min_models: int = 1
    max_models: int | None = None
    blends: bool = True
    description: str = ""
    aliases: tuple[str, ...] = field(default=())
    check: Callable[[dict], str | None] | None = None
    check_shape: Callable[[dict, tuple[int, ...]], str | None] | None = None
    random: bool = False  # the planner then adds params["seed"], fixed per output tensor
    # (model count, resolved params) -> how many tensor-sized buffers (in the compute dtype) `apply` holds at
    # once beyond its inputs and result, for the memory budget; None: two (a chunked method holds less)
    temporaries: Callable[[int, dict], float] | None = None
    light: bool = (
        False  # a few elementwise passes, bound by reading and writing: the executor leaves a core to its I/O threads
    )
    copies: bool = (
        False  # only copies (or scales) one input: a merge on a GPU runs it on the CPU, where the input was read
    )
    # its temporaries are at least float32 whatever the compute dtype (an SVD has no half-precision form):
    # `temporaries` then counts float32-or-wider buffers, the inputs' conversions to the compute dtype included
    float32_work: bool = False
    # a calibration method (RegMean): "own" when each model's Gram matrices come from its own earlier layers, "merged"
    # when from the merged earlier layers; `apply` then finds the Gram matrices in params["grams"]. None: data-free
    calibration: str | None = None
    adapters: bool = False  # merges LoRA adapters' factors (every model BASE+ADAPTER on one base), not whole weights

    def parameter(self, name: str) -> Parameter | None:
        return next((p for p in self.parameters if p.name == name), None)


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Make `method` known under its name and its aliases; returns it."""
    for name in (method.name, *method.aliases):
        METHODS[name] = method
    return method


def registered(name: str, parameters: tuple[Parameter, ...] = (), **options) -> Callable[[Callable], Callable]:
    """A decorator that registers the function below it as `apply` of the method `name`, taking
    `parameters`; `options` are the other fields of `MergeMethod`. The function is returned unchanged."""

    def decorate(apply: Callable) -> Callable:
        register(MergeMethod(name=name, apply=apply, parameters=tuple(parameters), **options))
        return apply

    return decorate


def get_method(name: str) -> MergeMethod:
    method = METHODS.get(name)
    if method is None:
        raise ComposerError(f"Unknown merge_method '{name}'. Known methods: {', '.join(sorted(METHODS))}.")
    return method


def parameter_names() -> set[str]:
    """Every parameter name some registered method takes."""
    return {parameter.name for method in METHODS.values() for parameter in method.parameters}
