"""GGUF files, dequantised one tensor at a time.

Config and tokenizer metadata are translated by transformers' GGUF support; the tensor names and the
per-family fix-ups (llama's permuted q/k rows, gemma's norm offsets) come from the same place, so a
tensor read here equals what `from_pretrained(gguf_file=...)` would load.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from composer.errors import ComposerError
from composer.sources.base import ModelSource, TensorInfo


class GGUFFile(ModelSource):
    def __init__(self, reference: str, path: Path):
        super().__init__(reference)
        self.path = path
        try:
            from gguf import GGUFReader

            self._reader = GGUFReader(str(path))
        except Exception as error:  # the reader raises ValueError, struct.error, IndexError... on damage
            raise ComposerError(f"{path} could not be read as a GGUF file ({type(error).__name__}: {error}).") from None
        self._tensor_by_gguf_name = {tensor.name: tensor for tensor in self._reader.tensors}

    @cached_property
    def _parsed(self) -> dict:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        try:
            return load_gguf_checkpoint(str(self.path), return_tensors=False)
        except (ValueError, NotImplementedError) as error:
            raise ComposerError(f"{self.path}: transformers cannot translate this GGUF file's metadata ({error}).") from None

    def config(self) -> dict:
        config = {key: value for key, value in self._parsed["config"].items() if not key.startswith("_")}
        from transformers import AutoConfig

        model_config = AutoConfig.for_model(**config)
        if not getattr(model_config, "architectures", None):
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_config.model_type)
            if name:
                model_config.architectures = [name]
        return model_config.to_diff_dict() | {"architectures": model_config.architectures, "model_type": model_config.model_type}

    @cached_property
    def _hf_name_of(self) -> dict[str, str]:
        """GGUF tensor name -> transformers parameter name, derived from a model built on the meta device."""
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        config = AutoConfig.for_model(**self.config())
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        processor = TENSOR_PROCESSORS.get(self._architecture, TensorProcessor)(config=self._parsed["config"])
        return get_gguf_hf_weights_map(model, processor)

    @cached_property
    def _architecture(self) -> str:
        field = self._reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()

    @cached_property
    def _infos(self) -> dict[str, TensorInfo]:
        infos = {}
        for gguf_name, tensor in self._tensor_by_gguf_name.items():
            hf_name = self._hf_name_of.get(gguf_name)
            if hf_name is None:
                continue
            shape = tuple(int(size) for size in reversed(tensor.shape.tolist()))
            infos[hf_name] = TensorInfo(hf_name, shape, torch.float32)
        return infos

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return self._infos

    @cached_property
    def _gguf_name_of(self) -> dict[str, str]:
        return {hf: gguf for gguf, hf in self._hf_name_of.items()}

    def read(self, name: str) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        gguf_name = self._gguf_name_of[name]
        tensor = self._tensor_by_gguf_name[gguf_name]
        weights = dequantize(tensor.data, tensor.tensor_type)
        processor = TENSOR_PROCESSORS.get(self._architecture, TensorProcessor)(config=self._parsed["config"])
        weights = processor.process(weights=weights, name=gguf_name).weights
        result = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
        return result.reshape(self._infos[name].shape)

    def save_tokenizer(self, destination: Path) -> list[str]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        before = set(p.name for p in destination.iterdir())
        tokenizer.save_pretrained(str(destination))
        return sorted(set(p.name for p in destination.iterdir()) - before)

    def license(self) -> str | None:
        field = self._reader.fields.get("general.license")
        return bytes(field.parts[field.data[0]]).decode() if field else None
