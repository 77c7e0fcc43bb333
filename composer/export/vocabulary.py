"""A model's tokenizer as llama.cpp reads it from GGUF metadata.

Two kinds are written, both read from the tokenizer's `tokenizer.json` (transformers builds one for any fast tokenizer):
- byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen): `tokenizer.ggml.model = gpt2`, the vocabulary and the merge list,
  and `tokenizer.ggml.pre`, which tells llama.cpp how to split text before BPE (read off the pre-tokenizer);
- SentencePiece-style BPE with byte fallback (Llama 2, Gemma): `tokenizer.ggml.model = llama`, the pieces, and a
  score per piece. llama.cpp merges the neighbouring pair whose result scores highest, so a piece made by the k-th
  merge rule scores -k: it applies the rules in the order BPE does.
Special token ids, whether BOS/EOS are added, and the chat template come from the gguf package's SpecialVocab.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from composer.errors import ComposerError
from composer.sources.base import ModelSource

log = logging.getLogger("composer")

# llama.cpp's pre-tokenizer for the split rules of common byte-level tokenizers, as their tokenizer.json writes them
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


@dataclass
class Vocabulary:
    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]  # gguf.TokenType values
    scores: list[float] | None
    add_space_prefix: bool
    special: object  # gguf.SpecialVocab: merges, special ids, add_bos/add_eos, chat template

    def add_to(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_add_space_prefix(self.add_space_prefix)
        self.special.add_to_gguf(writer, quiet=True)


def read_vocabulary(source: ModelSource, rows: int, where: str) -> Vocabulary:
    """The tokenizer of `source` for a GGUF whose embedding has `rows` rows (extra rows get unused padding tokens)."""
    import gguf
    from transformers import AutoTokenizer

    if not source.has_tokenizer():
        raise ComposerError(
            f"{where} has no tokenizer, and llama.cpp needs one in the GGUF; add the tokenizer files to the model."
        )
    with tempfile.TemporaryDirectory(prefix="composer-gguf-tokenizer-") as scratch:
        copied, normalised = Path(scratch) / "copied", Path(scratch) / "saved"
        copied.mkdir()
        source.save_tokenizer(copied)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(copied))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ComposerError(f"{where}: transformers cannot load its tokenizer ({error}).") from None
        if not getattr(tokenizer, "is_fast", False):
            raise ComposerError(
                f"{where}: its tokenizer has no tokenizer.json form, which composer reads to write GGUF."
            )
        if not (copied / "tokenizer.json").is_file():  # SpecialVocab reads tokenizer.json: make one
            tokenizer.save_pretrained(str(normalised))
            copied = normalised
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        model = spec.get("model", {})
        byte_fallback = model.get("type") == "BPE" and bool(model.get("byte_fallback"))
        if model.get("type") != "BPE" or not (byte_fallback or _is_byte_level(spec.get("decoder"))):
            raise ComposerError(
                f"{where}: its tokenizer is {model.get('type')} without byte-level decoding or byte fallback; composer writes "
                "byte-level BPE and SentencePiece-style BPE tokenizers to GGUF."
            )
        tokens, types = _tokens(spec, rows, byte_fallback, where)
        quiet = logging.getLogger("gguf")  # its guesses about post-processors it half reads are not the user's concern
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            special = gguf.SpecialVocab(str(copied), load_merges=not byte_fallback, n_vocab=rows)
        finally:
            quiet.setLevel(level)
    _set_added_specials(special, tokenizer)
    if byte_fallback:
        return Vocabulary("llama", "default", tokens, types, _scores(spec, tokens), _prepends_space(spec), special)
    return Vocabulary("gpt2", _pre_tokenizer(spec, where), tokens, types, None, False, special)


def _is_byte_level(part) -> bool:
    if not isinstance(part, dict):
        return False
    if part.get("type") == "ByteLevel":
        return True
    return any(_is_byte_level(inner) for inner in part.get("decoders", part.get("pretokenizers", [])) or [])


def _tokens(spec: dict, rows: int, byte_fallback: bool, where: str) -> tuple[list[str], list[int]]:
    import gguf

    by_id: dict[int, str] = {index: text for text, index in spec["model"]["vocab"].items()}
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    by_id |= {index: entry["content"] for index, entry in added.items()}
    size = max(by_id) + 1 if by_id else 0
    if size > rows:
        raise ComposerError(
            f"{where}: its tokenizer has {size} tokens but the embedding only {rows} rows; llama.cpp needs a row per token."
        )
    unknown = spec["model"].get("unk_token")
    tokens, types = [], []
    for index in range(rows):
        text = by_id.get(index)
        if text is None:  # a row no token uses (embeddings padded to a round size)
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(text)
        if index in added:
            types.append(gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED)
        elif text == unknown:
            types.append(gguf.TokenType.UNKNOWN)
        elif byte_fallback and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(kind) for kind in types]


def _scores(spec: dict, tokens: list[str]) -> list[float]:
    """A score per piece: -k for the piece the k-th merge makes; pieces no merge makes score below every merge."""
    merges = spec["model"].get("merges") or []
    made_by: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        made_by.setdefault(left + right, rank)
    floor = -float(len(merges))
    return [-float(made_by[token]) if token in made_by else floor for token in tokens]


def _prepends_space(spec: dict) -> bool:
    """Whether the tokenizer puts '▁' before the text (Llama 2) or not (Gemma)."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text)


def _pre_tokenizer(spec: dict, where: str) -> str:
    """llama.cpp's name for how this byte-level tokenizer splits text before BPE."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [part.get("type") for part in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        name = SPLIT_PRE_TOKENIZERS.get((parts[0].get("pattern") or {}).get("Regex"))
        if name is not None:
            return name
    log.warning(
        "%s: llama.cpp has no known name for this tokenizer's pre-tokenizer (%s); the GGUF says 'default', so llama.cpp "
        "may split some text into other tokens than transformers does.",
        where,
        ", ".join(str(kind) for kind in kinds) or "none",
    )
    return "default"


def _set_added_specials(special, tokenizer) -> None:
    """Whether llama.cpp adds BOS and EOS, as the tokenizer itself does (more reliable than reading its post-processor)."""
    ids = tokenizer("a")["input_ids"]
    for role in ("bos", "eos"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        position = 0 if role == "bos" else -1
        special.add_special_token[role] = bool(ids) and token_id is not None and ids[position] == token_id
