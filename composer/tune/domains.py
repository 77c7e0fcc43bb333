"""Where each tunable number may go: a method parameter's domain, by name, and what `--tune-all` makes of a value."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Domain:
    low: float
    high: float
    integer: bool = False

    def holds(self, value: float) -> bool:
        return self.low <= value <= self.high

    def text(self) -> str:
        if self.integer:
            return "whole numbers" + (f" from {self.low:g}" if math.isfinite(self.low) else "")
        if math.isinf(self.low) and math.isinf(self.high):
            return "any real number"
        if math.isinf(self.high):
            return f"numbers of at least {self.low:g}"
        return f"numbers from {self.low:g} to {self.high:g}"


ANY = Domain(-math.inf, math.inf)
SHARE = Domain(0.0, 1.0)
POSITIVE = Domain(0.0, math.inf)
LAYER_BOUND = Domain(0, math.inf, integer=True)

# parameters not named here take any real number (weight, lambda, scale, alpha, r, ...)
PARAMETER_DOMAINS = {
    "density": SHARE,
    "t": SHARE,
    "gamma": SHARE,
    "select_topk": SHARE,
    "epsilon": SHARE,
    "eps": POSITIVE,
    "tol": POSITIVE,
    "max_iter": Domain(1, math.inf, integer=True),
}
# what --tune-all turns into ranges: the merge's own numbers, not a solver's tolerances
TUNE_ALL = ("weight", "density", "t", "lambda", "scale", "gamma", "select_topk", "epsilon")


def parameter_domain(name: str) -> Domain:
    return PARAMETER_DOMAINS.get(name, ANY)


def range_around(value: float, domain: Domain) -> tuple[float, float]:
    """The range --tune-all gives a value: half its size (at least 0.25) either side, kept inside the domain."""
    half = max(0.25, abs(value) / 2)
    low, high = max(domain.low, value - half), min(domain.high, value + half)
    return round(low, 6), round(high, 6)
