"""Local model folders: safetensors (one file or sharded with an index) or PyTorch .bin checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from composer.errors import ComposerError
from composer.sources.base import FolderFilesMixin, ModelSource, TensorInfo
from composer.sources.safetensors_format import DTYPE_BY_CODE, read_header


def _index_files(folder: Path, index_name: str, pattern: str) -> list[Path]:
    index_path = folder / index_name
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise ComposerError(f"{index_path} is not a valid index file (it needs a 'weight_map').") from None
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise ComposerError(f"{index_path} names shard {missing[0]}, which is not in {folder}.")
        return [folder / name for name in files]
    return sorted(folder.glob(pattern))


class SafetensorsFolder(FolderFilesMixin, ModelSource):
    def __init__(self, reference: str, folder: Path):
        super().__init__(reference)
        self.folder = folder
        self._file_of: dict[str, Path] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._handles: dict[Path, object] = {}
        for path in _index_files(folder, "model.safetensors.index.json", "*.safetensors"):
            for name, entry in read_header(path).items():
                if name == "__metadata__":
                    continue
                self._file_of[name] = path
                self._infos[name] = TensorInfo(name, tuple(entry["shape"]), DTYPE_BY_CODE[entry["dtype"]])

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._file_of[name]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(str(path), framework="pt")
        return handle.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


class TorchBinFolder(FolderFilesMixin, ModelSource):
    """PyTorch pickles, memory-mapped so a tensor's bytes are paged in only when read."""

    def __init__(self, reference: str, folder: Path):
        super().__init__(reference)
        self.folder = folder
        self._tensors: dict[str, torch.Tensor] = {}
        for path in _index_files(folder, "pytorch_model.bin.index.json", "*.bin"):
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:  # torch raises many types for a damaged pickle
                raise ComposerError(f"{path} could not be read as a PyTorch checkpoint ({type(error).__name__}: {error}).") from None
            self._tensors.update(state)
        self._infos = {name: TensorInfo(name, tuple(t.shape), t.dtype) for name, t in self._tensors.items()}

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name].clone()

    def close(self) -> None:
        self._tensors.clear()


def open_folder(reference: str, folder: Path) -> ModelSource:
    if list(folder.glob("*.safetensors")):
        return SafetensorsFolder(reference, folder)
    if list(folder.glob("*.bin")):
        return TorchBinFolder(reference, folder)
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        from composer.sources.gguf_file import GGUFFile

        return GGUFFile(reference, ggufs[0])
    raise ComposerError(
        f"Model folder {folder} (for '{reference}') holds no weights: composer looks for *.safetensors, *.bin or a single *.gguf file."
    )
