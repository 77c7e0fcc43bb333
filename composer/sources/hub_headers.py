"""Hub models opened from their headers alone, for `compose check` (none of the weights a merge reads is fetched) and on
a cluster's nodes (each weights file fetched when a tensor of it is first read: a node fetches only what its units read).

config.json and the index come through the hub cache (the small files a run fetches first anyway); the tokenizer and
other small files only when something asks for one of them; and each safetensors file's header with two HTTP range
requests through huggingface_hub (its 8-byte length, then the header), checked exactly as a local file's header is.
The source then knows every tensor's name, shape and dtype, which is all planning needs. A model whose weights are
already in the hub cache is opened from there, as a run would open it.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from composer.errors import ComposerError
from composer.safetensors_header import header_length, parse_header
from composer.sources.base import ModelSource
from composer.sources.folder import BIN_INDEX, SAFETENSORS_INDEX, SafetensorsFolder, open_folder, read_shards
from composer.sources.hub import (
    METADATA_FILES,
    download,
    fetch_hub_file,
    fetch_hub_model,
    holds_weights,
    hub_errors,
    split_revision,
)

FIRST_FILES = ["config.json", SAFETENSORS_INDEX, BIN_INDEX]
HEADER_READERS = 8  # headers fetched at once: a model of 163 shards is 326 small requests


class HubHeaders(SafetensorsFolder):
    """A hub model's tensors known from its safetensors headers; its data cannot be read."""

    def __init__(
        self,
        reference: str,
        folder: Path,
        layouts: dict[Path, tuple[dict, int]],
        weight_map: dict[str, str] | None,
        file_sizes: dict[str, int],
        header_bytes: int,
    ):
        self.commit = folder.name  # snapshots/<commit>
        self.file_sizes = file_sizes  # weights file -> its size: what a run would download
        self.header_bytes = header_bytes  # bytes fetched to read the headers
        self._all_small_files = False
        super().__init__(reference, folder, layouts, weight_map)

    def folder_file(self, name: str) -> Path | None:
        if name not in FIRST_FILES and not self._all_small_files:  # a tokenizer file, say: fetched when first wanted
            repo_id, _ = split_revision(self.reference)
            download(self.reference, repo_id, self.commit, METADATA_FILES)
            self._all_small_files = True
        return super().folder_file(name)

    def byte_range(self, name: str) -> tuple[Path, int, int] | None:
        return None

    def read(self, name: str) -> torch.Tensor:
        raise ComposerError(
            f"Model '{self.reference}' was opened from its safetensors headers alone (compose check), so the data of "
            f"tensor '{name}' is not here; run the recipe with compose to download the weights."
        )


class HubWhenRead(HubHeaders):
    """A hub model whose weights files are fetched one by one into this machine's hub cache, each when one of its
    tensors is first read (or copied)."""

    def __init__(self, *arguments):
        super().__init__(*arguments)
        self._fetching = threading.Lock()
        self.fetched: list[str] = []  # the weights files fetched, in order

    def _here(self, path: Path) -> Path:
        if not path.is_file():
            with self._fetching:
                if not path.is_file():
                    name = path.relative_to(self.folder).as_posix()
                    fetched = fetch_hub_file(self.reference, name, self.commit)
                    if fetched != path and not path.is_file():
                        raise ComposerError(
                            f"Model '{self.reference}': {name} was fetched to {fetched}, not into the snapshot {self.folder} "
                            "it was planned from; the hub cache changed during the run. Run again."
                        )
                    self.fetched.append(name)
        return path

    def byte_range(self, name: str) -> tuple[Path, int, int] | None:
        located = SafetensorsFolder.byte_range(self, name)
        if located is not None:
            self._here(located[0])
        return located

    def read(self, name: str) -> torch.Tensor:
        return SafetensorsFolder.read(self, name)

    def read_stored(self, name: str) -> torch.Tensor:
        location = self._location.get(name)
        if location is not None:
            self._here(location[0])
        return super().read_stored(name)


