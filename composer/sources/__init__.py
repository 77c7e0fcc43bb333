"""Open a model reference lazily: local folder, single weights file, GGUF file or hub id."""

from __future__ import annotations

from pathlib import Path

from composer.errors import ComposerError
from composer.sources.base import ModelSource, TensorInfo
from composer.sources.references import is_hub_id, local_path

__all__ = ["ModelSource", "TensorInfo", "local_path", "open_source"]


def open_source(reference: str, relative_to: Path | None = None, headers_only: bool = False) -> ModelSource:
    """The model `reference` names, opened lazily. `headers_only`: a hub model's weights are not downloaded, only their
    safetensors headers read (`compose check`); such a source knows its tensors but cannot read them."""
    from composer.sources.folder import open_folder

    path = local_path(reference, relative_to)
    if path.is_dir():
        return open_folder(reference, path)
    if path.is_file():
        if path.suffix == ".gguf":
            from composer.sources.gguf_file import GGUFFile

            return GGUFFile(reference, path)
        if path.suffix in (".safetensors", ".bin"):
            return open_folder(reference, path.parent)
        raise ComposerError(
            f"Model '{reference}' is a file composer cannot read: give a model folder, a .gguf file or a hub id."
        )
    if "+" in reference:  # BASE+ADAPTER: a PEFT LoRA adapter merged into its base as tensors are read
        from composer.sources.lora import open_with_adapter

        def open_base(base: str, where: Path | None) -> ModelSource:
            return open_source(base, where, headers_only)

        return open_with_adapter(reference, relative_to, open_base=open_base)
    if is_hub_id(reference) and headers_only:
        from composer.sources.hub_headers import open_hub_headers

        return open_hub_headers(reference)
    if is_hub_id(reference):
        from composer.sources.hub import fetch_hub_model

        return open_folder(reference, fetch_hub_model(reference))
    raise ComposerError(f"Model path '{reference}' does not exist (and is not a hub id of the form org/name).")
