"""Typed calls into the bf16 kernels of kernels.c: torch tensors in, their memory written in place.
Every function here expects what `usable` checks (contiguous bf16 CPU tensors) and the library
loaded (`composer.native.library()` not None)."""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from composer import native

MAX_MODELS = 16  # kernels.c's MAX_MODELS
KEEP_ALL, KEEP_BITS, KEEP_BYTES, KEEP_PATTERNS = range(4)
EXPONENT_SUMS = 320  # kernels.c SUMS: value slots, then infinities and NaNs
_BLOCK = 256  # kernels.c's BLOCK: ranges split between threads start at multiples of it
_MIN_PART = 1 << 17  # entries below which a range is not split between threads


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors (and are built)."""
    return all(
        tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu" and tensor.is_contiguous() for tensor in tensors
    ) and native.library() is not None


def _pointers(values, kind=ctypes.c_void_p):
    return (kind * max(1, len(values)))(*values)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="composer-kernels")


def _thread_count() -> int:
    return torch.get_num_threads()


def _parts(start: int, stop: int) -> list[tuple[int, int]]:
    """[start, stop) in torch's number of threads of parts (ctypes lets go of the GIL while a kernel
    runs, so they run at once), each but the first starting at a multiple of BLOCK."""
    count = max(1, min(_thread_count(), (stop - start) // _MIN_PART))
    step = -(-(stop - start) // count)
    cuts = [start] + [(start + k * step) // _BLOCK * _BLOCK for k in range(1, count)] + [stop]
    return [(low, high) for low, high in zip(cuts, cuts[1:]) if high > low]


def _in_parts(kernel, start: int, stop: int) -> None:
    """kernel(part_start, part_stop) over `_parts`, the last on this thread."""
    parts = _parts(start, stop)
    pending = [_pool().submit(kernel, *part) for part in parts[:-1]]
    kernel(*parts[-1])
    for future in pending:
        future.result()


def task_arithmetic_(
    start: int,
    stop: int,
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    keeps: Sequence[tuple],
    scales: Sequence[float | None],
    weights: Sequence[float],
    consensus: bool,
    normalize: bool,
    divisor: float,
    lambda_: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Entries [start, stop) of the flat `out` from the flat `base` and `models` (kernels.c's
    task_arithmetic_bf16). keeps[i]: (KEEP_ALL,), (KEEP_BITS, uint8 bits of the whole tensor),
    (KEEP_BYTES, one byte per entry of the range) or (KEEP_PATTERNS, low, high)."""
    modes, data, lows, highs = [], [], [], []
    for keep in keeps:
        mode = keep[0]
        modes.append(mode)
        data.append(keep[1].data_ptr() if mode in (KEEP_BITS, KEEP_BYTES) else None)
        lows.append(keep[1] if mode == KEEP_PATTERNS else 0)
        highs.append(keep[2] if mode == KEEP_PATTERNS else 0)
    common = (
        _pointers(modes, ctypes.c_int), _pointers(lows, ctypes.c_uint16), _pointers(highs, ctypes.c_uint16),
        _pointers([scale is not None for scale in scales], ctypes.c_int), _pointers([scale or 0.0 for scale in scales], ctypes.c_float),
        _pointers(list(weights), ctypes.c_float),
    )
    model_pointers = _pointers([model.data_ptr() for model in models])

    def kernel(low: int, high: int) -> None:
        # a range's byte masks start at the range's start
        here = _pointers([pointer + (low - start) if mode == KEEP_BYTES else pointer for mode, pointer in zip(modes, data)])
        native.library().task_arithmetic_bf16(
            low, high, len(models), base.data_ptr(), model_pointers, common[0], here, *common[1:],
            int(consensus), int(normalize), divisor, int(lambda_ != 1), lambda_, out.data_ptr(),
        )

    _in_parts(kernel, start, stop)
    return out


