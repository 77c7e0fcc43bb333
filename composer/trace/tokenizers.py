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
from tokensurgery.vocabulary import GGUF_TOKEN_TYPES, Scheme

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
    stored_as: str = "tokenizer.json"  # or "gguf": normalizer and pre-tokenizer compare only within one format
    merges_from: str = "merges"  # or "scores": a SentencePiece GGUF keeps scores, not merges (see gguf_facts)


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
        facts = (
            ("ids", self.same_ids),
            ("merges", self.same_merges),
            ("special tokens", self.same_special_tokens),
            ("chat template", self.same_chat_template),
            ("normalizer", self.same_normalizer),
            ("pre-tokenizer", self.same_pre_tokenizer),
        )
        same = [label for label, value in facts if value]
        unknown = [label for label, value in facts if value is None]
        untold = f"; {', '.join(unknown)} not comparable between GGUF and tokenizer.json" if unknown else ""
        return f"{self.model}: {shown} ({self.shared_vocab:.1%} of SUSPECT's vocabulary; same {', '.join(same) or 'nothing else'}{untold})"


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
    gguf_metadata = getattr(source, "tokenizer_metadata", None)
    if gguf_metadata is not None:
        return gguf_facts(gguf_metadata(), source.reference)
    plain = plain_tokenizer(source)
    tokenizer = plain or load_source_tokenizer(source, "tokenizer commonality needs one")
    spec = plain.spec if plain is not None else json.loads(tokenizer.backend_tokenizer.to_str())
    try:
        vocabulary = Vocabulary.from_tokenizer(tokenizer, source.reference, spec=spec, splits_text=False)
    except (TokenSurgeryError, ValueError, KeyError) as error:
        raise ComposerError(f"The tokenizer of '{source.reference}' cannot be read: {error}") from None
    special = sorted((entry["content"], bool(entry.get("special"))) for entry in spec.get("added_tokens") or [])
    return TokenizerFacts(
        vocabulary.tokens,
        comparison_keys(vocabulary),
        merges_digest((spec.get("model") or {}).get("merges")),
        special,
        getattr(tokenizer, "chat_template", None),
        spec.get("normalizer"),
        spec.get("pre_tokenizer"),
        vocabulary,
    )


def comparison_keys(vocabulary) -> list[object]:
    """Per id, what a token is compared by: the text it stands for, or ("control", token) for a control token."""
    return [
        surface if surface is not None else ("control", token)
        for token, surface in zip(vocabulary.tokens, vocabulary.surfaces)
    ]


def gguf_facts(metadata: dict, reference: str) -> TokenizerFacts:
    """The facts of a GGUF file's tokenizer, from its metadata alone (transformers' conversion of Gemma 3's
    262,144 tokens into a tokenizer took 34 s and 1 GB). Its merges, stored as "left right", are compared as a
    tokenizer.json's pairs are. A SentencePiece GGUF stores scores instead of merges (transformers derives the
    merges from them), so its merges compare only with another GGUF's scores; its normalizer and pre-tokenizer are
    llama.cpp's names for them, which compare only with another GGUF's."""
    from tokensurgery import TokenSurgeryError, Vocabulary

    try:
        vocabulary = Vocabulary.from_gguf_metadata(metadata, reference)
    except TokenSurgeryError as error:
        raise ComposerError(f"The tokenizer of '{reference}' cannot be read: {error}") from None
    merges = metadata.get("tokenizer.ggml.merges")
    merges_from = "merges"
    if isinstance(merges, list):
        digest = merges_digest([merge_pair(merge, reference) for merge in merges])
    elif merges is not None:
        raise ComposerError(
            f"The tokenizer of '{reference}' cannot be read: its GGUF metadata 'tokenizer.ggml.merges' is not a list "
            "of strings; the file is damaged."
        )
    elif isinstance(metadata.get("tokenizer.ggml.scores"), list):
        digest, merges_from = merges_digest(metadata["tokenizer.ggml.scores"]), "scores"
    else:
        digest = None
    added = {GGUF_TOKEN_TYPES[kind] for kind in ("control", "unknown", "user-defined")}
    kinds = metadata.get("tokenizer.ggml.token_type") or []
    special = sorted(
        (token, kind != GGUF_TOKEN_TYPES["user-defined"])
        for token, kind in zip(metadata["tokenizer.ggml.tokens"], kinds)
        if kind in added and not (vocabulary.scheme is Scheme.SENTENCEPIECE and token and not token.strip(" "))
    )
    template = metadata.get("tokenizer.chat_template")
    return TokenizerFacts(
        vocabulary.tokens,
        comparison_keys(vocabulary),
        digest,
        special,
        template if isinstance(template, str) else None,
        {"model": metadata.get("tokenizer.ggml.model")},
        {"pre": metadata.get("tokenizer.ggml.pre")},
        vocabulary,
        stored_as="gguf",
        merges_from=merges_from,
    )


def merge_pair(merge: str, reference: str) -> list[str]:
    """A GGUF merge "left right" as a tokenizer.json's pair; the separator is the first space after the first
    character (a left part may be a space)."""
    separator = merge.find(" ", 1) if isinstance(merge, str) else -1
    if separator < 0:
        raise ComposerError(
            f"The tokenizer of '{reference}' cannot be read: its GGUF merge {str(merge)[:40]!r} is not two parts "
            "with a space between them; the file is damaged."
        )
    return [merge[:separator], merge[separator + 1 :]]


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
    theirs = set(candidate.keys)
    present = [key for key in suspect.keys if key in theirs]
    shared = len(present) / max(len(suspect.keys), 1)
    # a token both have sits at the same id in both (a token text can have two ids: a byte and its fallback)
    same_ids = all(
        index < len(candidate.keys) and candidate.keys[index] == key
        for index, key in enumerate(suspect.keys)
        if key in theirs
    )
    one_format = suspect.stored_as == candidate.stored_as
    comparison = TokenizerComparison(
        model,
        "",
        shared,
        same_ids,
        suspect.merges == candidate.merges if suspect.merges_from == candidate.merges_from else None,
        suspect.special == candidate.special,
        suspect.chat_template == candidate.chat_template,
        suspect.normalizer == candidate.normalizer if one_format else None,
        suspect.pre_tokenizer == candidate.pre_tokenizer if one_format else None,
    )
    if suspect.keys == candidate.keys and comparison.same_merges is not False:
        comparison.verdict = "is"
    elif same_ids and len(candidate.keys) < len(suspect.keys) and set(candidate.keys) <= set(suspect.keys):
        comparison.verdict = "extends"  # SUSPECT is the candidate's vocabulary with tokens added after it
    elif shared >= UNRELATED_BELOW:
        comparison.verdict = "shares"
    else:
        comparison.verdict = "unrelated"
    return comparison
