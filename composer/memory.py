"""Large uninitialised tensors that are cheap to fill and to give back."""

from __future__ import annotations

import mmap

import torch

_HUGE_PAGE_MINIMUM = 4 << 20


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """torch.empty, except that a large CPU tensor is its own anonymous memory map marked for transparent huge
    pages: filling it takes one page fault per 2 MiB instead of one per 4 KiB (on a virtual machine the faults
    were half the time of a merge), and freeing it returns the memory to the system at once."""
    count = 1
    for size in shape:
        count *= size
    nbytes = count * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < _HUGE_PAGE_MINIMUM or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype, device=device)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass
    return torch.frombuffer(region, dtype=torch.uint8).view(dtype).view(shape)
