"""Router gate rows: pure functions from prompt statistics to a [experts, hidden] matrix per layer, and the
checks that say when two experts' prompts cannot be told apart.

Averaged router inputs share a large component (the same for code, stories, anything), so every expert's
logit is mostly that shared part, and the small differences that should decide are easily outweighed by a
few dimensions where all tokens vary a lot. The `discriminant` rows are Fisher's linear discriminant of the
experts' prompt tokens (with the within-expert covariance shrunk towards the identity): the differences
between the experts' means are weighed against how tokens vary within each expert, and LDA's per-expert
offset is folded onto the shared mean direction, since a router has no bias but every router input carries
that direction at a nearly constant strength. docs/moe.md has the measured effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SHRINKAGE = 0.2  # weight of the isotropic target in the within-expert covariance (ridge-regularised LDA)
COLLINEAR = 0.95  # cosine above which two experts' (centred) rows are the same direction
SEPARATED = 1.0  # Mahalanobis distance between two experts' means below which LDA confuses over 31% of their tokens


@dataclass
class ExpertStatistics:
    """One layer's router inputs for the prompts of every expert, pooled as the recipe asks."""

    positive_means: torch.Tensor  # [experts, hidden]: mean over each expert's prompts of the pooled vector
    negative_means: torch.Tensor  # [experts, hidden]: the same for negative prompts (zero where none)
    has_negatives: torch.Tensor  # [experts] bool
    centred: torch.Tensor  # [tokens, hidden]: every prompt token minus its expert's token mean (float64)

    @property
    def count(self) -> int:
        return max(self.centred.shape[0], 1)

    @property
    def scatter(self) -> torch.Tensor:
        """[hidden, hidden]: the sum over experts of the scatter of its prompts' tokens around their mean."""
        return self.centred.T @ self.centred


