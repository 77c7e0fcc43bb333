"""The I/O floor of a merge: the time to read every input byte once and write every output byte once.

    python bench/io_floor.py --read FILE [FILE ...] --write-bytes N --dir DIR [--cold]

Reads go through the page cache with pread into one reused buffer (what an ideal merge does); the
write goes to a scratch file in DIR (the output's disk), past the page cache (O_DIRECT, whole blocks from an
aligned buffer) as `compose` writes its large tensors, where the filesystem allows it, and also, for comparison,
into the page cache as an ordinary write is (`write_buffered_s`); --fsync waits for the disk too, as
`compose --fsync` does.
--cold drops the page cache first (needs root); the default measures a warm cache, which is how
merges are usually run right after a download.
"""

from __future__ import annotations

import argparse
import mmap
import os
import time
from pathlib import Path

CHUNK = 64 * 1024 * 1024
BLOCK = 4096  # O_DIRECT's alignment: a multiple of the common logical block sizes


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_seconds(paths: list[Path]) -> tuple[float, int]:
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    total = 0
    started = time.perf_counter()
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while True:
                got = os.preadv(descriptor, [view], offset)
                if got == 0:
                    break
                offset += got
            total += offset
        finally:
            os.close(descriptor)
    return time.perf_counter() - started, total


def write_seconds(folder: Path, count: int, durable: bool = False, direct: bool = False) -> float:
    """Seconds to write `count` bytes; `direct`: whole blocks past the page cache where the filesystem allows
    it (the rest, and everything where it refuses, buffered)."""
    buffer = mmap.mmap(-1, min(CHUNK, max(count, 1)))  # page-aligned, as O_DIRECT needs
    buffer.write(os.urandom(len(buffer)))
    target = folder / ".io-floor-scratch"
    started = time.perf_counter()
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = write_direct(target, buffer, count // BLOCK * BLOCK) if direct else 0
        while written < count:
            written += os.pwrite(descriptor, memoryview(buffer)[: min(len(buffer), count - written)], written)
        if durable:
            os.fsync(descriptor)
    finally:
        os.close(descriptor)
        elapsed = time.perf_counter() - started
        target.unlink(missing_ok=True)
    return elapsed


def write_direct(target: Path, buffer: mmap.mmap, count: int) -> int:
    """Write the first `count` bytes (whole blocks) of `target` past the page cache, from the page-aligned `buffer`
    repeated; the bytes written, fewer where the filesystem refuses O_DIRECT."""
    if not hasattr(os, "O_DIRECT"):
        return 0
    try:
        descriptor = os.open(target, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return 0
    written = 0
    try:
        while written < count:
            written += os.pwrite(descriptor, memoryview(buffer)[: min(len(buffer), count - written)], written)
    except OSError:
        pass  # refused: the caller writes the rest through the page cache
    finally:
        os.close(descriptor)
    return written


def io_floor(inputs: list[Path], output_bytes: int, folder: Path, cold: bool = False, durable: bool = False) -> dict:
    """Seconds to read `inputs` and write `output_bytes` into `folder` (flushed to the disk when `durable`);
    warm unless `cold` (and permitted)."""
    if cold:
        cold = drop_page_cache()
    else:
        read_seconds(inputs)  # warm the page cache
        os.sync()
    reading, read_bytes = read_seconds(inputs)
    buffered = write_seconds(folder, output_bytes, durable)
    os.sync()  # the buffered write's dirty pages must not slow the direct one
    writing = write_seconds(folder, output_bytes, durable, direct=True)
    return {
        "read_s": reading,
        "write_s": writing,
        "write_buffered_s": buffered,
        "floor_s": reading + writing,
        "read_bytes": read_bytes,
        "cold": cold,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--read", type=Path, nargs="+", required=True, help="input files (every weights file of every input model)"
    )
    parser.add_argument("--write-bytes", type=int, required=True, help="bytes the merge writes")
    parser.add_argument("--dir", type=Path, default=Path("."), help="folder on the output's disk")
    parser.add_argument("--cold", action="store_true", help="drop the page cache first (root only)")
    parser.add_argument("--fsync", action="store_true", help="wait until the written bytes are on the disk")
    arguments = parser.parse_args()
    figures = io_floor(arguments.read, arguments.write_bytes, arguments.dir, arguments.cold, arguments.fsync)
    print(
        f"read {figures['read_bytes'] / 1e9:.2f} GB in {figures['read_s']:.2f} s ({figures['read_bytes'] / figures['read_s'] / 1e9:.2f} GB/s, "
        f"{'cold' if figures['cold'] else 'warm'}), write {arguments.write_bytes / 1e9:.2f} GB in {figures['write_s']:.2f} s "
        f"({figures['write_buffered_s']:.2f} s through the page cache): floor {figures['floor_s']:.2f} s"
    )


if __name__ == "__main__":
    main()
