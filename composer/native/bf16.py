"""Typed calls into the bf16 kernels of kernels.c: torch tensors in, their memory written in place.
Every function here expects what `usable` checks (contiguous bf16 CPU tensors) and the library
loaded (`composer.native.library()` not None)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

from composer import native
from composer.parallel import each

MAX_MODELS = 16  # kernels.c's MAX_MODELS
KEEP_ALL, KEEP_BITS, KEEP_BYTES, KEEP_PATTERNS = range(4)
EXPONENT_SUMS = 320  # kernels.c SUMS: value slots, then infinities and NaNs
_BLOCK = 256  # kernels.c's BLOCK: ranges split between threads start at multiples of it
MIN_PART = 1 << 17  # entries below which a range is not split between threads


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors (and are built)."""
    return (
        all(
            tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu" and tensor.is_contiguous()
            for tensor in tensors
        )
        and native.library() is not None
    )


def usable_for_merge(base: torch.Tensor, models: Sequence[torch.Tensor]) -> bool:
    """Whether the merge kernels can take `base` and `models` (at most MAX_MODELS of them)."""
    return len(models) <= MAX_MODELS and usable(base, *models)


def _pointers(values, kind=ctypes.c_void_p):
    return (kind * max(1, len(values)))(*values)


def thread_count() -> int:
    return torch.get_num_threads()


