"""Embeddings and LM heads of models with different vocabularies, compared row by row through the tokenizer
alignment: the rows of the tokens both vocabularies have (the same text, tokensurgery's `align`), in SUSPECT's
id order against the candidate's ids for the same tokens."""

from __future__ import annotations

import torch

from composer.trace.layout import TracedModel

COPIED = ("EXACT", "NORMALISED", "SPECIAL")  # alignment kinds that pair a token with the same token of the other side


def vocabulary_pairs(suspect_vocabulary, candidate_vocabulary) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(SUSPECT ids, candidate ids) of the tokens both vocabularies have; None when the vocabularies are the same,
    id for id (rows then pair by place, as any other tensor)."""
    from tokensurgery.alignment import Match, align

    if suspect_vocabulary.tokens == candidate_vocabulary.tokens:
        return None
    alignment = align(candidate_vocabulary, suspect_vocabulary)
    paired = torch.from_numpy(alignment.ids_of(*(Match[kind] for kind in COPIED)))
    paired = paired[torch.from_numpy(alignment.source_ids)[paired] >= 0]
    return paired, torch.from_numpy(alignment.source_ids)[paired]


def is_vocabulary_matrix(model: TracedModel, name: str, vocabulary_size: int) -> bool:
    """An embedding or LM head: a matrix outside the layer stack with a row for every token (padding rows allowed)."""
    shape = tuple(model.infos[name].shape)
    return name in model.outer and len(shape) == 2 and shape[0] >= vocabulary_size


def row_map(pairs: tuple[torch.Tensor, torch.Tensor] | None, suspect_rows: int, candidate_rows: int) -> torch.Tensor:
    """For each SUSPECT row, the candidate row of the same token, or -1 (rows pair by place where `pairs` is None)."""
    found = torch.full((suspect_rows,), -1, dtype=torch.long)
    if pairs is None:
        shared = min(suspect_rows, candidate_rows)
        found[:shared] = torch.arange(shared)
    else:
        suspect_ids, candidate_ids = pairs
        inside = (suspect_ids < suspect_rows) & (candidate_ids < candidate_rows)
        found[suspect_ids[inside]] = candidate_ids[inside]
    return found


def common_rows(maps: list[torch.Tensor], limit: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """SUSPECT rows every map pairs (at most `limit`, evenly spaced, ascending) and each map's rows for them."""
    shared = torch.stack(maps).min(dim=0).values >= 0
    rows = torch.nonzero(shared).reshape(-1)
    if len(rows) > limit:
        rows = rows[torch.linspace(0, len(rows) - 1, limit).round().long().unique()]
    return rows, [found[rows] for found in maps]
