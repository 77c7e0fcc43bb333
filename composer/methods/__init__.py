"""Merge methods: pure tensor functions `(tensors, base, params) -> tensor`, one method or small family a
module, each registered (`composer.methods.registry`) in the module that holds its formula.

Adding a method is one module here with its function and a `@registered(...)` line, and one import below.
"""

# imported so that their methods register
from composer.methods import (  # noqa: F401
    cart,
    isotropic,
    knots,
    linear,
    model_stock,
    passthrough,
    pcb,
    regmean,
    selection,
    slerp,
    spherical,
    task_arithmetic,
    tsv,
)
from composer.methods.registry import METHODS, MergeMethod, Parameter, get_method, parameter_names, register, registered

__all__ = ["METHODS", "MergeMethod", "Parameter", "get_method", "parameter_names", "register", "registered"]
