"""Evaluate a parameter setting for one tensor at one depth.

`t` runs from 0 at the first layer of an output slice to 1 at its last (a one-layer slice has t=1);
tensors before the layers use t=0 and tensors after them t=1. A list of numbers is a gradient:
its entries are spread evenly over t and interpolated linearly, numbers written as strings (`['0.1', '0.9']`)
too. Any other list of strings is stepped (entry int(t * (n-1)), as mergekit does). A list of `{filter, value}`
entries applies the first whose filter is a substring of the tensor name (no filter, "" or "*" matches all); when
none matches, the setting gives None and the next place in the precedence order is asked.
"""

from __future__ import annotations

import math
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
        numbers = numbers_written_as_text(setting)
        if numbers is not None:  # `weight: ['0.1', '0.9']` is the gradient mergekit reads it as
            return interpolate_gradient(numbers, t)
        return setting[min(max(int(t * (len(setting) - 1)), 0), len(setting) - 1)]
    return setting


def numbers_written_as_text(entries: list) -> list[float] | None:
    """The finite numbers a list of strings spells (YAML reads `'0.5'` and `1e-5` as strings), or None."""
    numbers = []
    for entry in entries:
        try:
            number = float(entry.strip()) if isinstance(entry, str) else None
        except ValueError:
            return None
        if number is None or not math.isfinite(number):
            return None
        numbers.append(number)
    return numbers


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
