"""Checks that a model folder or GGUF file is one transformers can load and score, each refusal one paragraph
naming the file at fault, where transformers itself would raise one of many exception types (or, for a
missing tensor, quietly fill it with random values)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from composer.errors import ComposerError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer_config.json",
)
TOKENIZER_JSON_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
)


def model_label(reference: str, folder: Path) -> str:
    return f"Model '{reference}'" if Path(reference).expanduser() == folder else f"Model '{reference}' ({folder})"


def check_model(reference: str, path: Path) -> None:
    """Before transformers loads `path`: composer's own readers check the weights files (a truncated or
    corrupt safetensors file, a pickle that weights_only refuses, a GGUF file that is not one) and read the
    config; its model_type must be a causal LM transformers has, and a folder needs a readable tokenizer."""
    from transformers import CONFIG_MAPPING, __version__
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from composer.sources import open_source

    source = open_source(str(path))
    try:
        config = source.config()
        has_tokenizer = source.has_tokenizer()
    finally:
        source.close()
    where = str(path / "config.json") if path.is_dir() else str(path)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        raise ComposerError(
            f"{where} has no 'model_type', so transformers cannot tell which architecture model '{reference}' is."
        )
    if model_type not in CONFIG_MAPPING:
        raise ComposerError(
            f"{where}: model_type '{model_type}' is not an architecture transformers {__version__} knows. "
            "Check the name, or upgrade transformers if the architecture is newer than it."
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ComposerError(
            f"{where}: model_type '{model_type}' has no causal language model class in transformers {__version__}, so it cannot score text."
        )
    if not has_tokenizer:
        raise ComposerError(
            f"Model folder {path} has no tokenizer ({', '.join(TOKENIZER_FILES[:5])}); scoring text needs the model's own tokenizer."
        )
    for name in TOKENIZER_JSON_FILES if path.is_dir() else ():
        if not (path / name).is_file():
            continue
        try:
            json.loads((path / name).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise ComposerError(
                f"{path / name} is not valid JSON ({error}); the tokenizer cannot be read. Download or copy the file again."
            ) from None


def check_loaded(reference: str, folder: Path, loading: dict) -> None:
    """transformers' loading info (`output_loading_info=True`): a tensor the weights lack, or hold in another
    shape, is filled with random values, and a score of that model is no score."""
    mismatched = sorted(loading.get("mismatched_keys") or [])
    if mismatched:
        name, stored, wanted = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ComposerError(
            f"{model_label(reference, folder)}: tensor '{name}' is {list(stored)} in the weights, but the architecture in config.json "
            f"needs {list(wanted)}{more}. The weights and config.json do not belong together."
        )
    missing = sorted(loading.get("missing_keys") or [])
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ComposerError(
            f"{model_label(reference, folder)}: the weights lack tensor '{missing[0]}'{more}, which the architecture in config.json needs; "
            "transformers would fill it with random values, so the model would not be the one on disk. "
            "The weights are incomplete or config.json describes another model."
        )


@contextmanager
def quiet_transformers():
    """transformers' weight-loading progress bar and load report off; composer reports what matters itself."""
    from transformers.utils import logging as transformers_logging

    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def one_line(error: BaseException) -> str:
    """An exception as `Type: message` on one line, at most about 400 characters."""
    text = " ".join(str(error).split()) or "no message"
    return f"{type(error).__name__}: {text if len(text) <= 400 else text[:400] + ' ...'}"
