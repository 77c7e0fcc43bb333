"""The settings of one merge of the task-arithmetic family, checked and filled in once and handed to
whichever path computes it (`reference`, `chunked`, and through it `native`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from composer.methods.task_arithmetic.draws import make_generator
from composer.methods.task_arithmetic.steps import check_inputs

SPARSIFICATIONS = ("magnitude", "random", "magnitude_outliers", "della_magprune")
RANDOM_SPARSIFICATIONS = ("random", "della_magprune")


@dataclass(frozen=True)
class Sparsity:
    """How one task vector is sparsified: `method` (one of SPARSIFICATIONS) keeping a `density` share of
    its entries; `gamma`: the share of largest entries breadcrumbs drops; `epsilon`: the spread of
    DELLA's keep probabilities; `rescale`: the kept entries are scaled back to the task vector's L1 norm."""

    method: str
    density: float
    gamma: float
    epsilon: float
    rescale: bool


@dataclass(frozen=True)
class TaskMerge:
    """What one merge of task vectors does: per-model `weights`, `densities`, `gammas` and `epsilons`
    (aligned with the models), the `sparsification` (None or one of SPARSIFICATIONS), whether a sign
    is elected per entry (`consensus`), `normalize`, `rescale`, `lambda_`, and for the random
    sparsifications the `generator` each model's stream key is drawn from, in model order."""

    weights: tuple[float, ...]
    sparsification: str | None = None
    consensus: bool = False
    densities: Sequence[float] | None = None
    gammas: Sequence[float] | None = None
    epsilons: Sequence[float] | None = None
    normalize: bool = False
    rescale: bool = False
    lambda_: float = 1.0
    generator: torch.Generator | int | None = None

    def sparsity(self, i: int) -> Sparsity | None:
        """How model i's task vector is sparsified; None where it is kept whole (no sparsification,
        or a density of 1 or more)."""
        if self.sparsification is None or not self.densities[i] < 1:
            return None
        return Sparsity(self.sparsification, self.densities[i], self.gammas[i], self.epsilons[i], self.rescale)


def task_merge(tensors: Sequence[torch.Tensor], base: torch.Tensor, weights: Sequence[float], **options) -> TaskMerge:
    """The checked settings of a merge of `tensors` onto `base` with `weights` and `options` (the other
    fields of `TaskMerge`; ValueError where they do not fit): densities default to 1, gammas to 0.01
    and epsilons to 0.15 for every model; for the random sparsifications an int seed (0 for None)
    becomes a CPU generator, so the masks are the same on every device."""
    merge = TaskMerge(tuple(weights), **options)
    count = len(tensors)
    if len(weights) != count:
        raise ValueError(f"{count} models but {len(weights)} weights")
    if merge.sparsification is not None and merge.sparsification not in SPARSIFICATIONS:
        raise ValueError(f"unknown sparsification {merge.sparsification!r}")
    check_inputs(tensors, base)
    generator = merge.generator
    if merge.sparsification in RANDOM_SPARSIFICATIONS and not isinstance(generator, torch.Generator):
        generator = make_generator(0 if generator is None else generator)
    return replace(
        merge,
        densities=tuple([1.0] * count if merge.densities is None else merge.densities),
        gammas=tuple([0.01] * count if merge.gammas is None else merge.gammas),
        epsilons=tuple([0.15] * count if merge.epsilons is None else merge.epsilons),
        generator=generator,
    )
