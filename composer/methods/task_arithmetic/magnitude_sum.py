"""Exact sums of the magnitudes of 16-bit floats (bf16, fp16), accumulated piece by piece.

A 16-bit magnitude is an integer significand times a power of two, so the sum of any number of them
is held exactly as integer counts of each power (the `slots` below) and rounded once, to float64, at
the end. The result does not depend on the order of the pieces, the chunking, the device or the
number of threads, and the fused CPU kernels (composer.native) compute the same slots as the torch
path here (a count of each bit pattern, `torch.bincount`), which is also faster than a float64 sum.
"""

from __future__ import annotations

import math

import torch

from composer.native import bf16 as native_bf16

SLOTS = native_bf16.EXPONENT_SUMS  # value slots, then infinities, then NaNs (as kernels.c counts them)
INF_SLOT, NAN_SLOT = SLOTS - 2, SLOTS - 1
UNIT_EXPONENT = -134  # slot s counts units of 2^(s + UNIT_EXPONENT)
# (exponent bits, significand bits, the power of two of significand unit 1 at biased exponent 1)
_FORMATS = {torch.bfloat16: (8, 7, -133), torch.float16: (5, 10, -24)}
DTYPES = tuple(_FORMATS)


class MagnitudeSum:
    """sum |x| over every piece `add`ed, exactly; `value()` rounds it once to a float64 tensor."""

    def __init__(self, dtype: torch.dtype, device: torch.device | str = "cpu"):
        if dtype not in _FORMATS:
            raise ValueError(f"exact magnitude sums are for bf16 and fp16, not {dtype}")
        self.dtype = dtype
        self.slots = torch.zeros(SLOTS, dtype=torch.int64, device=device)

    def add(self, values: torch.Tensor) -> MagnitudeSum:
        flat = values.reshape(-1)
        if flat.dtype != self.dtype:
            raise ValueError(f"a sum of {self.dtype} magnitudes was given {flat.dtype} values")
        if flat.numel() == 0:
            return self
        if native_bf16.usable(flat) and self.slots.device.type == "cpu":
            native_bf16.magnitude_sums_(flat, self.slots)
        else:
            self.slots += _slots_of_counts(
                torch.bincount(flat.view(torch.int16) & 0x7FFF, minlength=1 << 15), self.dtype
            )
        return self

    def value(self) -> torch.Tensor:
        """The sum as a float64 tensor on the slots' device (inf with an infinity, NaN with a NaN)."""
        return torch.tensor(exact_total(self.slots.tolist()), dtype=torch.float64, device=self.slots.device)


def _slots_of_counts(counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The slots of the values whose magnitude bit patterns occur `counts` times (32768 counts)."""
    exponent_bits, fraction_bits, lowest = _FORMATS[dtype]
    by_exponent = counts.view(1 << exponent_bits, 1 << fraction_bits)
    finite = by_exponent[:-1]  # the last exponent holds the infinities and NaNs
    significands = torch.arange(1 << fraction_bits, dtype=torch.int64, device=counts.device)
    sums = (finite * significands).sum(dim=1)
    sums[1:] += finite[1:].sum(dim=1) << fraction_bits  # the implicit leading bit of normal numbers
    # biased exponent e >= 1 counts units of 2^(e - 1 + lowest); subnormals (e = 0) those of e = 1
    offset = lowest - 1 - UNIT_EXPONENT
    slots = torch.zeros(SLOTS, dtype=torch.int64, device=counts.device)
    slots[offset + 1 : offset + sums.numel()] = sums[1:]
    slots[offset + 1] += sums[0]
    slots[INF_SLOT] = by_exponent[-1, 0]
    slots[NAN_SLOT] = by_exponent[-1, 1:].sum()
    return slots


def exact_total(slots: list[int]) -> float:
    """The float64 nearest to sum_s slots[s] * 2^(s + UNIT_EXPONENT) (NaN / inf for those counts)."""
    if slots[NAN_SLOT]:
        return math.nan
    if slots[INF_SLOT]:
        return math.inf
    total = sum(count << slot for slot, count in enumerate(slots[:INF_SLOT]) if count)
    try:
        return math.ldexp(float(total), UNIT_EXPONENT)  # float(int) rounds to nearest even, once
    except OverflowError:
        return math.inf
