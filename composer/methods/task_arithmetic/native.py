"""The task-arithmetic family's one way into the bf16 C kernels (composer.native.bf16): every kernel the
family uses is called from here, and each function first checks that the kernels can take the tensors
(bf16, contiguous, on a CPU, at most `bf16.MAX_MODELS` of them, the library built). Where they cannot, the
task-arithmetic functions return None and the caller takes its torch path; the kernels round at the same
steps as that path, so either gives the same bits (tests/test_native.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from composer.memory import empty
from composer.methods.order_statistics import ChunkedWindow
from composer.methods.task_arithmetic.bitmask import BitMask
from composer.methods.task_arithmetic.settings import Sparsity, TaskMerge
from composer.methods.task_arithmetic.sparsify import della_thresholds, l1_sum, rescale_factor
from composer.methods.task_arithmetic.steps import chunk_delta
from composer.native import bf16

# --- pass 1 of the chunked path: one model's mask ----------------------------------------------------


def magnitude_counts(chunks: Sequence[tuple[int, int]], base: torch.Tensor, model: torch.Tensor) -> torch.Tensor | None:
    """How many of the magnitudes of model - base in each chunk have each bit pattern (`ChunkedWindow`'s
    `counts`); `model` flat."""
    if not bf16.usable(base, model):
        return None
    return bf16.delta_pattern_counts(chunks, model, base.reshape(-1))


def dare_keep(base: torch.Tensor, model: torch.Tensor, key: int, threshold: int, rescale: bool):
    """DARE's pass 1 for the flat `model`: (the whole tensor's keep bits, the rescale factor or None), with
    exact L1 sums, in one call."""
    if not bf16.usable(base, model):
        return None
    mask = BitMask(base.numel(), base.device, zeroed=False)  # the kernel writes every byte
    before, after = l1_sum(base.dtype), l1_sum(base.dtype)
    sums = (model, base.reshape(-1), before.slots, after.slots) if rescale else ()
    bf16.dare_select(0, base.numel(), key, threshold, mask.bits, *sums)
    return mask, (rescale_factor(before.value(), after.value()) if rescale else None)


def della_keep(base: torch.Tensor, model: torch.Tensor, chunks, chunk_keep: torch.Tensor, sparsity: Sparsity, key: int):
    """DELLA's pass 1 for the flat `model`, a block of rows (`chunks`) at a time through the byte buffer
    `chunk_keep`: (keep bits, rescale factor or None). Matrices and vectors only."""
    if base.dim() > 2 or not bf16.usable(base, model):
        return None
    rows = base.shape[0] if base.dim() >= 2 else 1
    mask = BitMask(base.numel(), base.device)
    width = base.numel() // rows
    thresholds = della_thresholds(width, sparsity.density, sparsity.epsilon)
    before, after = l1_sum(base.dtype), l1_sum(base.dtype)
    sums = (before.slots, after.slots) if sparsity.rescale else ()
    for start, stop in chunks:
        keep = chunk_keep[: stop - start]
        bf16.della_select((stop - start) // width, width, start, key, thresholds, keep, model, base.reshape(-1), *sums)
        mask.store(start, keep)
    return mask, (rescale_factor(before.value(), after.value()) if sparsity.rescale else None)


# --- pass 2 of the chunked path: the merge ----------------------------------------------------------


def merged(
    base: torch.Tensor, models: Sequence[torch.Tensor], chunks, keeps: list, scales: list, merge: TaskMerge, divisor
) -> torch.Tensor | None:
    """Pass 2 of the chunked path in one sweep over the flat `models` (`keeps` and `scales` from pass 1,
    `divisor` the weights' sum where no sign is elected): the whole tensor at once, unless a magnitude
    window splits a tie inside a chunk; then chunk by chunk, that chunk's mask computed as the torch path
    computes it."""
    base_flat, n = base.reshape(-1), base.numel()
    if not bf16.usable_for_merge(base_flat, models):
        return None
    out = empty((n,), base.dtype, base.device)
    settings = bf16.TaskArithmeticSettings(
        weights=torch.tensor(list(merge.weights), dtype=base.dtype).tolist(),  # rounded as the torch path rounds them
        scales=[None if scale is None else float(scale) for scale in scales],
        consensus=merge.consensus,
        normalize=merge.normalize,
        divisor=1.0 if divisor is None else float(divisor),
        lambda_=merge.lambda_,
    )
    windows = [isinstance(keep, ChunkedWindow) for keep in keeps]
    if not any(windows):
        specs = [(bf16.KEEP_ALL,) if keep is None else (bf16.KEEP_BITS, keep.bits) for keep in keeps]
        bf16.task_arithmetic_(0, n, base_flat, models, specs, settings, out)
        return out.view(base.shape)
    width = max(stop - start for start, stop in chunks)
    delta, magnitudes = (torch.empty(width, dtype=base.dtype) for _ in range(2))
    kept_masks = [torch.empty(width, dtype=torch.bool) for _ in keeps]
    spare = torch.empty(width, dtype=torch.bool)
    for index, (start, stop) in enumerate(chunks):
        specs = []
        for i, keep in enumerate(keeps):
            if keep is None:
                specs.append((bf16.KEEP_ALL,))
            elif not windows[i]:
                specs.append((bf16.KEEP_BITS, keep.bits))
            elif (patterns := keep.pattern_range(index)) is not None:
                specs.append((bf16.KEEP_PATTERNS, *patterns))
            else:
                torch.abs(
                    chunk_delta(models[i], base_flat, start, stop, delta[: stop - start]),
                    out=magnitudes[: stop - start],
                )
                specs.append(
                    (
                        bf16.KEEP_BYTES,
                        keep.keep_(
                            magnitudes[: stop - start], index, kept_masks[i][: stop - start], spare[: stop - start]
                        ),
                    )
                )
        bf16.task_arithmetic_(start, stop, base_flat, models, specs, settings, out)
    return out.view(base.shape)


# --- SCE ---------------------------------------------------------------------------------------------


def sce_usable(base: torch.Tensor, models: Sequence[torch.Tensor]) -> bool:
    """Whether SCE's kernels below can take the flat `base` and `models`."""
    return bf16.usable_for_merge(base, models)


def sce_variances_(
    start: int, stop: int, base: torch.Tensor, models: Sequence[torch.Tensor], out: torch.Tensor
) -> torch.Tensor:
    """The variances across `models` of their deltas over [start, stop) into `out` (`sce.population_variance`'s bits)."""
    return bf16.sce_variances_(start, stop, base, models, out)


def sce_square_sums_(
    start: int, stop: int, base: torch.Tensor, models: Sequence[torch.Tensor], keep, sums: list
) -> None:
    """Add each model's exact sum of squared deltas over [start, stop), masked by the booleans `keep` when
    given, to its `l1_sum` accumulator in `sums`."""
    for model, total in zip(models, sums):
        bf16.sce_square_sums(start, stop, base, model, keep, total.slots)


def sce_merge_(
    base: torch.Tensor, models: Sequence[torch.Tensor], bits, weights: Sequence[float], out: torch.Tensor
) -> torch.Tensor:
    """SCE's merge of the flat tensors into `out`, with the selection `bits` (every entry when None)."""
    return bf16.sce_merge_(base, models, bits, weights, out)
