"""SCE (FuseChat, Wan et al. 2024, arXiv:2408.07990): select, calculate, erase, on task vectors
tau_i = x_i - base.

Select: with select_topk < 1, keep in every task vector only the entries whose variance across the
models is among the top int(select_topk * #nonzero variances) (whole tensor; equal variances ranked by
position). Calculate: model weight c_i = m_i / sum_j m_j (uniform 1/n when that sum is below 1e-6), m_i
the mean of tau_i^2 (squares in the tensors' dtype, summed as `l1_norm` sums, the mean rounded to the
dtype). Erase: TIES sign election on the selected tau_i (unweighted).

    y = base + sum_i c_i [kept_i] tau_i / max(sum_i c_i [kept_i], 1e-6)

`reference_sce` computes it whole tensors at a time (the specification); `sce`, the default, gives its
bits a cache-sized chunk at a time on a CPU, through the bf16 kernels (`native`) where they can take
the tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from composer.memory import empty
from composer.methods.order_statistics import ChunkedWindow, pattern_counts, window_mask_
from composer.methods.registry import Parameter, registered
from composer.methods.task_arithmetic import native
from composer.methods.task_arithmetic.bitmask import BitMask
from composer.methods.task_arithmetic.chunked import cpu_chunks
from composer.methods.task_arithmetic.sparsify import l1_norm, l1_sum
from composer.methods.task_arithmetic.steps import as_factor, check_inputs, chunk_delta, elect_signs_, task_vectors

VARIANCE_CHUNK = 1 << 16  # entries per step of `population_variance` on a CPU (read at call time)


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
    size = min(VARIANCE_CHUNK, total)
    mean, m2, x, d = (torch.empty(size, dtype=torch.float64) for _ in range(4))
    for start in range(0, total, VARIANCE_CHUNK):
        stop = min(total, start + VARIANCE_CHUNK)
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


def sce(tensors: Sequence[torch.Tensor], base: torch.Tensor, select_topk: float = 1.0) -> torch.Tensor:
    """SCE of `tensors` onto `base` (the module's formula): `reference_sce`'s bits, a cache-sized chunk
    at a time on a CPU: one pass counts the variances' bit patterns for the selection threshold
    (`ChunkedWindow`), one keeps the selection one bit per entry and sums the squares, one merges.
    Off the CPU, the reference."""
    if base.device.type != "cpu" or base.numel() == 0:
        return reference_sce(tensors, base, select_topk)
    return _sce_chunked(tensors, base, select_topk)


def _sce_weights(mean_squares: torch.Tensor) -> torch.Tensor:
    count = mean_squares.numel()
    total = mean_squares.sum().item()
    return torch.ones_like(mean_squares) / count if abs(total) < 1e-6 else mean_squares / total


def _mean_square(sums: torch.Tensor, count: int, dtype: torch.dtype) -> torch.Tensor:
    return (sums / count).to(dtype)


def reference_sce(tensors: Sequence[torch.Tensor], base: torch.Tensor, select_topk: float = 1.0) -> torch.Tensor:
    """SCE whole tensors at a time (k stacked task vectors and a float32 mask): the specification."""
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
    check_inputs(tensors, base)
    count = len(tensors)
    dtype, device, n = base.dtype, base.device, base.numel()
    base_flat, flats = base.reshape(-1), [tensor.reshape(-1) for tensor in tensors]
    chunks = cpu_chunks(n)
    width = chunks[0][1]
    stack = torch.empty((count, width), dtype=dtype, device=device)

    def deltas_of(start: int, stop: int) -> torch.Tensor:
        deltas = stack[:, : stop - start]
        for i in range(count):
            chunk_delta(flats[i], base_flat, start, stop, deltas[i])
        return deltas

    fused = select_topk > 0 and native.sce_usable(base_flat, flats)
    variance_buffer = torch.empty(width, dtype=dtype) if fused else None

    def chunk_variances(index: int) -> torch.Tensor:
        start, stop = chunks[index]
        if fused:
            return native.sce_variances_(start, stop, base_flat, flats, variance_buffer[: stop - start])
        return population_variance(deltas_of(start, stop))

    window = selection = None
    if 0 < select_topk < 1:
        variances = chunk_variances

        def sample(positions: torch.Tensor) -> torch.Tensor:
            picked = torch.stack([flat[positions] for flat in flats]).to(dtype).sub_(base_flat[positions])
            return population_variance(picked).float()

        counts = None
        if dtype in (
            torch.bfloat16,
            torch.float16,
        ):  # one pass counts both the nonzero variances and their bit patterns
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
            native.sce_square_sums_(start, stop, base_flat, flats, kept, sums)
            continue
        deltas = deltas_of(start, stop)
        if window is not None:
            kept = window.keep_(population_variance(deltas), index, keep[: stop - start], factor[: stop - start])
            selection.store(start, kept)
            deltas.mul_(as_factor(kept, factor[: stop - start]))
        elif select_topk <= 0:
            deltas.zero_()
        for i in range(count):
            sums[i].add(torch.square(deltas[i], out=squares[: stop - start]))
    model_weights = _sce_weights(_mean_square(torch.stack([total.value() for total in sums]), n, dtype))
    weights = model_weights.tolist()
    weight_column = model_weights.reshape(count, 1)
    out = empty((n,), dtype, device)
    if fused:
        return native.sce_merge_(base_flat, flats, None if selection is None else selection.bits, weights, out).view(
            base.shape
        )
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


def _check_sce(params: dict) -> str | None:
    if not 0 < params["select_topk"] <= 1:
        return (
            f"select_topk must be in (0, 1] (the fraction of entries selected by variance), got {params['select_topk']}"
        )
    return None


@registered(
    "sce",
    (Parameter("select_topk", default=1.0), Parameter("int8_mask", default=False, kind="bool")),
    needs_base=True,
    description="select entries of high variance across models, weight models by task-vector size, erase minority signs (FuseChat)",
    check=_check_sce,
)
def apply_sce(tensors, base, params):
    return sce(tensors, base, params["select_topk"])
