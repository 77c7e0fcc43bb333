"""GGUF files, dequantised one tensor at a time (or, for a reader that wants part of a 2-D tensor, a run of rows at a
time: every row of a GGUF matrix is a whole number of quant blocks).

The header (tensor table, licence) is read by composer's own parser, which touches no tensor data. Config
and tokenizer are translated by transformers' GGUF support; the tensor names and the per-family fix-ups
(llama's permuted q/k rows, gemma's norm offsets, merged MoE experts) come from the same place, so a tensor
read here equals what `from_pretrained(..., gguf_file=...)` loads.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import torch

from composer.errors import ComposerError
from composer.files import fill_from
from composer.sources.base import ModelSource, TensorInfo
from composer.sources.gguf_format import (
    GGUFTensorEntry,
    read_gguf_header,
    read_gguf_tokenizer,
    type_name,
    write_metadata_copy,
)


class GGUFFile(ModelSource):
    def __init__(self, reference: str, path: Path):
        super().__init__(reference)
        self.path = path
        self.header = read_gguf_header(path)
        if self.header.architecture is None:
            raise ComposerError(
                f"{path} has no 'general.architecture' in its metadata, so composer cannot tell which model family it holds."
            )
        self._descriptor: int | None = None
        self._opening = threading.Lock()
        self._row_readers: dict[str, Callable[[int, int], torch.Tensor] | None] = {}

    # ---- translation through transformers (metadata only) -------------------------------------------

    @cached_property
    def _parsed(self) -> dict:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        try:
            # transformers reads the config from a copy without the tokenizer's arrays: 14 s -> 0.02 s for Gemma 3
            with tempfile.TemporaryDirectory(prefix="composer-gguf-") as scratch:
                copy = write_metadata_copy(self.header, Path(scratch) / self.path.name)
                return load_gguf_checkpoint(str(copy), return_tensors=False)
        except (ValueError, NotImplementedError, KeyError) as error:
            raise ComposerError(
                f"{self.path}: transformers cannot translate this GGUF file's metadata "
                f"(architecture '{self.header.architecture}'): {error}"
            ) from None

    @cached_property
    def _config(self) -> dict:
        from transformers import AutoConfig

        config = {key: value for key, value in self._parsed["config"].items() if not key.startswith("_")}
        try:
            model_config = AutoConfig.for_model(**config)
        except (ValueError, KeyError) as error:
            raise ComposerError(
                f"{self.path}: transformers has no model type '{config.get('model_type')}' for this GGUF file ({error})."
            ) from None
        if not getattr(model_config, "architectures", None):
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_config.model_type)
            if name:
                model_config.architectures = [name]
        return model_config.to_diff_dict() | {
            "architectures": model_config.architectures,
            "model_type": model_config.model_type,
        }

    def config(self) -> dict:
        return dict(self._config)

    @cached_property
    def _processor(self):
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        return TENSOR_PROCESSORS.get(self.header.architecture, TensorProcessor)(config=self._parsed["config"])

    @cached_property
    def _mapping(self) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
        """(GGUF tensor name -> transformers name, transformers name -> shape), from a model built on the meta device."""
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

        config = AutoConfig.for_model(**self.config())
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
            with _memoised_tensor_name_map():
                hf_name_of = get_gguf_hf_weights_map(model, self._processor)
        except (ValueError, NotImplementedError) as error:
            raise ComposerError(
                f"{self.path}: transformers cannot map this GGUF file's tensors to '{config.model_type}' names ({error})."
            ) from None
        shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        return hf_name_of, shapes

    @cached_property
    def _gguf_names_of(self) -> dict[str, list[str]]:
        """transformers name -> the GGUF tensors it is built from (more than one for merged MoE experts)."""
        hf_name_of, _ = self._mapping
        names: dict[str, list[str]] = {}
        for gguf_name in self.header.tensors:
            hf_name = hf_name_of.get(gguf_name)
            if hf_name is not None:
                names.setdefault(hf_name, []).append(gguf_name)
        return names

    @cached_property
    def _infos(self) -> dict[str, TensorInfo]:
        _, shapes = self._mapping
        infos = {}
        for hf_name, gguf_names in self._gguf_names_of.items():
            shape = shapes.get(hf_name)
            if shape is None or (
                len(gguf_names) == 1 and _numel(shape) != _numel(self.header.tensors[gguf_names[0]].shape)
            ):
                shape = self.header.tensors[gguf_names[0]].shape
            infos[hf_name] = TensorInfo(hf_name, shape, torch.float32)
        return infos

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return self._infos

    # ---- tensor data -------------------------------------------------------------------------------

    def _tensor_bytes(self, entry: GGUFTensorEntry):
        """The raw bytes of one tensor, shaped as rows of quant blocks."""
        return self._row_bytes(entry, 0, _numel(entry.byte_shape[:-1])).reshape(entry.byte_shape)

    def _row_bytes(self, entry: GGUFTensorEntry, start: int, stop: int):
        """The raw bytes of rows [start, stop) of one tensor (rows of its last axis), [stop - start, row bytes], read
        into memory of their own: a map of the file would keep every page read resident (in the process's RSS) for
        as long as the file is open, a whole model's worth by the end of a pass."""
        import numpy as np

        row_bytes = entry.byte_shape[-1]
        raw = np.empty((stop - start, row_bytes), dtype=np.uint8)
        view = memoryview(raw).cast("B")
        with self._opening:  # readers on several threads share one descriptor
            if self._descriptor is None:
                self._descriptor = os.open(self.path, os.O_RDONLY)
        try:
            fill_from(self._descriptor, entry.offset + start * row_bytes, view)
        except EOFError:
            raise ComposerError(
                f"{self.path}: tensor '{entry.name}' could not be read (the file ends before the tensor does). "
                "The file may have changed since it was opened."
            ) from None
        except OSError as error:
            raise ComposerError(f"{self.path}: tensor '{entry.name}' could not be read ({error}).") from None
        return raw

    def _dequantized(self, gguf_name: str, rows: tuple[int, int] | None = None):
        """One GGUF tensor as float32 (numpy), or its rows [start, stop) as [rows, row length]."""
        from gguf import GGMLQuantizationType, dequantize

        entry = self.header.tensors[gguf_name]
        raw = self._tensor_bytes(entry) if rows is None else self._row_bytes(entry, *rows)
        try:
            values = dequantize(raw, GGMLQuantizationType(entry.ggml_type))
        except NotImplementedError:
            raise ComposerError(
                f"{self.path}: tensor '{gguf_name}' is stored as {type_name(entry.ggml_type)}, which the gguf package cannot dequantise."
            ) from None
        return values.reshape(entry.shape if rows is None else (rows[1] - rows[0], entry.shape[-1]))

    def row_reader(self, name: str) -> Callable[[int, int], torch.Tensor] | None:
        """For a matrix stored as one GGUF tensor that transformers' processor hands on unchanged (most; not llama's
        permuted q and k rows, merged experts, offset norms), a function giving its rows [start, stop) in float32,
        equal to those rows of `read(name)`; None for the others."""
        if name not in self._row_readers:
            self._row_readers[name] = self._make_row_reader(name)
        return self._row_readers[name]

    def _make_row_reader(self, name: str) -> Callable[[int, int], torch.Tensor] | None:
        import numpy as np

        gguf_names = self._gguf_names_of.get(name)
        if gguf_names is None or len(gguf_names) != 1:
            return None
        entry = self.header.tensors[gguf_names[0]]
        shape = self._infos[name].shape
        if len(entry.shape) != 2 or len(shape) != 2 or tuple(shape) != tuple(entry.shape):
            return None
        # the processor is asked about a stand-in of the tensor's shape that takes no memory (every entry one
        # zero): handed back as is, the tensor is the stored one, row for row
        stand_in = np.broadcast_to(np.zeros((), dtype=np.float32), entry.shape)
        hf_name_of, _ = self._mapping
        try:
            result = self._processor.process(
                weights=stand_in, name=entry.name, tensor_key_mapping=hf_name_of, parsed_parameters={"tensors": {}}
            )
        except Exception:  # noqa: BLE001  (a processor that cannot take the stand-in: read whole, as before)
            return None
        if result.name is None or result.weights is not stand_in:
            return None

        def rows(start: int, stop: int) -> torch.Tensor:
            values = self._dequantized(entry.name, (start, stop))
            return torch.from_numpy(np.require(values, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))

        return rows

    def read(self, name: str) -> torch.Tensor:
        import numpy as np

        gguf_names = self._gguf_names_of.get(name)
        if gguf_names is None:
            raise ComposerError(f"Model '{self.reference}' ({self.path}) has no tensor '{name}'.")
        parsed: dict = {"tensors": {}}
        hf_name_of, _ = self._mapping
        weights = None
        for gguf_name in gguf_names:
            result = self._processor.process(
                weights=self._dequantized(gguf_name),
                name=gguf_name,
                tensor_key_mapping=hf_name_of,
                parsed_parameters=parsed,
            )
            if result.name is not None:
                weights = result.weights
        if name in parsed["tensors"]:  # assembled by the processor from several GGUF tensors
            tensor = parsed["tensors"][name].to(torch.float32)
        elif weights is not None:
            # dequantize hands float32 tensors back as a view of the raw bytes, which this read owns: np.require
            # copies only a view the processor made (a transpose)
            tensor = torch.from_numpy(np.require(weights, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))
        else:
            raise ComposerError(
                f"{self.path}: transformers' GGUF processor produced nothing for tensor '{name}' (from {', '.join(gguf_names)})."
            )
        shape = self._infos[name].shape
        if tensor.numel() != _numel(shape):
            raise ComposerError(
                f"{self.path}: tensor '{name}' dequantises to shape {tuple(tensor.shape)}, which does not fit {shape}."
            )
        return tensor.reshape(shape)

    # ---- tokenizer and card -------------------------------------------------------------------------

    def has_tokenizer(self) -> bool:
        return "tokenizer.ggml.tokens" in self.header.metadata

    def tokenizer_metadata(self) -> dict:
        """The `tokenizer.*` metadata with the arrays whole (vocabulary, token types, scores, merges)."""
        return read_gguf_tokenizer(self.path)

    def save_tokenizer(self, destination: Path) -> list[str]:
        from transformers import AutoTokenizer

        if not self.has_tokenizer():
            return []
        # transformers also reads tokenizer files lying beside the GGUF (tokenizer_config.json, ...), which may be
        # links out of the folder: it gets a folder holding nothing but a link to the GGUF, so the GGUF alone decides
        with tempfile.TemporaryDirectory(prefix="composer-gguf-") as alone:
            folder = Path(alone)
            try:
                (folder / self.path.name).symlink_to(self.path.resolve())
            except (
                OSError
            ):  # no links here (Windows without the privilege): the GGUF's own folder, as transformers would
                folder = self.path.parent
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=self.path.name)
            except (OSError, ValueError, KeyError, NotImplementedError) as error:
                raise ComposerError(
                    f"{self.path}: transformers cannot build a tokenizer from this GGUF file ({error})."
                ) from None
            before = {p.name for p in destination.iterdir()}
            tokenizer.save_pretrained(str(destination))
        return sorted({p.name for p in destination.iterdir()} - before)

    def license(self) -> str | None:
        value = self.header.metadata.get("general.license")
        return value if isinstance(value, str) and value else None

    def close(self) -> None:
        with self._opening:
            descriptor, self._descriptor = self._descriptor, None
        if descriptor is not None:
            os.close(descriptor)

    def release_files(self) -> None:
        self.close()


@contextmanager
def _memoised_tensor_name_map():
    """`get_gguf_hf_weights_map` rebuilds gguf's name table for every submodule (seconds for a 30-layer model);
    the table depends only on (architecture, layer count), so build it once while the map is made."""
    import gguf

    original = gguf.get_tensor_name_map
    built: dict = {}

    def memoised(arch, n_blocks):
        if (arch, n_blocks) not in built:
            built[arch, n_blocks] = original(arch, n_blocks)
        return built[arch, n_blocks]

    gguf.get_tensor_name_map = memoised
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
