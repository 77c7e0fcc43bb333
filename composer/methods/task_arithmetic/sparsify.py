"""Sparsification of task vectors: which entries of a delta to keep, by magnitude or at random, and
applying the mask (with the L1-preserving rescale).

The magnitude masks are rank windows (`composer.methods.order_statistics`): exactly the asked number of
entries, ties at a threshold broken by position. Random masks come from the counter-based stream of
`composer.methods.task_arithmetic.draws`. Only DELLA, whose drop probabilities depend on each element's
rank within its row, sorts (row by row).

Masks are 0/1 float32 tensors written into buffers the caller may supply (a float multiply is far
cheaper than masking with booleans, and a reused buffer saves the page faults of a fresh one).
Functions ending in `_` write into their first argument or into `out`; the others leave their
inputs alone.
"""

from __future__ import annotations

import torch

from composer.methods.order_statistics import HALF_DTYPES, window_mask_
from composer.methods.task_arithmetic.draws import LEVELS, level_of, random_levels, stream_key
from composer.methods.task_arithmetic.magnitude_sum import DTYPES as MAGNITUDE_SUM_DTYPES
from composer.methods.task_arithmetic.magnitude_sum import MagnitudeSum
from composer.parallel import each

RESCALE_EPS = 1e-7  # L1 norms below this are not rescaled (as in mergekit)


# --- masks: written as 0/1 into a float32 buffer, which the caller may supply --------------------