def pooled(states: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[prompts, tokens, hidden] -> [prompts, hidden]: the mean over real tokens, or the last real token."""
    if pooling == "last":
        last = mask.sum(1) - 1
        return states[torch.arange(states.shape[0]), last]
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1)


def statistics(
    states: torch.Tensor, mask: torch.Tensor, positives: list[list[int]], negatives: list[list[int]], pooling: str
) -> ExpertStatistics:
    """`positives[e]` / `negatives[e]`: rows of `states` holding expert e's positive / negative prompts."""
    vectors = pooled(states, mask, pooling).double()
    hidden = states.shape[-1]
    positive_means = torch.stack([vectors[rows].mean(0) for rows in positives])
    negative_means = torch.stack(
        [vectors[rows].mean(0) if rows else torch.zeros(hidden, dtype=torch.float64) for rows in negatives]
    )
    centred = []
    for rows in positives:
        tokens = states[rows][
            mask[rows]
        ].double()  # every real token: the router routes each of them, whatever the pooling
        centred.append(tokens - tokens.mean(0))
    has_negatives = torch.tensor([bool(rows) for rows in negatives])
    return ExpertStatistics(positive_means, negative_means, has_negatives, torch.cat(centred))


def statistics_bytes(prompts: int, width: int, tokens: int, hidden: int) -> int:
    """The most that `statistics` and the rows and separations made from them hold at once, for `tokens` real tokens
    in a [prompts, width] batch: the float32 product that mean pooling sums, every real token twice in float64
    (gathered, then centred), and four float64 squares of the smaller of tokens and hidden (the covariance, or its
    token-space form, with what solving it copies)."""
    return prompts * width * hidden * 4 + 2 * tokens * hidden * 8 + 4 * min(tokens, hidden) ** 2 * 8


def expert_targets(stats: ExpertStatistics) -> torch.Tensor:
    """Each expert's mean, pushed away from its negative prompts' own part (their mean minus the common mean)."""
    common = stats.positive_means.mean(0)
    away = torch.where(
        stats.has_negatives.unsqueeze(1), stats.negative_means - common, torch.zeros_like(stats.negative_means)
    )
    return stats.positive_means - away


def average_rows(stats: ExpertStatistics) -> torch.Tensor:
    """Each expert's averaged router input minus its negatives' average, normalised (mergekit's rows)."""
    rows = stats.positive_means - stats.negative_means
    return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def gate_row(positive_mean: torch.Tensor, negative_mean: torch.Tensor) -> torch.Tensor:
    """[1, hidden]: one gate's row by mergekit's rule, the averaged router input of its prompts minus that of its
    negative prompts (zeros where none), normalised. A sigmoid gate's logit is then the router input's length
    along the prompts' direction."""
    row = positive_mean - negative_mean
    return (row / row.norm().clamp(min=1e-12)).unsqueeze(0)


def _isotropic_level(stats: ExpertStatistics) -> torch.Tensor:
    """The mean variance per dimension: trace(scatter) / count / hidden."""
    return (stats.centred.square().sum() / stats.count / stats.centred.shape[1]).clamp(min=1e-12)


def regularised_covariance(stats: ExpertStatistics, shrinkage: float = SHRINKAGE) -> torch.Tensor:
    """The pooled within-expert covariance of the prompt tokens, shrunk towards a multiple of the identity."""
    covariance = stats.scatter / stats.count
    return (1 - shrinkage) * covariance + shrinkage * _isotropic_level(stats) * torch.eye(
        covariance.shape[0], dtype=covariance.dtype
    )


def solve_covariance(stats: ExpertStatistics, right: torch.Tensor, shrinkage: float = SHRINKAGE) -> torch.Tensor:
    """regularised_covariance(stats)^-1 @ right ([hidden, k]). With fewer prompt tokens than dimensions the
    covariance is a ridge plus a low-rank part, C = a I + b Z^T Z (Z: the centred tokens), and the Woodbury
    identity C^-1 = (I - Z^T (a/b I + Z Z^T)^-1 Z) / a solves it in token space: [tokens, tokens] instead of
    [hidden, hidden], which is what makes hidden gates cheap for wide models."""
    tokens, hidden = stats.centred.shape
    if tokens >= hidden:
        return torch.linalg.solve(regularised_covariance(stats, shrinkage), right)
    ridge = shrinkage * _isotropic_level(stats)
    if shrinkage >= 1:
        return right / ridge
    low_rank = (1 - shrinkage) / stats.count
    z = stats.centred
    inner = z @ z.T
    inner.diagonal().add_(ridge / low_rank)
    return (right - z.T @ torch.linalg.solve(inner, z @ right)) / ridge


def discriminant_rows(stats: ExpertStatistics, shrinkage: float = SHRINKAGE) -> torch.Tensor:
    """LDA rows with the offsets folded onto the common mean direction, centred, scaled to mean row norm 1."""
    targets = expert_targets(stats)
    weights = solve_covariance(stats, targets.T, shrinkage).T
    offsets = -0.5 * (weights * targets).sum(-1)
    common = targets.mean(0)
    rows = weights + offsets.unsqueeze(1) * common.unsqueeze(0) / (common @ common).clamp(min=1e-12)
    return scaled(rows - rows.mean(0))


def separations(stats: ExpertStatistics, shrinkage: float = SHRINKAGE) -> torch.Tensor:
    """[e, f]: the Mahalanobis distance between experts' targets under the within-expert covariance. Two Gaussian
    kinds this far apart are confused by the best linear router for a share Phi(-distance / 2) of their tokens."""
    targets = expert_targets(stats)
    differences = targets.unsqueeze(1) - targets.unsqueeze(0)  # [e, f, hidden]
    solved = solve_covariance(stats, differences.reshape(-1, targets.shape[1]).T, shrinkage).T
    return (
        (differences.reshape(-1, targets.shape[1]) * solved)
        .sum(-1)
        .clamp(min=0)
        .sqrt()
        .reshape(len(targets), len(targets))
    )


def close_pairs(distances: torch.Tensor, threshold: float = SEPARATED) -> list[tuple[int, int, float]]:
    """(e, f, expected confused share) for experts whose prompts lie closer than `threshold`."""
    pairs = []
    for e in range(distances.shape[0]):
        for f in range(e + 1, distances.shape[0]):
            if distances[e, f] < threshold:
                pairs.append((e, f, 0.5 * math.erfc(distances[e, f].item() / 2 / math.sqrt(2))))
    return pairs


def embedding_rows(means: torch.Tensor, negatives: torch.Tensor, norm_weight: torch.Tensor, kind: str) -> torch.Tensor:
    """cheap_embed: token-embedding averages stand in for router inputs. `average`: mergekit's normalised
    rows, the same in every layer; `discriminant`: the experts' common part removed and each dimension
    weighted by the layer's post-attention norm weight, which scales it in what the router receives."""
    rows = means - negatives
    if kind == "average":
        return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return scaled((rows - rows.mean(0)) * norm_weight.double())


def scaled(rows: torch.Tensor) -> torch.Tensor:
    size = rows.norm(dim=-1).mean()
    return rows / size if size > 1e-12 else rows


def random_rows(experts: int, hidden: int, seed: int, uniform: bool) -> torch.Tensor:
    """`random`: standard normal entries; `uniform_random`: U(-1/sqrt(hidden), 1/sqrt(hidden)), torch's Linear init."""
    generator = torch.Generator().manual_seed(seed)
    if uniform:
        bound = 1.0 / math.sqrt(hidden)
        return (torch.rand(experts, hidden, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return torch.randn(experts, hidden, generator=generator, dtype=torch.float64)


def collinear_pairs(rows: torch.Tensor) -> list[tuple[int, int, float]]:
    """(e, f, cosine) for experts whose rows, with the part common to all rows removed, point the same way or
    coincide: the router cannot prefer one of them over the other."""
    centred = rows - rows.mean(0)
    size = rows.norm(dim=-1).max().clamp(min=1e-12)
    pairs = []
    for e in range(rows.shape[0]):
        for f in range(e + 1, rows.shape[0]):
            if (centred[e] - centred[f]).norm() <= 1e-6 * size:
                pairs.append((e, f, 1.0))
                continue
            cosine = torch.nn.functional.cosine_similarity(centred[e], centred[f], dim=0).item()
            if cosine > COLLINEAR:
                pairs.append((e, f, cosine))
    return pairs


def routing_shares(rows: torch.Tensor, tokens_by_expert: list[torch.Tensor]) -> torch.Tensor:
    """[e, f]: the share of expert e's own prompt tokens whose top-1 expert is f."""
    shares = torch.zeros(len(tokens_by_expert), rows.shape[0], dtype=torch.float64)
    for e, tokens in enumerate(tokens_by_expert):
        choice = (tokens.double() @ rows.T.double()).argmax(-1)
        shares[e] = torch.bincount(choice, minlength=rows.shape[0]).double() / max(len(choice), 1)
    return shares


def layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts: list[str] = []
    start = previous = None
    for layer in sorted(set(layers)):
        if start is None:
            start = previous = layer
        elif layer == previous + 1:
            previous = layer
        else:
            parts.append(f"{start}-{previous}" if previous != start else str(start))
            start = previous = layer
    if start is not None:
        parts.append(f"{start}-{previous}" if previous != start else str(start))
    return ", ".join(parts)
