"""Local model folders: safetensors (one file or sharded with an index) or PyTorch .bin checkpoints.

Which files hold the weights follows transformers: the shards an index names, else `model.safetensors` /
`pytorch_model.bin`, else every weights file in the folder. Opening reads headers only; a tensor's bytes
are read when it is asked for, and each read hands back a tensor of its own (never a view of the map).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from composer.errors import ComposerError
from composer.files import printable, read_json_object
from composer.safetensors_header import read_layout
from composer.sources.base import FolderFilesMixin, ModelSource, TensorInfo
from composer.sources.fp8 import find_block_scaled_fp8, without_quantization
from composer.sources.model_files import model_file
from composer.sources.mxfp4 import find_mxfp4
from composer.sources.safetensors_format import DTYPE_BY_CODE, read_into

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
NOT_WEIGHTS = {"training_args.bin", "optimizer.bin", "scheduler.bin", "scaler.bin"}


def read_index(folder: Path, index_name: str) -> dict[str, str] | None:
    """The weight map (tensor name -> shard file name) of an index file, or None when there is none."""
    index_path = folder / index_name
    if not index_path.is_file():
        return None
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ComposerError(
            f"{index_path} is not a valid index file: 'weight_map' must map tensor names to shard file names."
        )
    return weight_map


def read_shards(folder: Path, index_name: str) -> tuple[dict[str, str], dict[str, Path | None]] | None:
    """An index's weight map and, for each shard it names, the shard's path (None where it is missing), every name
    checked by `model_file` so that an index cannot point outside the folder; None where there is no index."""
    model_file(folder, index_name, weights=True)  # an index linking out of a hub snapshot is refused before it is read
    weight_map = read_index(folder, index_name)
    if weight_map is None:
        return None
    named_in = folder / index_name
    return weight_map, {
        name: model_file(folder, name, named_in=named_in, weights=True) for name in sorted(set(weight_map.values()))
    }


def weight_files(
    folder: Path, index_name: str, single_name: str, pattern: str
) -> tuple[list[Path], dict[str, str] | None]:
    """The files holding the weights, and the index's weight map if there is one."""
    indexed = read_shards(folder, index_name)
    if indexed is not None:
        weight_map, shards = indexed
        missing = [name for name, path in shards.items() if path is None]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ComposerError(
                f"{folder / index_name} names shard '{missing[0]}'{more}, which is not in {folder}. "
                "The download is incomplete: fetch the missing shard or the whole model again."
            )
        return list(shards.values()), weight_map
    single = model_file(folder, single_name, weights=True)
    if single is not None:
        return [single], None
    found = (
        model_file(folder, path.name, weights=True)
        for path in sorted(folder.glob(pattern))
        if path.name not in NOT_WEIGHTS
    )
    return [path for path in found if path is not None], None


def assign_tensors(
    folder: Path, index_name: str, weight_map: dict[str, str] | None, found: list[tuple[str, Path]]
) -> dict[str, Path]:
    """Tensor name -> the file to read it from. With an index the index decides; without one a name in two files is an error."""
    file_of: dict[str, Path] = {}
    places: dict[str, set[Path]] = {}
    for name, path in found:
        places.setdefault(name, set()).add(path)
    for name, paths in places.items():
        if weight_map is not None and name in weight_map:
            wanted = folder / weight_map[name]
            if wanted not in paths:
                raise ComposerError(
                    f"{folder / index_name} says tensor '{name}' is in {weight_map[name]}, but that shard does not hold it "
                    f"(it is in {', '.join(sorted(p.name for p in paths))}). The index and the shards do not match."
                )
            file_of[name] = wanted
        elif len(paths) > 1:
            raise ComposerError(
                f"Tensor '{name}' is in several files of {folder} ({', '.join(sorted(p.name for p in paths))}) "
                "and no index says which one the model uses."
            )
        else:
            file_of[name] = next(iter(paths))
    for name, shard in (weight_map or {}).items():
        if name not in file_of:
            raise ComposerError(
                f"{folder / index_name} says tensor '{name}' is in {shard}, but that shard does not hold it."
            )
    return file_of


