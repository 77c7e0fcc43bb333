"""Open a model reference lazily: local folder, single weights file, GGUF file or hub id."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from composer.errors import ComposerError
from composer.sources.base import ModelSource, TensorInfo
from composer.sources.references import is_hub_id, local_path

__all__ = ["ModelSource", "TensorInfo", "local_path", "open_source", "opened_on_a_node"]

# how a cluster's node opens models while it builds the plan (see opened_on_a_node)
_DESCRIBED: ContextVar[dict | None] = ContextVar("composer_described_models", default=None)
_HUB_WEIGHTS_WHEN_READ: ContextVar[bool] = ContextVar("composer_hub_weights_when_read", default=False)


@contextmanager
def opened_on_a_node(described: dict | None = None) -> Iterator[None]:
    """Models opened within this are opened as a cluster's node needs them: a model in `described` (reference ->
    composer.sources.described.ModelDescription: one this node does not hold) from its description, and a hub model
    with its weights fetched file by file as its tensors are first read, so a node fetches only the shards its units
    read."""
    described_token = _DESCRIBED.set(dict(described or {}))
    hub_token = _HUB_WEIGHTS_WHEN_READ.set(True)
    try:
        yield
    finally:
        _DESCRIBED.reset(described_token)
        _HUB_WEIGHTS_WHEN_READ.reset(hub_token)


def open_source(reference: str, relative_to: Path | None = None, headers_only: bool = False) -> ModelSource:
    """The model `reference` names, opened lazily. `headers_only`: a hub model's weights are not downloaded, only their
    safetensors headers read (`compose check`); such a source knows its tensors but cannot read them."""
    from composer.sources.folder import open_folder

    description = (_DESCRIBED.get() or {}).get(reference)
    if description is not None:
        from composer.sources.described import DescribedModel

        return DescribedModel(description)
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
    if is_hub_id(reference) and (headers_only or _HUB_WEIGHTS_WHEN_READ.get()):
        from composer.sources.hub_headers import open_hub_headers

        return open_hub_headers(reference, when_read=not headers_only)
    if is_hub_id(reference):
        from composer.sources.hub import fetch_hub_model

        return open_folder(reference, fetch_hub_model(reference))
    raise ComposerError(f"Model path '{reference}' does not exist (and is not a hub id of the form org/name).")
