"""A tokenizer made while planning (a union of vocabularies): a source with tokenizer files and nothing else."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from composer.errors import ComposerError
from composer.sources.base import ModelSource, TensorInfo


class WeightlessSource(ModelSource):
    """A source that holds a tokenizer and no tensors."""

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return {}

    def read(self, name: str) -> torch.Tensor:
        raise ComposerError(f"'{self.reference}' holds only a tokenizer; it has no tensor '{name}'.")


class BuiltTokenizer(WeightlessSource):
    def __init__(self, reference: str, tokenizer):
        super().__init__(reference)
        self.tokenizer = tokenizer

    def config(self) -> dict:
        return {}

    def save_tokenizer(self, destination: Path) -> list[str]:
        with tempfile.TemporaryDirectory(prefix="composer-tokenizer-") as scratch:
            self.tokenizer.save_pretrained(scratch)
            written = sorted(path.name for path in Path(scratch).iterdir() if path.is_file())
            for name in written:
                (destination / name).write_bytes((Path(scratch) / name).read_bytes())
        return written

    def input_paths(self) -> dict[str, Path]:
        return {}
