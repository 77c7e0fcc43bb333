"""Evaluate a parameter setting for one tensor at one depth.

`t` runs from 0 at the first layer of an output slice to 1 at its last (a one-layer slice has t=1);
tensors before the layers use t=0 and tensors after them t=1. A list of numbers is a gradient:
its entries are spread evenly over t and interpolated linearly. A list of strings is stepped (entry
int(t * (n-1)), as mergekit does). A list of `{filter, value}` entries applies the first whose filter
is a substring of the tensor name (no filter, "" or "*" matches all); when none matches, the setting
gives None and the next place in the precedence order is asked.
"""

from __future__ import annotations

from typing import Any

from composer.recipe.schema import ConditionalParameter


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(entry, ConditionalParameter) for entry in setting):
            for entry in setting:
                if not entry.filter or entry.filter == "*" or entry.filter in tensor_name:
                    return evaluate(entry.value, tensor_name, t)
            return None
        if all(isinstance(entry, (int, float)) and not isinstance(entry, bool) for entry in setting):
            return interpolate_gradient(setting, t)
        return setting[min(max(int(t * (len(setting) - 1)), 0), len(setting) - 1)]
    return setting


def interpolate_gradient(values: list[float], t: float) -> float:
    """Piecewise-linear interpolation of `values` placed at t = 0, 1/(n-1), ..., 1 (t clamped to [0, 1])."""
    if len(values) == 1:
        return values[0]
    t = min(max(t, 0.0), 1.0)
    position = t * (len(values) - 1)
    lower = min(int(position), len(values) - 1)
    upper = min(lower + 1, len(values) - 1)
    fraction = position - lower
    if fraction == 0:
        return values[lower]
    return (1 - fraction) * values[lower] + fraction * values[upper]


def layer_t(offset: int, slice_length: int) -> float:
    """t of the layer at `offset` within an output slice of `slice_length` layers."""
    return offset / (slice_length - 1) if slice_length > 1 else 1.0
