"""MXFP4 checkpoints (gpt-oss's official release), seen as the bf16 model they encode.

The format is MXFP4 of the OCP Microscaling Formats (MX) specification v1.0: blocks of 32 FP4 E2M1 elements that
share one E8M0 scale. A fused expert tensor `X` (gpt-oss: `model.layers.N.mlp.experts.gate_up_proj`, `.down_proj`)
is stored as two uint8 tensors:

- `X_blocks`, shape [experts, rows, groups, 16]: each row is `groups` blocks of 16 bytes, each byte two E2M1 codes,
  the low nibble first (element 2k of a block is byte k & 0x0F, element 2k + 1 is byte k >> 4).
- `X_scales`, shape [experts, rows, groups]: each block's E8M0 scale s, the factor 2^(s - 127) (s = 255 is NaN).

An E2M1 code is a sign bit then three bits for the magnitude: codes 0-7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6 and codes 8-15
their negatives. An element is its code's value times its block's factor. The 32 elements of a block run along axis 1
of the tensor transformers holds: a row decodes to a column, so `X` is [experts, groups * 32, rows]. gpt-oss's
`gate_up_proj_blocks` [experts, 2 x inner, hidden / 32, 16] is `gate_up_proj` [experts, hidden, 2 x inner] and
`down_proj_blocks` [experts, hidden, inner / 32, 16] is `down_proj` [experts, inner, hidden], as transformers'
own dequantisation (transformers.integrations.mxfp4) reads them.

Every such value (one mantissa bit times a power of two, 2^-128 the smallest but zero) is exact in bfloat16, which
has float32's exponent range and subnormals down to 2^-133, except those of 2^128 and more (only under s = 254),
which overflow float32 as well; so the tensors are handed out in bfloat16, nothing lost, and the recipe's `dtype:`
decides the output's dtype as for any input. The stored layout is checked against transformers in tests/test_mxfp4.py.
A source that finds MXFP4 tensors shows `X` in place of `X_blocks` and `X_scales` and drops `quantization_config`
from the config it hands out (composer.sources.fp8.without_quantization). Every pair is checked when the model is
opened, before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from composer.errors import ComposerError
from composer.sources.base import TensorInfo

BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"
BLOCK_BYTES = 16  # 32 four-bit elements
ELEMENTS_PER_BYTE = 2
DEQUANTISED_DTYPE = torch.bfloat16
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_BIAS = 127
E8M0_NAN = 255


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = DEQUANTISED_DTYPE
) -> torch.Tensor:
    """The tensor that MXFP4 `blocks` [experts, rows, groups, 16] and `scales` [experts, rows, groups] encode, as
    [experts, groups * 32, rows] in `dtype` (the layout is in the module's docstring). Works an expert at a time: it
    holds the result, the inputs and one expert's values in float32 and in `dtype`."""
    experts, rows, groups, width = blocks.shape
    if width != BLOCK_BYTES or tuple(scales.shape) != (experts, rows, groups):
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not fit together")
    codes = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    pair_of_byte = torch.stack([codes.repeat(16), codes.repeat_interleave(16)], dim=-1)  # byte -> (low, high nibble)
    factor_of = torch.tensor([2.0 ** (s - E8M0_BIAS) for s in range(E8M0_NAN)] + [float("nan")], dtype=torch.float32)
    result = torch.empty((experts, groups * BLOCK_BYTES * ELEMENTS_PER_BYTE, rows), dtype=dtype)
    for expert in range(experts):  # index_select: several times faster than indexing with a tensor
        values = pair_of_byte.index_select(0, blocks[expert].reshape(-1).int()).view(rows, groups, -1)
        values *= factor_of.index_select(0, scales[expert].reshape(-1).int()).view(rows, groups, 1)
        result[expert] = values.view(rows, -1).to(dtype).T
    return result


@dataclass(frozen=True)
class Mxfp4Tensors:
    """Which tensors of a checkpoint are MXFP4: the dequantised tensor's name -> (its blocks' name, its scales' name)."""

    pairs: dict[str, tuple[str, str]]

    def visible(self, infos: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
        """The tensors as the model they encode: each `X` where its `X_blocks` was, in bfloat16, no scales."""
        blocks_of = {blocks: name for name, (blocks, _) in self.pairs.items()}
        hidden = {scales for _, scales in self.pairs.values()}
        shown = {}
        for name, info in infos.items():
            if name in blocks_of:
                experts, rows, groups, _ = info.shape
                dequantised = blocks_of[name]
                shown[dequantised] = TensorInfo(
                    dequantised, (experts, groups * BLOCK_BYTES * ELEMENTS_PER_BYTE, rows), DEQUANTISED_DTYPE
                )
            elif name not in hidden:
                shown[name] = info
        return shown

    def dequantise(self, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return dequantize_mxfp4(blocks, scales)


def says_mxfp4(config: dict) -> bool:
    settings = config.get("quantization_config")
    return isinstance(settings, dict) and str(settings.get("quant_method", "")).lower() == "mxfp4"


def _stored(info: TensorInfo) -> str:
    return f"{str(info.dtype).removeprefix('torch.')} with shape {list(info.shape)}"


def _check_pair(reference: str, blocks: TensorInfo, scales: TensorInfo, file: Path) -> None:
    shape = blocks.shape
    if len(shape) != 4 or shape[-1] != BLOCK_BYTES:
        raise ComposerError(
            f"Tensor '{blocks.name}' of model '{reference}' ({file}) is {_stored(blocks)}, but MXFP4 blocks of fused "
            f"experts are [experts, rows, groups, {BLOCK_BYTES}] (32 four-bit values in {BLOCK_BYTES} bytes a block), so "
            "composer cannot tell what it encodes. Use the model's bf16 release, or the checkpoint as it was published."
        )
    if scales.dtype != torch.uint8 or tuple(scales.shape) != tuple(shape[:-1]):
        raise ComposerError(
            f"Tensor '{scales.name}' of model '{reference}' ({file}) is {_stored(scales)}, but as the MXFP4 scales of "
            f"'{blocks.name}' ({_stored(blocks)}) it must be uint8 with shape {list(shape[:-1])}, one exponent a block. "
            "The checkpoint is damaged or not MXFP4: download it again, or use the model's bf16 release."
        )


def _require_partner(
    reference: str, name: str, partner: str, infos: dict[str, TensorInfo], files: dict[str, Path], holds: str
) -> None:
    """An MXFP4 tensor's blocks need its scales and its scales its blocks."""
    if partner not in infos:
        dequantised = name.rsplit("_", 1)[0]
        raise ComposerError(
            f"Tensor '{name}' of model '{reference}' ({files[name]}) holds MXFP4 {holds}, but the checkpoint has no "
            f"'{partner}' beside it, so the values of '{dequantised}' cannot be recovered. The download is incomplete: "
            "fetch the model again, or use its bf16 release."
        )


def find_mxfp4(
    infos: dict[str, TensorInfo], files: dict[str, Path], config: dict, reference: str, config_file: Path | None
) -> Mxfp4Tensors | None:
    """The MXFP4 tensors of a checkpoint (uint8 `X_blocks` with `X_scales`), checked; None when it has none and its
    config does not say it is MXFP4. `files` gives the file each tensor is stored in."""
    blocks = {name for name, info in infos.items() if name.endswith(BLOCKS_SUFFIX) and info.dtype == torch.uint8}
    declared = says_mxfp4(config)
    if not blocks and not declared:
        return None
    scales = {name for name, info in infos.items() if name.endswith(SCALES_SUFFIX) and info.dtype == torch.uint8}
    for name in sorted(blocks):
        base = name.removesuffix(BLOCKS_SUFFIX)
        _require_partner(reference, name, base + SCALES_SUFFIX, infos, files, "blocks")
        if base in infos:
            raise ComposerError(
                f"Model '{reference}' holds both '{base}' ({files[base]}) and its MXFP4 blocks '{name}' ({files[name]}), "
                "so which one the model means is unclear. Remove one of them."
            )
        _check_pair(reference, infos[name], infos[base + SCALES_SUFFIX], files[name])
    for name in sorted(scales):
        _require_partner(reference, name, name.removesuffix(SCALES_SUFFIX) + BLOCKS_SUFFIX, infos, files, "scales")
    if not blocks:
        raise ComposerError(
            f"The config.json of model '{reference}' ({config_file}) says its weights are MXFP4 "
            f"(quantization_config {config.get('quantization_config')!r}), but none of its tensors is MXFP4 blocks "
            f"(uint8 'X{BLOCKS_SUFFIX}' with 'X{SCALES_SUFFIX}'). Remove quantization_config if the weights are not "
            "quantised, or use the checkpoint as it was published."
        )
    return Mxfp4Tensors(
        {
            name.removesuffix(BLOCKS_SUFFIX): (name, name.removesuffix(BLOCKS_SUFFIX) + SCALES_SUFFIX)
            for name in sorted(blocks)
        }
    )
