"""The task-arithmetic family: merges of task vectors tau_i = x_i - base.

    y = base + lambda * merge(tau_1 .. tau_n)

`generalized_task_arithmetic` covers task arithmetic, TIES, DARE, breadcrumbs and DELLA (they differ
in how each task vector is sparsified and whether a sign is elected per entry); `sce` is separate.
The arithmetic follows mergekit's operation for operation (weighted deltas stacked, summed over the
model axis, divided, scaled, added to the base), so the deterministic methods give the same float32
weights bit for bit wherever no two entries tie at a selection threshold (at a tie mergekit keeps
whichever its unstable sort puts first; here the lowest positions). Selection by magnitude uses
order statistics instead of a full sort (see `composer.methods.sparsify`). Inputs are never
modified.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from composer.memory import empty
from composer.native import bf16 as native_bf16
from composer.methods.chunks import chunk_bounds
from composer.methods.bitmask import BitMask
from composer.methods.draws import level_of, make_generator, random_levels, stream_key
from composer.methods.sparsify import ChunkedWindow, della_keep, della_thresholds, l1_norm, l1_sum, pattern_counts, rescale_factor, sparsify_, window_mask_

SPARSIFICATIONS = ("magnitude", "random", "magnitude_outliers", "della_magprune")


def _check_task_inputs(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> None:
    if not tensors:
        raise ValueError("task arithmetic needs at least one model besides the base")
    for i, tensor in enumerate(tensors):
        if tensor.shape != base.shape:
            raise ValueError(f"model {i + 1} has shape {list(tensor.shape)} but the base has {list(base.shape)}")


def _cpu_chunks(count: int) -> list[tuple[int, int]]:
    """Flat (start, stop) ranges of `_FUSED_CHUNK` entries covering `count`."""
    return [(start, min(start + _FUSED_CHUNK, count)) for start in range(0, count, _FUSED_CHUNK)]


def task_vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """The stacked task vectors [n, *base.shape], x_i - base, in the base's dtype."""
    _check_task_inputs(tensors, base)
    deltas = torch.empty((len(tensors), *base.shape), dtype=base.dtype, device=base.device)
    for i, tensor in enumerate(tensors):
        torch.sub(tensor.to(device=base.device, dtype=base.dtype), base, out=deltas[i])
    return deltas


def elect_signs_(
    deltas: torch.Tensor, weights: Sequence[float] | None = None, divisor: bool = True, workspace: torch.Tensor | None = None
) -> torch.Tensor | None:
    """TIES sign election on the stacked (already weighted) deltas, in place: the elected sign of an
    entry is that of the sum over models (+ where the sum is >= 0); entries of the other sign are
    set to zero. With `divisor`, returns per entry the sum of `weights` (ones when None) over the
    models whose entry was kept (nonzero and of the elected sign); otherwise None. `workspace`: a
    buffer of at least 2 * deltas[0].numel() elements of deltas' dtype (allocated when None)."""
    shape = deltas.shape[1:]
    n = deltas[0].numel()
    if workspace is None or workspace.dtype != deltas.dtype or workspace.numel() < 2 * n:
        workspace = torch.empty(2 * n, dtype=deltas.dtype, device=deltas.device)
    sign = workspace.view(-1)[:n].view(shape)
    torch.sum(deltas, dim=0, out=sign)
    torch.ge(sign, 0, out=sign)
    sign.mul_(2).sub_(1)  # +1 / -1
    kept = workspace.view(-1)[n:2 * n].view(shape)
    # accumulated in float32 or better and rounded once, as a sum over the stacked model axis would be
    kept_weight = None
    if divisor:
        kept_weight = torch.zeros(shape, dtype=torch.promote_types(deltas.dtype, torch.float32), device=deltas.device)
    for i in range(deltas.shape[0]):
        delta = deltas[i]
        delta.mul_(sign).relu_().mul_(sign)  # delta where its sign is the elected one, else 0
        if kept_weight is not None:
            weight = 1.0 if weights is None else float(torch.tensor(float(weights[i]), dtype=deltas.dtype))
            kept_weight.add_(torch.ne(delta, 0, out=kept), alpha=weight)
    return None if kept_weight is None else kept_weight.to(deltas.dtype)


