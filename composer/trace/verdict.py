"""Parent, related or independent: a permutation test over matched rows, in the spirit of the 2025
model-independence tests (Zhu et al., "Independence Tests for Language Models").

Training from a random initialisation treats a layer's rows (neurons) alike, so for two models trained
independently the pairing of SUSPECT's row i with the candidate's row i is no better than any other pairing.
The statistic: for each SUSPECT layer, the best candidate layer's mean cosine between SUSPECT's rows and the
candidate's rows at the same places (row sketches, `fingerprints`), averaged over SUSPECT's layers. Its null
distribution comes from the same statistic with SUSPECT's rows shuffled (each matrix its own shuffle, the
maximum over candidate layers taken again). The p-value is the normal tail of the observed statistic
against that distribution (PERMUTATIONS shuffles); ALPHA is the stated false-positive rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from composer.trace.layers import Fingerprinted

ALPHA = 1e-3
PERMUTATIONS = 200
ROWS = 256  # rows per matrix that enter the test (a fixed sample; all when fewer)
MIN_CONTRIBUTION = 0.02


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


def _same_shape_matrices(candidate: Fingerprinted) -> dict[int, dict[tuple[int, ...], list[str]]]:
    found: dict[int, dict[tuple[int, ...], list[str]]] = {}
    for layer, members in candidate.model.layers.items():
        for name in members.values():
            tensor_print = candidate.prints[name]
            if tensor_print.sketch is not None:
                found.setdefault(layer, {}).setdefault(tensor_print.shape, []).append(name)
    return found


def independence_test(suspect: Fingerprinted, candidate: Fingerprinted, seed: int = 0) -> IndependenceTest:
    """Each SUSPECT matrix is compared with every candidate matrix of its shape in a layer and the best taken, in
    the observed pairing and in each shuffled one alike, so choosing the partner biases neither."""
    generator = torch.Generator().manual_seed(seed)
    c_layers = list(candidate.model.layers)
    matrices = _same_shape_matrices(candidate)
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
            shuffled = mine[torch.stack([torch.randperm(len(rows), generator=generator) for _ in range(PERMUTATIONS)])]
            for position, c_layer in enumerate(c_layers):
                partners = matrices.get(c_layer, {}).get(shape)
                if not partners:
                    continue
                theirs = torch.stack(
                    [_unit_rows(candidate.prints[partner].sketch, rows) for partner in partners]
                )  # [m, r, k]
                observed[position] += torch.einsum("rk,mrk->m", mine, theirs).max() / len(rows)
                null[:, position] += torch.einsum("nrk,mrk->nm", shuffled, theirs).max(dim=1).values / len(rows)
                counted[position] += 1
                pairs += 1
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
    if std <= 0:
        p_value = 0.0 if statistic > mean else 1.0
    else:
        p_value = 0.5 * math.erfc((statistic - mean) / std / math.sqrt(2))
    return IndependenceTest(statistic, mean, std, max(p_value, 1e-300), pairs)


def verdict(test: IndependenceTest, contribution: float, is_recipe_base: bool) -> str:
    if test.p_value >= ALPHA:
        return "independent"
    return "parent" if contribution >= MIN_CONTRIBUTION or is_recipe_base else "related"