def _buffer(delta: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(delta.shape, dtype=torch.float32, device=delta.device)
    return out.view(-1)[: delta.numel()].view(delta.shape)


def _magnitudes_into(delta: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    magnitudes = _buffer(delta, out)
    if delta.dtype == torch.float32:
        return torch.abs(delta, out=magnitudes)
    return magnitudes.copy_(delta).abs_()


def magnitude_mask_(delta: torch.Tensor, density: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """TIES "trim": 1 for the k = max(1, int(density * n)) entries of largest magnitude (over the
    whole tensor), 0 elsewhere, written into `out` (float32)."""
    k = max(1, int(density * delta.numel()))
    return window_mask_(_magnitudes_into(delta, out), 0, k, descending=True)


def outlier_mask_(
    delta: torch.Tensor,
    density: float,
    gamma: float,
    out: torch.Tensor | None = None,
    spare: torch.Tensor | None = None,
) -> torch.Tensor:
    """Model breadcrumbs: drop the int(gamma * n) largest magnitudes and the smallest ones, keeping
    int(density * n) entries. When density + gamma > 1 fewer large entries are dropped, so that
    int(density * n) remain (and no small ones are dropped)."""
    n = delta.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - keep - top)
    return window_mask_(_magnitudes_into(delta, out), bottom, bottom + keep, spare=spare)


def random_mask_(
    delta: torch.Tensor, density: float, key: int, out: torch.Tensor | None = None, offset: int = 0
) -> torch.Tensor:
    """DARE: each entry 1 independently with probability `density`, drawn from the stream of `key`
    at the flat positions offset, offset + 1, ..."""
    mask = _buffer(delta, out)
    threshold = level_of(density)
    if threshold >= LEVELS // 2:
        return mask.fill_(1)
    return torch.lt(random_levels(delta.shape, key, delta.device, offset), threshold, out=mask)


def stable_row_order(keys: torch.Tensor) -> torch.Tensor:
    """torch.sort(keys, dim=1, stable=True).indices for 16-bit integer keys. On a CPU numpy's stable
    argsort, a radix sort for 16-bit keys (two passes over bytes), is about 3x faster than torch's
    comparison sort and gives the same permutation."""
    if keys.device.type != "cpu":
        return torch.sort(keys, dim=1, stable=True).indices
    import numpy as np

    return torch.from_numpy(np.argsort(keys.contiguous().numpy(), axis=1, kind="stable"))


_MIN_ROWS_PER_THREAD = 8


def scatter_by_row_rank_(out: torch.Tensor, keys: torch.Tensor, by_rank: torch.Tensor) -> torch.Tensor:
    """out[i, order[i, r]] = by_rank[i, r], order the stable row order of the 16-bit `keys`: each entry gets
    the value of its rank within its row. On a CPU blocks of rows go to torch's number of threads at
    once (numpy's sort runs on one core and releases the GIL), each block sorted and scattered on its own."""
    rows = keys.shape[0]
    threads = min(torch.get_num_threads(), rows // _MIN_ROWS_PER_THREAD) if keys.device.type == "cpu" else 1
    if threads <= 1:
        return out.scatter_(1, stable_row_order(keys), by_rank)
    step = -(-rows // threads)
    blocks = [slice(start, min(start + step, rows)) for start in range(0, rows, step)]
    each(
        lambda index: out[blocks[index]].scatter_(1, stable_row_order(keys[blocks[index]]), by_rank[blocks[index]]),
        len(blocks),
    )
    return out


def della_thresholds(m: int, density: float, epsilon: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The int32 `random_levels` thresholds of DELLA's keep probabilities by rank in a row of m entries."""
    if m > 1:
        probabilities = torch.arange(m, device=device, dtype=torch.float64) * (2 * epsilon / (m - 1)) + (
            density - epsilon
        )
    else:
        probabilities = torch.full((1,), density, dtype=torch.float64, device=device)
    return (probabilities.clamp(0, 1) * LEVELS).round_().sub_(LEVELS // 2).to(torch.int32)


def della_keep(
    delta: torch.Tensor, density: float, epsilon: float, key: int, out: torch.Tensor | None = None, offset: int = 0
) -> torch.Tensor:
    """DELLA MagPrune as a boolean mask (into `out` when given): within each row (dimension 1; a
    1-D tensor is one row), the entry of rank r (0 = smallest magnitude, m - 1 = largest, m
    entries; equal magnitudes ranked by position) is kept with probability
    density - epsilon + 2 epsilon r / (m - 1), so larger entries are likelier to stay and the mean
    keep probability is `density`. A row of one entry keeps it with probability `density`. The
    draw for the entry of rank r in row i is at flat position offset + i * m + r of the stream of
    `key` (`offset`: where these rows start in a larger tensor drawn row block by row block)."""
    rows_shape = (1, delta.numel()) if delta.dim() < 2 else delta.shape
    m = rows_shape[1]
    thresholds = della_thresholds(m, density, epsilon, delta.device).view((m,) + (1,) * (len(rows_shape) - 2))
    keep_in_order = torch.lt(random_levels(rows_shape, key, delta.device, offset), thresholds)  # rank r at position r
    mask = torch.empty(rows_shape, dtype=torch.bool, device=delta.device) if out is None else out.view(rows_shape)
    if delta.dtype in HALF_DTYPES:
        # the bit patterns of half-precision magnitudes sort as the values do; a stable sort of them ranks
        # equal magnitudes by position, the same on every machine
        return scatter_by_row_rank_(mask, delta.abs().view(torch.int16).view(rows_shape), keep_in_order).view(
            delta.shape
        )
    order = torch.sort(_magnitudes_into(delta, None).view(rows_shape), dim=1, stable=True).indices
    return mask.scatter_(1, order, keep_in_order).view(delta.shape)


def della_mask_(
    delta: torch.Tensor, density: float, epsilon: float, key: int, out: torch.Tensor | None = None, offset: int = 0
) -> torch.Tensor:
    """`della_keep` as 0/1 in a float32 buffer (`out` when given)."""
    return _buffer(delta, out).copy_(della_keep(delta, density, epsilon, key, offset=offset))


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`magnitude_mask_` as a boolean mask."""
    return magnitude_mask_(delta, density) > 0


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """`outlier_mask_` as a boolean mask."""
    return outlier_mask_(delta, density, gamma) > 0


def random_mask(delta: torch.Tensor, density: float, generator: torch.Generator | int) -> torch.Tensor:
    """`random_mask_` as a boolean mask, with a stream key drawn from `generator` (`stream_key`)."""
    return random_mask_(delta, density, stream_key(generator)) > 0


def della_mask(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator | int) -> torch.Tensor:
    """`della_keep` with a stream key drawn from `generator` (`stream_key`)."""
    return della_keep(delta, density, epsilon, stream_key(generator))


# --- applying a mask --------------------------------------------------------------------------------

L1_PIECE = 1 << 18  # elements summed at a time by `l1_norm`


class _PieceSum:
    """sum |x| in float64, the flattened tensor summed piece by piece (1 << 18 elements at a time,
    from its start): so a tensor summed one chunk at a time, with chunks of a multiple of that size,
    gets the same bits as summed whole. For dtypes other than bf16 and fp16, whose sums are exact."""

    def __init__(self, device: torch.device | str):
        self.total = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, values: torch.Tensor) -> _PieceSum:
        flat = values.reshape(-1)
        for start in range(0, flat.numel(), L1_PIECE):
            self.total = self.total + torch.linalg.vector_norm(flat[start : start + L1_PIECE], 1, dtype=torch.float64)
        return self

    def value(self) -> torch.Tensor:
        return self.total


def l1_sum(dtype: torch.dtype, device: torch.device | str = "cpu") -> MagnitudeSum | _PieceSum:
    """An accumulator of sum |x| over the pieces `add`ed to it, read as a float64 tensor by `value()`:
    exact for bf16 and fp16 (`MagnitudeSum`: the same bits in any order, on any device), float64
    piece sums otherwise."""
    return MagnitudeSum(dtype, device) if dtype in MAGNITUDE_SUM_DTYPES else _PieceSum(device)


def l1_norm(values: torch.Tensor) -> torch.Tensor:
    """sum |values| as a float64 tensor (`l1_sum`)."""
    return l1_sum(values.dtype, values.device).add(values).value()


def rescale_factor(before: torch.Tensor, after: torch.Tensor):
    """What a masked delta is multiplied by to get back the L1 norm `before` from `after`: a tensor
    when the norms are tensors of the delta's dtype (summed as mergekit sums them, so the scale
    matches it bit for bit), a float for float64 norms from `l1_norm`; None when either norm is
    below 1e-7."""
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return None
    return float(before / after) if before.dtype == torch.float64 else before / after


def mask_(delta: torch.Tensor, keep: torch.Tensor, rescale: bool, exact: bool = True) -> torch.Tensor:
    """delta *= keep (a 0/1 mask), in place; with `rescale`, then scaled so that its L1 norm is what
    it was before masking (skipped when either norm is below 1e-7). `exact`: the norms are summed
    as mergekit sums them (abs, then sum, in delta's dtype); otherwise with `l1_norm` (no
    temporary; the random masks cannot match mergekit's anyway). Returns `delta`."""
    l1 = (lambda tensor: tensor.abs().sum()) if exact else l1_norm
    before = l1(delta) if rescale else None
    delta.mul_(keep)
    if rescale:
        factor = rescale_factor(before, l1(delta))
        if factor is not None:
            delta.mul_(factor)
    return delta


def sparsify_(
    delta: torch.Tensor,
    method: str,
    density: float,
    rescale: bool,
    gamma: float = 0.0,
    epsilon: float = 0.0,
    generator: torch.Generator | int | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sparsify `delta` in place with `method` ("magnitude", "random", "magnitude_outliers",
    "della_magprune"); density >= 1 leaves it untouched. `workspace`: a float32 tensor of at least
    2 * delta.numel() elements on delta's device, reused for the masks (allocated when None).
    Returns `delta`."""
    if density >= 1 or delta.numel() == 0:
        return delta
    n = delta.numel()
    if workspace is None:
        workspace = torch.empty(2 * n, dtype=torch.float32, device=delta.device)
    out, spare = workspace.view(-1)[:n], workspace.view(-1)[n : 2 * n]
    if method == "magnitude":
        keep = magnitude_mask_(delta, density, out)
    elif method == "magnitude_outliers":
        keep = outlier_mask_(delta, density, gamma, out, spare)
    elif method == "random":
        keep = random_mask_(delta, density, stream_key(generator), out)
    elif method == "della_magprune":
        keep = della_mask_(delta, density, epsilon, stream_key(generator), out)
    else:
        raise ValueError(f"unknown sparsification method {method!r}")
    return mask_(delta, keep, rescale, exact=method in ("magnitude", "magnitude_outliers"))
