"""What every model source hands out: tensor metadata up front, tensor data one at a time."""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from composer.errors import ComposerError
from composer.files import read_bytes, read_json_object
from composer.sources.model_files import model_file
from composer.yaml_text import parse_yaml

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    # a vision-language model's image and video processors
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


class ModelSource(ABC):
    """A model opened lazily: nothing but headers is read until `read` is called."""

    def __init__(self, reference: str):
        self.reference = reference

    @abstractmethod
    def tensor_infos(self) -> dict[str, TensorInfo]: ...

    @abstractmethod
    def read(self, name: str) -> torch.Tensor: ...

    @abstractmethod
    def config(self) -> dict: ...

    @abstractmethod
    def save_tokenizer(self, destination: Path) -> list[str]:
        """Write this model's tokenizer files into `destination`; return the file names written."""

    def byte_range(self, name: str) -> tuple[Path, int, int] | None:
        """(file, offset, length) where tensor `name` is stored as it would be written (safetensors
        bytes), for a copy from file to file; None where it is not stored so."""
        return None

    def row_reader(self, name: str) -> Callable[[int, int], torch.Tensor] | None:
        """A function giving rows [start, stop) of tensor `name` (seen as rows of its last axis), equal to those rows
        of `read(name)`, for a source that can read part of a tensor it cannot hand out as stored bytes (a GGUF
        file's quantised matrices); None where only `read` gives it."""
        return None

    def license(self) -> str | None:
        return None

    def close(self) -> None:
        pass

    def release_files(self) -> None:
        """Close the files kept open between reads; the next read opens them again (a cluster's worker does this
        between units, so that what each unit opens is what it reads)."""

    def has_tokenizer(self) -> bool:
        return True

    def input_paths(self) -> dict[str, Path]:
        """The local files and folders this source reads, by what they are (no output may be written there)."""
        paths = {}
        for attribute in ("folder", "path"):
            value = getattr(self, attribute, None)
            if isinstance(value, Path):
                paths[f"the input model '{self.reference}'"] = value
        return paths


class FolderFilesMixin:
    """Config, tokenizer and licence read from plain files in a model folder."""

    folder: Path
    reference: str
    weight_paths: tuple[Path, ...] = ()  # the folder's weights files: its other files may link to where these are

    def folder_file(self, name: str) -> Path | None:
        """The folder's file `name`, whose bytes reach the output: inside the folder or where its weights are (model_files)."""
        weight_folders = [Path(os.path.realpath(path)).parent for path in self.weight_paths]
        return model_file(self.folder, name, also_inside=weight_folders)

    def config(self) -> dict:
        path = self.folder_file("config.json")
        if path is None:
            raise ComposerError(
                f"Model '{self.reference}' has no config.json in {self.folder}; a model folder needs one."
            )
        return read_json_object(path)

    def has_tokenizer(self) -> bool:
        return any(
            self.folder_file(name) is not None
            for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
        )

    def save_tokenizer(self, destination: Path) -> list[str]:
        written = []
        for name in TOKENIZER_FILES:
            path = self.folder_file(name)
            if path is not None:
                shutil.copyfile(path, destination / name)
                written.append(name)
        return written

    def license(self) -> str | None:
        card = self.folder_file("README.md")
        return read_card_license(card) if card is not None else None


def read_card_license(card_path: Path) -> str | None:
    """The `license:` field of a Hugging Face model card's front matter, if there is one."""
    if not card_path.is_file():
        return None
    try:  # a card that cannot be read only leaves the licence unknown
        text = read_bytes(card_path).decode("utf-8", errors="replace")
        if not text.startswith("---"):
            return None
        front = text.split("---", 2)[1] if text.count("---") >= 2 else ""
        meta = parse_yaml(front, str(card_path))[1]
    except ComposerError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None
