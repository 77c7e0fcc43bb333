"""Order statistics and rank windows without sorting a whole flattened tensor.

An order statistic comes from a small random sample that brackets it, then `torch.kthvalue` on the few
elements inside the bracket (a handful of elementwise passes over the tensor); for 16-bit magnitudes
streamed in chunks (`ChunkedWindow`), from a count of their bit patterns instead (one pass). Ties at a
threshold are broken by position, lowest index first, so a window keeps exactly the asked number of
elements. The task-arithmetic family selects task-vector entries with these; Arcee Fusion takes its
quartiles from `pattern_counts`.
"""

from __future__ import annotations

import math

import torch

EXACT_LIMIT = 1 << 18  # at most this many elements: torch.kthvalue on the whole tensor (read at call time)
_SAMPLE = 1 << 14  # sample size used to bracket an order statistic of a larger tensor
HALF_DTYPES = (torch.bfloat16, torch.float16)  # thresholds of their magnitudes come from counts of bit patterns
_SAMPLE_SEED = 0x5EED  # the bracket is a speed device only; any sample gives the same answer


def order_statistic(values: torch.Tensor, rank: int) -> tuple[torch.Tensor, int, int]:
    """The value at 0-based `rank` in ascending order of the flat tensor `values`, the number of
    elements strictly below it and the number equal to it."""
    flat = values.reshape(-1)
    n = flat.numel()
    if not 0 <= rank < n:
        raise ValueError(f"rank {rank} is outside a tensor of {n} elements")
    if n > EXACT_LIMIT:
        found = _bracketed_order_statistic(flat, rank)
        if found is not None:
            return found
    value = torch.kthvalue(flat, rank + 1).values
    return value, int(torch.count_nonzero(flat < value)), int(torch.count_nonzero(flat == value))


def _bracket(sample: torch.Tensor, rank: int, n: int) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """Two values of the sorted sample between which the value of `rank` (of n) lies with near
    certainty (None for an open side); None when both sides are open."""
    p = (rank + 0.5) / n
    half_width = 5.0 * math.sqrt(_SAMPLE * p * (1 - p)) + 16
    low_index = math.floor(p * _SAMPLE - half_width)
    high_index = math.ceil(p * _SAMPLE + half_width)
    low = sample[low_index] if low_index >= 0 else None
    high = sample[high_index] if high_index < _SAMPLE else None
    return None if low is None and high is None else (low, high)


def _sample_positions(n: int) -> torch.Tensor:
    return torch.randint(0, n, (_SAMPLE,), generator=torch.Generator().manual_seed(_SAMPLE_SEED))


def _band_(values: torch.Tensor, low, high, out: torch.Tensor) -> int:
    """out = low <= values <= high (an open side unchecked), as booleans; returns how many values
    lie below `low`."""
    if low is None:
        torch.le(values, high, out=out)
        return 0
    torch.ge(values, low, out=out)
    below = values.numel() - int(torch.count_nonzero(out))
    if high is not None:
        out.logical_and_(values <= high)
    return below


def _bracketed_order_statistic(flat: torch.Tensor, rank: int) -> tuple[torch.Tensor, int, int] | None:
    """Bracket the order statistic between two sampled values, then select inside the bracket only.
    None when the bracket missed (practically never); the caller then selects on the whole tensor."""
    n = flat.numel()
    bracket = _bracket(flat[_sample_positions(n).to(flat.device)].sort().values, rank, n)
    if bracket is None:
        return None
    band = torch.empty(flat.shape, dtype=torch.bool, device=flat.device)
    below = _band_(flat, *bracket, out=band)
    inside = flat[band]
    if not below <= rank < below + inside.numel():
        return None
    value = torch.kthvalue(inside, rank - below + 1).values
    return value, below + int(torch.count_nonzero(inside < value)), int(torch.count_nonzero(inside == value))


def window_boundaries(n: int, start: int, stop: int, descending: bool, statistics) -> list[tuple] | bool:
    """The thresholds of the rank window [start, stop) of n values (ranks as in `window_mask_`):
    True when every element is in it, False when none is, else a list of (value, lower, first, last,
    equal): the window keeps elements >= value (lower) or <= value (not lower), and of the `equal`
    elements equal to value, in index order, those of index in [first, last).
    `statistics(ranks)` gives (value, below, equal) for each ascending rank, as `order_statistic`."""
    start, stop = max(start, 0), min(stop, n)
    if stop <= start:
        return False
    if start == 0 and stop == n:
        return True
    # The kept values lie between the value at the window's first rank and at its last rank.
    bounds = []  # (ascending rank of the boundary value, keep elements >= it (True) or <= it (False))
    if descending:
        if stop < n:
            bounds.append((n - stop, True))
        if start > 0:
            bounds.append((n - 1 - start, False))
    else:
        if start > 0:
            bounds.append((start, True))
        if stop < n:
            bounds.append((stop - 1, False))
    found = []
    for (_, lower), (value, below, equal) in zip(bounds, statistics([rank for rank, _ in bounds])):
        # The elements equal to `value` hold window ranks before .. before + equal - 1, in index order.
        before = n - below - equal if descending else below
        found.append((value, lower, max(0, start - before), min(equal, stop - before), equal))
    return found