def _parts(start: int, stop: int) -> list[tuple[int, int]]:
    """[start, stop) in torch's number of threads of parts (ctypes lets go of the GIL while a kernel
    runs, so they run at once), each but the first starting at a multiple of BLOCK."""
    count = max(1, min(thread_count(), (stop - start) // MIN_PART))
    step = -(-(stop - start) // count)
    cuts = [start] + [(start + k * step) // _BLOCK * _BLOCK for k in range(1, count)] + [stop]
    return [(low, high) for low, high in pairwise(cuts) if high > low]


def _part_sums(parts: list, targets: Sequence[torch.Tensor | None]) -> list[tuple]:
    """Zeroed sums for each part, one per target (None where the target is None): each thread adds
    to its own, and `_fold` adds them to the targets."""
    return [
        tuple(None if target is None else torch.zeros(EXPONENT_SUMS, dtype=torch.int64) for target in targets)
        for _ in parts
    ]


def _fold(sums: list[tuple], targets: Sequence[torch.Tensor | None]) -> None:
    for part in sums:
        for target, total in zip(targets, part):
            if target is not None:
                target += total


def _in_parts(kernel, start: int, stop: int) -> None:
    """kernel(part_start, part_stop) over `_parts`."""
    parts = _parts(start, stop)
    each(lambda index: kernel(*parts[index]), len(parts))


@dataclass(frozen=True)
class TaskArithmeticSettings:
    """What kernels.c's task_arithmetic_bf16 does with one tensor besides its inputs: each model's weight
    (`weights`) and rescale factor (`scales`, None for none), whether a sign is elected per entry
    (`consensus`), whether the sum is divided (`normalize`) by the kept weights (with `consensus`) or by
    `divisor`, and the factor `lambda_` applied last."""

    weights: Sequence[float]
    scales: Sequence[float | None]
    consensus: bool
    normalize: bool
    divisor: float
    lambda_: float


def task_arithmetic_(
    start: int,
    stop: int,
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    keeps: Sequence[tuple],
    settings: TaskArithmeticSettings,
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
        _pointers(modes, ctypes.c_int),
        _pointers(lows, ctypes.c_uint16),
        _pointers(highs, ctypes.c_uint16),
        _pointers([scale is not None for scale in settings.scales], ctypes.c_int),
        _pointers([scale or 0.0 for scale in settings.scales], ctypes.c_float),
        _pointers(list(settings.weights), ctypes.c_float),
    )
    model_pointers = _pointers([model.data_ptr() for model in models])

    def kernel(low: int, high: int) -> None:
        # a range's byte masks start at the range's start
        here = _pointers(
            [pointer + (low - start) if mode == KEEP_BYTES else pointer for mode, pointer in zip(modes, data)]
        )
        native.library().task_arithmetic_bf16(
            low,
            high,
            len(models),
            base.data_ptr(),
            model_pointers,
            common[0],
            here,
            *common[1:],
            int(settings.consensus),
            int(settings.normalize),
            settings.divisor,
            int(settings.lambda_ != 1),
            settings.lambda_,
            out.data_ptr(),
        )

    _in_parts(kernel, start, stop)
    return out


def dare_select(
    start: int,
    stop: int,
    key: int,
    threshold: int,
    bits: torch.Tensor,
    model: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    before: torch.Tensor | None = None,
    after: torch.Tensor | None = None,
) -> None:
    """DARE's keep bits for [start, stop) into `bits` (the whole tensor's); with `before` and
    `after` (int64, EXPONENT_SUMS each), the exact L1 sums of model - base and of it masked added to them."""
    parts = _parts(start, stop)
    sums = _part_sums(parts, (before, after))

    def kernel(index: int) -> None:
        pointers = [None if tensor is None else tensor.data_ptr() for tensor in (model, base, *sums[index])]
        native.library().dare_select_bf16(*parts[index], key & ((1 << 64) - 1), threshold, bits.data_ptr(), *pointers)

    each(kernel, len(parts))
    _fold(sums, (before, after))


def della_select(
    rows: int,
    width: int,
    offset: int,
    key: int,
    thresholds: torch.Tensor,
    keep: torch.Tensor,
    model: torch.Tensor,
    base: torch.Tensor,
    before: torch.Tensor | None = None,
    after: torch.Tensor | None = None,
) -> None:
    """DELLA's keep bytes for `rows` rows of `width` entries at flat `offset` of the flat `model` and
    `base` into `keep` (a byte per entry of those rows), the rows split between threads; with `before`
    and `after`, the exact L1 sums of the delta and of it masked added to them (kernels.c's
    della_select_bf16; `thresholds`: int32, one per rank)."""
    parts = _row_parts(rows, width)
    sums = _part_sums(parts, (before, after))

    def kernel(index: int) -> None:
        first, last = parts[index]
        at = offset + first * width
        pointers = [None if tensor is None else tensor.data_ptr() for tensor in sums[index]]
        native.library().della_select_bf16(
            last - first,
            width,
            at,
            key & ((1 << 64) - 1),
            thresholds.data_ptr(),
            keep.data_ptr() + first * width,
            model.data_ptr() + 2 * at,
            base.data_ptr() + 2 * at,
            *pointers,
        )

    each(kernel, len(parts))
    _fold(sums, (before, after))


def _row_parts(rows: int, width: int) -> list[tuple[int, int]]:
    """Rows [0, rows) in torch's number of threads of parts of at least MIN_PART entries."""
    count = max(1, min(thread_count(), rows * width // MIN_PART, rows))
    cuts = [rows * k // count for k in range(count + 1)]
    return [(low, high) for low, high in pairwise(cuts) if high > low]


def model_stock_blend_(
    base: torch.Tensor, models: Sequence[torch.Tensor], ratio: float, keep: float, out: torch.Tensor
) -> torch.Tensor:
    """Model Stock's blend of the flat `models` and `base` into `out` (kernels.c's model_stock_blend_bf16)."""
    pointers = _pointers([model.data_ptr() for model in models])

    def kernel(low: int, high: int) -> None:
        native.library().model_stock_blend_bf16(
            low, high, len(models), pointers, base.data_ptr(), ratio, keep, out.data_ptr()
        )

    _in_parts(kernel, 0, base.numel())
    return out


def sce_variances_(
    start: int, stop: int, base: torch.Tensor, models: Sequence[torch.Tensor], out: torch.Tensor
) -> torch.Tensor:
    """The bf16 variances across `models` of their deltas over [start, stop) into `out` (from its start),
    as `population_variance` computes them (kernels.c's sce_variances_bf16)."""
    pointers = _pointers([model.data_ptr() for model in models])

    def kernel(low: int, high: int) -> None:
        native.library().sce_variances_bf16(
            low, high, len(models), base.data_ptr(), pointers, out.data_ptr() + 2 * (low - start)
        )

    _in_parts(kernel, start, stop)
    return out


def sce_square_sums(
    start: int, stop: int, base: torch.Tensor, model: torch.Tensor, keep: torch.Tensor | None, sums: torch.Tensor
) -> None:
    """Add to `sums` the exact sums of the squared deltas of `model` over [start, stop), masked by the
    booleans `keep` (from its start) when given (kernels.c's sce_square_sums_bf16)."""
    parts = _parts(start, stop)
    totals = _part_sums(parts, (sums,))

    def kernel(index: int) -> None:
        low, high = parts[index]
        mask = None if keep is None else keep.data_ptr() + (low - start)
        native.library().sce_square_sums_bf16(
            low, high, model.data_ptr(), base.data_ptr(), mask, totals[index][0].data_ptr()
        )

    each(kernel, len(parts))
    _fold(totals, (sums,))


def sce_merge_(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    bits: torch.Tensor | None,
    weights: Sequence[float],
    out: torch.Tensor,
) -> torch.Tensor:
    """SCE's merge of the flat `models` and `base` into `out`, with the selection `bits` (the whole
    tensor's; every entry when None) and the model `weights` (kernels.c's sce_merge_bf16)."""
    pointers, weight_values = (
        _pointers([model.data_ptr() for model in models]),
        _pointers(list(weights), ctypes.c_float),
    )
    selection = None if bits is None else bits.data_ptr()

    def kernel(low: int, high: int) -> None:
        native.library().sce_merge_bf16(
            low, high, len(models), base.data_ptr(), pointers, selection, weight_values, out.data_ptr()
        )

    _in_parts(kernel, 0, base.numel())
    return out


def delta_pattern_counts(chunks: Sequence[tuple[int, int]], model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """How many of the bf16 deltas model - base of each chunk have each magnitude bit pattern
    ([chunks, 32768] int64, as `sparsify.pattern_counts` of each chunk's magnitudes), chunks split
    between threads (kernels.c's delta_pattern_counts_bf16)."""
    counts = torch.zeros((len(chunks), 1 << 15), dtype=torch.int64)

    def kernel(index: int) -> None:
        native.library().delta_pattern_counts_bf16(
            *chunks[index], model.data_ptr(), base.data_ptr(), counts[index].data_ptr()
        )

    for first in range(0, len(chunks), thread_count()):
        each(lambda index, first=first: kernel(first + index), min(thread_count(), len(chunks) - first))
    return counts


def nth_delta_pattern(model: torch.Tensor, base: torch.Tensor, pattern: int, nth: int) -> int:
    """The flat position of the `nth` (1-based) delta model - base, in position order, whose bf16 magnitude has bit
    pattern `pattern` (kernels.c's nth_delta_pattern_bf16); -1 when there are fewer."""
    found = ctypes.c_int64(-1)
    native.library().nth_delta_pattern_bf16(
        0, base.numel(), model.data_ptr(), base.data_ptr(), pattern, nth, ctypes.byref(found)
    )
    return found.value


def magnitude_sums_(values: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Add the exact L1 sums of the bf16 `values` to `sums` (int64, EXPONENT_SUMS)."""
    native.library().magnitude_sums_bf16(values.numel(), values.data_ptr(), sums.data_ptr())
    return sums
