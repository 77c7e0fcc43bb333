"""Estimators of embedding rows for tokens a model lacks. Pure, batched tensor functions.

Each takes the model's rows (`rows`, one per model token) and returns a tensor with one estimated row per
token to estimate. Notation: the donor is the model whose tokenizer is transplanted; anchors are tokens
both vocabularies share, so each has a donor row and a model row.

- `compose_subwords`: a token's row from the model's rows of the pieces the model's tokenizer splits its text into;
- `sparse_code` (orthogonal matching pursuit): the token's donor row written as a sparse combination of k
  anchors' donor rows; the same coefficients applied to the anchors' model rows;
- `nearest_neighbours`: the model rows of the k anchors closest to the token in donor space, weighted by similarity;
- `fit_linear_map`: a least-squares map from donor space to model space fitted on the anchors, recoloured
  so that its outputs spread like real rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensurgery.pieces import Pieces


def compose_subwords(rows: torch.Tensor, pieces: Pieces, first_weight: float = 0.0) -> torch.Tensor:
    """Mean of each token's pieces' rows; `first_weight` in [0, 1] moves weight onto the first piece
    (0: plain mean, 1: the first piece alone). A token with no pieces gets a zero row."""
    counts = torch.from_numpy(pieces.counts)
    owners = torch.from_numpy(pieces.owners)
    positions = torch.from_numpy(pieces.positions)
    share = 1.0 / counts[owners].clamp(min=1).to(rows.dtype)
    weights = (1.0 - first_weight) * share + first_weight * (positions == 0).to(rows.dtype)
    composed = torch.zeros(len(pieces), rows.shape[1], dtype=rows.dtype)
    composed.index_add_(0, owners, rows[torch.from_numpy(pieces.ids)] * weights[:, None])
    return composed


def _batches(count: int, size: int):
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def screening_basis(anchors: torch.Tensor, dims: int) -> torch.Tensor:
    """The top principal directions of the anchors ([d, dims]): similarities in this subspace pick candidates cheaply."""
    centred = anchors.float() - anchors.float().mean(dim=0)
    dims = min(dims, *centred.shape)
    _, _, basis = torch.linalg.svd(centred[:: max(1, len(centred) // 20000)], full_matrices=False)
    return basis[:dims].T.contiguous()


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def candidate_anchors(
    targets: torch.Tensor,
    anchors_unit: torch.Tensor,
    screened_anchors: torch.Tensor | None,
    basis: torch.Tensor | None,
    count: int,
) -> torch.Tensor:
    """For each target, the `count` anchors of highest |cosine|, measured in the screening subspace when one is given."""
    if basis is None:
        scores = _unit(targets) @ anchors_unit.T
    else:
        scores = _unit(targets @ basis) @ screened_anchors.T
    return scores.abs_().topk(min(count, scores.shape[1]), dim=1).indices


def sparse_code(
    targets: torch.Tensor,
    anchors: torch.Tensor,
    k: int = 8,
    batch_size: int = 1024,
    ridge: float = 1e-6,
    candidates: int | None = 64,
    screen_dims: int | None = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit, vectorised over a batch of targets.

    For each row x of `targets`, greedily picks k rows of `anchors` (the one most correlated with the
    residual, then least squares on all picked so far) so that x ~ coefficients @ anchors[picked].
    With `candidates`, each target's search is limited to the anchors most similar to it (screened in
    the top `screen_dims` principal directions), which makes the cost one low-rank product instead of k
    full ones; `candidates=None` searches every anchor at every step.
    Returns (picked: long [n, k], coefficients: [n, k]).
    """
    anchors = anchors.float()
    anchors_unit = _unit(anchors)
    basis = screening_basis(anchors, screen_dims) if candidates and screen_dims else None
    screened = _unit(anchors @ basis) if basis is not None else None
    k = min(k, len(anchors))
    picked = torch.zeros(len(targets), k, dtype=torch.long)
    coefficients = torch.zeros(len(targets), k)
    eye = torch.eye(k)
    for part in _batches(len(targets), batch_size):
        x = targets[part].float()
        pool = candidate_anchors(x, anchors_unit, screened, basis, candidates) if candidates else None
        pool_unit = anchors_unit[pool] if pool is not None else None  # [b, c, d]
        residual = x.clone()
        chosen = torch.zeros(len(x), k, dtype=torch.long)  # positions in the pool (or anchor ids without one)
        rows = torch.arange(len(x))
        for step in range(k):
            if pool_unit is not None:
                scores = (pool_unit @ residual.unsqueeze(2)).squeeze(2).abs_()
            else:
                scores = (residual @ anchors_unit.T).abs_()
            if step:
                scores[rows[:, None], chosen[:, :step]] = -1.0  # never pick an anchor twice
            chosen[:, step] = scores.argmax(dim=1)
            ids = pool.gather(1, chosen[:, : step + 1]) if pool is not None else chosen[:, : step + 1]
            basis_rows = anchors[ids]  # [b, s, d]
            gram = basis_rows @ basis_rows.transpose(1, 2) + ridge * eye[: step + 1, : step + 1]
            solved = torch.linalg.solve(gram, basis_rows @ x.unsqueeze(2)).squeeze(2)  # [b, s]
            residual = x - (solved.unsqueeze(1) @ basis_rows).squeeze(1)
        picked[part], coefficients[part] = ids, solved
    return picked, coefficients


