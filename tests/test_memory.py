"""composer.memory: large tensors reuse freed memory inside `recycling`, never memory still in use."""

import torch

from composer import memory

MIB = 1 << 20


def held_bytes() -> int:
    return sum(array.nbytes for array in memory._RECYCLER.arrays)


def test_outside_recycling_nothing_is_kept():
    tensor = memory.empty((8 * MIB,), torch.uint8)
    assert tensor.numel() == 8 * MIB and memory._RECYCLER.arrays == []


def test_freed_memory_of_the_same_size_is_reused_and_memory_in_use_never_is():
    with memory.recycling():
        first = memory.empty((4 * MIB,), torch.float16)  # 8 MiB
        address = first.data_ptr()
        second = memory.empty((8 * MIB,), torch.uint8)
        assert second.data_ptr() != address
        view = first[10:20]
        del first
        third = memory.empty((2 * MIB,), torch.float32)
        assert third.data_ptr() != address, "a view still uses the first tensor's memory"
        del view
        fourth = memory.empty((1024, 2048), torch.float32)
        assert fourth.data_ptr() == address and fourth.shape == (1024, 2048) and fourth.dtype == torch.float32
        fourth.fill_(1.5)
        assert float(fourth.sum()) == 1.5 * 1024 * 2048
    assert memory._RECYCLER.arrays == [] and memory._RECYCLER.most_in_use == 0


def test_free_memory_of_other_sizes_is_given_back_beyond_the_most_ever_in_use():
    with memory.recycling():
        small = [memory.empty((8 * MIB,), torch.uint8) for _ in range(3)]  # 24 MiB in use at most
        del small
        assert held_bytes() == 24 * MIB
        large = memory.empty((16 * MIB,), torch.uint8)
        # 16 MiB in use: two of the free 8 MiB maps go, so that no more than 24 MiB are held
        assert held_bytes() == 24 * MIB
        other = memory.empty((8 * MIB,), torch.uint8)
        assert held_bytes() == 24 * MIB and other.data_ptr() != large.data_ptr()
        del large, other


def test_small_and_device_tensors_are_plain():
    with memory.recycling():
        small = memory.empty((16,), torch.float32)
        assert small.shape == (16,) and memory._RECYCLER.arrays == []