def _fetch_range(url: str, start: int, count: int) -> tuple[bytes, int]:
    """`count` bytes of the file at `url` from `start`, and the file's size."""
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

    response = http_backoff(
        "GET", url, headers={**build_hf_headers(), "Range": f"bytes={start}-{start + count - 1}"}, max_retries=2
    )
    hf_raise_for_status(response)
    if response.status_code != 206:  # a server that ignores ranges sends the whole file
        return response.content[start : start + count], len(response.content)
    total = response.headers.get("Content-Range", "").rpartition("/")[2]
    if not total.isdigit():
        raise ComposerError(f"{url} answered a range request without the file's size (Content-Range '{total}').")
    return response.content[:count], int(total)


def read_hub_layout(reference: str, filename: str, commit: str) -> tuple[dict, int, int]:
    """(checked header, data start, file size) of the safetensors file `filename` of hub model `reference`, from the
    file's first 8 + header-length bytes only."""
    from huggingface_hub import errors, hf_hub_url

    repo_id, _ = split_revision(reference)
    url = hf_hub_url(repo_id, filename, revision=commit)
    where = f"{repo_id}/{filename} on the hub (commit {commit[:12]})"
    with hub_errors(reference, repo_id, commit):
        try:
            prefix, size = _fetch_range(url, 0, 8)
            length = header_length(where, prefix, size)
            raw = _fetch_range(url, 8, length)[0] if length else b""
        except errors.EntryNotFoundError:
            raise ComposerError(
                f"Model '{reference}' names the weights file '{filename}', which its hub repository (commit {commit[:12]}) "
                "does not hold; the repository is incomplete."
            ) from None
    return parse_header(where, raw, size), 8 + length, size


def _safetensors_files(reference: str, folder: Path) -> tuple[list[str], dict[str, str] | None]:
    """The repository's safetensors files a run would download, as transformers chooses them, and the index's weight map."""
    indexed = read_shards(folder, SAFETENSORS_INDEX)
    if indexed is not None:
        weight_map, shards = indexed
        return sorted(shards), weight_map
    from huggingface_hub import HfApi

    repo_id, _ = split_revision(reference)
    with hub_errors(reference, repo_id, folder.name):
        files = [name for name in HfApi().list_repo_files(repo_id, revision=folder.name) if "/" not in name]
    if "model.safetensors" in files:
        return ["model.safetensors"], None
    found = sorted(name for name in files if name.endswith(".safetensors"))
    if not found:
        kinds = sorted({name.rpartition(".")[2] for name in files if name.endswith((".bin", ".pt", ".gguf", ".pth"))})
        held = f"only {', '.join('.' + kind for kind in kinds)} weights" if kinds else "no weights files"
        raise ComposerError(
            f"Model '{reference}': its hub repository holds {held}. compose check reads safetensors headers over the "
            "network, which other formats do not have; download the model (or run the recipe) to check it."
        )
    return found, None


def open_hub_headers(reference: str, when_read: bool = False) -> ModelSource:
    """Hub model `reference` for planning: its config, index and headers fetched, its weights not (unless cached).
    `when_read`: each weights file is fetched when a tensor of it is first read (HubWhenRead)."""
    repo_id, revision = split_revision(reference)
    folder = download(reference, repo_id, revision, FIRST_FILES)
    if holds_weights(folder):
        return open_folder(reference, fetch_hub_model(reference))
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ComposerError(
            f"Model '{reference}': its weights are not in the Hugging Face cache and HF_HUB_OFFLINE is set, so their "
            "headers cannot be read from the hub. Unset HF_HUB_OFFLINE, or download the model first."
        )
    names, weight_map = _safetensors_files(reference, folder)
    with ThreadPoolExecutor(max_workers=min(HEADER_READERS, len(names))) as pool:
        read = list(pool.map(lambda name: read_hub_layout(reference, name, folder.name), names))
    layouts = {folder / name: (header, start) for name, (header, start, _) in zip(names, read)}
    sizes = {name: size for name, (_, _, size) in zip(names, read)}
    fetched = sum(start for _, start, _ in read)
    return (HubWhenRead if when_read else HubHeaders)(reference, folder, layouts, weight_map, sizes, fetched)
