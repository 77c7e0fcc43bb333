"""Weighted averages and spherical interpolation of whole tensors."""

from __future__ import annotations

import math

import torch

from composer.memory import empty

SLERP_PARALLEL_THRESHOLD = 0.9995  # |cos| above this: the tensors are nearly (anti)parallel, use lerp
_CACHE_CHUNK = 1 << 18  # elements per step of elementwise CPU work: a float32 operand of 1 MiB stays in cache


def weights_cancel(weights: list[float]) -> bool:
    """True when the weights sum to zero (up to rounding), so normalising by their sum is undefined."""
    return abs(sum(weights)) <= 1e-12 * max(1.0, sum(abs(w) for w in weights))


def linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    """sum_i w_i x_i, divided by sum_i w_i when `normalize` (Wortsman et al. 2022, model soups).

    Accumulates in at least float32 and returns the dtype of the first tensor. On the CPU the sum runs
    over cache-sized chunks (several times faster than whole-tensor passes; the same operations, so the
    same bits).
    """
    if len(tensors) != len(weights):
        raise ValueError(f"linear: {len(tensors)} tensors but {len(weights)} weights")
    if normalize and weights_cancel(weights):
        raise ValueError("linear: the weights sum to zero, so they cannot be normalised")
    first = tensors[0]
    accumulate = torch.promote_types(first.dtype, torch.float32)
    flats = [tensor.reshape(-1) for tensor in tensors]
    out = empty((first.numel(),), first.dtype, first.device)
    total = sum(weights)
    bounds = chunk_bounds(first)
    width = max((end - start for start, end in bounds), default=0)
    result, converted = (torch.empty(width, dtype=accumulate, device=first.device) for _ in range(2))  # reused for every chunk
    for start, end in bounds:
        chunk_result = result[: end - start].zero_()
        for flat, weight in zip(flats, weights):
            part = flat[start:end]
            if part.dtype != accumulate:
                part = converted[: end - start].copy_(part)
            chunk_result.add_(part, alpha=weight)
        if normalize:
            chunk_result.div_(total)
        out[start:end] = chunk_result
    return out.view(first.shape)


_ELEMENTWISE_CHUNK = 1 << 20  # entries per call of an elementwise function run chunk by chunk


def flat_chunks(tensors: list[torch.Tensor]):
    """Lists of the same flat chunk (1 << 20 entries) of each of `tensors` (one shape), in order; the whole
    flattened tensors at once off the CPU or when they hold at most one chunk."""
    count = tensors[0].numel()
    flats = [tensor.reshape(-1) for tensor in tensors]
    if tensors[0].device.type != "cpu" or count <= _ELEMENTWISE_CHUNK:
        yield flats
        return
    for start in range(0, count, _ELEMENTWISE_CHUNK):
        yield [flat[start:start + _ELEMENTWISE_CHUNK] for flat in flats]


def in_chunks(fn, tensors: list[torch.Tensor]) -> torch.Tensor:
    """fn(list of flat chunks, one per tensor) -> the flat result chunk, run over `flat_chunks` into one
    output: for a function whose every output entry depends only on the entries at the same position of
    its inputs (no reduction over a tensor), the same result, bit for bit, as fn of the whole flattened
    tensors, with only chunk-sized temporaries. The result takes the inputs' shape."""
    shape, count = tensors[0].shape, tensors[0].numel()
    out, start = None, 0
    for flats in flat_chunks(tensors):
        part = fn(flats)
        if start == 0 and part.numel() == count:
            return part.reshape(shape)
        if out is None:
            out = empty((count,), part.dtype, part.device)
        out[start:start + part.numel()] = part
        start += part.numel()
    return out.view(shape)


def each_chunk(update, target: torch.Tensor, *others: torch.Tensor) -> None:
    """update(target chunk, other chunks...) over `flat_chunks` of tensors of one number of entries: for
    elementwise updates of `target` in place with chunk-sized temporaries."""
    for flats in flat_chunks([target, *others]):
        update(*flats)


ROW_BLOCK = 1 << 20  # entries per block of rows for work that reduces only within rows


