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


def independence_test(suspect: Fingerprinted, candidate: Fingerprinted, seed: int = 0) -> IndependenceTest:
    """Each SUSPECT matrix is compared with every candidate matrix of its shape in a layer and the best taken, in
    the observed pairing and in each shuffled one alike, so choosing the partner biases neither. One matrix
    product a SUSPECT matrix scores it against all of the candidate's matrices of its shape, in every pairing."""
    generator = torch.Generator().manual_seed(seed)
    c_layers = list(candidate.model.layers)
    by_shape = _matrices_by_shape(candidate, c_layers)
    observed_layers, null_layers = [], []
    pairs = 0
    for layer in suspect.model.layers.values():
        observed = torch.zeros(len(c_layers))
        null = torch.zeros(PERMUTATIONS, len(c_layers))
        counted = torch.zeros(len(c_layers))
        for name in layer.values():
            sketch = suspect.prints[name].sketch
            if sketch is None:
                continue
            shape = suspect.prints[name].shape
            count = sketch.shape[0]
            rows = torch.randperm(count, generator=generator)[:ROWS] if count > ROWS else torch.arange(count)
            mine = _unit_rows(sketch, rows)
            shuffled = mine[torch.rand(PERMUTATIONS, len(rows), generator=generator).argsort(dim=1)]
            if shape not in by_shape:
                continue
            sketches, positions = by_shape[shape]
            theirs = sketches[:, rows]
            theirs = (theirs / theirs.norm(dim=2, keepdim=True).clamp_min(1e-30)).reshape(len(positions), -1)
            seen = _best_per_layer(theirs @ mine.reshape(-1) / len(rows), positions, len(c_layers))
            shuffled_seen = _best_per_layer(
                shuffled.reshape(PERMUTATIONS, -1) @ theirs.T / len(rows), positions, len(c_layers)
            )
            present = torch.isfinite(seen)
            observed += seen.where(present, 0.0)
            null += shuffled_seen.where(present, 0.0)
            counted += present
            pairs += int(present.sum())
        if counted.sum() == 0:
            continue
        scale = counted.clamp_min(1)
        observed_layers.append(float((observed / scale).max()))
        null_layers.append((null / scale).max(dim=1).values)
    if not observed_layers:
        return IndependenceTest(0.0, 0.0, 0.0, 1.0, 0)
    statistic = sum(observed_layers) / len(observed_layers)
    null_statistic = torch.stack(null_layers).mean(dim=0).double()
    mean, std = float(null_statistic.mean()), float(null_statistic.std())
    return IndependenceTest(statistic, mean, std, cantelli_bound(statistic, mean, std), pairs)


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
