"""The text files a tune scores: read and checked before any model is touched, tokenized into the windows that
`compose eval` scores."""

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


def windows_of(texts: list[NamedText], tokenizer, context: int, model_name: str) -> list[Window]:
    """Each text tokenized as `compose eval` tokenizes it, cut into its scoring windows for a model whose context is
    `context` tokens."""
    windows = []
    for index, text in enumerate(texts):
        ids = tokenizer(text.text, return_tensors="pt", add_special_tokens=True)["input_ids"][0]
        if len(ids) < 2:
            raise ComposerError(
                f"Text file {text.name} is {len(ids)} token(s) long for the tokenizer of '{model_name}'; a score needs "
                "at least two tokens (each token after the first is scored). Give a longer text."
            )
        windows += [Window(index, ids[start:end], first) for start, end, first in scoring_windows(len(ids), context)]
    return windows
