"""A model's vocabulary-indexed tensors rebuilt for another tokenizer: the pieces put together."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensurgery.alignment import ROLE_STAND_INS, Alignment, align
from tokensurgery.pieces import Pieces
from tokensurgery.rows import EstimatorSettings, RebuiltRows, estimate_rows, model_pieces
from tokensurgery.vocabulary import Vocabulary

CONFIG_ID_KEYS = {"bos_token_id": "bos", "eos_token_id": "eos", "pad_token_id": "pad", "sep_token_id": "sep"}


def padded(size: int, multiple: int | None) -> int:
    return size if not multiple else -(-size // multiple) * multiple


@dataclass
class Transplant:
    """How to move rows from `model`'s vocabulary into `target`'s: built once, applied to each tensor."""

    alignment: Alignment
    pieces: Pieces
    settings: EstimatorSettings = EstimatorSettings()
    pad_to_multiple_of: int | None = None

    @classmethod
    def between(
        cls,
        model: Vocabulary,
        target: Vocabulary,
        settings: EstimatorSettings = EstimatorSettings(),
        pad_to_multiple_of: int | None = None,
    ) -> Transplant:
        alignment = align(model, target)
        return cls(alignment, model_pieces(alignment), settings, pad_to_multiple_of)

    @property
    def size(self) -> int:
        """Rows of every rebuilt tensor: the target's vocabulary, padded."""
        return padded(len(self.alignment.target), self.pad_to_multiple_of)

    def rebuild(self, model_rows: torch.Tensor, donor_rows: torch.Tensor | None = None) -> RebuiltRows:
        """One vocabulary-indexed tensor (vocabulary along axis 0) in the target's id order. `donor_rows`: the
        donor's tensor of the same role (its input embedding for an input embedding, its head for a head)."""
        return estimate_rows(model_rows, self.alignment, donor_rows, self.settings, self.pieces, self.size)

    def config_ids(self, donor_config: dict | None = None) -> dict:
        """bos/eos/pad ids for the output config: the donor's own where its config has them, else its tokenizer's."""
        target = self.alignment.target
        ids = {}
        for key, role in CONFIG_ID_KEYS.items():
            value = (donor_config or {}).get(key)
            if _valid_ids(value, len(target)):
                ids[key] = value
                continue
            for stand_in in ROLE_STAND_INS.get(role, (role,)):
                if stand_in in target.roles:
                    ids[key] = target.roles[stand_in]
                    break
        return ids


def _valid_ids(value, size: int) -> bool:
    values = value if isinstance(value, list) else [value]
    return bool(values) and all(
        isinstance(item, int) and not isinstance(item, bool) and 0 <= item < size for item in values
    )