def nearest_neighbours(
    targets: torch.Tensor,
    anchors: torch.Tensor,
    k: int = 8,
    batch_size: int = 4096,
    temperature: float = 0.05,
    candidates: int | None = 64,
    screen_dims: int | None = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k anchors with the highest cosine similarity to each target, and softmax(similarity / temperature)
    weights (summing to one). With `candidates`, the search is screened as in `sparse_code`.
    Returns (picked: long [n, k], weights: [n, k])."""
    anchors_unit = _unit(anchors.float())
    basis = screening_basis(anchors, screen_dims) if candidates and screen_dims else None
    screened = _unit(anchors.float() @ basis) if basis is not None else None
    k = min(k, len(anchors))
    picked = torch.zeros(len(targets), k, dtype=torch.long)
    weights = torch.zeros(len(targets), k)
    for part in _batches(len(targets), batch_size):
        x = _unit(targets[part].float())
        if basis is not None:
            pool = candidate_anchors(x, anchors_unit, screened, basis, max(candidates, k))
            similarity = (anchors_unit[pool] @ x.unsqueeze(2)).squeeze(2)
            similarity, order = similarity.topk(k, dim=1)
            chosen = pool.gather(1, order)
        else:
            similarity, chosen = (x @ anchors_unit.T).topk(k, dim=1)
        picked[part], weights[part] = chosen, torch.softmax(similarity / temperature, dim=1)
    return picked, weights


def combine(rows: torch.Tensor, picked: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """sum_j coefficients[i, j] * rows[picked[i, j]]: coefficients found in donor space applied to model rows."""
    return torch.einsum("nk,nkd->nd", coefficients.to(rows.dtype), rows[picked])


@dataclass
class LinearMap:
    """x -> ((x @ weight + bias) - centre) @ recolour + centre: an affine least-squares map from donor space
    to model space, then (optionally) a linear stretch that gives its outputs the spread the model's rows have."""

    weight: torch.Tensor  # [donor d, model d]
    bias: torch.Tensor  # [model d]
    centre: torch.Tensor  # [model d]
    recolour: torch.Tensor | None  # [model d, model d]

    def __call__(self, donor_rows: torch.Tensor, batch_size: int = 65536) -> torch.Tensor:
        out = torch.empty(len(donor_rows), self.weight.shape[1])
        for part in _batches(len(donor_rows), batch_size):
            mapped = donor_rows[part].float() @ self.weight + self.bias
            out[part] = mapped if self.recolour is None else (mapped - self.centre) @ self.recolour + self.centre
        return out


def _matrix_power(covariance: torch.Tensor, power: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(covariance)
    values = values.clamp(min=values.max() * 1e-8)
    return (vectors * values**power) @ vectors.T


def fit_linear_map(
    donor_rows: torch.Tensor, model_rows: torch.Tensor, ridge: float = 1e-3, recolour: bool = True
) -> LinearMap:
    """Fit on paired anchor rows. Ridge regression (`ridge` relative to the mean feature variance) predicts
    each row's conditional mean, which shrinks every prediction toward the average row: a frequent word
    and a rare one come out alike, and as output rows all of them get middling logits. The recolouring
    whitens the predictions (their covariance over the anchors) and colours them with the anchors' true
    covariance, restoring the spread (norms and the logit offsets that encode frequency) of real rows."""
    inputs = torch.cat([donor_rows.double(), torch.ones(len(donor_rows), 1, dtype=torch.float64)], dim=1)
    normal = inputs.T @ inputs
    normal += ridge * normal.diagonal().mean() * torch.eye(len(normal), dtype=torch.float64)
    solution = torch.linalg.solve(normal, inputs.T @ model_rows.double())
    weight, bias = solution[:-1], solution[-1]
    predicted = donor_rows.double() @ weight + bias
    centre = predicted.mean(dim=0)
    transform = None
    if recolour:
        spread = predicted - centre
        truth = model_rows.double() - model_rows.double().mean(dim=0)
        transform = _matrix_power(spread.T @ spread / len(spread), -0.5) @ _matrix_power(
            truth.T @ truth / len(truth), 0.5
        )
        transform = transform.float()
    return LinearMap(weight.float(), bias.float(), centre.float(), transform)
