"""Large uninitialised tensors that are cheap to fill and to give back, and reused while a merge runs."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import sys
import threading

import numpy as np
import torch

_HUGE_PAGE_MINIMUM = 4 << 20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MAPPED_FROM = 1 << 20  # bytes: allocations from this size on get their own map, returned to the system when freed


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError:
        return None


_LIBC = _libc()


def _libc_function(name: str):
    """glibc's `name`, or None (another C library)."""
    return getattr(_LIBC, name, None) if _LIBC is not None else None


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim). glibc keeps freed blocks of a few MB
    (under its adaptive mmap threshold) for reuse; between phases whose working sets come from different allocators
    (a trace's fingerprint temporaries, then --verify's executor maps; a tune's trials) the kept blocks count in the
    process's resident memory: 0.5 GB a model on SmolLM2-135M in a trace, above --memory-budget."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


def map_large_allocations() -> None:
    """Make glibc give every allocation of `MAPPED_FROM` bytes or more its own memory map. By default the size above
    which it does so rises to 32 MiB as large blocks are freed, and a trial's layer tensors and activations (a few
    MiB each) then come from the heap, which keeps the pages freed ones leave: a pass over parents the cache cannot
    hold grew the process by ~10 MiB a layer (290 MiB over SmolLM2's 30) beyond any set of tensors held at once. Set
    once; it fixes the size for the whole process."""
    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MAPPED_FROM)


class _Recycler:
    """The anonymous maps handed out while recycling is on, so that a freed one serves the next request
    of its size: a fresh map costs a page fault per page and the kernel's zeroing of it, which made
    reading a tensor into new memory two to three times slower than into memory used before.

    A map is free when no tensor uses it any more: tensors made by `torch.from_numpy` hold a reference
    to the array over the map until the last tensor or view sharing its storage is gone. A request is
    served by a free map of exactly its size, the one least recently used; when none fits, free maps are
    unmapped, least recently used first, until the maps held (in use or free) and the new one come to no
    more than the most that were ever in use at once: so recycling never raises the process's peak
    memory above what its tensors needed anyway."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.arrays: list[np.ndarray] = []  # uint8 arrays over the maps, least recently handed out first
        self.users = 0
        self.most_in_use = 0  # bytes

    def _free_arrays(self) -> list[np.ndarray]:
        free = []
        for array in self.arrays:
            if sys.getrefcount(array) <= _UNUSED_REFERENCES:
                free.append(array)
        return free

    def take(self, nbytes: int) -> np.ndarray:
        with self.lock:
            free = self._free_arrays()
            held = sum(array.nbytes for array in self.arrays)
            self.most_in_use = max(self.most_in_use, held - sum(array.nbytes for array in free) + nbytes)
            for array in free:
                if array.nbytes == nbytes:
                    self.arrays = [kept for kept in self.arrays if kept is not array] + [array]
                    return array
            unmapped = set()
            for array in free:
                if held + nbytes <= self.most_in_use:
                    break
                unmapped.add(id(array))
                held -= array.nbytes
            self.arrays = [array for array in self.arrays if id(array) not in unmapped]
            del free
            array = _new_map(nbytes)
            self.arrays.append(array)
            return array

    def release(self) -> None:
        """Unmap the free maps and stop tracking the others (they are unmapped when their tensors go)."""
        with self.lock:
            self.arrays.clear()
            self.most_in_use = 0


def _unused_references() -> int:
    """What sys.getrefcount reports, inside `_free_arrays`, for an array that only the list holds (counted
    on this interpreter rather than assumed)."""
    probe = _Recycler()
    probe.arrays.append(np.empty(1, dtype=np.uint8))
    counts = []
    for array in probe.arrays:
        counts.append(sys.getrefcount(array))
    return counts[0]


_UNUSED_REFERENCES = _unused_references()
_RECYCLER = _Recycler()


def _new_map(nbytes: int) -> np.ndarray:
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass
    return np.frombuffer(region, dtype=np.uint8)


@contextlib.contextmanager
def recycling():
    """Within this block, large CPU tensors from `empty` reuse the memory of freed ones of the same size
    (see `_Recycler`); on leaving it, free memory is given back to the system."""
    with _RECYCLER.lock:
        _RECYCLER.users += 1
    try:
        yield
    finally:
        with _RECYCLER.lock:
            _RECYCLER.users -= 1
            last = _RECYCLER.users == 0
        if last:
            _RECYCLER.release()


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """torch.empty, except that a large CPU tensor is its own anonymous memory map marked for transparent huge
    pages: filling it takes one page fault per 2 MiB instead of one per 4 KiB (on a virtual machine the faults
    were half the time of a merge), and freeing it returns the memory to the system at once. Inside a
    `recycling` block the map of a freed tensor of the same size is used again, with no faults at all."""
    count = 1
    for size in shape:
        count *= size
    nbytes = count * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < _HUGE_PAGE_MINIMUM or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype, device=device)
    array = _RECYCLER.take(nbytes) if _RECYCLER.users else _new_map(nbytes)
    return torch.from_numpy(array).view(dtype).view(shape)
