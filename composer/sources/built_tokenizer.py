"""A tokenizer made while planning (a union of vocabularies): a source with tokenizer files and nothing else."""

from __future__ import annotations

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
        return sorted(Path(path).name for path in self.tokenizer.save_pretrained(str(destination)))

    def input_paths(self) -> dict[str, Path]:
        return {}
