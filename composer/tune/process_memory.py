"""What this process holds besides the parents' cache, for a memory budget that bounds the whole process."""

from __future__ import annotations

from composer.execute.executor import resident_bytes
from composer.memory import release_freed_memory


def held_bytes() -> int:
    """The process's resident memory once free heap pages are handed back (0 where it cannot be read)."""
    release_freed_memory()
    return resident_bytes()
