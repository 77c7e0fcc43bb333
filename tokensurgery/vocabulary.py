"""What text each token of a vocabulary stands for, whatever convention its tokenizer stores it in.

Tokenizers store tokens in different alphabets:

- byte-level BPE (GPT-2, Llama 3, SmolLM, Qwen): every byte is shown as a printable character, so a
  space is `Ġ`, a newline `Ċ`, and "ção" is stored as `Ã§Ã£o` (the UTF-8 bytes c3 a7 c3 a3 6f);
- SentencePiece (Gemma, Llama 2, T5): `▁` marks a space, and byte-fallback tokens `<0x41>` stand for one byte;
- WordPiece (BERT): `##` marks a piece that continues a word; every other piece starts a word.

`Vocabulary.surfaces[i]` is the UTF-8 bytes of the text token `i` stands for (with a leading space for a
word-start marker), or None for a control token (bos, eos, `<unused0>`, ...). The byte-level alphabet is
decoded only inside a byte-level vocabulary: a literal `Ċ` in a SentencePiece vocabulary is the letter Ċ.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from tokensurgery.errors import TokenSurgeryError

BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
ROLES = ("bos", "eos", "pad", "unk", "cls", "sep", "mask")


class Scheme(str, Enum):
    BYTE_LEVEL = "byte-level BPE"
    SENTENCEPIECE = "SentencePiece"
    WORDPIECE = "WordPiece"
    PLAIN = "plain"


# llama.cpp's names for tokenizers in GGUF metadata ('tokenizer.ggml.model'). Its BERT vocabularies mark a word's
# start with `▁` (and drop WordPiece's `##`), so they read as SentencePiece ones.
GGUF_SCHEMES = {
    "gpt2": Scheme.BYTE_LEVEL,
    "llama": Scheme.SENTENCEPIECE,
    "t5": Scheme.SENTENCEPIECE,
    "bert": Scheme.SENTENCEPIECE,
}
GGUF_TOKEN_TYPES = {"normal": 1, "unknown": 2, "control": 3, "user-defined": 4, "unused": 5, "byte": 6}
GGUF_ROLE_KEYS = {
    "bos": "bos_token_id",
    "eos": "eos_token_id",
    "unk": "unknown_token_id",
    "pad": "padding_token_id",
    "sep": "seperator_token_id",  # llama.cpp's spelling
    "cls": "cls_token_id",
    "mask": "mask_token_id",
}


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: printable character -> the byte it shows.

    Printable Latin-1 bytes show as themselves; the other 68 bytes (controls, space, 0x7f-0xa0, 0xad) show
    as U+0100 onwards, in byte order. So a space (0x20) is U+0120 `Ġ` and a newline (0x0a) is U+010A `Ċ`.
    """
    shown_as_self = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {chr(byte): byte for byte in shown_as_self}
    shifted = 0
    for byte in range(256):
        if byte not in alphabet.values():
            alphabet[chr(256 + shifted)] = byte
            shifted += 1
    return alphabet


def _component_types(settings: Any) -> set[str]:
    """Every `type` named in a tokenizer.json component, looking inside Sequence components."""
    if isinstance(settings, dict):
        found = {settings["type"]} if isinstance(settings.get("type"), str) else set()
        for value in settings.values():
            found |= _component_types(value)
        return found
    if isinstance(settings, list):
        return set().union(*(_component_types(value) for value in settings)) if settings else set()
    return set()


def _metaspace_character(spec: dict) -> str | None:
    """The word-start marker of a SentencePiece-style tokenizer (`▁`), if it has one."""
    for component in (spec.get("decoder"), spec.get("pre_tokenizer"), spec.get("normalizer")):
        text = json.dumps(component or {}, ensure_ascii=False)
        if '"Metaspace"' in text:
            match = re.search(r'"replacement":\s*"(.)"', text)
            return match.group(1) if match else "▁"
        if "▁" in text:
            return "▁"
    return None


def detect_scheme(spec: dict) -> Scheme:
    model_type = (spec.get("model") or {}).get("type")
    if model_type == "WordPiece":
        return Scheme.WORDPIECE
    if "ByteLevel" in _component_types(spec.get("pre_tokenizer")) | _component_types(spec.get("decoder")):
        return Scheme.BYTE_LEVEL
    if (
        _metaspace_character(spec) is not None
        or model_type == "Unigram"
        or (spec.get("model") or {}).get("byte_fallback")
    ):
        return Scheme.SENTENCEPIECE
    return Scheme.PLAIN


def _surface(token: str, scheme: Scheme, marker: str | None, byte_fallback: bool, continuing_prefix: str) -> bytes:
    if scheme is Scheme.BYTE_LEVEL:
        alphabet = byte_level_alphabet()
        if all(character in alphabet for character in token):
            return bytes(alphabet[character] for character in token)
        return token.encode("utf-8")  # a token outside the alphabet (rare, hand-added): its text as written
    if byte_fallback and (match := BYTE_TOKEN.match(token)):
        return bytes([int(match.group(1), 16)])
    if scheme is Scheme.SENTENCEPIECE and marker:
        return token.replace(marker, " ").encode("utf-8")
    if scheme is Scheme.WORDPIECE:
        if continuing_prefix and token.startswith(continuing_prefix) and len(token) > len(continuing_prefix):
            return token[len(continuing_prefix) :].encode("utf-8")
        # a word-start piece follows a space in running text, except punctuation, which BERT splits off words
        return (" " + token if token[:1].isalnum() else token).encode("utf-8")
    return token.encode("utf-8")


