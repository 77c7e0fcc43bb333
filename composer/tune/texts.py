"""The text files a tune scores: read and checked before any model is touched, tokenized into scoring windows.

The windows are `compose eval`'s (composer.evaluate.scoring_windows), of up to 1024 tokens, but each shares only one
token with the one before (`compose eval`'s default overlaps them by half, for more context per scored token): every
token is run through the model once, which halves a trial's forward pass. `score_text(..., stride=window - 1)` gives
the same numbers for a written model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from composer.errors import ComposerError
from composer.evaluate import scoring_windows
from composer.files import read_text_to_score


@dataclass(frozen=True)
class NamedText:
    name: str
    text: str

    @property
    def bytes(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclass(frozen=True)
class Window:
    text: int  # index of its text
    ids: torch.Tensor  # the window's token ids
    first_scored: int  # scored positions start here (earlier ones are context the window before scored)


def read_texts(paths: list[Path], option: str) -> list[NamedText]:
    if not paths:
        raise ComposerError(f"{option} needs at least one text file.")
    return [NamedText(str(path), read_text_to_score(path)) for path in paths]


WINDOW = 1024  # tokens, at most: compose eval's window


def window_stride(context: int) -> int:
    """Tokens from one window's start to the next's, for a model whose context is `context` tokens: a window less
    the one token it shares with the window before."""
    return min(WINDOW, context) - 1


def windows_of(texts: list[NamedText], tokenizer, context: int, model_name: str) -> list[Window]:
    """Each text tokenized as `compose eval` tokenizes it, cut into its scoring windows (see the module's doc) for a
    model whose context is `context` tokens."""
    windows = []
    for index, text in enumerate(texts):
        ids = tokenizer(text.text, return_tensors="pt", add_special_tokens=True)["input_ids"][0]
        if len(ids) < 2:
            raise ComposerError(
                f"Text file {text.name} is {len(ids)} token(s) long for the tokenizer of '{model_name}'; a score needs "
                "at least two tokens (each token after the first is scored). Give a longer text."
            )
        windows += [
            Window(index, ids[start:end], first)
            for start, end, first in scoring_windows(len(ids), context, WINDOW, window_stride(context))
        ]
    return windows