def window_mask_(
    values: torch.Tensor, start: int, stop: int, descending: bool = False, spare: torch.Tensor | None = None
) -> torch.Tensor:
    """Overwrite the floating tensor `values` with a 0/1 mask of the elements whose rank lies in
    [start, stop), ranks taken in a stable sort of the flattened tensor (ascending, or descending
    when `descending`): equal values are ordered by position, lowest index first. Exactly
    max(0, min(stop, n) - max(start, 0)) elements get 1. `spare`, a buffer of as many elements,
    is used (and overwritten) when the window has two bounds. Returns `values`."""
    flat = values.view(-1)
    n = flat.numel()
    bounds = window_boundaries(
        n, start, stop, descending, lambda ranks: [order_statistic(flat, rank) for rank in ranks]
    )
    if bounds is False:
        return values.zero_()
    if bounds is True:
        return values.fill_(1)
    dropped = []
    for value, _, first, last, equal in bounds:
        if first > 0 or last < equal:
            positions = (flat == value).nonzero().view(-1)
            dropped += [positions[:first], positions[last:]]
    if len(bounds) == 1:
        ((value, lower, *_),) = bounds
        (torch.ge if lower else torch.le)(flat, value, out=flat)
    else:
        (low, *_), (high, *_) = sorted(bounds, key=lambda bound: not bound[1])
        other = torch.empty_like(flat) if spare is None else spare.view(-1)[:n]
        torch.ge(flat, low, out=other)
        torch.le(flat, high, out=flat)
        flat.mul_(other)
    for positions in dropped:
        flat[positions] = 0
    return values


def rank_window_mask(values: torch.Tensor, start: int, stop: int, descending: bool = False) -> torch.Tensor:
    """`window_mask_` as a boolean mask, leaving `values` alone."""
    work = values.to(torch.promote_types(values.dtype, torch.float32), copy=True).contiguous()
    return window_mask_(work, start, stop, descending) > 0


def pattern_counts(magnitudes: torch.Tensor) -> torch.Tensor:
    """How many of the non-negative 16-bit `magnitudes` hold each of the 32768 bit patterns (pattern 0 is +0)."""
    return torch.bincount(magnitudes.reshape(-1).view(torch.int16), minlength=1 << 15)


