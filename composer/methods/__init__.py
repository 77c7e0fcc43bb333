"""Merge methods: pure tensor functions plus a registry that says what parameters each takes.

Adding a method is one function in a module here and one `register(...)` line below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from composer.errors import ComposerError


@dataclass(frozen=True)
class Parameter:
    """A parameter of a method. `per_model`: set per input model (sources[].parameters or
    models[].parameters), giving a list aligned with the non-base tensors; otherwise one value for the
    tensor, which may only be set per slice or at the top level. `kind`: "number" or "bool"."""

    name: str
    default: Any = None
    required: bool = False
    per_model: bool = False
    kind: str = "number"

    def coerce(self, value: Any) -> Any:
        """`value` as this parameter's kind; ValueError with a readable reason when it cannot be."""
        if value is None:
            return None
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)):
                return bool(value)  # mergekit configs sometimes write `normalize: 1.0`
            raise ValueError(f"'{self.name}' must be true or false, not {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"'{self.name}' must be a number, not {value!r}")
        return value


@dataclass(frozen=True)
class MergeMethod:
    """`apply(tensors, base, params)`: tensors of the non-base models in recipe order, the base tensor
    (or None), and the resolved parameters: per-model ones as lists aligned with `tensors`.
    `check(params)`, when given, returns why resolved parameters cannot work (checked at plan time)."""

    name: str
    apply: Callable
    parameters: tuple[Parameter, ...]
    needs_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    blends: bool = True
    description: str = ""
    aliases: tuple[str, ...] = field(default=())
    check: Callable[[dict], str | None] | None = None

    def parameter(self, name: str) -> Parameter | None:
        return next((p for p in self.parameters if p.name == name), None)


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> None:
    for name in (method.name, *method.aliases):
        METHODS[name] = method


def get_method(name: str) -> MergeMethod:
    method = METHODS.get(name)
    if method is None:
        raise ComposerError(f"Unknown merge_method '{name}'. Known methods: {', '.join(sorted(METHODS))}.")
    return method


def _apply_passthrough(tensors, base, params):
    from composer.methods.passthrough import passthrough

    return passthrough(tensors[0], params["scale"][0])


def _apply_linear(tensors, base, params):
    from composer.methods.interpolation import linear

    return linear(tensors, params["weight"], params["normalize"])


def _check_linear(params):
    from composer.methods.interpolation import weights_cancel

    if params["normalize"] and weights_cancel(params["weight"]):
        return f"the weights {params['weight']} sum to zero, so they cannot be normalised (set normalize: false or change a weight)"
    return None


def _apply_slerp(tensors, base, params):
    from composer.methods.interpolation import slerp

    return slerp(base, tensors[0], params["t"])


register(MergeMethod(
    name="passthrough",
    apply=_apply_passthrough,
    parameters=(Parameter("scale", per_model=True),),
    max_models=1,
    blends=False,
    description="copy one model's tensors (layer stacking), optionally scaled",
))
register(MergeMethod(
    name="linear",
    apply=_apply_linear,
    parameters=(Parameter("weight", required=True, per_model=True), Parameter("normalize", default=True, kind="bool")),
    description="weighted average of the models",
    check=_check_linear,
))
register(MergeMethod(
    name="slerp",
    apply=_apply_slerp,
    parameters=(Parameter("t", required=True),),
    needs_base=True,
    min_models=1,
    max_models=1,
    description="spherical interpolation from the base model (t=0) to the other model (t=1)",
))

# --- task-arithmetic family (registered below this line) ---

# --- other interpolation and selection methods (registered below this line) ---
