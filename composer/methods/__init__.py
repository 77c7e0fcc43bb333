"""Merge methods: pure tensor functions plus a registry that says what parameters each takes.

Adding a method is one function in a module here and one `register(...)` line below.
"""

from __future__ import annotations

import math
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
            raise ValueError(f"'{self.name}' must be a number, not {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"'{self.name}' must be a finite number, not {value!r}")
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
    optional_base: bool = False  # a base_model, when the recipe names one, is passed as `base` (else None)
    min_models: int = 1
    max_models: int | None = None
    blends: bool = True
    description: str = ""
    aliases: tuple[str, ...] = field(default=())
    check: Callable[[dict], str | None] | None = None
    random: bool = False  # the planner then adds params["seed"], fixed per output tensor
    # (model count, resolved params) -> how many tensor-sized buffers (in the compute dtype) `apply` holds at
    # once beyond its inputs and result, for the memory budget; None: two (a chunked method holds less)
    temporaries: Callable[[int, dict], float] | None = None
    light: bool = False  # a few elementwise passes, bound by reading and writing: the executor leaves a core to its I/O threads
    copies: bool = False  # only copies (or scales) one input: a merge on a GPU runs it on the CPU, where the input was read

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
    light=True,
    copies=True,
))
register(MergeMethod(
    name="linear",
    apply=_apply_linear,
    parameters=(Parameter("weight", required=True, per_model=True), Parameter("normalize", default=True, kind="bool")),
    description="weighted average of the models",
    check=_check_linear,
    light=True,
))
register(MergeMethod(
    name="slerp",
    apply=_apply_slerp,
    parameters=(Parameter("t", required=True),),
    needs_base=True,
    min_models=1,
    max_models=1,
    description="spherical interpolation from the base model (t=0) to the other model (t=1)",
    light=True,
))

# --- task-arithmetic family (registered below this line) ---
from composer.methods.task_arithmetic_registry import TASK_ARITHMETIC_METHODS  # noqa: E402  (torch-free)

for _method in TASK_ARITHMETIC_METHODS:
    register(_method)

# --- other interpolation and selection methods (registered below this line) ---


def _apply_nuslerp(tensors, base, params):
    from composer.methods.spherical import nuslerp

    return nuslerp(tensors, params["weight"], base, params["nuslerp_row_wise"], params["nuslerp_flatten"])


def _apply_multislerp(tensors, base, params):
    from composer.methods.spherical import multislerp

    return multislerp(tensors, params["weight"], base, params["normalize_weights"], params["eps"])


def _check_multislerp(params):
    from composer.methods.interpolation import weights_cancel

    if params["normalize_weights"] and len(params["weight"]) > 1 and weights_cancel(params["weight"]):
        return f"the weights {params['weight']} sum to zero, so they cannot be normalised (set normalize_weights: false or change a weight)"
    return None


def _apply_karcher(tensors, base, params):
    from composer.methods.spherical import karcher

    return karcher(tensors, params["max_iter"], params["tol"])


def _check_karcher(params):
    if params["max_iter"] != int(params["max_iter"]) or params["max_iter"] < 0:
        return f"'max_iter' must be a whole number of iterations (0 or more), not {params['max_iter']}"
    return None


def _apply_model_stock(tensors, base, params):
    from composer.methods.model_stock import model_stock

    return model_stock(tensors, base, params["filter_wise"])


def _apply_nearswap(tensors, base, params):
    from composer.methods.selection import nearswap

    return nearswap(base, tensors[0], params["t"])


def _apply_arcee_fusion(tensors, base, params):
    from composer.methods.selection import arcee_fusion

    return arcee_fusion(base, tensors[0])


def _apply_ram(tensors, base, params):
    from composer.methods.selection import ram

    return ram(tensors, base, params["epsilon"])


def _apply_ramplus_tl(tensors, base, params):
    from composer.methods.selection import ramplus_tl

    return ramplus_tl(tensors, base, params["r"], params["alpha"], params["epsilon"])


register(MergeMethod(
    name="nuslerp",
    apply=_apply_nuslerp,
    parameters=(
        Parameter("weight", required=True, per_model=True),
        Parameter("nuslerp_row_wise", default=False, kind="bool"),
        Parameter("nuslerp_flatten", default=True, kind="bool"),
    ),
    optional_base=True,
    min_models=2,
    max_models=2,
    description="spherical interpolation of two models (or of their task vectors from an optional base), t = w_1 / (w_0 + w_1)",
    # whole vectors (the default): the two task vectors and the directions' product; per row: six
    temporaries=lambda count, params: 3 if params.get("nuslerp_flatten", True) else 6,
))
register(MergeMethod(
    name="multislerp",
    apply=_apply_multislerp,
    parameters=(
        Parameter("weight", required=True, per_model=True),
        Parameter("normalize_weights", default=True, kind="bool"),
        Parameter("eps", default=1e-8),
    ),
    optional_base=True,
    description="weighted spherical mean of any number of models (or of their task vectors from an optional base)",
    check=_check_multislerp,
    temporaries=lambda count, params: 2 * count + 2,
))
register(MergeMethod(
    name="karcher",
    apply=_apply_karcher,
    parameters=(Parameter("max_iter", default=10), Parameter("tol", default=1e-5)),
    description="Karcher (Riemannian) mean of the models' directions on the sphere, scaled by their mean norm",
    check=_check_karcher,
    temporaries=lambda count, params: count + 3,  # the unit vectors, the mean, the step, a widened copy for a norm
))
register(MergeMethod(
    name="model_stock",
    apply=_apply_model_stock,
    parameters=(Parameter("filter_wise", default=False, kind="bool"),),
    needs_base=True,
    min_models=2,
    description="Model Stock: from the base towards the fine-tunes' average by a ratio set by the angle between their updates",
    light=True,
))
register(MergeMethod(
    name="nearswap",
    apply=_apply_nearswap,
    parameters=(Parameter("t", required=True),),
    needs_base=True,
    max_models=1,
    description="take the other model's value where it is within t of the base, less of it the further it is",
    light=True,
))
register(MergeMethod(
    name="arcee_fusion",
    apply=_apply_arcee_fusion,
    parameters=(),
    needs_base=True,
    max_models=1,
    description="take the other model's value only where its change is an outlier of importance (|change| x KL)",
    temporaries=lambda count, params: 1,  # a large tensor on a CPU: its importances (the rest goes a block at a time)
))
register(MergeMethod(
    name="ram",
    apply=_apply_ram,
    parameters=(Parameter("epsilon", default=1e-5),),
    needs_base=True,
    description="Reinforced Agent Merging: keep unique task-vector entries whole, average shared ones over their contributors",
    light=True,
))
register(MergeMethod(
    name="ramplus_tl",
    apply=_apply_ramplus_tl,
    parameters=(Parameter("r", default=0.1), Parameter("alpha", default=0.2), Parameter("epsilon", default=1e-5)),
    needs_base=True,
    description="RAM+ (tensor-local): RAM with each model's unique entries scaled up by its overlap ratio",
))


def parameter_names() -> set[str]:
    """Every parameter name some registered method takes."""
    return {parameter.name for method in METHODS.values() for parameter in method.parameters}
