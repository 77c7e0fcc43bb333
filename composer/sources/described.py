"""A safetensors model known from its description alone: each weights file's header, the index's weight map and the
folder's small files (config, tokenizer, card). A cluster's node that does not hold a model (it was placed on other
nodes) builds the plan from this: planning needs every tensor's name, shape and dtype, never its bytes, and no unit
reading the model is sent to that node."""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from composer.errors import ComposerError
from composer.safetensors_header import read_layout
from composer.sources.folder import SAFETENSORS_INDEX, SafetensorsFolder, read_index

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".onnx")
LARGEST_SMALL_FILE = 64 << 20  # bytes: a tokenizer.json of a large vocabulary is tens of MB; weights are never sent


@dataclass(frozen=True)
class ModelDescription:
    reference: str
    folder: str  # where the model lies on the machines that hold it
    layouts: dict[str, tuple[dict, int]]  # weights file name -> (its checked header, where its data starts)
    weight_map: dict[str, str] | None
    small_files: dict[str, bytes]  # the folder's other files, by name


def describe_model(reference: str, source) -> ModelDescription:
    """What a node that does not hold `reference` needs to plan with it (read here, from headers and small files)."""
    if not isinstance(source, SafetensorsFolder) or not source.weight_paths:
        raise ComposerError(
            f"Model '{reference}' is not a folder of safetensors files, so it cannot be placed on some nodes only (the "
            "others plan from its headers); put it on storage every node reads, or convert it to safetensors."
        )
    folder = Path(source.folder)
    layouts = {Path(path).name: read_layout(Path(path)) for path in source.weight_paths}
    small = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.stat().st_size <= LARGEST_SMALL_FILE:
            small[path.name] = path.read_bytes()
    return ModelDescription(reference, str(folder), layouts, read_index(folder, SAFETENSORS_INDEX), small)


class DescribedModel(SafetensorsFolder):
    """A model this machine does not hold: its tensors are known, its small files are in a temporary folder, and
    reading a tensor is an error that names the model."""

    def __init__(self, description: ModelDescription):
        self.description = description
        self.scratch = Path(tempfile.mkdtemp(prefix="composer-described-"))
        # removed at close, and also when the object is collected or the process exits without closing it
        self.remove_scratch = weakref.finalize(self, shutil.rmtree, self.scratch, True)
        for name, data in description.small_files.items():
            (self.scratch / name).write_bytes(data)
        layouts = {self.scratch / name: layout for name, layout in description.layouts.items()}
        super().__init__(description.reference, self.scratch, layouts, description.weight_map)

    def input_paths(self) -> dict[str, Path]:
        return {f"the input model '{self.reference}'": Path(self.description.folder)}

    def byte_range(self, name: str) -> tuple[Path, int, int] | None:
        return None

    def read_stored(self, name: str) -> torch.Tensor:
        raise ComposerError(
            f"Model '{self.reference}' is not on this machine (it was placed on other nodes), so tensor '{name}' cannot "
            "be read here; the unit that reads it belongs on a node holding the model."
        )

    def close(self) -> None:
        super().close()
        self.remove_scratch()
