"""Boolean masks stored one bit per entry: the random masks of DARE and DELLA are drawn in a first
pass over a tensor and applied in a second, and a vocabulary-sized tensor's masks for several models
would otherwise take a byte per entry each (a sizeable part of a merge's peak memory).

Packing and unpacking are a few int64 operations per 8 entries (the multiply tricks below), so they
cost far less than the draws they save, on any device.
"""

from __future__ import annotations

import torch

from composer.methods.task_arithmetic.draws import signed_int64

# x holds 8 bytes b_k (each 0 or 1), byte k at bits 8k..8k+7 (little-endian). x * GATHER has b_k at
# bit 8k + 7j + 7 for every j; with j = 7 - k that is bit 56 + k, and no two (k, j) share a bit, so
# nothing carries: bits 56..63 of the product are b_0 .. b_7.
_GATHER = 0x0102040810204080
# p (8 bits) * SPREAD copies p into every byte; byte k keeps only bit k of its copy under SELECT.
_SPREAD = 0x0101010101010101
_SELECT = signed_int64(0x8040201008040201)


class BitMask:
    """A mask of `count` entries on `device`, one bit each (bit i % 8 of byte i // 8). Written in
    pieces that start at a multiple of 8 (`store`), read back as 0/1 factors (`factor_into`)."""

    def __init__(self, count: int, device: torch.device | str = "cpu", zeroed: bool = True):
        """`zeroed=False` leaves the bits as allocated, for a writer that fills every byte."""
        self.count = count
        self.bits = (torch.zeros if zeroed else torch.empty)((count + 7) // 8, dtype=torch.uint8, device=device)

    def store(self, start: int, keep: torch.Tensor) -> None:
        """Entries start .. start + len(keep) - 1 from the boolean `keep`; `start` a multiple of 8,
        and `keep` a multiple of 8 long unless it reaches the end."""
        if start % 8:
            raise ValueError(f"a bit mask is stored from multiples of 8, not from {start}")
        flat = keep.reshape(-1)
        length = flat.numel()
        if length % 8:
            if start + length != self.count:
                raise ValueError("only the last piece of a bit mask may have a length that is not a multiple of 8")
            padded = torch.zeros(length + 8 - length % 8, dtype=torch.bool, device=flat.device)
            padded[:length] = flat
            flat = padded
        elif flat.storage_offset() % 8:
            flat = flat.clone()
        words = flat.view(torch.uint8).view(torch.int64)
        packed = words.mul(_GATHER).bitwise_right_shift_(56).bitwise_and_(0xFF)
        self.bits[start // 8 : start // 8 + packed.numel()].copy_(packed)

    def factor_into(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Entries start .. stop - 1 as 0/1 in `out`'s dtype (out[: stop - start]); `start` a
        multiple of 8."""
        if start % 8:
            raise ValueError(f"a bit mask is read from multiples of 8, not from {start}")
        bytes_ = self.bits[start // 8 : (stop + 7) // 8].to(torch.int64)
        spread = bytes_.mul_(_SPREAD).bitwise_and_(_SELECT)
        return torch.gt(spread.view(torch.uint8)[: stop - start], 0, out=out[: stop - start])

    def to_bool(self) -> torch.Tensor:
        """The whole mask as a boolean tensor of `count` entries."""
        factor = torch.empty(self.count, dtype=torch.bool, device=self.bits.device)
        return self.factor_into(0, self.count, factor)
