"""Hugging Face hub ids (`org/name` or `org/name@revision`): only the files a merge needs are fetched.

First the small files at the top of the repository (config, tokenizer, model card), then only the weights
transformers itself would load: the shards an index names, else `model.safetensors` / `pytorch_model.bin`,
else the top-level weights files of one format. Everything goes through huggingface_hub's cache, so a
model already there is used without the network, and HF_HUB_OFFLINE is honoured.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from composer.errors import ComposerError
from composer.sources.folder import BIN_INDEX, NOT_WEIGHTS, SAFETENSORS_INDEX, read_shards

METADATA_FILES = ["*.json", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja", "README.md"]
WEIGHT_CHOICES = (["model.safetensors"], ["*.safetensors"], ["pytorch_model.bin"], ["*.bin"])
NESTED = ["*/*"]  # files in subfolders (onnx/, original/, ...) are never part of the transformers checkpoint


def split_revision(reference: str) -> tuple[str, str | None]:
    if "@" in reference:
        repo_id, revision = reference.rsplit("@", 1)
        return repo_id, revision or None
    return reference, None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextmanager
def hub_errors(reference: str, repo_id: str, revision: str | None):
    """huggingface_hub's errors while fetching model `reference` turned into ComposerErrors that say what to do."""
    from huggingface_hub import errors

    incomplete = getattr(errors, "IncompleteSnapshotError", ())
    try:
        yield
    except incomplete as error:
        raise ComposerError(
            f"Model '{reference}' is only partly in the hub cache and the hub cannot be reached to complete it "
            f"({_first_line(error)})."
        ) from None
    except errors.RevisionNotFoundError:
        raise ComposerError(
            f"Model '{reference}': the hub repository '{repo_id}' has no revision '{revision}'."
        ) from None
    except errors.GatedRepoError:
        raise ComposerError(
            f"Model '{reference}' is a gated repository on the hub: accept its terms on the model page and log in "
            "(`hf auth login` or HF_TOKEN) before composing with it."
        ) from None
    except errors.RepositoryNotFoundError:
        raise ComposerError(
            f"Model '{reference}' is neither a local path nor a model on the hub "
            "(if it is private, log in with `hf auth login` or set HF_TOKEN)."
        ) from None
    except errors.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if _offline() else "the hub cannot be reached"
        wanted = f"revision '{revision}' of '{repo_id}'" if revision else f"'{repo_id}'"
        raise ComposerError(
            f"Model '{reference}' is not a local path, {wanted} is not in the Hugging Face cache, and {why}. "
            f"Download it first (e.g. `hf download {repo_id}{f' --revision {revision}' if revision else ''}`) or give a local folder."
        ) from None
    except (errors.HfHubHTTPError, OSError, ValueError, *_transport_errors()) as error:
        raise ComposerError(f"Model '{reference}' could not be fetched from the hub: {_first_line(error)}") from None


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's own errors (a refused connection, a timeout) where huggingface_hub lets them through: those of
    httpx, which huggingface_hub 1.x and later are built on (0.x's requests errors are OSErrors)."""
    from huggingface_hub import utils

    client = getattr(utils, "httpx", None)
    return (client.HTTPError,) if client is not None else ()


def download(reference: str, repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """A snapshot folder holding the repository's files that match `patterns` (from the cache when they are there)."""
    from huggingface_hub import snapshot_download

    with hub_errors(reference, repo_id, revision):
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=NESTED))


def _holds(folder: Path, patterns: list[str]) -> bool:
    return any(path.is_file() and path.name not in NOT_WEIGHTS for pattern in patterns for path in folder.glob(pattern))


def holds_weights(folder: Path) -> bool:
    """Whether a snapshot folder already holds the weights a merge reads: every shard its index names, else one of
    the weights files transformers would load."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        indexed = read_shards(folder, index_name)
        if indexed is not None:
            return None not in indexed[1].values()
    return any(_holds(folder, patterns) for patterns in WEIGHT_CHOICES)


def in_hub_cache(path: Path) -> bool:
    """Whether `path` lies in the Hugging Face hub's cache: a file that another machine fetches into a cache of its own."""
    from huggingface_hub import constants

    try:
        Path(path).resolve().relative_to(Path(constants.HF_HUB_CACHE).resolve())
    except (ValueError, OSError):
        return False
    return True


def fetch_hub_model(reference: str) -> Path:
    """A local folder (a snapshot in the hub cache) holding the model's config, tokenizer and weights.

    Weights already in the snapshot are used as they are: a commit's files never change, and asking the
    hub again would only cost time (minutes of retries when it cannot be reached).
    """
    repo_id, revision = split_revision(reference)
    folder = download(reference, repo_id, revision, METADATA_FILES)
    commit = folder.name  # snapshots/<commit>: later calls need not resolve the revision again
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        indexed = read_shards(folder, index_name)
        if indexed is not None:
            _, shards = indexed
            if None not in shards.values():
                return folder
            return download(reference, repo_id, commit, sorted(shards))
    for patterns in WEIGHT_CHOICES:
        if _holds(folder, patterns):
            return folder
    for patterns in WEIGHT_CHOICES:
        folder = download(reference, repo_id, commit, patterns)
        if _holds(folder, patterns):
            return folder
    where = "the hub cache (HF_HUB_OFFLINE is set)" if _offline() else "the hub repository"
    raise ComposerError(
        f"Model '{reference}': {where} holds no transformers weights for it (model.safetensors, pytorch_model.bin "
        f"or an index of shards) at {folder}."
    )
