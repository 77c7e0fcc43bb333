"""Rebuild a vocabulary-indexed tensor in a target vocabulary's id order: copy, estimate, fill."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from tokensurgery.alignment import Alignment, Match
from tokensurgery.errors import TokenSurgeryError
from tokensurgery.estimators import combine, compose_subwords, fit_linear_map, nearest_neighbours, sparse_code
from tokensurgery.pieces import Pieces, split_into_model_pieces

ESTIMATORS = ("mapped", "subword", "omp", "knn")
NEEDS_DONOR = ("mapped", "omp", "knn")
DEFAULT_ESTIMATOR = "mapped"


@dataclass(frozen=True)
class EstimatorSettings:
    """`name`: mapped (default), subword, omp or knn. `k`: anchors per token for omp and knn.
    `subword_share`: the weight of subword composition mixed into mapped rows. `stretch` scales mapped rows'
    deviation from their mean after recolouring (see docs/tokensurgery.md)."""

    name: str = DEFAULT_ESTIMATOR
    k: int = 8
    subword_share: float = 0.2
    stretch: float = 1.1
    ridge: float = 1e-3

    def __post_init__(self):
        if self.name not in ESTIMATORS:
            raise TokenSurgeryError(f"Unknown estimator '{self.name}'; choose one of {', '.join(ESTIMATORS)}.")
        if self.k < 1:
            raise TokenSurgeryError(f"k must be at least 1 (got {self.k}).")
        if self.stretch <= 0:
            raise TokenSurgeryError(f"stretch must be positive (got {self.stretch}).")
        if not 0.0 <= self.subword_share <= 1.0:
            raise TokenSurgeryError(f"subword_share must lie in [0, 1] (got {self.subword_share}).")


@dataclass
class RebuiltRows:
    rows: torch.Tensor  # [target rows, ...] in the target's id order
    counts: Counter = field(
        default_factory=Counter
    )  # how many rows each way was used for: "copied", "mapped", "filler", ...


def model_pieces(alignment: Alignment) -> Pieces:
    """The model's pieces for every target token whose row is composed or estimated (empty for the others)."""
    wanted = set(alignment.ids_of(Match.NEW, Match.SPLIT).tolist())
    texts = [surface if token_id in wanted else None for token_id, surface in enumerate(alignment.target.surfaces)]
    return split_into_model_pieces(texts, alignment.model)


def _subset(pieces: Pieces, positions: np.ndarray) -> Pieces:
    return Pieces.from_lists([pieces.of(int(position)) for position in positions])


def _anchors(alignment: Alignment, donor_rows: torch.Tensor) -> np.ndarray:
    """Target ids that stand for the same text in both vocabularies (control tokens excluded) and have donor rows."""
    anchors = alignment.ids_of(Match.EXACT, Match.NORMALISED)
    anchors = anchors[[alignment.target.surfaces[i] is not None for i in anchors]] if len(anchors) else anchors
    return anchors[anchors < len(donor_rows)]


def estimate_rows(
    model_rows: torch.Tensor,
    alignment: Alignment,
    donor_rows: torch.Tensor | None = None,
    settings: EstimatorSettings = EstimatorSettings(),
    pieces: Pieces | None = None,
    padded_size: int | None = None,
) -> RebuiltRows:
    """`model_rows` (one row per model id, along axis 0) rebuilt in the target's id order.

    Copied tokens take their model row bit for bit; tokens the model lacks are estimated by
    `settings.name`; control tokens without a counterpart, twins and padding rows take the model's mean
    row. Estimators that need donor rows (the donor's own rows for this tensor, one per target id) use
    subword composition when `donor_rows` is None.
    """
    target_size = len(alignment.target)
    size = max(padded_size or target_size, target_size)
    if len(model_rows) < len(alignment.model):
        raise TokenSurgeryError(
            f"The model tensor has {len(model_rows)} rows but its tokenizer has {len(alignment.model)} tokens."
        )
    work = model_rows.float()
    flat = work.reshape(len(work), -1)
    filler = flat[: len(alignment.model)].mean(dim=0)
    out = filler.repeat(size, 1)
    counts: Counter = Counter()
    copied = alignment.copied
    out[torch.from_numpy(copied)] = flat[torch.from_numpy(alignment.source_ids[copied])]
    counts["copied"] = len(copied)
    counts["filler"] = size - target_size + len(alignment.ids_of(Match.CONTROL, Match.TWIN))

    pieces = pieces if pieces is not None else model_pieces(alignment)
    split = alignment.ids_of(Match.SPLIT)
    if len(split):
        out[torch.from_numpy(split)] = compose_subwords(flat, _subset(pieces, split))
        counts["subword"] += len(split)

    new = alignment.ids_of(Match.NEW)
    if len(new):
        name = settings.name
        if name in NEEDS_DONOR and (donor_rows is None or model_rows.dim() != 2):  # a bias has no donor counterpart
            name = "subword"
        new_pieces = _subset(pieces, new)
        has_pieces = torch.from_numpy(new_pieces.counts > 0)
        composed = compose_subwords(flat, new_pieces)
        if name == "subword":
            estimated = torch.where(has_pieces[:, None], composed, filler)
            counts["subword"] += int(has_pieces.sum())
            counts["filler"] += int((~has_pieces).sum())
        else:
            estimated = _from_donor(name, flat, alignment, donor_rows, new, settings)
            if name == "mapped" and settings.subword_share:
                share = settings.subword_share * has_pieces.float()[:, None]
                estimated = (1 - share) * estimated + share * composed
            counts[name] += len(new)
        out[torch.from_numpy(new)] = estimated
    rows = out.reshape(size, *model_rows.shape[1:]).to(model_rows.dtype)
    return RebuiltRows(rows, counts)


def _from_donor(
    name: str,
    flat: torch.Tensor,
    alignment: Alignment,
    donor_rows: torch.Tensor,
    new: np.ndarray,
    settings: EstimatorSettings,
) -> torch.Tensor:
    if len(donor_rows) < len(alignment.target):
        raise TokenSurgeryError(
            f"The donor's embedding has {len(donor_rows)} rows but its tokenizer has {len(alignment.target)} tokens; "
            "the weights and the tokenizer do not belong together."
        )
    anchors = _anchors(alignment, donor_rows)
    if len(anchors) < 2:
        raise TokenSurgeryError(
            f"The two vocabularies share only {len(anchors)} token(s), too few to relate the donor's embedding space "
            "to the model's; use the subword estimator."
        )
    donor_anchor_rows = donor_rows[torch.from_numpy(anchors)].float()
    model_anchor_ids = torch.from_numpy(alignment.source_ids[anchors])
    targets = donor_rows[torch.from_numpy(new)].float()
    if name == "mapped":
        mapping = fit_linear_map(donor_anchor_rows, flat[model_anchor_ids], settings.ridge)
        mapped = mapping(targets)
        if settings.stretch != 1.0:
            centre = mapped.mean(dim=0)
            mapped = (mapped - centre) * settings.stretch + centre
        return mapped
    if name == "omp":
        picked, weights = sparse_code(targets, donor_anchor_rows, settings.k)
    else:
        picked, weights = nearest_neighbours(targets, donor_anchor_rows, settings.k)
    return combine(flat, model_anchor_ids[picked], weights)