@dataclass
class Vocabulary:
    """A tokenizer's vocabulary in id order, with the text each token stands for."""

    tokens: list[str]
    surfaces: list[bytes | None]
    special: list[bool]
    scheme: Scheme
    roles: dict[str, int] = field(default_factory=dict)  # "bos" -> id, ...
    name: str = "tokenizer"
    encoder: Any = None  # a `tokenizers.Tokenizer` that splits text exactly as given (see `verbatim_tokenizer`)
    adds_bos: bool = False  # whether the tokenizer puts its bos token before every text

    def encode(self, text: str) -> list[int]:
        """The ids this tokenizer gives `text` on its own (no bos/eos, no space put in front)."""
        if self.encoder is None:
            raise TokenSurgeryError(
                f"The vocabulary of {self.name} was read without its tokenizer, so it cannot split text."
            )
        return self.encoder.encode(text, add_special_tokens=False).ids

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def _ids(self) -> dict[str, int]:
        return {text: index for index, text in enumerate(self.tokens)}

    def id_of(self, token: str) -> int | None:
        return self._ids.get(token)

    @classmethod
    def from_tokenizer_json(
        cls, spec: dict | str, roles: dict[str, int] | None = None, name: str = "tokenizer"
    ) -> Vocabulary:
        """From the contents of a tokenizer.json (a dict, or its text)."""
        if isinstance(spec, str):
            spec = json.loads(spec)
        model = spec.get("model") or {}
        vocab = model.get("vocab")
        if isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
            pairs = [(entry[0], index) for index, entry in enumerate(vocab)]
        elif isinstance(vocab, dict):
            pairs = list(vocab.items())
        else:
            raise TokenSurgeryError(
                f"The tokenizer of {name} has no vocabulary in its tokenizer.json (model type {model.get('type')!r})."
            )
        added = {entry["id"]: entry for entry in spec.get("added_tokens") or []}
        size = max([index for _, index in pairs] + list(added) + [-1]) + 1
        tokens = [""] * size
        for text, index in pairs:
            tokens[index] = text
        scheme = detect_scheme(spec)
        marker = _metaspace_character(spec)
        byte_fallback = bool(model.get("byte_fallback")) or scheme is Scheme.SENTENCEPIECE
        prefix = model.get("continuing_subword_prefix") or ("##" if scheme is Scheme.WORDPIECE else "")
        surfaces: list[bytes | None] = [
            _surface(text, scheme, marker, byte_fallback, prefix) if text else None for text in tokens
        ]
        special = [False] * size
        for index, entry in added.items():
            tokens[index] = entry["content"]
            special[index] = bool(entry.get("special"))
            # an added token is matched in raw text before the normaliser runs: its content is its text
            surfaces[index] = None if special[index] else entry["content"].encode("utf-8")
        return cls(tokens, surfaces, special, scheme, dict(roles or {}), name)

    @classmethod
    def from_tokenizer(
        cls, tokenizer, name: str = "tokenizer", spec: dict | None = None, splits_text: bool = True
    ) -> Vocabulary:
        """From a transformers fast tokenizer (or a `tokenizers.Tokenizer`). `spec`: its backend's tokenizer.json
        contents where the caller has parsed them already (a large vocabulary's take seconds to write and parse).
        `splits_text=False` leaves out the encoder (2.7 s for Gemma 3's 262,144 tokens): the vocabulary then aligns
        by token text alone, without telling twins apart by the one its tokenizer writes."""
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if not hasattr(backend, "to_str"):
            raise TokenSurgeryError(
                f"The tokenizer of {name} has no fast (tokenizers) version, so its vocabulary cannot be read."
            )
        roles = {}
        for role in ROLES:
            index = getattr(tokenizer, f"{role}_token_id", None)
            if isinstance(index, int):
                roles[role] = index
        if spec is None:
            spec = json.loads(backend.to_str())
        vocabulary = cls.from_tokenizer_json(spec, roles, name)
        vocabulary.encoder = verbatim_tokenizer(spec) if splits_text else None
        bos = roles.get("bos")
        try:
            vocabulary.adds_bos = bos is not None and backend.encode("a").ids[:1] == [bos]
        except Exception:  # a tokenizer that cannot encode plain text on its own adds nothing we can see
            vocabulary.adds_bos = False
        return vocabulary

    @classmethod
    def from_gguf_metadata(cls, metadata: dict, name: str = "tokenizer") -> Vocabulary:
        """From a GGUF file's `tokenizer.ggml.*` metadata, arrays whole: the tokens in id order, llama.cpp's type
        of each (GGUF_TOKEN_TYPES) and the tokenizer model (GGUF_SCHEMES). Control and unknown tokens are special;
        a user-defined token stands for its text as written (as a tokenizer.json's added token does), and in a
        SentencePiece vocabulary its spaces are the word marker, as in the pieces `▁▁`, `▁▁▁` that GGUF stores
        as spaces. No encoder: the vocabulary cannot split text."""
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
            raise TokenSurgeryError(f"{name} has no vocabulary in its GGUF metadata ('tokenizer.ggml.tokens').")
        kinds = metadata.get("tokenizer.ggml.token_type")
        if kinds is None:
            kinds = [GGUF_TOKEN_TYPES["normal"]] * len(tokens)
        if not isinstance(kinds, list) or len(kinds) != len(tokens):
            raise TokenSurgeryError(
                f"{name}: its GGUF metadata 'tokenizer.ggml.token_type' does not give one type for each of the "
                f"{len(tokens)} tokens."
            )
        scheme = GGUF_SCHEMES.get(metadata.get("tokenizer.ggml.model"), Scheme.PLAIN)
        marker = "▁" if scheme is Scheme.SENTENCEPIECE else None
        surfaces: list[bytes | None] = []
        special = []
        shown = list(tokens)
        for index, (token, kind) in enumerate(zip(tokens, kinds)):
            control = kind in (GGUF_TOKEN_TYPES["control"], GGUF_TOKEN_TYPES["unknown"])
            special.append(control)
            if control:
                surfaces.append(None)
            elif kind == GGUF_TOKEN_TYPES["user-defined"]:
                surfaces.append(token.encode("utf-8"))
                if marker:
                    shown[index] = token.replace(" ", marker)
            else:
                surfaces.append(_surface(token, scheme, marker, scheme is Scheme.SENTENCEPIECE, ""))
        roles = {
            role: metadata[f"tokenizer.ggml.{key}"]
            for role, key in GGUF_ROLE_KEYS.items()
            if isinstance(metadata.get(f"tokenizer.ggml.{key}"), int)
            and 0 <= metadata[f"tokenizer.ggml.{key}"] < len(tokens)
        }
        vocabulary = cls(shown, surfaces, special, scheme, roles, name)
        vocabulary.adds_bos = bool(metadata.get("tokenizer.ggml.add_bos_token")) and "bos" in roles
        return vocabulary

    @classmethod
    def from_folder(cls, folder: Path | str, name: str | None = None) -> Vocabulary:
        return cls.from_tokenizer(load_tokenizer(folder), name or str(folder))


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def load_tokenizer(folder: Path | str):
    """A transformers fast tokenizer from a model or tokenizer folder, with a clear error when there is none."""
    from transformers import AutoTokenizer

    path = Path(folder)
    if not path.is_dir() or not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise TokenSurgeryError(
            f"{folder} has no tokenizer: a tokenizer folder needs tokenizer.json (or tokenizer.model, vocab.json + merges.txt, vocab.txt)."
        )
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as error:  # noqa: BLE001  (damaged files make transformers and tokenizers raise many types: KeyError, ...)
        text = " ".join(str(error).split()) or "no message"
        raise TokenSurgeryError(
            f"The tokenizer in {folder} could not be loaded with transformers ({type(error).__name__}: {text[:400]})"
        ) from None