def counted_value(cumulative: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[int, torch.Tensor]:
    """(bit pattern, value as a 0-dim tensor of the 16-bit `dtype`) of the element of `rank` (0 = smallest),
    from the cumulative `pattern_counts`: the first pattern whose cumulative count passes the rank."""
    pattern = int(torch.searchsorted(cumulative, rank, right=True))
    return pattern, torch.tensor(pattern, dtype=torch.int16).view(dtype)


def _tie_side(counts: list[int], index: int, first: int, last: int) -> tuple[bool, bool]:
    """Whether chunk `index` keeps all (whole) or none of its entries equal to a threshold, of which
    the window keeps those of tie rank [first, last), `counts` of them in each chunk (neither: the
    tie is split inside the chunk)."""
    seen, here = sum(counts[:index]), counts[index]
    whole = here == 0 or (first <= seen and seen + here <= last)
    return whole, not whole and (seen + here <= first or seen >= last)


class ChunkedWindow:
    """`window_mask_` over the magnitudes of a tensor that is only ever seen one chunk at a time.

    Built with one pass over the chunks (`magnitudes(i)`: the magnitudes of chunk i = `chunks[i]`
    of the flattened tensor, in any floating dtype that holds them exactly; `sample(positions)`:
    float32 magnitudes at flat positions). The sample brackets each boundary's order statistic as
    in `order_statistic`; the pass counts the elements below each bracket and keeps the few inside
    it, and also how many elements equal to each boundary value every chunk holds, so that
    `keep_(magnitudes, i, out)` later writes chunk i of the mask with a comparison, plus a position
    fix-up only in a chunk where the tie at a threshold is split. Same mask, bit for bit, as
    `window_mask_` on the whole tensor."""

    def __init__(
        self, magnitudes, chunks: list[tuple[int, int]], start: int, stop: int, descending: bool, sample, counts=None
    ):
        """`counts`: for 16-bit magnitudes, their `pattern_counts` chunk by chunk ([chunks, 32768]) when the
        caller has them already (the pass over the chunks is then skipped)."""
        self.chunks = chunks
        n = chunks[-1][1] if chunks else 0
        self.equal_counts: list[list[int]] = []
        self._dtype = None  # the magnitudes' dtype, once seen
        self.bounds = window_boundaries(
            n, start, stop, descending, lambda ranks: self._statistics(magnitudes, n, ranks, sample, counts)
        )

    def _statistics(self, magnitudes, n: int, ranks: list[int], sample, counts) -> list[tuple[torch.Tensor, int, int]]:
        first = magnitudes(0)
        self._dtype = first.dtype
        if first.dtype in HALF_DTYPES:
            return self._counted(magnitudes, first, ranks, counts)
        found = self._bracketed(magnitudes, n, ranks, sample) if n > EXACT_LIMIT else None
        if found is None:  # small tensors, or a bracket missed
            whole = torch.cat([magnitudes(i).to(torch.float32, copy=True) for i in range(len(self.chunks))])
            found = []
            for rank in ranks:
                found.append(order_statistic(whole, rank))
                self.equal_counts.append([int(torch.count_nonzero(whole[s:e] == found[-1][0])) for s, e in self.chunks])
        return found

    def _counted(
        self, magnitudes, first: torch.Tensor, ranks: list[int], counts=None
    ) -> list[tuple[torch.Tensor, int, int]]:
        """The order statistics of 16-bit magnitudes from a count of each bit pattern, chunk by chunk
        (one pass): non-negative floats order as their bit patterns do, and 16 bits make only 32768
        patterns, so the counts give each value, how many lie below it and how many each chunk
        holds, exactly."""
        if counts is None:
            counts = torch.stack([pattern_counts(first if i == 0 else magnitudes(i)) for i in range(len(self.chunks))])
        totals = counts.sum(dim=0)
        cumulative = totals.cumsum(0)
        found = []
        for rank in ranks:
            pattern, value = counted_value(cumulative, rank, first.dtype)
            found.append((value.float(), int(cumulative[pattern] - totals[pattern]), int(totals[pattern])))
            self.equal_counts.append(counts[:, pattern].tolist())
        return found

    def _bracketed(self, magnitudes, n: int, ranks: list[int], sample):
        brackets = [_bracket(sample(_sample_positions(n)).sort().values, rank, n) for rank in ranks]
        if any(bracket is None for bracket in brackets):
            return None
        belows, bands = [0] * len(ranks), [[] for _ in ranks]
        band = None
        for i, (start, stop) in enumerate(self.chunks):
            values = magnitudes(i)
            if band is None or band.numel() < stop - start:
                band = torch.empty(stop - start, dtype=torch.bool, device=values.device)
            for j, bracket in enumerate(brackets):
                # thresholds in the magnitudes' dtype (they hold them exactly): mixed-dtype comparisons are slow
                low, high = (None if bound is None else bound.to(values.dtype) for bound in bracket)
                belows[j] += _band_(values, low, high, out=band[: stop - start])
                bands[j].append(values[band[: stop - start]].float())
        found = []
        for rank, below, pieces in zip(ranks, belows, bands):
            inside = torch.cat(pieces)
            if not below <= rank < below + inside.numel():
                self.equal_counts.clear()
                return None
            value = torch.kthvalue(inside, rank - below + 1).values
            found.append(
                (value, below + int(torch.count_nonzero(inside < value)), int(torch.count_nonzero(inside == value)))
            )
            self.equal_counts.append([int(torch.count_nonzero(piece == value)) for piece in pieces])
        return found

    def pattern_range(self, index: int) -> tuple[int, int] | None:
        """For 16-bit magnitudes: chunk `index` keeps exactly the entries whose magnitude's bit pattern
        lies in [low, high] (an empty range when none); None where a tie at a threshold is split
        inside the chunk (then only `keep_` knows which equal entries stay)."""
        if self.bounds is True or self.bounds is False:
            return (0, 0xFFFF) if self.bounds else (1, 0)
        low, high = 0, 0xFFFF
        for (value, lower, first, last, _), counts in zip(self.bounds, self.equal_counts):
            pattern = int(value.to(self._dtype).view(torch.int16)) & 0xFFFF
            whole, none = _tie_side(counts, index, first, last)
            if not whole and not none:
                return None
            if lower:
                low = max(low, pattern + 1 if none else pattern)
            else:
                high = min(high, pattern - 1 if none else pattern)
        return low, high

    def keep_(
        self, values: torch.Tensor, index: int, out: torch.Tensor, spare: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Write into `out` the mask of chunk `index`, whose magnitudes are `values`: booleans, or
        0/1 in a floating dtype (best the delta's: a multiply of like dtypes is several times
        faster than by booleans). `spare`, like `out`, is used when the window has two bounds."""
        if self.bounds is True or self.bounds is False:
            return out.fill_(self.bounds)
        dropped = []
        for number, ((value, lower, first, last, _), counts) in enumerate(zip(self.bounds, self.equal_counts)):
            value = value.to(values.dtype)  # exactly; mixed-dtype comparisons are slow
            whole, none = _tie_side(counts, index, first, last)
            seen = sum(counts[:index])
            compare = (torch.gt if none else torch.ge) if lower else (torch.lt if none else torch.le)
            if number == 0:
                compare(values, value, out=out)
            else:
                out.mul_(compare(values, value, out=spare))
            if not whole and not none:  # the tie at this threshold is split inside this chunk
                positions = (values == value).nonzero().view(-1)
                dropped += [positions[: max(0, first - seen)], positions[max(0, last - seen) :]]
        for positions in dropped:
            out[positions] = 0
        return out
