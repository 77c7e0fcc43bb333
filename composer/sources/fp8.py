"""Block-scaled FP8 checkpoints (DeepSeek-V3 style), seen as the floating-point model they encode.

Such a checkpoint stores a linear weight `X.weight` as float8_e4m3fn and beside it `X.weight_scale_inv`, one
float32 factor per block of `quantization_config.weight_block_size` (128x128) of the weight's last two axes. A
source that finds FP8 tensors hands each out dequantised (weight times its block's factor, computed in float32, then
in the checkpoint's declared dtype, as DeepSeek's own conversion does), hides the scales, and drops
`quantization_config` from the config it hands out: everything above the sources sees a plain model, and the
recipe's `dtype:` decides the output's dtype as for any other input. Every scale is checked against its weight when
the model is opened, before any work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from composer.errors import ComposerError
from composer.sources.base import TensorInfo

FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))
SCALE_SUFFIX = "_scale_inv"
DECLARED_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class BlockScaledFp8:
    """Which tensors of a checkpoint are block-scaled FP8: weight name -> its scale's name, the block and the dtype
    the weights are dequantised to."""

    scales: dict[str, str]
    block: tuple[int, int]
    dtype: torch.dtype

    def visible(self, infos: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
        """The tensors as the model they encode: FP8 weights in `dtype`, no scales."""
        hidden = set(self.scales.values())
        shown = {}
        for name, info in infos.items():
            if name in hidden:
                continue
            shown[name] = TensorInfo(name, info.shape, self.dtype) if name in self.scales else info
        return shown

    def dequantise(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """`weight` (FP8) times its blocks' factors: one float32 copy of the weight, scaled a row of blocks at a time."""
        rows, columns = weight.shape[-2:]
        block_rows, block_columns = self.block
        result = weight.to(torch.float32)
        scale = scale.to(torch.float32)
        for block in range(scale.shape[-2]):
            factors = scale[..., block : block + 1, :].repeat_interleave(block_columns, dim=-1)[..., :columns]
            result[..., block * block_rows : min((block + 1) * block_rows, rows), :] *= factors
        return result.to(self.dtype)


def _declared_dtype(config: dict) -> torch.dtype:
    """The dtype the checkpoint declares for its unquantised tensors (bfloat16 when it names none we can use)."""
    for key in ("torch_dtype", "dtype"):
        value = config.get(key)
        if isinstance(value, str) and value.removeprefix("torch.") in DECLARED_DTYPES:
            return DECLARED_DTYPES[value.removeprefix("torch.")]
    return torch.bfloat16


def _block_size(config: dict, reference: str, example: str) -> tuple[int, int]:
    settings = config.get("quantization_config")
    block = settings.get("weight_block_size") if isinstance(settings, dict) else None
    if (
        not isinstance(block, (list, tuple))
        or len(block) != 2
        or not all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in block)
    ):
        found = "has no 'quantization_config'" if settings is None else f"has 'quantization_config' {settings!r}"
        raise ComposerError(
            f"Model '{reference}' holds block-scaled FP8 weights (e.g. '{example}' with '{example}{SCALE_SUFFIX}'), but its "
            f"config.json {found} without a 'weight_block_size' of two positive whole numbers, so the size of the blocks "
            "the scales apply to is unknown. Add the block size the model was quantised with (e.g. "
            "'quantization_config': {'quant_method': 'fp8', 'weight_block_size': [128, 128]})."
        )
    return int(block[0]), int(block[1])


def _check_scale(reference: str, weight: TensorInfo, scale: TensorInfo, block: tuple[int, int]) -> None:
    if len(weight.shape) < 2:
        raise ComposerError(
            f"Tensor '{weight.name}' of model '{reference}' is {_dtype_name(weight.dtype)} with shape {list(weight.shape)}; "
            "block-scaled FP8 weights have at least two axes, so this checkpoint is not one composer can dequantise."
        )
    expected = (*weight.shape[:-2], *(math.ceil(size / step) for size, step in zip(weight.shape[-2:], block)))
    if not scale.dtype.is_floating_point or tuple(scale.shape) != expected:
        raise ComposerError(
            f"Tensor '{scale.name}' of model '{reference}' is {_dtype_name(scale.dtype)} with shape {list(scale.shape)}, but "
            f"as the scales of '{weight.name}' (shape {list(weight.shape)}) in blocks of {list(block)} it must be floating "
            f"point with shape {list(expected)}. The checkpoint or its quantization_config.weight_block_size is wrong."
        )


def find_block_scaled_fp8(
    infos: dict[str, TensorInfo], read_config: Callable[[], dict], reference: str
) -> BlockScaledFp8 | None:
    """The FP8 layout of a checkpoint's tensors, checked; None when it has no FP8 tensor. `read_config` is called only
    when there is one."""
    weights = [info for info in infos.values() if info.dtype in FP8_DTYPES]
    if not weights:
        return None
    for weight in weights:
        if weight.name + SCALE_SUFFIX not in infos:
            raise ComposerError(
                f"Tensor '{weight.name}' of model '{reference}' is {_dtype_name(weight.dtype)}, but the checkpoint has no "
                f"'{weight.name}{SCALE_SUFFIX}' beside it. composer reads FP8 checkpoints that are block-scaled (DeepSeek-V3 "
                "style: a 'weight_scale_inv' factor per block and 'quantization_config.weight_block_size' in config.json); "
                "without its scales the weight's values cannot be recovered. Use the model's BF16 release, or the complete "
                "FP8 checkpoint with its scales."
            )
    config = read_config()
    block = _block_size(config, reference, weights[0].name)
    for weight in weights:
        _check_scale(reference, weight, infos[weight.name + SCALE_SUFFIX], block)
    return BlockScaledFp8(
        scales={weight.name: weight.name + SCALE_SUFFIX for weight in weights},
        block=block,
        dtype=_declared_dtype(config),
    )


def without_quantization(config: dict) -> dict:
    """The config of the dequantised model: no quantization_config."""
    return {key: value for key, value in config.items() if key != "quantization_config"}
