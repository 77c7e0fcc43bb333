"""How a model's own tokenizer splits the text of tokens it lacks: the pieces subword composition combines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokensurgery.vocabulary import Vocabulary, surface_index

WORD_AFTER = "x"  # a letter put after a run of whitespace, to see how a tokenizer splits the run in front of a word


@dataclass
class Pieces:
    """A ragged list: the pieces of token j's text are `ids[starts[j]:starts[j + 1]]` (model ids)."""

    ids: np.ndarray  # flat model ids
    starts: np.ndarray  # len(tokens) + 1 offsets into ids

    def __len__(self) -> int:
        return len(self.starts) - 1

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.starts)

    @property
    def owners(self) -> np.ndarray:
        """For each flat piece, the position of the token it belongs to."""
        return np.repeat(np.arange(len(self)), self.counts)

    @property
    def positions(self) -> np.ndarray:
        """For each flat piece, its position inside its token (0 for the first piece)."""
        return np.arange(len(self.ids)) - np.repeat(self.starts[:-1], self.counts)

    def of(self, position: int) -> list[int]:
        return self.ids[self.starts[position] : self.starts[position + 1]].tolist()

    @classmethod
    def from_lists(cls, lists: list[list[int]]) -> Pieces:
        counts = np.array([len(items) for items in lists], dtype=np.int64)
        flat = np.fromiter((item for items in lists for item in items), dtype=np.int64, count=int(counts.sum()))
        return cls(flat, np.concatenate([[0], np.cumsum(counts)]))


def is_whitespace_run(text: bytes | None) -> bool:
    return bool(text) and len(text) > 1 and text.isspace()


def pieces_before_word(vocabulary: Vocabulary, text: str) -> list[int]:
    """The tokens `vocabulary`'s tokenizer gives a run of whitespace when a word follows it.

    GPT-2-style tokenizers split "\\n\\nThe" into `Ċ`, `Ċ`, `The`: the last whitespace character leaves the run,
    so their token for "\\n\\n" is only ever seen at the end of a text or before more whitespace.
    """
    ids = vocabulary.encode(text + WORD_AFTER)
    kept, length = [], 0
    for token_id in ids:
        surface = vocabulary.surfaces[token_id] or b""
        if length + len(surface) > len(text.encode("utf-8")):
            break
        kept.append(token_id)
        length += len(surface)
    return kept


def split_into_model_pieces(texts: list[bytes | None], model: Vocabulary) -> Pieces:
    """The model's tokens for each text (None or empty: no pieces), split as the model's tokenizer splits it
    in running text. Bytes that are not whole UTF-8 characters (a byte-level token can hold half a
    character) take the model's single-byte tokens where it has them."""
    single_bytes = {surface[0]: token_id for surface, token_id in surface_index(model).items() if len(surface) == 1}
    decoded: list[str] = []
    positions: list[int] = []
    lists: list[list[int]] = [[] for _ in texts]
    for position, text in enumerate(texts):
        if not text:
            continue
        try:
            string = text.decode("utf-8")
        except UnicodeDecodeError:
            lists[position] = [single_bytes[byte] for byte in text if byte in single_bytes]
            continue
        if is_whitespace_run(text):
            lists[position] = pieces_before_word(model, string)
        else:
            decoded.append(string)
            positions.append(position)
    for position, encoding in zip(positions, model.encoder.encode_batch(decoded, add_special_tokens=False)):
        lists[position] = encoding.ids
    return Pieces.from_lists(lists)
