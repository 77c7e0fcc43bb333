"""Writing a shard's large stretches past the page cache (O_DIRECT), the rest through it.

A buffered write copies every byte into page-cache pages the kernel must first find: on a virtual machine whose host
takes back the memory a guest frees (a balloon's free page reporting), each such page costs a fault on the host. The
bench's 1.6 GB output, written with `dd`, took 5.9-8.8 s buffered (190-280 MB/s) and 1.1-1.4 s direct, to the same
disk. Direct writes also leave nothing dirty behind, so the next run does not start while the kernel still writes
this one back. `COMPOSER_DIRECT_WRITES=0` keeps every write buffered.

O_DIRECT needs the file offset, the length and the memory address aligned to the device's block: the stretch of a
tensor between its first and last block boundaries goes through an aligned staging buffer, the bytes on either side
(and every tensor under `SMALLEST_DIRECT`) through the ordinary descriptor. A filesystem that refuses O_DIRECT, at
the open or at the first write (tmpfs on older kernels, some network and FUSE filesystems), gets buffered writes.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading

import numpy

# a multiple of every common logical block size (512 and 4096 bytes) and of the memory page, so that no page holds
# both bytes written directly and bytes written through the page cache
BLOCK = max(4096, mmap.PAGESIZE)
STAGING_BYTES = 8 << 20  # one staging buffer per writing thread
SMALLEST_DIRECT = 1 << 20  # a tensor whose aligned stretch is shorter goes through the page cache whole
_REFUSALS = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


def direct_writes_wanted() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get("COMPOSER_DIRECT_WRITES", "1") != "0"


def open_direct(path) -> int | None:
    """A second descriptor on the existing file `path` for direct writes, or None where there can be none."""
    if not direct_writes_wanted():
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return None


class DirectWrites:
    """Writes `data` at `offset` of a file open twice: `buffered` (ordinary) and `direct` (O_DIRECT, or None). The
    first direct write the filesystem refuses turns direct writes off for this object; other errors are raised."""

    def __init__(self) -> None:
        self.refused = False
        self._local = threading.local()

    def write(self, buffered: int, direct: int | None, data: memoryview, offset: int) -> None:
        first = -(-offset // BLOCK) * BLOCK
        last = (offset + len(data)) // BLOCK * BLOCK
        if direct is None or self.refused or last - first < SMALLEST_DIRECT:
            write_all(buffered, data, offset)
            return
        write_all(buffered, data[: first - offset], offset)
        if not self._write_direct(direct, data[first - offset : last - offset], first):
            write_all(buffered, data[first - offset : last - offset], first)
        write_all(buffered, data[last - offset :], last)

    def _write_direct(self, direct: int, data: memoryview, offset: int) -> bool:
        """Write `data` (whole blocks, at a block boundary) through the staging buffer; False if refused."""
        staging = getattr(self._local, "staging", None)
        if staging is None:
            staging = self._local.staging = mmap.mmap(-1, STAGING_BYTES)
        staging_address = ctypes.addressof(ctypes.c_char.from_buffer(staging))
        source = numpy.frombuffer(data, numpy.uint8)
        done = 0
        while done < len(source):
            piece = min(STAGING_BYTES, len(source) - done)
            ctypes.memmove(staging_address, source.ctypes.data + done, piece)  # without the interpreter's lock
            try:
                write_all(direct, memoryview(staging)[:piece], offset + done)
            except OSError as error:
                if done or error.errno not in _REFUSALS:
                    raise
                self.refused = True
                return False
            done += piece
        return True


def write_all(descriptor: int, data: memoryview, offset: int) -> None:
    """pwrite all of `data` at `offset` (one call may write less than asked)."""
    written = 0
    while written < len(data):
        written += os.pwrite(descriptor, data[written:], offset + written)