def _whole_tensors(tensors, base, weights, sparsification, consensus, densities, gammas, epsilons, normalize, rescale, lambda_, generator):
    """The reference path of `generalized_task_arithmetic`: whole tensors at a time (k stacked
    deltas in the base's dtype, two float32 mask buffers), the operations in mergekit's order."""
    count = len(tensors)
    deltas = task_vectors(tensors, base)
    workspace = None  # two tensor-sized float32 buffers, reused for every model's masks
    if sparsification is not None:
        if sparsification in ("random", "della_magprune") and not isinstance(generator, torch.Generator):
            generator = make_generator(0 if generator is None else generator)
        for i in range(count):
            if densities[i] < 1 and workspace is None:
                workspace = torch.empty(2 * base.numel(), dtype=torch.float32, device=base.device)
            sparsify_(deltas[i], sparsification, densities[i], rescale, gammas[i], epsilons[i], generator, workspace)
    weight_column = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device)
    weight_column = weight_column.reshape((count,) + (1,) * base.dim())
    deltas.mul_(weight_column)
    if consensus:
        divisor = elect_signs_(deltas, weights, divisor=normalize, workspace=workspace)
        merged = deltas.sum(dim=0)
        if divisor is not None:
            divisor.masked_fill_(divisor == 0, 1)
    else:
        merged = deltas.sum(dim=0)
        divisor = weight_column.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    del deltas
    if normalize:
        merged /= divisor
    if lambda_ != 1:
        merged *= lambda_
    return merged.add_(base).to(base.dtype)


_FUSED_CHUNK = 1 << 20  # elements per chunk on a CPU; a multiple of the L1 summing piece and of 4


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
    reference: bool = False,
) -> torch.Tensor:
    """base + lambda * merge of the task vectors of `tensors`.

    1. tau_i = x_i - base, sparsified with `sparsification` at `densities[i]` (with `rescale`, the
       kept entries are scaled to the task vector's L1 norm); `gammas` for "magnitude_outliers",
       `epsilons` for "della_magprune"; the random methods take one stream key per model, in
       order, from `generator` (`composer.methods.draws.stream_key`).
    2. d_i = w_i tau_i.
    3. consensus: per entry keep the d_i whose sign is the sign of sum_i d_i (TIES sign election);
       m = sum of the kept d_i, D = sum of the w_i kept there (1 where none).
       otherwise: m = sum_i d_i, D = sum_i w_i (1 when |D| < 1e-8).
    4. m / D when `normalize`; times `lambda_`; plus base, in the base's dtype.

    `reference`: the simple path, whole tensors at a time (k stacked deltas, float32 masks). By
    default the same result, bit for bit, in cache-sized chunks (the whole tensor is one chunk off
    the CPU), with no tensor-sized float32 temporaries (tests/test_fused_task_arithmetic.py).
    Pass 1, model by model, only where a mask needs the whole tensor: the magnitude thresholds
    (`ChunkedWindow`), the random masks (drawn chunk by chunk from the same stream, kept one
    bit per entry, `BitMask`) and the L1 norms for `rescale`. Pass 2, chunk by chunk: the task vectors, masked,
    rescaled, weighted, sign-elected, summed, divided, scaled and added to the base, with the same
    operations as the reference on each chunk (all elementwise, so the same bits; masks as 0/1 in
    the deltas' dtype). bf16 on a CPU: composer.native's C kernels do pass 2 in one sweep, and DARE's
    and DELLA's pass 1 and the magnitude counts, rounding at the same steps (tests/test_native.py).
    """
    count = len(tensors)
    if len(weights) != count:
        raise ValueError(f"{count} models but {len(weights)} weights")
    if sparsification is not None and sparsification not in SPARSIFICATIONS:
        raise ValueError(f"unknown sparsification {sparsification!r}")
    _check_task_inputs(tensors, base)
    densities = [1.0] * count if densities is None else list(densities)
    gammas = [0.01] * count if gammas is None else list(gammas)
    epsilons = [0.15] * count if epsilons is None else list(epsilons)
    arguments = (tensors, base, weights, sparsification, consensus, densities, gammas, epsilons, normalize, rescale, lambda_, generator)
    return (_whole_tensors if reference else _chunked)(*arguments)


