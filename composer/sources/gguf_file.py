"""GGUF files, dequantised one tensor at a time.

The header (tensor table, licence) is read by composer's own parser, which touches no tensor data. Config
and tokenizer are translated by transformers' GGUF support; the tensor names and the per-family fix-ups
(llama's permuted q/k rows, gemma's norm offsets, merged MoE experts) come from the same place, so a tensor
read here equals what `from_pretrained(..., gguf_file=...)` loads.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import torch

from composer.errors import ComposerError
from composer.sources.base import ModelSource, TensorInfo
from composer.sources.gguf_format import GGUFTensorEntry, read_gguf_header, type_name


class GGUFFile(ModelSource):
    def __init__(self, reference: str, path: Path):
        super().__init__(reference)
        self.path = path
        self.header = read_gguf_header(path)
        if self.header.architecture is None:
            raise ComposerError(
                f"{path} has no 'general.architecture' in its metadata, so composer cannot tell which model family it holds."
            )
        self._memmap = None

    # ---- translation through transformers (metadata only) -------------------------------------------

    @cached_property
    def _parsed(self) -> dict:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        try:
            return load_gguf_checkpoint(str(self.path), return_tensors=False)
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
        """The raw bytes of one tensor, as a read-only view of the memory-mapped file."""
        import numpy as np

        if self._memmap is None:
            self._memmap = np.memmap(self.path, mode="r", dtype=np.uint8)
        return self._memmap[entry.offset : entry.offset + entry.nbytes].reshape(entry.byte_shape)

    def _dequantized(self, gguf_name: str):
        from gguf import GGMLQuantizationType, dequantize

        entry = self.header.tensors[gguf_name]
        raw = self._tensor_bytes(entry)
        try:
            values = dequantize(raw, GGMLQuantizationType(entry.ggml_type))
        except NotImplementedError:
            raise ComposerError(
                f"{self.path}: tensor '{gguf_name}' is stored as {type_name(entry.ggml_type)}, which the gguf package cannot dequantise."
            ) from None
        return values.reshape(entry.shape)

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
            # dequantize hands back a view of the read-only map for float32 tensors: copy those (only those)
            # into memory the tensor owns, so it is writable and independent of the file
            tensor = torch.from_numpy(np.require(weights, np.float32, ["C_CONTIGUOUS", "WRITEABLE", "OWNDATA"]))
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
        self._memmap = None


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