def dare_select(
    start: int, stop: int, key: int, threshold: int, bits: torch.Tensor,
    model: torch.Tensor | None = None, base: torch.Tensor | None = None,
    before: torch.Tensor | None = None, after: torch.Tensor | None = None,
) -> None:
    """DARE's keep bits for [start, stop) into `bits` (the whole tensor's); with `before` and
    `after` (int64, EXPONENT_SUMS each), the exact L1 sums of model - base and of it masked added to them."""
    parts = _parts(start, stop)
    counted = before is not None
    sums = [(torch.zeros(EXPONENT_SUMS, dtype=torch.int64), torch.zeros(EXPONENT_SUMS, dtype=torch.int64)) if counted else (None, None) for _ in parts]

    def kernel(low: int, high: int) -> None:
        pointers = [None if tensor is None else tensor.data_ptr() for tensor in (model, base, *sums[parts.index((low, high))])]
        native.library().dare_select_bf16(low, high, key & ((1 << 64) - 1), threshold, bits.data_ptr(), *pointers)

    _in_parts(kernel, start, stop)
    if counted:
        for part_before, part_after in sums:
            before += part_before
            after += part_after


def della_select(
    rows: int, width: int, offset: int, key: int, thresholds: torch.Tensor, keep: torch.Tensor,
    model: torch.Tensor, base: torch.Tensor, before: torch.Tensor | None = None, after: torch.Tensor | None = None,
) -> None:
    """DELLA's keep bytes for `rows` rows of `width` entries at flat `offset` of the flat `model` and
    `base` into `keep` (a byte per entry of those rows), the rows split between threads; with `before`
    and `after`, the exact L1 sums of the delta and of it masked added to them (kernels.c's
    della_select_bf16; `thresholds`: int32, one per rank)."""
    parts = _row_parts(rows, width)
    counted = before is not None
    sums = [(torch.zeros(EXPONENT_SUMS, dtype=torch.int64), torch.zeros(EXPONENT_SUMS, dtype=torch.int64)) if counted else (None, None) for _ in parts]

    def kernel(index: int) -> None:
        first, last = parts[index]
        at = offset + first * width
        pointers = [None if tensor is None else tensor.data_ptr() for tensor in sums[index]]
        native.library().della_select_bf16(
            last - first, width, at, key & ((1 << 64) - 1), thresholds.data_ptr(), keep.data_ptr() + first * width,
            model.data_ptr() + 2 * at, base.data_ptr() + 2 * at, *pointers,
        )

    pending = [_pool().submit(kernel, index) for index in range(len(parts) - 1)]
    kernel(len(parts) - 1)
    for future in pending:
        future.result()
    if counted:
        for part_before, part_after in sums:
            before += part_before
            after += part_after


def _row_parts(rows: int, width: int) -> list[tuple[int, int]]:
    """Rows [0, rows) in torch's number of threads of parts of at least _MIN_PART entries."""
    count = max(1, min(_thread_count(), rows * width // _MIN_PART, rows))
    cuts = [rows * k // count for k in range(count + 1)]
    return [(low, high) for low, high in zip(cuts, cuts[1:]) if high > low]


def model_stock_blend_(base: torch.Tensor, models: Sequence[torch.Tensor], ratio: float, keep: float, out: torch.Tensor) -> torch.Tensor:
    """Model Stock's blend of the flat `models` and `base` into `out` (kernels.c's model_stock_blend_bf16)."""
    pointers = _pointers([model.data_ptr() for model in models])

    def kernel(low: int, high: int) -> None:
        native.library().model_stock_blend_bf16(low, high, len(models), pointers, base.data_ptr(), ratio, keep, out.data_ptr())

    _in_parts(kernel, 0, base.numel())
    return out


def magnitude_sums_(values: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Add the exact L1 sums of the bf16 `values` to `sums` (int64, EXPONENT_SUMS)."""
    native.library().magnitude_sums_bf16(values.numel(), values.data_ptr(), sums.data_ptr())
    return sums