def reference_generalized_task_arithmetic(tensors, base, weights, **options) -> torch.Tensor:
    """`generalized_task_arithmetic` by the simple whole-tensor path (the reference)."""
    return generalized_task_arithmetic(tensors, base, weights, reference=True, **options)


def _chunked(tensors, base, weights, sparsification, consensus, densities, gammas, epsilons, normalize, rescale, lambda_, generator):
    """The chunked path of `generalized_task_arithmetic` (its default)."""
    count = len(tensors)
    dtype, device = base.dtype, base.device
    base_flat = base.reshape(-1)
    flats = [tensor.reshape(-1) for tensor in tensors]
    if sparsification == "della_magprune":
        chunks = _row_chunks(base)
    elif device.type == "cpu":
        chunks = _cpu_chunks(base.numel())
    else:
        chunks = chunk_bounds(base)
    width = max((stop - start for start, stop in chunks), default=0)
    buffer = torch.empty(width, dtype=dtype, device=device)

    def delta_into(i: int, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        return _chunk_delta(flats[i], base_flat, start, stop, out)

    keeps, scales = [None] * count, [None] * count
    if sparsification is not None:
        if sparsification in ("random", "della_magprune") and not isinstance(generator, torch.Generator):
            generator = make_generator(0 if generator is None else generator)
        for i in range(count):
            if densities[i] < 1 and base.numel():
                keeps[i], scales[i] = _select(
                    sparsification, lambda start, stop, out, i=i: delta_into(i, start, stop, out), chunks, buffer, base, flats[i],
                    densities[i], gammas[i], epsilons[i], rescale, generator,
                    lambda positions, i=i: _as(flats[i][positions.to(device)], dtype, device).sub(base_flat[positions.to(device)]).abs().float(),
                )

    weight_column = torch.tensor(list(weights), dtype=dtype, device=device).reshape(count, 1)
    divisor = None
    if not consensus:
        divisor = weight_column.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if native_bf16.usable_for_merge(base_flat, flats):
        return _native_merge(base, flats, chunks, keeps, scales, weight_column, consensus, normalize, divisor, lambda_)
    out = empty((base.numel(),), dtype, device)
    stack = torch.empty((count, width), dtype=dtype, device=device)
    keep_buffer = torch.empty((2, width), dtype=dtype, device=device)  # 0/1 masks in the deltas' dtype
    merged_buffer = torch.empty(width, dtype=dtype, device=device)
    sign_workspace = torch.empty(2 * width, dtype=dtype, device=device) if consensus else None
    for index, (start, stop) in enumerate(chunks):
        deltas = stack[:, : stop - start]
        for i in range(count):
            delta = delta_into(i, start, stop, deltas[i])
            keep = keeps[i]
            if isinstance(keep, ChunkedWindow):
                magnitudes = torch.abs(delta, out=buffer[: stop - start])
                delta.mul_(keep.keep_(magnitudes, index, keep_buffer[0, : stop - start], keep_buffer[1, : stop - start]))
            elif keep is not None:
                delta.mul_(keep.factor_into(start, stop, keep_buffer[0]))
            if scales[i] is not None:
                delta.mul_(scales[i])
        deltas.mul_(weight_column)
        merged = merged_buffer[: stop - start]
        if consensus:
            kept_weight = elect_signs_(deltas, weights, divisor=normalize, workspace=sign_workspace)
            torch.sum(deltas, dim=0, out=merged)
            if kept_weight is not None:
                # 1 where no weight was kept: + (x == 0) is masked_fill_'s result (x == 0 holds for -0 too), faster
                divisor = kept_weight.add_(torch.eq(kept_weight, 0, out=keep_buffer[0, : stop - start]))
        else:
            torch.sum(deltas, dim=0, out=merged)
        if normalize:
            merged /= divisor
        if lambda_ != 1:
            merged *= lambda_
        torch.add(merged, base_flat[start:stop], out=out[start:stop])
    return out.view(base.shape)


def _native_merge(base, flats, chunks, keeps, scales, weight_column, consensus, normalize, divisor, lambda_):
    """Pass 2 of `_chunked` by the fused bf16 kernel (composer.native): the same operations, rounded
    at the same steps, in one pass. The whole tensor at once, unless a magnitude window splits a tie
    inside a chunk: then chunk by chunk, that chunk's mask computed as the torch path computes it."""
    base_flat, n = base.reshape(-1), base.numel()
    out = empty((n,), base.dtype, base.device)
    weights = weight_column.reshape(-1).tolist()
    scales = [None if scale is None else float(scale) for scale in scales]
    arguments = (scales, weights, consensus, normalize, 1.0 if divisor is None else float(divisor), lambda_, out)
    windows = [isinstance(keep, ChunkedWindow) for keep in keeps]
    if not any(windows):
        specs = [(native_bf16.KEEP_ALL,) if keep is None else (native_bf16.KEEP_BITS, keep.bits) for keep in keeps]
        native_bf16.task_arithmetic_(0, n, base_flat, flats, specs, *arguments)
        return out.view(base.shape)
    width = max(stop - start for start, stop in chunks)
    delta, magnitudes = (torch.empty(width, dtype=base.dtype) for _ in range(2))
    kept_masks = [torch.empty(width, dtype=torch.bool) for _ in keeps]
    spare = torch.empty(width, dtype=torch.bool)
    for index, (start, stop) in enumerate(chunks):
        specs = []
        for i, keep in enumerate(keeps):
            if keep is None:
                specs.append((native_bf16.KEEP_ALL,))
            elif not windows[i]:
                specs.append((native_bf16.KEEP_BITS, keep.bits))
            elif (patterns := keep.pattern_range(index)) is not None:
                specs.append((native_bf16.KEEP_PATTERNS, *patterns))
            else:
                torch.abs(_chunk_delta(flats[i], base_flat, start, stop, delta[: stop - start]), out=magnitudes[: stop - start])
                specs.append((native_bf16.KEEP_BYTES, keep.keep_(magnitudes[: stop - start], index, kept_masks[i][: stop - start], spare[: stop - start])))
        native_bf16.task_arithmetic_(start, stop, base_flat, flats, specs, *arguments)
    return out.view(base.shape)


def _as(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return tensor.to(device=device, dtype=dtype)


def _chunk_delta(flat: torch.Tensor, base_flat: torch.Tensor, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
    """The task vector of one flat chunk, x - base, in the base's dtype, into `out`."""
    return torch.sub(_as(flat[start:stop], base_flat.dtype, base_flat.device), base_flat[start:stop], out=out)


def _as_factor(mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The boolean `mask` as 0/1 in `out`'s dtype (a comparison of its bytes: far faster on a CPU
    than a conversion or a multiply by booleans)."""
    return torch.gt(mask.view(torch.uint8), 0, out=out)


def _row_chunks(base: torch.Tensor) -> list[tuple[int, int]]:
    """Flat ranges of whole rows (DELLA ranks entries within rows, along dimension 1) of about
    `_FUSED_CHUNK` elements (the draws are by flat position, so any boundary gives the same
    draws); one range for a 1-D tensor or off the CPU."""
    n = base.numel()
    if base.dim() < 2 or base.device.type != "cpu" or n == 0:
        return [(0, n)] if n else []
    row = n // base.shape[0]
    step = 8 // math.gcd(row, 8)  # every range starts at a multiple of 8, where a `BitMask` can be stored
    rows = max(step, _FUSED_CHUNK // max(row, 1) // step * step)
    return [(start * row, min(start + rows, base.shape[0]) * row) for start in range(0, base.shape[0], rows)]


def _select(method, delta_into, chunks, buffer, base, model, density, gamma, epsilon, rescale, generator, sample):
    """Pass 1 for one model: (keep, scale). keep: a `ChunkedWindow` for the magnitude methods, a
    flat boolean mask for the random ones; scale: what the masked delta is multiplied by (None for
    none), as `sparsify_` computes it."""
    n = base.numel()
    if method in ("magnitude", "magnitude_outliers"):
        def magnitudes(index):
            start, stop = chunks[index]
            return delta_into(start, stop, buffer[: stop - start]).abs_()

        counts = native_bf16.delta_pattern_counts(chunks, model, base.reshape(-1)) if native_bf16.usable(base, model) else None
        if method == "magnitude":
            window = ChunkedWindow(magnitudes, chunks, 0, max(1, int(density * n)), True, sample, counts)
        else:
            keep, top = int(density * n), int(gamma * n)
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
    else:
        rows = base.shape[0] if base.dim() >= 2 else 1
        row_shape = base.shape[1:] if base.dim() >= 2 else (n,)
    if method == "random" and native_bf16.usable(base, model):
        return _native_dare(base, model, key, threshold, rescale)
    chunk_keep = torch.empty(buffer.numel(), dtype=torch.bool, device=base.device)
    if method == "della_magprune" and base.dim() <= 2 and native_bf16.usable(base, model):
        return _native_della(base, model, chunks, chunk_keep, rows, density, epsilon, key, rescale)
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
            della_keep(delta.view(shape), density, epsilon, key, keep, start)
        mask.store(start, keep)
        if rescale:
            if method == "random":
                delta = delta_into(start, stop, buffer[: stop - start])
            before.add(delta)
            after.add(delta.mul_(_as_factor(keep, factor[: stop - start])))
    return mask, (rescale_factor(before.value(), after.value()) if rescale else None)


def _native_dare(base, model, key, threshold, rescale):
    """`_select` for "random" by the C kernel: the whole tensor's bits and exact L1 sums in one call."""
    mask = BitMask(base.numel(), base.device, zeroed=False)  # the kernel writes every byte
    before, after = l1_sum(base.dtype), l1_sum(base.dtype)
    sums = (model, base.reshape(-1), before.slots, after.slots) if rescale else ()
    native_bf16.dare_select(0, base.numel(), key, threshold, mask.bits, *sums)
    return mask, (rescale_factor(before.value(), after.value()) if rescale else None)


def _native_della(base, model, chunks, chunk_keep, rows, density, epsilon, key, rescale):
    """`_select` for "della_magprune" by the C kernel, a block of rows (`chunks`) at a time."""
    mask = BitMask(base.numel(), base.device)
    width = base.numel() // rows
    thresholds = della_thresholds(width, density, epsilon)
    before, after = l1_sum(base.dtype), l1_sum(base.dtype)
    sums = (before.slots, after.slots) if rescale else ()
    for start, stop in chunks:
        keep = chunk_keep[: stop - start]
        native_bf16.della_select((stop - start) // width, width, start, key, thresholds, keep, model, base.reshape(-1), *sums)
        mask.store(start, keep)
    return mask, (rescale_factor(before.value(), after.value()) if rescale else None)


# --- the named methods ------------------------------------------------------------------------------

def task_arithmetic(tensors, base, weights, *, normalize=False, lambda_=1.0):
    """Ilharco et al. 2022, arXiv:2212.04089: base + lambda * sum_i w_i tau_i (/ sum_i w_i)."""
    return generalized_task_arithmetic(tensors, base, weights, normalize=normalize, lambda_=lambda_)


def ties(tensors, base, weights, densities=None, *, normalize=True, rescale=False, lambda_=1.0):
    """Yadav et al. 2023, arXiv:2306.01708: trim by magnitude, elect signs, disjoint mean."""
    return generalized_task_arithmetic(
        tensors, base, weights, sparsification="magnitude", consensus=True, densities=densities,
        normalize=normalize, rescale=rescale, lambda_=lambda_,
    )


def dare_linear(tensors, base, weights, densities=None, *, normalize=False, rescale=True, lambda_=1.0, generator=None):
    """Yu et al. 2023, arXiv:2311.03099: random drop (keep with probability density), rescale, sum."""
    return generalized_task_arithmetic(
        tensors, base, weights, sparsification="random", densities=densities,
        normalize=normalize, rescale=rescale, lambda_=lambda_, generator=generator,
    )


def dare_ties(tensors, base, weights, densities=None, *, normalize=False, rescale=True, lambda_=1.0, generator=None):
    """DARE's random drop, then TIES's sign election."""
    return generalized_task_arithmetic(
        tensors, base, weights, sparsification="random", consensus=True, densities=densities,
        normalize=normalize, rescale=rescale, lambda_=lambda_, generator=generator,
    )


def breadcrumbs(tensors, base, weights, densities=None, gammas=None, *, normalize=False, rescale=False, lambda_=1.0):
    """Davari & Belilovsky 2023, arXiv:2312.06795: drop the largest gamma and the smallest entries."""
    return generalized_task_arithmetic(
        tensors, base, weights, sparsification="magnitude_outliers", densities=densities, gammas=gammas,
        normalize=normalize, rescale=rescale, lambda_=lambda_,
    )


def breadcrumbs_ties(tensors, base, weights, densities=None, gammas=None, *, normalize=False, rescale=False, lambda_=1.0):
    """Breadcrumbs' sparsification, then TIES's sign election."""
    return generalized_task_arithmetic(
        tensors, base, weights, sparsification="magnitude_outliers", consensus=True, densities=densities,
        gammas=gammas, normalize=normalize, rescale=rescale, lambda_=lambda_,
    )


def della(tensors, base, weights, densities=None, epsilons=None, *, normalize=True, rescale=True, lambda_=1.0, generator=None):
    """Deep et al. 2024, arXiv:2406.11617: magnitude-ranked random drop (MagPrune), sign election."""
    return generalized_task_arithmetic(
        tensors, base, weights, sparsification="della_magprune", consensus=True, densities=densities,
        epsilons=epsilons, normalize=normalize, rescale=rescale, lambda_=lambda_, generator=generator,
    )


def della_linear(tensors, base, weights, densities=None, epsilons=None, *, normalize=False, rescale=True, lambda_=1.0, generator=None):
    """DELLA's MagPrune, then a weighted sum (no sign election)."""
    return generalized_task_arithmetic(
        tensors, base, weights, sparsification="della_magprune", densities=densities,
        epsilons=epsilons, normalize=normalize, rescale=rescale, lambda_=lambda_, generator=generator,
    )


_VARIANCE_CHUNK = 1 << 16


def population_variance(stacked: torch.Tensor) -> torch.Tensor:
    """torch.var(stacked, dim=0, unbiased=False), bit for bit. On a CPU that reduction is slow over
    the leading axis (for bfloat16 about 200 ns an entry), so float32, bfloat16 and float16 tensors
    take the same Welford recurrence in float64 here, in cache-sized chunks: mean_k = mean_{k-1} + d / k
    with d = x_k - mean_{k-1}, m2_k = m2_{k-1} + d (x_k - mean_k); variance = m2_n / n, rounded to
    float32 (and then to the tensors' 16-bit dtype, as torch rounds it)."""
    if stacked.device.type != "cpu" or stacked.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return torch.var(stacked, dim=0, unbiased=False)
    count = stacked.shape[0]
    flat = stacked.reshape(count, -1)
    total = flat.shape[1]
    result = torch.empty(total, dtype=torch.float32)
    size = min(_VARIANCE_CHUNK, total)
    mean, m2, x, d = (torch.empty(size, dtype=torch.float64) for _ in range(4))
    for start in range(0, total, _VARIANCE_CHUNK):
        stop = min(total, start + _VARIANCE_CHUNK)
        width = stop - start
        mean_, m2_, x_, d_ = mean[:width], m2[:width], x[:width], d[:width]
        mean_.zero_()
        m2_.zero_()
        for k in range(count):
            x_.copy_(flat[k, start:stop])
            torch.sub(x_, mean_, out=d_)
            mean_.add_(torch.div(d_, k + 1))
            m2_.add_(d_.mul_(x_.sub_(mean_)))
        result[start:stop].copy_(m2_.div_(count))
    return result.to(stacked.dtype).reshape(stacked.shape[1:])


def sce(tensors: Sequence[torch.Tensor], base: torch.Tensor, select_topk: float = 1.0, *, reference: bool = False) -> torch.Tensor:
    """SCE (FuseChat, Wan et al. 2024, arXiv:2408.07990): select, calculate, erase.

    Select: with select_topk < 1, keep in every task vector only the entries whose variance across
    the models is among the top int(select_topk * #nonzero variances) (whole tensor; equal variances
    ranked by position).
    Calculate: model weight c_i = m_i / sum_j m_j (uniform 1/n when that sum is below 1e-6), m_i the
    mean of tau_i^2 (squares in the tensors' dtype, summed as `l1_norm` sums, the mean
    rounded to the dtype). Erase: TIES sign election on the selected tau_i (unweighted).
    y = base + sum_i c_i [kept_i] tau_i / max(sum_i c_i [kept_i], 1e-6).

    `reference`: whole tensors at a time (k stacked task vectors and a float32 mask). By default the
    same result, bit for bit, a cache-sized chunk at a time on a CPU: one pass counts the variances'
    bit patterns for the selection threshold (`ChunkedWindow`), one keeps the selection one bit per
    entry and sums the squares, one merges.
    """
    if reference or base.device.type != "cpu" or base.numel() == 0:
        return _sce_whole(tensors, base, select_topk)
    return _sce_chunked(tensors, base, select_topk)


def reference_sce(tensors: Sequence[torch.Tensor], base: torch.Tensor, select_topk: float = 1.0) -> torch.Tensor:
    """`sce` by the simple whole-tensor path (the reference)."""
    return sce(tensors, base, select_topk, reference=True)


def _sce_weights(mean_squares: torch.Tensor) -> torch.Tensor:
    count = mean_squares.numel()
    total = mean_squares.sum().item()
    return torch.ones_like(mean_squares) / count if abs(total) < 1e-6 else mean_squares / total


def _mean_square(sums: torch.Tensor, count: int, dtype: torch.dtype) -> torch.Tensor:
    return (sums / count).to(dtype)


def _sce_whole(tensors, base, select_topk):
    deltas = task_vectors(tensors, base)
    count = deltas.shape[0]
    if select_topk < 1:
        if select_topk <= 0:
            deltas.zero_()
        else:
            variance = population_variance(deltas)
            k = int(int(torch.count_nonzero(variance)) * select_topk)
            if variance.dtype not in (torch.float32, torch.float64):
                variance = variance.float()
            deltas.mul_(window_mask_(variance, 0, k, descending=True))
            del variance
    sums = torch.stack([l1_norm(torch.square(deltas[i])) for i in range(count)])
    model_weights = _sce_weights(_mean_square(sums, base.numel(), deltas.dtype))
    kept_weight = elect_signs_(deltas, model_weights.tolist())  # the election sees the unweighted tau_i
    deltas.mul_(model_weights.reshape((count,) + (1,) * base.dim()))
    merged = deltas.sum(dim=0)
    del deltas
    merged /= kept_weight.clamp_(min=1e-6)
    return merged.add_(base).to(base.dtype)


def _sce_chunked(tensors, base, select_topk):
    _check_task_inputs(tensors, base)
    count = len(tensors)
    dtype, device, n = base.dtype, base.device, base.numel()
    base_flat, flats = base.reshape(-1), [tensor.reshape(-1) for tensor in tensors]
    chunks = _cpu_chunks(n)
    width = chunks[0][1]
    stack = torch.empty((count, width), dtype=dtype, device=device)

    def deltas_of(start: int, stop: int) -> torch.Tensor:
        deltas = stack[:, : stop - start]
        for i in range(count):
            _chunk_delta(flats[i], base_flat, start, stop, deltas[i])
        return deltas

    fused = select_topk > 0 and native_bf16.usable_for_merge(base_flat, flats)
    variance_buffer = torch.empty(width, dtype=dtype) if fused else None

    def chunk_variances(index: int) -> torch.Tensor:
        start, stop = chunks[index]
        if fused:
            return native_bf16.sce_variances_(start, stop, base_flat, flats, variance_buffer[: stop - start])
        return population_variance(deltas_of(start, stop))

    window = selection = None
    if 0 < select_topk < 1:
        variances = chunk_variances

        def sample(positions: torch.Tensor) -> torch.Tensor:
            picked = torch.stack([flat[positions] for flat in flats]).to(dtype).sub_(base_flat[positions])
            return population_variance(picked).float()

        counts = None
        if dtype in (torch.bfloat16, torch.float16):  # one pass counts both the nonzero variances and their bit patterns
            counts = torch.stack([pattern_counts(variances(index)) for index in range(len(chunks))])
            nonzero = n - int(counts[:, 0].sum())  # a variance is never -0
        else:
            nonzero = sum(int(torch.count_nonzero(variances(index))) for index in range(len(chunks)))
        window = ChunkedWindow(variances, chunks, 0, int(nonzero * select_topk), True, sample, counts)
        selection = BitMask(n, device)
    keep = torch.empty(width, dtype=torch.bool, device=device)
    spare = torch.empty(width, dtype=torch.bool, device=device) if fused else None
    factor = torch.empty(width, dtype=dtype, device=device)
    squares = torch.empty(width, dtype=dtype, device=device)
    sums = [l1_sum(dtype, device) for _ in range(count)]
    for index, (start, stop) in enumerate(chunks):
        if fused:
            kept = None
            if window is not None:
                kept = window.keep_(chunk_variances(index), index, keep[: stop - start], spare[: stop - start])
                selection.store(start, kept)
            for i in range(count):
                native_bf16.sce_square_sums(start, stop, base_flat, flats[i], kept, sums[i].slots)
            continue
        deltas = deltas_of(start, stop)
        if window is not None:
            kept = window.keep_(population_variance(deltas), index, keep[: stop - start], factor[: stop - start])
            selection.store(start, kept)
            deltas.mul_(_as_factor(kept, factor[: stop - start]))
        elif select_topk <= 0:
            deltas.zero_()
        for i in range(count):
            sums[i].add(torch.square(deltas[i], out=squares[: stop - start]))
    model_weights = _sce_weights(_mean_square(torch.stack([total.value() for total in sums]), n, dtype))
    weights = model_weights.tolist()
    weight_column = model_weights.reshape(count, 1)
    out = empty((n,), dtype, device)
    if fused:
        return native_bf16.sce_merge_(base_flat, flats, None if selection is None else selection.bits, weights, out).view(base.shape)
    merged = torch.empty(width, dtype=dtype, device=device)
    workspace = torch.empty(2 * width, dtype=dtype, device=device)
    for start, stop in chunks:
        deltas = deltas_of(start, stop)
        if selection is not None:
            deltas.mul_(selection.factor_into(start, stop, factor))
        elif select_topk <= 0:
            deltas.zero_()
        kept_weight = elect_signs_(deltas, weights, workspace=workspace)
        deltas.mul_(weight_column)
        torch.sum(deltas, dim=0, out=merged[: stop - start])
        merged[: stop - start].div_(kept_weight.clamp_(min=1e-6))
        torch.add(merged[: stop - start], base_flat[start:stop], out=out[start:stop])
    return out.view(base.shape)
