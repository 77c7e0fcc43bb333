"""The chunked path of the task-arithmetic family (the default): the reference's result
(`composer.methods.task_arithmetic.reference`, which states the formula), bit for bit, in cache-sized
chunks (the whole tensor is one chunk off the CPU), with no tensor-sized float32 temporaries
(tests/test_fused_task_arithmetic.py).

Pass 1, model by model, only where a mask needs the whole tensor: the magnitude thresholds
(`ChunkedWindow`), the random masks (drawn chunk by chunk from the same stream, kept one bit per entry,
`BitMask`) and the L1 norms for `rescale`. Pass 2, chunk by chunk: the task vectors, masked, rescaled,
weighted, sign-elected, summed, divided, scaled and added to the base, with the same operations as the
reference on each chunk (all elementwise, so the same bits; masks as 0/1 in the deltas' dtype). Where
the bf16 C kernels can take the tensors, `native` does pass 2 in one sweep, and DARE's and DELLA's pass 1
and the magnitude counts, rounding at the same steps (tests/test_native.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from composer.memory import empty
from composer.methods.chunks import chunk_bounds
from composer.methods.order_statistics import ChunkedWindow
from composer.methods.task_arithmetic import native
from composer.methods.task_arithmetic.bitmask import BitMask
from composer.methods.task_arithmetic.draws import level_of, random_levels, stream_key
from composer.methods.task_arithmetic.settings import Sparsity, TaskMerge, task_merge
from composer.methods.task_arithmetic.sparsify import della_keep, l1_sum, rescale_factor
from composer.methods.task_arithmetic.steps import as_factor, chunk_delta, elect_signs_

CHUNK = 1 << 20  # elements per chunk on a CPU, a multiple of the L1 summing piece and of 4 (read at call time)


def cpu_chunks(count: int) -> list[tuple[int, int]]:
    """Flat (start, stop) ranges of `CHUNK` entries covering `count`."""
    return [(start, min(start + CHUNK, count)) for start in range(0, count, CHUNK)]


def row_chunks(base: torch.Tensor) -> list[tuple[int, int]]:
    """Flat ranges of whole rows (DELLA ranks entries within rows, along dimension 1) of about
    `CHUNK` elements (the draws are by flat position, so any boundary gives the same draws); one range
    for a 1-D tensor or off the CPU."""
    n = base.numel()
    if base.dim() < 2 or base.device.type != "cpu" or n == 0:
        return [(0, n)] if n else []
    row = n // base.shape[0]
    step = 8 // math.gcd(row, 8)  # every range starts at a multiple of 8, where a `BitMask` can be stored
    rows = max(step, CHUNK // max(row, 1) // step * step)
    return [(start * row, min(start + rows, base.shape[0]) * row) for start in range(0, base.shape[0], rows)]


@dataclass
class ChunkedInputs:
    """One merge's inputs: the `base` (in its shape, and flat), the flattened `models`, the flat ranges the
    chunked path goes through (`chunks`) and a buffer of the largest range in the base's dtype."""

    base: torch.Tensor
    models: list[torch.Tensor]
    chunks: list[tuple[int, int]]
    base_flat: torch.Tensor = field(init=False)
    buffer: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.base_flat = self.base.reshape(-1)
        width = max((stop - start for start, stop in self.chunks), default=0)
        self.buffer = torch.empty(width, dtype=self.base.dtype, device=self.base.device)

    def delta_into(self, i: int, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Model i's task vector over [start, stop), into `out`."""
        return chunk_delta(self.models[i], self.base_flat, start, stop, out)

    def magnitudes_at(self, i: int, positions: torch.Tensor) -> torch.Tensor:
        """|task vector| of model i at the flat `positions`, as float32 (a sample for `ChunkedWindow`)."""
        device = self.base.device
        picked = self.models[i][positions.to(device)].to(device=device, dtype=self.base.dtype)
        return picked.sub(self.base_flat[positions.to(device)]).abs().float()


def generalized_task_arithmetic(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    weights: Sequence[float],
    *,
    sparsification: str | None = None,
    consensus: bool = False,
    densities: Sequence[float] | None = None,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    generator: torch.Generator | int | None = None,
) -> torch.Tensor:
    """base + lambda * merge of the task vectors of `tensors`: `reference_generalized_task_arithmetic`'s
    result (which states the formula; `settings.TaskMerge` describes the options), bit for bit, chunk by chunk."""
    merge = task_merge(
        tensors,
        base,
        weights,
        sparsification=sparsification,
        consensus=consensus,
        densities=densities,
        gammas=gammas,
        epsilons=epsilons,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        generator=generator,
    )
    return merge_in_chunks(tensors, base, merge)


def merge_in_chunks(tensors: Sequence[torch.Tensor], base: torch.Tensor, merge: TaskMerge) -> torch.Tensor:
    """Pass 1 (`select`) for each sparsified model, then pass 2 by the kernels (`native.merged`) or chunk by chunk."""
    count = len(tensors)
    dtype, device = base.dtype, base.device
    if merge.sparsification == "della_magprune":
        chunks = row_chunks(base)
    elif device.type == "cpu":
        chunks = cpu_chunks(base.numel())
    else:
        chunks = chunk_bounds(base)
    inputs = ChunkedInputs(base, [tensor.reshape(-1) for tensor in tensors], chunks)
    base_flat, buffer, width = inputs.base_flat, inputs.buffer, inputs.buffer.numel()

    keeps, scales = [None] * count, [None] * count
    for i in range(count):
        sparsity = merge.sparsity(i)
        if sparsity is not None and base.numel():
            keeps[i], scales[i] = select(inputs, i, sparsity, merge.generator)

    weight_column = torch.tensor(list(merge.weights), dtype=dtype, device=device).reshape(count, 1)
    divisor = None
    if not merge.consensus:
        divisor = weight_column.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    fused = native.merged(base, inputs.models, chunks, keeps, scales, merge, divisor)
    if fused is not None:
        return fused
    out = empty((base.numel(),), dtype, device)
    stack = torch.empty((count, width), dtype=dtype, device=device)
    keep_buffer = torch.empty((2, width), dtype=dtype, device=device)  # 0/1 masks in the deltas' dtype
    merged_buffer = torch.empty(width, dtype=dtype, device=device)
    sign_workspace = torch.empty(2 * width, dtype=dtype, device=device) if merge.consensus else None
    for index, (start, stop) in enumerate(chunks):
        deltas = stack[:, : stop - start]
        for i in range(count):
            delta = inputs.delta_into(i, start, stop, deltas[i])
            keep = keeps[i]
            if isinstance(keep, ChunkedWindow):
                magnitudes = torch.abs(delta, out=buffer[: stop - start])
                delta.mul_(
                    keep.keep_(magnitudes, index, keep_buffer[0, : stop - start], keep_buffer[1, : stop - start])
                )
            elif keep is not None:
                delta.mul_(keep.factor_into(start, stop, keep_buffer[0]))
            if scales[i] is not None:
                delta.mul_(scales[i])
        deltas.mul_(weight_column)
        merged = merged_buffer[: stop - start]
        if merge.consensus:
            kept_weight = elect_signs_(deltas, merge.weights, divisor=merge.normalize, workspace=sign_workspace)
            torch.sum(deltas, dim=0, out=merged)
            if kept_weight is not None:
                # 1 where no weight was kept: + (x == 0) is masked_fill_'s result (x == 0 holds for -0 too), faster
                divisor = kept_weight.add_(torch.eq(kept_weight, 0, out=keep_buffer[0, : stop - start]))
        else:
            torch.sum(deltas, dim=0, out=merged)
        if merge.normalize:
            merged /= divisor
        if merge.lambda_ != 1:
            merged *= merge.lambda_
        torch.add(merged, base_flat[start:stop], out=out[start:stop])
    return out.view(base.shape)


def select(inputs: ChunkedInputs, i: int, sparsity: Sparsity, generator) -> tuple:
    """Pass 1 for model i: (keep, scale). keep: a `ChunkedWindow` for the magnitude methods, a `BitMask`
    for the random ones (None: every entry kept); scale: what the masked delta is multiplied by (None for
    none), as `sparsify.sparsify_` computes it."""
    base, model, chunks, buffer = inputs.base, inputs.models[i], inputs.chunks, inputs.buffer
    n = base.numel()
    method, density, rescale = sparsity.method, sparsity.density, sparsity.rescale

    def delta_into(start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        return inputs.delta_into(i, start, stop, out)

    if method in ("magnitude", "magnitude_outliers"):

        def magnitudes(index):
            start, stop = chunks[index]
            return delta_into(start, stop, buffer[: stop - start]).abs_()

        def sample(positions):
            return inputs.magnitudes_at(i, positions)

        counts = native.magnitude_counts(chunks, base, model)
        if method == "magnitude":
            window = ChunkedWindow(magnitudes, chunks, 0, max(1, int(density * n)), True, sample, counts)
        else:
            keep, top = int(density * n), int(sparsity.gamma * n)
            bottom = max(0, n - keep - top)
            window = ChunkedWindow(magnitudes, chunks, bottom, bottom + keep, False, sample, counts)
        if not rescale:
            return window, None
        # summed whole, as the reference (and mergekit) sums them, for the same bits
        delta = torch.empty(n, dtype=base.dtype, device=base.device)
        for start, stop in chunks:
            delta_into(start, stop, delta[start:stop])
        before = delta.abs().sum()
        spare = torch.empty((2, buffer.numel()), dtype=base.dtype, device=base.device)
        for index, (start, stop) in enumerate(chunks):
            magnitudes = torch.abs(delta[start:stop], out=buffer[: stop - start])
            delta[start:stop].mul_(window.keep_(magnitudes, index, spare[0, : stop - start], spare[1, : stop - start]))
        return window, rescale_factor(before, delta.abs().sum())
    key = stream_key(generator)  # drawn before anything is skipped, as `sparsify_` draws it
    if method == "random":
        threshold = level_of(density)
        if threshold >= 1 << 15:
            return None, None  # kept whole, and no draws, as in `random_mask_`
        found = native.dare_keep(base, model, key, threshold, rescale)
        if found is not None:
            return found
    chunk_keep = torch.empty(buffer.numel(), dtype=torch.bool, device=base.device)
    if method == "della_magprune":
        found = native.della_keep(base, model, chunks, chunk_keep, sparsity, key)
        if found is not None:
            return found
        rows = base.shape[0] if base.dim() >= 2 else 1
        row_shape = base.shape[1:] if base.dim() >= 2 else (n,)
    mask = BitMask(n, base.device)
    factor = torch.empty(buffer.numel(), dtype=base.dtype, device=base.device) if rescale else None
    before, after = l1_sum(base.dtype, base.device), l1_sum(base.dtype, base.device)
    for start, stop in chunks:
        keep = chunk_keep[: stop - start]
        if method == "random":
            torch.lt(random_levels(stop - start, key, base.device, start), threshold, out=keep)
        else:
            delta = delta_into(start, stop, buffer[: stop - start])
            shape = ((stop - start) * rows // n, *row_shape)
            della_keep(delta.view(shape), density, sparsity.epsilon, key, keep, start)
        mask.store(start, keep)
        if rescale:
            if method == "random":
                delta = delta_into(start, stop, buffer[: stop - start])
            before.add(delta)
            after.add(delta.mul_(as_factor(keep, factor[: stop - start])))
    return mask, (rescale_factor(before.value(), after.value()) if rescale else None)