class SafetensorsFolder(FolderFilesMixin, ModelSource):
    """Safetensors weights in a folder; block-scaled FP8 weights (composer.sources.fp8) and MXFP4 experts
    (composer.sources.mxfp4) are handed out dequantised."""

    def __init__(
        self,
        reference: str,
        folder: Path,
        layouts: dict[Path, tuple[dict, int]] | None = None,
        weight_map: dict[str, str] | None = None,
    ):
        """`layouts` (file -> (header, data start)) and the index's `weight_map` where the headers were read elsewhere
        (from the hub); else the folder's weights files are found and their headers read here."""
        super().__init__(reference)
        self.folder = folder
        self._descriptors: dict[Path, int] = {}
        if layouts is None:
            paths, weight_map = weight_files(folder, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "*.safetensors")
            self.weight_paths = tuple(paths)
            layouts = {path: read_layout(path) for path in paths}
        self._index_headers(layouts, weight_map)

    def _index_headers(self, layouts: dict[Path, tuple[dict, int]], weight_map: dict[str, str] | None) -> None:
        """Learn every tensor's shape, dtype and place from the weights files' headers."""
        self._infos: dict[str, TensorInfo] = {}
        self._location: dict[str, tuple[Path, int]] = {}  # name -> (file, byte offset of its data)
        found = [(name, path) for path, (header, _) in layouts.items() for name in header if name != "__metadata__"]
        for name, path in assign_tensors(self.folder, SAFETENSORS_INDEX, weight_map, found).items():
            header, data_start = layouts[path]
            entry = header[name]
            if entry["dtype"] not in DTYPE_BY_CODE:
                raise ComposerError(
                    f"{path}: tensor '{printable(name)}' has dtype {entry['dtype']}, which torch {torch.__version__} does "
                    "not have (unsigned 16- to 64-bit integers need torch 2.3 or later)."
                )
            self._infos[name] = TensorInfo(name, tuple(entry["shape"]), DTYPE_BY_CODE[entry["dtype"]])
            self._location[name] = (path, data_start + entry["data_offsets"][0])
        self.fp8 = find_block_scaled_fp8(self._infos, super().config, self.reference)
        self._shown = self.fp8.visible(self._infos) if self.fp8 is not None else self._infos
        config_file = self.folder_file("config.json")
        files = {name: path for name, (path, _) in self._location.items()}
        config = super().config() if config_file is not None else {}
        self.mxfp4 = find_mxfp4(self._shown, files, config, self.reference, config_file)
        if self.mxfp4 is not None:
            self._shown = self.mxfp4.visible(self._shown)

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return self._shown

    def config(self) -> dict:
        config = super().config()
        return without_quantization(config) if self.fp8 is not None or self.mxfp4 is not None else config

    def byte_range(self, name: str) -> tuple[Path, int, int] | None:
        location = self._location.get(name)
        if location is None or name not in self._shown or (self.fp8 is not None and name in self.fp8.scales):
            return None  # a dequantised weight is not stored as it is written (an MXFP4 tensor has no location)
        return location[0], location[1], self._infos[name].nbytes

    def read(self, name: str) -> torch.Tensor:
        if name not in self._shown:
            raise ComposerError(f"Model '{self.reference}' ({self.folder}) has no tensor '{name}'.")
        if self.fp8 is not None and name in self.fp8.scales:
            return self.fp8.dequantise(self.read_stored(name), self.read_stored(self.fp8.scales[name]))
        if self.mxfp4 is not None and name in self.mxfp4.pairs:
            blocks, scales = self.mxfp4.pairs[name]
            return self.mxfp4.dequantise(self.read_stored(blocks), self.read_stored(scales))
        return self.read_stored(name)

    def read_stored(self, name: str) -> torch.Tensor:
        """Tensor `name` as its file stores it."""
        path, offset = self._location[name]
        info = self._infos[name]
        try:
            descriptor = self._descriptors.get(path)
            if descriptor is None:
                descriptor = self._descriptors[path] = os.open(path, os.O_RDONLY)
            return read_into(descriptor, offset, info.shape, info.dtype)
        except (OSError, EOFError) as error:
            raise ComposerError(
                f"{path}: tensor '{name}' could not be read ({error}). The file may have changed since it was opened."
            ) from None

    def release_files(self) -> None:
        descriptors, self._descriptors = self._descriptors, {}
        for descriptor in descriptors.values():
            os.close(descriptor)

    def close(self) -> None:
        self.release_files()


