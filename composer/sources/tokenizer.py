"""A source's tokenizer as a transformers object, whatever the source is (folder, GGUF, hub, stage, built)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from composer.errors import ComposerError
from composer.sources.base import ModelSource


def load_source_tokenizer(source: ModelSource, needed_for: str):
    """The tokenizer of `source`, loaded by transformers from the files the source writes into a temporary
    folder. `needed_for` ends the error when it has none ("router gates from prompts need one")."""
    from tokensurgery import TokenSurgeryError, load_tokenizer

    if not source.has_tokenizer():
        raise ComposerError(f"Model '{source.reference}' has no tokenizer files; {needed_for}.")
    with tempfile.TemporaryDirectory(prefix="composer-tokenizer-") as folder:
        written = source.save_tokenizer(Path(folder))
        try:
            return load_tokenizer(folder)
        except TokenSurgeryError as error:
            # the message names the source's own files, not the temporary folder they were copied into
            home = getattr(source, "folder", None)
            files = ", ".join(str(home / name) if isinstance(home, Path) else name for name in written)
            text = (
                str(error).replace(f"The tokenizer in {folder} could not", "It could not").replace(folder, "its folder")
            )
            raise ComposerError(f"The tokenizer of '{source.reference}' ({files}) cannot be read: {text}") from None


def check_vocabulary_rows(model: str, tensor: str, rows: int, tokens: int, padding_hint: str = "") -> None:
    """Refuse a vocabulary-indexed tensor with fewer rows than the model's tokenizer has tokens."""
    if rows < tokens:
        raise ComposerError(
            f"Model '{model}': tensor '{tensor}' has {rows} rows, but the model's tokenizer has {tokens} tokens, so token "
            f"ids {rows} and above have no row. The tokenizer does not belong to these weights, or tokens were added to "
            "it without resizing the embeddings: resize them (or use the tokenizer the model was trained with). Rows "
            f"beyond the tokenizer are fine: they are taken as padding.{padding_hint}"
        )
