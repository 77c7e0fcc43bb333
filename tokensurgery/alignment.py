"""Which token of one vocabulary stands for the same text as each token of another.

`align(model, target)` answers, for every id of `target` (the vocabulary a model is to speak), the id of
`model`'s token whose row it should take, or -1 when the row must be estimated, and how it was decided.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from tokensurgery.pieces import is_whitespace_run, pieces_before_word
from tokensurgery.vocabulary import BYTE_TOKEN, Vocabulary, surface_index

# turn markers of chat templates, by role; a target's marker takes the row of the model's marker of the same role
CHAT_ROLES = {
    "turn_start": ("<|im_start|>", "<start_of_turn>", "<|start_header_id|>", "<|turn_start|>"),
    "turn_end": ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|turn_end|>"),
}
# a role a vocabulary lacks is looked for under these (BERT has [CLS] and [SEP] where a causal LM has bos and eos)
ROLE_STAND_INS = {
    "bos": ("bos", "cls"),
    "eos": ("eos", "sep"),
    "cls": ("cls", "bos"),
    "sep": ("sep", "eos"),
    "pad": ("pad", "eos"),
    "unk": ("unk",),
    "mask": ("mask",),
}
# tokens that separate documents in pretraining data
DOCUMENT_SEPARATORS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|end|>")


class Match(IntEnum):
    EXACT = 0  # the same token string standing for the same text (or a control token with the same name): copied
    NORMALISED = (
        1  # the same text under another convention (`Ġhello` and `▁hello`, `Ã§` and `ç`, `<0x41>` and `A`): copied
    )
    SPECIAL = 2  # a control token mapped by its role (bos, eos, pad, chat turn markers): copied
    NEW = 3  # text the model has no single token for: estimated
    SPLIT = 4  # a whitespace run the model's tokenizer never keeps whole in front of a word: composed from the pieces it uses there
    CONTROL = 5  # a control token with no counterpart (`<unused0>`, image markers): filler row
    TWIN = 6  # a second spelling of a copied token that the target tokenizer never produces (`<0x2E>` beside `.`): filler row


@dataclass
class Alignment:
    """`source_ids[i]` is the model's id whose row target token i takes (-1: estimated or filled); `kinds[i]` says why."""

    model: Vocabulary
    target: Vocabulary
    source_ids: np.ndarray
    kinds: np.ndarray

    def counts(self) -> dict[str, int]:
        return {kind.name.lower(): int((self.kinds == kind).sum()) for kind in Match}

    @property
    def copied(self) -> np.ndarray:
        """Target ids whose rows are copied from the model."""
        return np.flatnonzero(self.source_ids >= 0)

    def ids_of(self, *kinds: Match) -> np.ndarray:
        return np.flatnonzero(np.isin(self.kinds, [int(kind) for kind in kinds]))

    def is_identity(self) -> bool:
        return len(self.model) == len(self.target) and bool((self.source_ids == np.arange(len(self.target))).all())


def _is_control(vocabulary: Vocabulary, token_id: int) -> bool:
    return vocabulary.special[token_id] or vocabulary.surfaces[token_id] is None


def _role_ids(vocabulary: Vocabulary) -> dict[str, int]:
    roles = dict(vocabulary.roles)
    for role, names in CHAT_ROLES.items():
        for name in names:
            token_id = vocabulary.id_of(name)
            if token_id is not None:
                roles.setdefault(role, token_id)
                break
    return roles


def _document_start(model: Vocabulary) -> int | None:
    """The model's token in front of a document. A model whose tokenizer adds no bos (SmolLM, GPT-2) saw its
    documents separated by an end-of-text token, never its nominal bos, so that token is what it expects."""
    if model.adds_bos or "bos" not in model.roles:
        return model.roles.get("bos")
    for name in DOCUMENT_SEPARATORS:
        token_id = model.id_of(name)
        if token_id is not None and _is_control(model, token_id):
            return token_id
    return model.roles.get("bos")


