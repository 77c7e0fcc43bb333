"""What this process holds besides the parents' cache, for a memory budget that bounds the whole process."""

from __future__ import annotations

import ctypes
import ctypes.util

from composer.execute.executor import resident_bytes


def _trim():
    """glibc's malloc_trim, or None: it hands the heap's free pages back to the system, which freed tensors (a trial's
    activations, the last layer's merge) would otherwise keep counted in the process's resident memory."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _trim()


def held_bytes() -> int:
    """The process's resident memory once free heap pages are handed back (0 where it cannot be read)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
    return resident_bytes()
