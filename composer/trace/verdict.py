"""Parent, related or independent: a permutation test over matched rows, in the spirit of the 2025
model-independence tests (Zhu et al., "Independence Tests for Language Models").

Training from a random initialisation treats a layer's rows (neurons) alike, so for two models trained
independently the pairing of SUSPECT's row i with the candidate's row i is no better than any other pairing.
The statistic: for each SUSPECT layer, the best candidate layer's mean cosine between SUSPECT's rows and the
candidate's rows at the same places (row sketches, `fingerprints`), averaged over SUSPECT's layers. Its null
distribution comes from the same statistic with SUSPECT's rows shuffled (each matrix its own shuffle, the
maximum over candidate layers taken again; PERMUTATIONS shuffles give its mean and standard deviation).

The p-value is Cantelli's one-sided bound, P(X - mean >= z std) <= 1 / (1 + z^2), which holds for any null
distribution, so ALPHA is a false-positive rate that the test keeps whatever the null's shape. A normal tail
does not: the statistic is an average of maxima, skewed to the right, and on SmolLM2 against a random
initialisation its normal tail gave p = 8e-4 in one row sample of three (z = 3.2). Parents and their relatives
stand thousands of standard deviations above the null (z ~ 2000 on SmolLM2: p ~ 2.5e-7), so the bound costs
them nothing; ALPHA = 1e-3 asks for z >= 31.6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from composer.trace.layers import Fingerprinted

ALPHA = 1e-3
PERMUTATIONS = 200
ROWS = 256  # rows per matrix that enter the test (a fixed sample; all when fewer)
# A parent gives at least this mean share of SUSPECT's layers. Below it lies what happens to a merge afterwards:
# continued fine-tuning of a linear merge of two SmolLM2 fine-tunes left their base at shares of 0.02-0.04 in
# most layers (the fine-tune moved part of the way back), and a sibling fine-tune at 0.02-0.03 in some; merges
# people publish give every parent far more.
MIN_CONTRIBUTION = 0.05


@dataclass
class IndependenceTest:
    statistic: float
    null_mean: float
    null_std: float
    p_value: float
    matrices: int  # matrix pairs the test compared


def _unit_rows(sketch: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    picked = sketch[rows]
    return picked / picked.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _matrices_by_shape(
    candidate: Fingerprinted, layers: list[int]
) -> dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]]:
    """Shape -> (the sketches of the candidate's layer matrices of that shape, stacked [m, rows, k]; the position in
    `layers` of each one's layer)."""
    found: dict[tuple[int, ...], tuple[list[torch.Tensor], list[int]]] = {}
    for position, layer in enumerate(layers):
        for name in candidate.model.layers[layer].values():
            tensor_print = candidate.prints[name]
            if tensor_print.sketch is not None:
                sketches, positions = found.setdefault(tensor_print.shape, ([], []))
                sketches.append(tensor_print.sketch)
                positions.append(position)
    return {shape: (torch.stack(sketches), torch.tensor(positions)) for shape, (sketches, positions) in found.items()}


def _best_per_layer(scores: torch.Tensor, positions: torch.Tensor, layers: int) -> torch.Tensor:
    """[..., m] scores of the candidate's matrices -> [..., layers]: each layer's best (-inf where it has none)."""
    best = torch.full((*scores.shape[:-1], layers), -math.inf, dtype=scores.dtype)
    return best.scatter_reduce(-1, positions.expand_as(scores), scores, "amax")


def independence_tests(
    suspect: Fingerprinted, candidates: list[Fingerprinted], seed: int = 0
) -> list[IndependenceTest]:
    """Each candidate's test. Each SUSPECT matrix is compared with every candidate matrix of its shape in a layer and
    the best taken, in the observed pairing and in each shuffled one alike, so choosing the partner biases neither.
    One matrix product a SUSPECT matrix scores it against all of a candidate's matrices of its shape, in every
    pairing. The rows sampled and the shuffles depend on SUSPECT and the seed alone: they are drawn once, for every
    candidate (each candidate's test is the one it would have on its own)."""
    generator = torch.Generator().manual_seed(seed)
    c_layers = [list(candidate.model.layers) for candidate in candidates]
    by_shape = [_matrices_by_shape(candidate, layers) for candidate, layers in zip(candidates, c_layers)]
    observed_layers: list[list[float]] = [[] for _ in candidates]
    null_layers: list[list[torch.Tensor]] = [[] for _ in candidates]
    pairs = [0] * len(candidates)
    for layer in suspect.model.layers.values():
        observed = [torch.zeros(len(layers)) for layers in c_layers]
        null = [torch.zeros(PERMUTATIONS, len(layers)) for layers in c_layers]
        counted = [torch.zeros(len(layers)) for layers in c_layers]
        for name in layer.values():
            sketch = suspect.prints[name].sketch
            if sketch is None:
                continue
            shape = suspect.prints[name].shape
            count = sketch.shape[0]
            rows = torch.randperm(count, generator=generator)[:ROWS] if count > ROWS else torch.arange(count)
            order = torch.rand(PERMUTATIONS, len(rows), generator=generator).argsort(dim=1)
            if not any(shape in shapes for shapes in by_shape):
                continue
            mine = _unit_rows(sketch, rows)
            # the shuffled rows, [PERMUTATIONS, rows * SKETCH_WIDTH] (index_select: the same copy as mine[order], faster)
            shuffled = mine.index_select(0, order.reshape(-1)).reshape(PERMUTATIONS, -1)
            for number, shapes in enumerate(by_shape):
                if shape not in shapes:
                    continue
                sketches, positions = shapes[shape]
                theirs = sketches[:, rows]
                theirs = (theirs / theirs.norm(dim=2, keepdim=True).clamp_min(1e-30)).reshape(len(positions), -1)
                width = len(c_layers[number])
                seen = _best_per_layer(theirs @ mine.reshape(-1) / len(rows), positions, width)
                shuffled_seen = _best_per_layer(shuffled @ theirs.T / len(rows), positions, width)
                present = torch.isfinite(seen)
                observed[number] += seen.where(present, 0.0)
                null[number] += shuffled_seen.where(present, 0.0)
                counted[number] += present
                pairs[number] += int(present.sum())
        for number in range(len(candidates)):
            if counted[number].sum() == 0:
                continue
            scale = counted[number].clamp_min(1)
            observed_layers[number].append(float((observed[number] / scale).max()))
            null_layers[number].append((null[number] / scale).max(dim=1).values)
    tests = []
    for number in range(len(candidates)):
        if not observed_layers[number]:
            tests.append(IndependenceTest(0.0, 0.0, 0.0, 1.0, 0))
            continue
        statistic = sum(observed_layers[number]) / len(observed_layers[number])
        null_statistic = torch.stack(null_layers[number]).mean(dim=0).double()
        mean, std = float(null_statistic.mean()), float(null_statistic.std())
        tests.append(IndependenceTest(statistic, mean, std, cantelli_bound(statistic, mean, std), pairs[number]))
    return tests


def cantelli_bound(statistic: float, mean: float, std: float) -> float:
    """An upper bound on P(null >= statistic) from the null's mean and standard deviation alone."""
    if statistic <= mean:
        return 1.0
    if std <= 0:
        return 1e-300
    z = (statistic - mean) / std
    return max(1.0 / (1.0 + z * z), 1e-300)


def verdict(test: IndependenceTest, contribution: float, is_recipe_base: bool) -> str:
    if test.p_value >= ALPHA:
        return "independent"
    return "parent" if contribution >= MIN_CONTRIBUTION or is_recipe_base else "related"
