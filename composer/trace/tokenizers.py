"""Tokenizer commonality: how much of SUSPECT's vocabulary (as text, not ids) a candidate has, whether the ids
are in the same order, and whether merges, special tokens, chat template, normalizer and pre-tokenizer are the
same. Tokens are compared by the text they stand for (tokensurgery's Vocabulary), so a byte-level `Ġhello`
and a SentencePiece `▁hello` are one token."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from types import SimpleNamespace

from composer.errors import ComposerError
from composer.files import read_json_object
from composer.sources import ModelSource
from composer.sources.base import TOKENIZER_FILES
from composer.sources.tokenizer import load_source_tokenizer

UNRELATED_BELOW = 0.3  # shares of vocabulary under this are what any two tokenizers of one script have in common

# A tokenizer folder whose tokenizer_config.json says no more than these keys, with a tokenizer.json whose special
# tokens it names are there already, is one transformers' TokenizersBackend hands on as tokenizer.json has it: it is
# read with the tokenizers library alone, without importing transformers (over a second of CPU). Any other key
# (add_bos_token, add_prefix_space, added or extra special tokens, ...) can change what transformers builds.
ROLES = ("bos", "eos", "pad", "unk", "cls", "sep", "mask")
PLAIN_CONFIG_KEYS = frozenset(
    {f"{role}_token" for role in ROLES}
    | {"backend", "tokenizer_class", "model_max_length", "is_local", "local_files_only", "chat_template"}
    | {"clean_up_tokenization_spaces", "padding_side", "truncation_side", "model_input_names"}
)
PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
TRANSFORMERS_ONLY_FILES = ("special_tokens_map.json", "added_tokens.json", "chat_template.json")


@dataclass
class TokenizerFacts:
    tokens: list[str]
    keys: list[object]  # per id: the text it stands for, or ("control", token) for control tokens
    merges: str | None  # merges_digest
    special: list[tuple[str, bool]]
    chat_template: str | None
    normalizer: object
    pre_tokenizer: object
    vocabulary: object = None  # tokensurgery's Vocabulary, for aligning embedding rows


@dataclass
class TokenizerComparison:
    model: str
    verdict: str  # is | extends | shares | unrelated | unknown
    shared_vocab: float | None
    same_ids: bool | None
    same_merges: bool | None = None
    same_special_tokens: bool | None = None
    same_chat_template: bool | None = None
    same_normalizer: bool | None = None
    same_pre_tokenizer: bool | None = None
    note: str = ""

    def line(self) -> str:
        if self.verdict == "unknown":
            return f"{self.model}: unknown ({self.note})"
        shown = f"shares {self.shared_vocab:.0%}" if self.verdict == "shares" else self.verdict
        same = [
            label
            for label, value in (
                ("ids", self.same_ids),
                ("merges", self.same_merges),
                ("special tokens", self.same_special_tokens),
                ("chat template", self.same_chat_template),
                ("normalizer", self.same_normalizer),
                ("pre-tokenizer", self.same_pre_tokenizer),
            )
            if value
        ]
        return f"{self.model}: {shown} ({self.shared_vocab:.1%} of SUSPECT's vocabulary; same {', '.join(same) or 'nothing else'})"


def tokenizer_key(source: ModelSource) -> str | None:
    """A digest of a model folder's tokenizer files: models whose files are equal (fine-tunes and merges of one
    base usually are) have equal facts, read once. None for other sources (GGUF, hub) and without tokenizer."""
    folder_file = getattr(source, "folder_file", None)
    if folder_file is None or not source.has_tokenizer():
        return None
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = folder_file(name)
        if path is not None:
            digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def tokenizer_facts(source: ModelSource) -> TokenizerFacts | None:
    """None when the model has no tokenizer files."""
    from tokensurgery import TokenSurgeryError, Vocabulary

    if not source.has_tokenizer():
        return None
    plain = plain_tokenizer(source)
    tokenizer = plain or load_source_tokenizer(source, "tokenizer commonality needs one")
    spec = plain.spec if plain is not None else json.loads(tokenizer.backend_tokenizer.to_str())
    try:
        vocabulary = Vocabulary.from_tokenizer(tokenizer, source.reference, spec=spec)
    except (TokenSurgeryError, ValueError, KeyError) as error:
        raise ComposerError(f"The tokenizer of '{source.reference}' cannot be read: {error}") from None
    keys: list[object] = [
        surface if surface is not None else ("control", token)
        for token, surface in zip(vocabulary.tokens, vocabulary.surfaces)
    ]
    special = sorted((entry["content"], bool(entry.get("special"))) for entry in spec.get("added_tokens") or [])
    return TokenizerFacts(
        vocabulary.tokens,
        keys,
        merges_digest((spec.get("model") or {}).get("merges")),
        special,
        getattr(tokenizer, "chat_template", None),
        spec.get("normalizer"),
        spec.get("pre_tokenizer"),
        vocabulary,
    )


def merges_digest(merges: object) -> str | None:
    """A digest of a BPE tokenizer's merges (None without them): they are only compared for equality, and kept
    whole, a large vocabulary's took 167 MB for the whole trace (Gemma 3's 514,906 merges)."""
    if merges is None:
        return None
    return hashlib.sha256(json.dumps(merges, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def plain_tokenizer(source: ModelSource) -> SimpleNamespace | None:
    """What tokenizer_facts reads of transformers' tokenizer (the backend, the roles' ids, the chat template; and the
    tokenizer.json's contents as `spec`, parsed once), from a folder's tokenizer.json by the tokenizers library
    alone, where transformers would load that file unchanged (PLAIN_CONFIG_KEYS); None elsewhere (and for files it
    cannot parse: transformers then says what is wrong)."""
    from tokenizers import Tokenizer

    folder_file = getattr(source, "folder_file", None)
    if folder_file is None or any(folder_file(name) is not None for name in TRANSFORMERS_ONLY_FILES):
        return None
    spec_path, config_path = folder_file("tokenizer.json"), folder_file("tokenizer_config.json")
    if spec_path is None or config_path is None:
        return None
    try:
        config = read_json_object(config_path, "tokenizer config")
    except Exception:  # noqa: BLE001  (ComposerError, or anything else: transformers then says what is wrong)
        return None
    if not set(config) <= PLAIN_CONFIG_KEYS or config.get("tokenizer_class") not in PLAIN_CLASSES:
        return None  # decided before the tokenizer.json is parsed: a large one takes seconds
    try:
        backend = Tokenizer.from_file(str(spec_path))
    except Exception:  # noqa: BLE001  (a bare Exception from tokenizers on a bad file)
        return None
    if backend.get_vocab_size() > 100_000:  # transformers may patch the pre-tokenizer of large (Mistral) ones
        return None
    # transformers adds each named token as a special one (special, not normalised, nothing stripped): it must be one
    spec = json.loads(backend.to_str())
    added = {entry.get("content"): entry for entry in spec.get("added_tokens") or []}
    plain = {"special": True, "normalized": False, "lstrip": False, "rstrip": False, "single_word": False}
    ids = {}
    for role in ROLES:
        token = config.get(f"{role}_token")
        if token is None:
            ids[f"{role}_token_id"] = None
            continue
        entry = added.get(token) if isinstance(token, str) else None
        if entry is None or any(entry.get(key) != value for key, value in plain.items()):
            return None
        ids[f"{role}_token_id"] = entry["id"]
    template_path = folder_file("chat_template.jinja")
    template = config.get("chat_template")
    if template_path is not None:
        template = template_path.read_text(encoding="utf-8")
    elif template is not None and not isinstance(template, str):
        return None
    return SimpleNamespace(backend_tokenizer=backend, chat_template=template, spec=spec, **ids)


def compare_tokenizers(
    model: str, suspect: TokenizerFacts | None, candidate: TokenizerFacts | None
) -> TokenizerComparison:
    if suspect is None or candidate is None:
        which = "SUSPECT has" if suspect is None else "the candidate has"
        return TokenizerComparison(model, "unknown", None, None, note=f"{which} no tokenizer files")
    theirs = {}
    for index, key in enumerate(candidate.keys):
        theirs.setdefault(key, index)
    present = [key for key in suspect.keys if key in theirs]
    shared = len(present) / max(len(suspect.keys), 1)
    same_ids = all(theirs.get(key) == index for index, key in enumerate(suspect.keys) if key in theirs)
    comparison = TokenizerComparison(
        model,
        "",
        shared,
        same_ids,
        suspect.merges == candidate.merges,
        suspect.special == candidate.special,
        suspect.chat_template == candidate.chat_template,
        suspect.normalizer == candidate.normalizer,
        suspect.pre_tokenizer == candidate.pre_tokenizer,
    )
    if suspect.keys == candidate.keys and comparison.same_merges:
        comparison.verdict = "is"
    elif same_ids and len(candidate.keys) < len(suspect.keys) and set(candidate.keys) <= set(suspect.keys):
        comparison.verdict = "extends"  # SUSPECT is the candidate's vocabulary with tokens added after it
    elif shared >= UNRELATED_BELOW:
        comparison.verdict = "shares"
    else:
        comparison.verdict = "unrelated"
    return comparison