def _verbatim(settings):
    """A tokenizer.json component changed so that it encodes text as given: no space put before the first
    word (a SentencePiece tokenizer would otherwise read "ing" as " ing")."""
    if isinstance(settings, list):
        return [_verbatim(item) for item in settings if not (isinstance(item, dict) and item.get("type") == "Prepend")]
    if not isinstance(settings, dict):
        return settings
    if settings.get("type") == "Prepend":
        return None
    changed = {key: _verbatim(value) for key, value in settings.items()}
    if changed.get("type") == "Metaspace":
        changed["prepend_scheme"] = "never"
        changed["add_prefix_space"] = False
    if changed.get("type") == "ByteLevel":
        changed["add_prefix_space"] = False
    return changed


def verbatim_tokenizer(spec: dict):
    """A `tokenizers.Tokenizer` built from a tokenizer.json's contents that splits text exactly as given,
    with no bos/eos around it."""
    from tokenizers import Tokenizer

    changed = dict(
        spec,
        normalizer=_verbatim(spec.get("normalizer")),
        pre_tokenizer=_verbatim(spec.get("pre_tokenizer")),
        post_processor=None,
    )
    return Tokenizer.from_str(json.dumps(changed))


def surface_index(vocabulary: Vocabulary) -> dict[bytes, int]:
    """Text -> id, preferring an ordinary token to a byte-fallback token for the same byte, then the lower id."""
    index: dict[bytes, int] = {}
    byte_tokens: dict[bytes, int] = {}
    for token_id, (token, surface) in enumerate(zip(vocabulary.tokens, vocabulary.surfaces)):
        if not surface:
            continue
        place = byte_tokens if BYTE_TOKEN.match(token) else index
        place.setdefault(surface, token_id)
    for surface, token_id in byte_tokens.items():
        index.setdefault(surface, token_id)
    return index
