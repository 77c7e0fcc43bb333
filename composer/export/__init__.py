"""Write a model as one GGUF file for llama.cpp and Ollama (`compose export`, `compose RECIPE OUT --gguf TYPE`).

The header (metadata, tokenizer, the table of every tensor's name, shape and type) is written first from the
source's headers alone; then each tensor is read, fixed up, converted and written, one at a time, so memory
holds one GGUF tensor (a layer's experts of one projection, for an MoE) and never the model.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from composer.errors import ComposerError
from composer.export.families import architecture_keys, check_exportable
from composer.export.output_file import WRITER_NAME, check_gguf_output_free, gguf_output
from composer.export.tensors import GGUFTensor, materialise, tensor_plan
from composer.export.vocabulary import read_vocabulary
from composer.sources import ModelSource, open_source

__all__ = [
    "GGUF_TYPES",
    "ExportReport",
    "check_exportable",
    "check_gguf_output_free",
    "check_gguf_type",
    "export_gguf",
    "gguf_beside",
]

log = logging.getLogger("composer")

GGUF_TYPES = ("f16", "bf16", "q8_0")
Q8_BLOCK = 32


@dataclass
class ExportReport:
    out: Path
    tensors: int
    bytes_written: int
    seconds: float
    kept_f16: list[str]  # tensors q8_0 could not hold (rows not a multiple of 32), written as f16


def check_gguf_type(text: str) -> str:
    """The GGUF type asked for, refused before any work when composer does not write it."""
    wanted = text.strip().lower()
    if wanted not in GGUF_TYPES:
        raise ComposerError(
            f"GGUF type '{text}' is not one composer writes; use f16, bf16 or q8_0. For {text} and the other k-quants, "
            "write f16 and run llama.cpp's llama-quantize on it (llama-quantize OUT.gguf OUT-q4_k_m.gguf Q4_K_M)."
        )
    return wanted


def gguf_beside(folder: Path) -> Path:
    """Where `compose RECIPE OUT --gguf` writes the GGUF: OUT.gguf, beside the folder OUT."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".gguf")


def _ggml_type(tensor: GGUFTensor, wanted: str):
    from gguf import GGMLQuantizationType

    if tensor.keeps_float32:
        return GGMLQuantizationType.F32
    if wanted == "q8_0":
        return GGMLQuantizationType.Q8_0 if tensor.shape[-1] % Q8_BLOCK == 0 else GGMLQuantizationType.F16
    return GGMLQuantizationType.BF16 if wanted == "bf16" else GGMLQuantizationType.F16


def _stored_bytes(shape: tuple[int, ...], ggml_type) -> int:
    from gguf import GGML_QUANT_SIZES

    block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    count = 1
    for size in shape:
        count *= size
    return count // block * block_bytes


def _encoded(values, ggml_type):
    """The bytes of one tensor in `ggml_type`, as a numpy array."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if ggml_type == GGMLQuantizationType.F32:
        return values.numpy().astype(np.float32, copy=False)
    if ggml_type == GGMLQuantizationType.F16:
        return values.to(torch.float16).numpy()
    if ggml_type == GGMLQuantizationType.BF16:
        return values.to(torch.bfloat16).view(torch.int16).numpy()
    return quantize(values.numpy(), ggml_type)


def _embedding_rows(tensors: list[GGUFTensor], where: str) -> int:
    for tensor in tensors:
        if tensor.kind == "TOKEN_EMBD":
            return tensor.shape[0]
    raise ComposerError(f"{where}: no token embedding tensor was found, so it cannot be written as GGUF.")


def _model_name(source: ModelSource) -> str:
    path = Path(str(source.reference).rstrip("/"))
    return path.stem if path.suffix == ".gguf" else path.name


def _recipe_text(source: ModelSource) -> str | None:
    """The recipe of a folder composer wrote, carried into the GGUF's metadata."""
    folder_file = getattr(source, "folder_file", None)
    path = folder_file("composer-recipe.yml") if folder_file is not None else None
    if path is None:
        return None
    from composer.files import read_text

    return read_text(path)