class TorchBinFolder(FolderFilesMixin, ModelSource):
    """PyTorch pickles, memory-mapped so a tensor's bytes are paged in only when read."""

    def __init__(self, reference: str, folder: Path):
        super().__init__(reference)
        self.folder = folder
        paths, weight_map = weight_files(folder, BIN_INDEX, BIN_SINGLE, "*.bin")
        self.weight_paths = tuple(paths)
        states = {path: load_mapped(path) for path in paths}
        found = [
            (name, path)
            for path, state in states.items()
            for name, value in state.items()
            if isinstance(value, torch.Tensor)
        ]
        file_of = assign_tensors(folder, BIN_INDEX, weight_map, found)
        self._tensors: dict[str, torch.Tensor] = {name: states[path][name] for name, path in file_of.items()}
        self._infos = {name: TensorInfo(name, tuple(t.shape), t.dtype) for name, t in self._tensors.items()}

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> torch.Tensor:
        tensor = self._tensors.get(name)
        if tensor is None:
            raise ComposerError(f"Model '{self.reference}' ({self.folder}) has no tensor '{name}'.")
        return tensor.clone()

    def close(self) -> None:
        self._tensors.clear()


def load_mapped(path: Path) -> dict:
    """A PyTorch checkpoint's state dict, memory-mapped (tensors paged in when read), unpickled with weights_only."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for a damaged, foreign or unsafe file
        raise ComposerError(_load_failure(path, error)) from None
    if not isinstance(state, dict):
        raise ComposerError(f"{path} holds a {type(state).__name__}, not a state dict of named tensors.")
    return state


def _load_failure(path: Path, error: Exception) -> str:
    """What went wrong opening a PyTorch checkpoint, told from the file itself, not only torch's words."""
    import re
    import zipfile

    text = str(error)
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        return (
            f"{path} holds a pickled object of type {refused.group(1)}, which is not plain tensor data; composer never runs "
            "code from a checkpoint (weights_only), so it cannot read this file. Convert it to safetensors where you trust it."
        )
    with open(path, "rb") as handle:
        start = handle.read(2)
    if not zipfile.is_zipfile(path):
        if start[:1] == b"\x80":  # a pickle protocol header: torch.save's legacy format
            return (
                f"{path} is a PyTorch checkpoint in the legacy (pre-1.6, non-zip) format, which cannot be memory-mapped "
                "and so cannot be read one tensor at a time. Re-save it with torch.save or convert it to safetensors."
            )
        if start[:2] == b"PK":
            return f"{path} is a PyTorch checkpoint that is truncated or damaged (its zip directory is missing). Download or copy it again."
        return f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle)."
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{path} could not be read as a PyTorch checkpoint ({type(error).__name__}: {first}). It may be damaged: download or copy it again."


def open_folder(reference: str, folder: Path) -> ModelSource:
    if (folder / SAFETENSORS_INDEX).is_file() or list(folder.glob("*.safetensors")):
        return SafetensorsFolder(reference, folder)
    if (folder / BIN_INDEX).is_file() or [p for p in folder.glob("*.bin") if p.name not in NOT_WEIGHTS]:
        return TorchBinFolder(reference, folder)
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1 and model_file(folder, ggufs[0].name, weights=True) is not None:
        from composer.sources.gguf_file import GGUFFile

        return GGUFFile(reference, ggufs[0])
    if len(ggufs) > 1:
        raise ComposerError(
            f"Model folder {folder} (for '{reference}') holds {len(ggufs)} GGUF files ({', '.join(p.name for p in ggufs[:4])}); "
            f"name the one to use, e.g. 'model: {folder / ggufs[0].name}'."
        )
    raise ComposerError(
        f"Model folder {folder} (for '{reference}') holds no weights: composer looks for *.safetensors, *.bin or a single *.gguf file."
    )
