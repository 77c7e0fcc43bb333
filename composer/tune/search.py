"""The optimisers: each proposes points in [0, 1]^n (a share of each tune range) and is told their objectives.

`cma`: CMA-ES from the `cma` package (ask/tell), bounded to the unit cube. `random`: uniform random points, needing
nothing beyond the standard library (a baseline, and the optimiser of the tests where `cma` is not installed)."""

from __future__ import annotations

import math
import random

from composer.errors import ComposerError

OPTIMIZERS = ("cma", "random")
PENALTY = 1e3  # the objective CMA-ES is told for a trial with no score (bits per byte are far below this)
CMA_INSTALL = "pip install 'cma>=3.3'"


class RandomSearch:
    def __init__(self, start: list[float], seed: int):
        self.dimensions = len(start)
        self.generator = random.Random(seed)

    def ask(self) -> list[list[float]]:
        return [[self.generator.random() for _ in range(self.dimensions)]]

    def tell(self, points: list[list[float]], values: list[float]) -> None:
        pass


class CmaSearch:
    """CMA-ES in the unit cube, starting at `start` with a step of a quarter of each range. The package does not run
    in one dimension, so a single number is searched with a second, unused coordinate beside it."""

    def __init__(self, start: list[float], seed: int):
        import warnings

        try:
            with warnings.catch_warnings():  # it warns, on import, that it cannot plot without matplotlib
                warnings.simplefilter("ignore")
                import cma
        except ImportError:
            raise ComposerError(
                f"--optimizer cma needs the 'cma' package, which is not installed; install it ({CMA_INSTALL}) "
                "or use --optimizer random."
            ) from None
        self.dimensions = len(start)
        padded = list(start) + [0.5] * (2 - len(start)) if len(start) < 2 else list(start)
        options = {"bounds": [0.0, 1.0], "seed": seed + 1, "verbose": -9}  # cma takes seed 0 as "from the clock"
        self.strategy = cma.CMAEvolutionStrategy(padded, 0.25, options)
        self.asked: list = []

    def ask(self) -> list[list[float]]:
        self.asked = self.strategy.ask()
        return [[float(x) for x in point[: self.dimensions]] for point in self.asked]

    def tell(self, points: list[list[float]], values: list[float]) -> None:
        told = [value if math.isfinite(value) else PENALTY for value in values]
        self.strategy.tell(self.asked[: len(told)], told)


def make_search(name: str, start: list[float], seed: int):
    if name not in OPTIMIZERS:
        raise ComposerError(f"--optimizer '{name}' is not one composer has; use one of {', '.join(OPTIMIZERS)}.")
    return (CmaSearch if name == "cma" else RandomSearch)(start, seed)
