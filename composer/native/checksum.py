"""The checksum of bytes and the count of NaN and infinite entries among them, through kernels.c's `scan_bytes`
(at memory speed), or numpy where there are no kernels (the same checksum and count, a few times slower). It needs
no torch, so a trace can checksum its files while torch is still being imported (composer.trace.prescan).

The checksum: the bytes as little-endian 64-bit words (the last one zero-padded) in blocks of 4096 bytes;
s1 = the sum of all words, s2 = the sum over blocks of s1 so far at each block's end (both mod 2^64), so a
block's words count with its place (Fletcher's sum, block by block, which vectorises).
"""

from __future__ import annotations

import ctypes

import numpy as np

from composer import native

SCAN_BLOCK = 4096  # kernels.c's SCAN_BLOCK
MASK = (1 << 64) - 1
_NUMPY_WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def checksum_text(first: int, second: int) -> str:
    return f"{first:016x}{second:016x}"


def scan_bytes(data: memoryview, width: int = 0, exponent: int = 0) -> tuple[int, int, int]:
    """(s1, s2, entries that are NaN or infinite) of `data`, read as entries of `width` bytes whose exponent bits
    are `exponent` (width 0: no entries counted)."""
    kernels = native.library()
    if kernels is not None and len(data):
        sums = (ctypes.c_uint64 * 2)()
        found = ctypes.c_int64()
        raw = np.frombuffer(data, dtype=np.uint8)  # no copy; read-only buffers (mapped files) too
        kernels.scan_bytes(len(raw), raw.ctypes.data, width, exponent, sums, ctypes.byref(found))
        return sums[0], sums[1], found.value
    return numpy_scan(data, width, exponent)


def checksum_of_pieces(pieces) -> str:
    """The checksum of bytes given as consecutive pieces, each but the last a multiple of SCAN_BLOCK bytes."""
    first = second = 0
    for piece in pieces:
        piece_first, piece_second, _ = scan_bytes(piece)
        blocks = -(-len(piece) // SCAN_BLOCK)
        second = (second + piece_second + first * blocks) & MASK
        first = (first + piece_first) & MASK
    return checksum_text(first, second)


def numpy_scan(data: memoryview, width: int, exponent: int) -> tuple[int, int, int]:
    raw = np.frombuffer(data, dtype=np.uint8)
    whole = len(raw) // 8 * 8
    words = raw[:whole].view("<u8")
    if whole < len(raw):
        tail = np.zeros(8, dtype=np.uint8)
        tail[: len(raw) - whole] = raw[whole:]
        words = np.concatenate([words, tail.view("<u8")])
    per_block = SCAN_BLOCK // 8
    padded = np.zeros(-(-len(words) // per_block) * per_block, dtype=np.uint64)
    padded[: len(words)] = words
    running = np.cumsum(padded.reshape(-1, per_block).sum(axis=1, dtype=np.uint64), dtype=np.uint64)
    first, second = (int(running[-1]), int(running.sum(dtype=np.uint64))) if len(running) else (0, 0)
    found = 0
    if width:
        entries = raw[: len(raw) // width * width].view(_NUMPY_WORDS[width])
        mask = _NUMPY_WORDS[width](exponent)
        found = int(np.count_nonzero((entries & mask) == mask))
    return first, second, found
