"""Hugging Face hub ids (`org/name` or `org/name@revision`): only the files a merge needs are fetched."""

from __future__ import annotations

from pathlib import Path

from composer.errors import ComposerError

WANTED_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "README.md"]
BIN_FILES = ["*.json", "*.bin", "tokenizer.model", "*.txt", "*.jinja", "README.md"]


def split_revision(reference: str) -> tuple[str, str | None]:
    if "@" in reference:
        repo_id, revision = reference.rsplit("@", 1)
        return repo_id, revision or None
    return reference, None


def fetch_hub_model(reference: str) -> Path:
    """A local folder holding the hub model's config, tokenizer and weights (safetensors preferred)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id, revision = split_revision(reference)
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=WANTED_FILES))
        if not list(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=BIN_FILES))
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise ComposerError(f"Model '{reference}' is neither a local path nor a model on the hub ({type(error).__name__}).") from None
    except LocalEntryNotFoundError:
        raise ComposerError(
            f"Model '{reference}' is not a local path and is not in the hub cache, and the hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE is set). Download it first or give a local folder."
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise ComposerError(f"Model '{reference}' could not be fetched from the hub: {error}") from None
    return folder
