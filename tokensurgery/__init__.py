"""Tokenizer surgery: give a model another tokenizer, rebuilding its vocabulary-indexed tensors.

    from tokensurgery import Vocabulary, align, estimate_rows

    model_vocab = Vocabulary.from_folder("SmolLM2")          # what text each token stands for
    target_vocab = Vocabulary.from_folder("gemma-3-270m")
    alignment = align(model_vocab, target_vocab)              # target id -> model id (or -1), and how
    rebuilt = estimate_rows(embed, alignment, donor_rows=gemma_embed)   # rows in the target's id order

`Transplant.between(model_vocab, target_vocab)` keeps the alignment and the model's pieces of every new
token, to rebuild several tensors (embedding, head) with one alignment.
"""

from tokensurgery.alignment import Alignment, Match, align
from tokensurgery.errors import TokenSurgeryError
from tokensurgery.pieces import Pieces, split_into_model_pieces
from tokensurgery.rows import DEFAULT_ESTIMATOR, ESTIMATORS, EstimatorSettings, RebuiltRows, estimate_rows, model_pieces
from tokensurgery.transplant import Transplant, padded
from tokensurgery.vocabulary import Scheme, Vocabulary, load_tokenizer

__all__ = [
    "DEFAULT_ESTIMATOR",
    "ESTIMATORS",
    "Alignment",
    "EstimatorSettings",
    "Match",
    "Pieces",
    "RebuiltRows",
    "Scheme",
    "TokenSurgeryError",
    "Transplant",
    "Vocabulary",
    "align",
    "estimate_rows",
    "load_tokenizer",
    "model_pieces",
    "padded",
    "split_into_model_pieces",
]
