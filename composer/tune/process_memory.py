"""What this process holds besides the parents' cache, for a memory budget that bounds the whole process."""

from __future__ import annotations

import ctypes
import ctypes.util

from composer.execute.executor import resident_bytes

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MAPPED_FROM = 1 << 20  # bytes: allocations from this size on get their own map, returned to the system when freed


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError:
        return None


_LIBC = _libc()


def _function(name: str):
    return getattr(_LIBC, name, None) if _LIBC is not None else None


def map_large_allocations() -> None:
    """Make glibc give every allocation of `MAPPED_FROM` bytes or more its own memory map. By default the size above
    which it does so rises to 32 MiB as large blocks are freed, and a trial's layer tensors and activations (a few
    MiB each) then come from the heap, which keeps the pages freed ones leave: a pass over parents the cache cannot
    hold grew the process by ~10 MiB a layer (290 MiB over SmolLM2's 30) beyond any set of tensors held at once. Set
    once; it fixes the size for the whole process."""
    mallopt = _function("mallopt")
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MAPPED_FROM)


def held_bytes() -> int:
    """The process's resident memory once free heap pages are handed back (glibc's malloc_trim; 0 where it cannot be
    read)."""
    trim = _function("malloc_trim")
    if trim is not None:
        trim(0)
    return resident_bytes()