def _metadata(writer, source: ModelSource, keys: dict, wanted: str, arch: str) -> None:
    from gguf import LlamaFileType

    writer.add_type("model")
    writer.add_name(_model_name(source))
    writer.add_quantized_by(WRITER_NAME)
    writer.add_file_type(
        {"f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}[wanted]
    )
    writer.add_quantization_version(2)
    licence = source.license()
    if licence:
        writer.add_license(licence)
    recipe = _recipe_text(source)
    if recipe:
        writer.add_string("composer.recipe", recipe)
    for key, value in keys.items():
        full = f"{arch}.{key}"
        if isinstance(value, list):
            writer.add_array(full, value)
        elif isinstance(value, bool):
            writer.add_bool(full, value)
        elif isinstance(value, int):
            writer.add_uint32(full, value)
        elif isinstance(value, float):
            writer.add_float32(full, value)
        else:
            writer.add_string(full, str(value))


def export_gguf(
    reference: str,
    out: Path,
    gguf_type: str = "f16",
    force: bool = False,
    progress: bool | None = None,
    durable: bool = False,
    relative_to: Path | None = None,
) -> ExportReport:
    """Write the model `reference` (a folder, hub id, .gguf or BASE+ADAPTER) as the GGUF file `out`."""
    from composer.execute.output_folder import check_output_not_input

    wanted = check_gguf_type(gguf_type)
    check_gguf_output_free(Path(out), force)
    started = time.monotonic()
    source = open_source(reference, relative_to)
    where = f"Model '{reference}'"
    try:
        check_output_not_input(Path(out), source.input_paths())
        config = source.config()
        family = check_exportable(config, where)
        tensors = tensor_plan(source.tensor_infos(), config, family, where)
        rows = _embedding_rows(tensors, where)
        vocabulary = read_vocabulary(source, rows, where)
        keys = architecture_keys(config, family, rows, where)
        return _write(
            source, Path(out), tensors, vocabulary, keys, family.arch, wanted, force, progress, durable, started
        )
    finally:
        source.close()


def _write(source, out, tensors, vocabulary, keys, arch, wanted, force, progress, durable, started) -> ExportReport:
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from tqdm import tqdm

    types = [_ggml_type(tensor, wanted) for tensor in tensors]
    sizes = [_stored_bytes(tensor.shape, ggml_type) for tensor, ggml_type in zip(tensors, types)]
    kept_f16 = [
        tensor.name
        for tensor, ggml_type in zip(tensors, types)
        if wanted == "q8_0" and ggml_type == GGMLQuantizationType.F16
    ]
    shown = sys.stderr.isatty() if progress is None else progress
    with gguf_output(out, force, durable) as partial:
        writer = GGUFWriter(None, arch)
        _metadata(writer, source, keys, wanted, arch)
        vocabulary.add_to(writer)
        for tensor, ggml_type, size in zip(tensors, types, sizes):
            writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), size, raw_dtype=ggml_type)
        try:
            writer.write_header_to_file(partial)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="GGUF", disable=not shown) as bar:
                for tensor, ggml_type, size in zip(tensors, types, sizes):
                    data = _encoded(materialise(source, tensor), ggml_type)
                    writer.write_tensor_data(data)
                    bar.update(size)
        finally:
            writer.close()
    if kept_f16:
        log.info(
            "%d tensor(s) have rows that are not a multiple of %d values, which q8_0 needs; they are f16 (%s)",
            len(kept_f16),
            Q8_BLOCK,
            ", ".join(kept_f16[:4]) + (" ..." if len(kept_f16) > 4 else ""),
        )
    return ExportReport(Path(out), len(tensors), out.stat().st_size, time.monotonic() - started, kept_f16)
