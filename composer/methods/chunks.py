"""Running elementwise and row-local work a piece at a time, for methods that would otherwise hold several
tensor-sized temporaries: the same operations on each piece give the whole tensor's bits with
piece-sized temporaries. The sizes below are read when a function runs, so a test can patch them."""

from __future__ import annotations

import torch

from composer.memory import empty

CACHE_CHUNK = 1 << 18  # elements per step of elementwise CPU work: a float32 operand of 1 MiB stays in cache
ELEMENTWISE_CHUNK = 1 << 20  # entries per call of an elementwise function run chunk by chunk
ROW_BLOCK = 1 << 20  # entries per block of rows for work that reduces only within rows


def chunk_bounds(tensor: torch.Tensor):
    """(start, end) element ranges for elementwise work: cache-sized on the CPU, the whole tensor elsewhere."""
    count = tensor.numel()
    step = CACHE_CHUNK if tensor.device.type == "cpu" else max(count, 1)
    return [(start, min(start + step, count)) for start in range(0, count, step)]


def flat_chunks(tensors: list[torch.Tensor]):
    """Lists of the same flat chunk (1 << 20 entries) of each of `tensors` (one shape), in order; the whole
    flattened tensors at once off the CPU or when they hold at most one chunk."""
    count = tensors[0].numel()
    flats = [tensor.reshape(-1) for tensor in tensors]
    if tensors[0].device.type != "cpu" or count <= ELEMENTWISE_CHUNK:
        yield flats
        return
    for start in range(0, count, ELEMENTWISE_CHUNK):
        yield [flat[start : start + ELEMENTWISE_CHUNK] for flat in flats]


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
        out[start : start + part.numel()] = part
        start += part.numel()
    return out.view(shape)


def each_chunk(update, target: torch.Tensor, *others: torch.Tensor) -> None:
    """update(target chunk, other chunks...) over `flat_chunks` of tensors of one number of entries: for
    elementwise updates of `target` in place with chunk-sized temporaries."""
    for flats in flat_chunks([target, *others]):
        update(*flats)


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
