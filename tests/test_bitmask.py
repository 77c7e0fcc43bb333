"""Bit-packed masks (composer.methods.task_arithmetic.bitmask): what is stored comes back, piece by piece."""

import pytest
import torch

from composer.methods.task_arithmetic.bitmask import BitMask


@pytest.mark.parametrize("count", [1, 7, 8, 9, 64, 1000, 4099])
def test_stored_pieces_read_back_exactly(count):
    generator = torch.Generator().manual_seed(count)
    keep = torch.rand(count, generator=generator) < 0.5
    mask = BitMask(count)
    cuts = list(range(0, count, 24)) + [count]
    for start, stop in zip(cuts, cuts[1:]):
        mask.store(start, keep[start:stop])
    assert torch.equal(mask.to_bool(), keep)
    assert mask.bits.numel() == (count + 7) // 8
    factor = torch.empty(count, dtype=torch.bfloat16)
    for start, stop in zip(cuts, cuts[1:]):  # read in other pieces than written
        mask.factor_into(start, stop, factor[start:])
    assert torch.equal(factor, keep.to(torch.bfloat16))


def test_all_ones_and_all_zeros():
    mask = BitMask(64)
    mask.store(0, torch.ones(64, dtype=torch.bool))
    assert mask.bits.tolist() == [255] * 8 and bool(mask.to_bool().all())
    mask.store(0, torch.zeros(64, dtype=torch.bool))
    assert not bool(mask.to_bool().any())


def test_unaligned_pieces_are_refused():
    mask = BitMask(32)
    with pytest.raises(ValueError, match="multiples of 8"):
        mask.store(4, torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="last piece"):
        mask.store(0, torch.ones(12, dtype=torch.bool))