def row_blocks(tensor: torch.Tensor) -> list[slice]:
    """Slices of whole rows (along the first axis) of about `ROW_BLOCK` entries each (one row when a row is
    larger): work whose reductions stay within rows gives each block what the whole tensor would."""
    rows = tensor.shape[0]
    step = max(1, ROW_BLOCK // max(1, tensor[0].numel()))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def by_row_blocks(fn, tensors: list[torch.Tensor]) -> torch.Tensor:
    """fn(the same block of rows of each of `tensors`) -> that block of the result, over `row_blocks`, into
    one output of the inputs' shape: for work whose every output row depends only on the same rows of its
    inputs, the whole tensors' result with temporaries the size of a block."""
    out = None
    for rows in row_blocks(tensors[0]):
        block = fn([tensor[rows] for tensor in tensors])
        if out is None:
            out = empty(tuple(tensors[0].shape), block.dtype, block.device)
        out[rows] = block
    return out


def chunk_bounds(tensor: torch.Tensor):
    """(start, end) element ranges for elementwise work: cache-sized on the CPU, the whole tensor elsewhere."""
    count = tensor.numel()
    step = _CACHE_CHUNK if tensor.device.type == "cpu" else max(count, 1)
    return [(start, min(start + step, count)) for start in range(0, count, step)]


_DOT_CHUNK = 1 << 16  # elements per step of the float64 dot products: a cache-sized copy


def _dots(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(<a, a>, <b, b>, <a, b>) over all elements, summed in float64 a cache-sized piece at a time, once for all
    three products. The pieces are fresh copies: BLAS's dot products (MKL's on AMD processors among them)
    round differently with the inputs' address, and a tensor mapped from a file sits wherever its header
    put it, so the same values would otherwise give other bits when they come from memory."""
    a, b = a.reshape(-1), b.reshape(-1)
    aa = bb = ab = 0.0
    for start in range(0, a.numel(), _DOT_CHUNK):
        x = a[start:start + _DOT_CHUNK].to(torch.float64, copy=True)
        y = b[start:start + _DOT_CHUNK].to(torch.float64, copy=True)
        aa += float(torch.dot(x, x))
        bb += float(torch.dot(y, y))
        ab += float(torch.dot(x, y))
    return aa, bb, ab


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from `a` (t=0) to `b` (t=1) (Shoemake 1985), each tensor taken as one vector.

    theta = arccos(<a, b> / (|a| |b|));  result = sin((1-t) theta)/sin(theta) a + sin(t theta)/sin(theta) b.
    The angle comes from the directions; the weights apply to the originals, so magnitudes interpolate
    too. When the tensors are nearly parallel or antiparallel (|cos theta| > 0.9995), or one has norm
    below `eps` (no direction), this is linear interpolation (1-t) a + t b instead.
    """
    if t == 0:
        return a
    if t == 1:
        return b
    squared_a, squared_b, product = _dots(a, b)
    norm_a = math.sqrt(max(squared_a, 0.0))
    norm_b = math.sqrt(max(squared_b, 0.0))
    if norm_a < eps or norm_b < eps:
        return torch.lerp(a, b, t)
    cosine = max(-1.0, min(1.0, product / (norm_a * norm_b)))
    if abs(cosine) > SLERP_PARALLEL_THRESHOLD:
        return torch.lerp(a, b, t)
    theta = math.acos(cosine)
    sin_theta = math.sin(theta)
    weight_a = math.sin((1 - t) * theta) / sin_theta
    weight_b = math.sin(t * theta) / sin_theta
    # weight_a * a + weight_b * b: two products and a sum, each rounded in the tensors' dtype (never a fused
    # multiply-add, whose use in torch depends on how a tensor is split between threads), a cache-sized
    # chunk at a time on the CPU
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    out = empty((a.numel(),), torch.promote_types(a.dtype, b.dtype), a.device)
    scaled = torch.empty(min(a.numel(), _CACHE_CHUNK) if a.device.type == "cpu" else a.numel(), dtype=out.dtype, device=a.device)
    for start, end in chunk_bounds(a):
        part = torch.mul(flat_b[start:end], weight_b, out=scaled[: end - start])
        torch.mul(flat_a[start:end], weight_a, out=out[start:end]).add_(part)
    return out.view(a.shape)