def _control_matches(model: Vocabulary, target: Vocabulary) -> dict[int, tuple[int, Match]]:
    """target id -> (model id, how) for control tokens: the same name first, then the same role."""
    found: dict[int, tuple[int, Match]] = {}
    model_controls = {model.tokens[i]: i for i in range(len(model)) if _is_control(model, i)}
    for token_id in range(len(target)):
        if _is_control(target, token_id) and target.tokens[token_id] in model_controls:
            found[token_id] = (model_controls[target.tokens[token_id]], Match.EXACT)
    model_roles, target_roles = _role_ids(model), _role_ids(target)
    if target.adds_bos and (start := _document_start(model)) is not None:
        model_roles["bos"] = start
    for role, target_id in target_roles.items():
        if target_id in found or not _is_control(target, target_id):
            continue
        for stand_in in ROLE_STAND_INS.get(role, (role,)):
            if stand_in in model_roles:
                found[target_id] = (model_roles[stand_in], Match.SPECIAL)
                break
    return found


def _set_apart_twins(target: Vocabulary, source_ids: np.ndarray, kinds: np.ndarray) -> None:
    """Where several target tokens would copy one model row, only the one the target's tokenizer produces keeps it.

    A SentencePiece vocabulary holds `.` and its byte-fallback twin `<0x2E>`; the tokenizer only ever writes
    `.`. Were both given the row of the model's `.`, every prediction of "." would be split between them.
    Likewise a pad token that shares its row with eos would halve the end of every answer.
    """
    takers: dict[int, list[int]] = defaultdict(list)
    for token_id in np.flatnonzero(source_ids >= 0):
        takers[int(source_ids[token_id])].append(int(token_id))
    pad = target.roles.get("pad")
    for group in (ids for ids in takers.values() if len(ids) > 1):
        controls = [token_id for token_id in group if _is_control(target, token_id)]
        texts = [token_id for token_id in group if token_id not in controls]
        if pad in controls and len(controls) > 1:
            source_ids[pad], kinds[pad] = -1, Match.TWIN
        if len(texts) > 1:
            keeper = _produced(target, texts)
            for token_id in texts:
                if token_id != keeper:
                    source_ids[token_id], kinds[token_id] = -1, Match.TWIN


def _produced(target: Vocabulary, candidates: list[int]) -> int:
    """Of target tokens for the same text, the one its tokenizer writes that text with."""
    surface = target.surfaces[candidates[0]]
    if target.encoder is not None:
        try:
            ids = target.encode(surface.decode("utf-8"))
        except UnicodeDecodeError:
            ids = []
        if len(ids) == 1 and ids[0] in candidates:
            return ids[0]
    ordinary = [token_id for token_id in candidates if not BYTE_TOKEN.match(target.tokens[token_id])]
    return min(ordinary or candidates)


def _split_whitespace_runs(model: Vocabulary, target: Vocabulary, source_ids: np.ndarray, kinds: np.ndarray) -> None:
    """A whitespace run the target's tokenizer keeps whole in front of a word but the model's never does
    (`\\n\\n` before a paragraph: `Ċ Ċ The` in GPT-2 style) takes the pieces the model uses there: the model has only
    seen its own `ĊĊ` at the end of a text, and reading it before a word costs a whole paragraph's predictions."""
    if model.encoder is None or target.encoder is None:
        return
    for token_id in np.flatnonzero(source_ids >= 0):
        surface = target.surfaces[token_id]
        if not is_whitespace_run(surface) or _is_control(target, token_id):
            continue
        text = surface.decode("utf-8")
        if pieces_before_word(target, text) == [token_id] and pieces_before_word(model, text) != [source_ids[token_id]]:
            source_ids[token_id], kinds[token_id] = -1, Match.SPLIT


def align(model: Vocabulary, target: Vocabulary) -> Alignment:
    """For each token of `target`, the token of `model` whose row it takes (or -1), and why."""
    by_surface = surface_index(model)
    controls = _control_matches(model, target)
    source_ids = np.full(len(target), -1, dtype=np.int64)
    kinds = np.full(len(target), Match.NEW, dtype=np.int8)
    for token_id, (token, surface) in enumerate(zip(target.tokens, target.surfaces)):
        if token_id in controls:
            source_ids[token_id], kinds[token_id] = controls[token_id]
        elif _is_control(target, token_id):
            kinds[token_id] = Match.CONTROL
        elif (same := model.id_of(token)) is not None and model.surfaces[same] == surface:
            source_ids[token_id], kinds[token_id] = same, Match.EXACT
        elif (model_id := by_surface.get(surface)) is not None:
            source_ids[token_id], kinds[token_id] = model_id, Match.NORMALISED
    _set_apart_twins(target, source_ids, kinds)
    _split_whitespace_runs(model, target, source_ids, kinds)
    return Alignment(model, target, source_ids, kinds)
