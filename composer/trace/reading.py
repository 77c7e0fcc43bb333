"""Reading tensors within `--memory-budget`: a tensor stored as plain bytes (safetensors) is read a block of rows
at a time, straight from its file (or mapped a block at a time, for the fingerprint pass); a GGUF matrix is
dequantised a block of rows at a time (the source's row reader); any other (a GGUF tensor its processor changes, a
PyTorch pickle) is read whole, one tensor at a time, and handed out in the same blocks."""

from __future__ import annotations

import math
import mmap
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from composer.errors import ComposerError
from composer.files import fill_from
from composer.native.checksum import SCAN_BLOCK
from composer.sources import ModelSource
from composer.sources.safetensors_format import read_into

FLOAT_BYTES = 4  # rows are worked on in float32
MIN_ROWS = 16


def row_count(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, row length) of a tensor seen as rows of its last axis (a vector is one row)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return math.prod(shape[:-1]), shape[-1]


def rows_within(budget: int, row_length: int, copies: int) -> int:
    """How many rows of `row_length` fit `copies` times over in float32 within `budget` bytes (at least MIN_ROWS)."""
    return max(MIN_ROWS, budget // max(1, row_length * FLOAT_BYTES * copies))


def spread_rows(total: int, wanted: int, runs: int) -> torch.Tensor:
    """About `wanted` of `total` row indices, ascending: `runs` runs of consecutive rows spread evenly over the
    tensor (all rows when `wanted` >= `total`)."""
    if wanted >= total:
        return torch.arange(total)
    runs = max(1, min(runs, wanted))
    length = wanted // runs
    starts = torch.linspace(0, total - length, runs).round().long()
    return (starts[:, None] + torch.arange(length)[None, :]).reshape(-1).unique()


def digest_aligned(rows: int, row_bytes: int) -> int:
    """`rows` rounded down to a multiple of the rows that make whole SCAN_BLOCKs (the digest is taken piece by
    piece, and every piece but the last must be a whole number of blocks)."""
    step = SCAN_BLOCK // math.gcd(SCAN_BLOCK, max(row_bytes, 1))
    return max(step, rows // step * step)


def runs(values: list[int]) -> list[tuple[int, int]]:
    """[first, last) of each run of consecutive values in `values` (ascending)."""
    found = []
    start = 0
    while start < len(values):
        end = start + 1
        while end < len(values) and values[end] == values[end - 1] + 1:
            end += 1
        found.append((values[start], values[end - 1] + 1))
        start = end
    return found


class RowReader:
    """Blocks of a source's tensors, as [rows, row length] tensors in their stored dtype."""

    def __init__(self, source: ModelSource):
        self.source = source
        self._descriptors: dict[str, int] = {}
        self._opening = threading.Lock()

    def stored_range(self, name: str) -> tuple[Path, int, int] | None:
        """(file, offset, length) of the tensor's bytes where the file holds it as it is read (plainly stored)."""
        located = self.source.byte_range(name)
        if located is None:
            return None
        info = self.source.tensor_infos()[name]
        return located if located[2] == math.prod(info.shape) * info.dtype.itemsize else None

    def _stored(self, name: str):
        located = self.stored_range(name)
        if located is None:
            return None
        path, offset, _ = located
        info = self.source.tensor_infos()[name]
        with self._opening:  # the trace's workers read one model's tensors at once
            descriptor = self._descriptors.get(str(path))
            if descriptor is None:
                descriptor = self._descriptors[str(path)] = os.open(path, os.O_RDONLY)
        return descriptor, offset, info

    def blocks(self, name: str, rows_per_block: int, mapped: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, block) for consecutive blocks of `rows_per_block` rows. `mapped`: a plainly stored block is a
        view of the file's pages mapped for it alone, read in place (no copy out of the page cache) and unmapped
        when the block is let go, so the resident memory is the block's, as when it is read."""
        stored = self._stored(name)
        if stored is None:
            part = self.source.row_reader(name)
            if part is not None:
                rows, _ = row_count(self.source.tensor_infos()[name].shape)
                for start in range(0, rows, rows_per_block):
                    yield start, part(start, min(rows, start + rows_per_block))
                return
            whole = self.source.read(name)
            rows, length = row_count(tuple(whole.shape))
            flat = whole.reshape(rows, length)
            for start in range(0, rows, rows_per_block):
                yield start, flat[start : start + rows_per_block]
            return
        descriptor, offset, info = stored
        rows, length = row_count(info.shape)
        row_bytes = length * info.dtype.itemsize
        read = self._mapped if mapped and hasattr(mmap, "MAP_POPULATE") else self._pread
        for start in range(0, rows, rows_per_block):
            count = min(rows_per_block, rows - start)
            yield start, read(descriptor, offset + start * row_bytes, (count, length), info.dtype, name)

    def _mapped(
        self, descriptor: int, offset: int, shape: tuple[int, int], dtype: torch.dtype, name: str, populate: bool = True
    ) -> torch.Tensor:
        size = shape[0] * shape[1] * dtype.itemsize
        if size == 0:
            return self._pread(descriptor, offset, shape, dtype, name)
        if os.fstat(descriptor).st_size < offset + size:  # a map past the file's end would fault, not fail
            raise ComposerError(
                f"Model '{self.source.reference}': tensor '{name}' could not be read (the file ends before the tensor "
                "does). The file may have changed since it was opened."
            )
        first = offset - offset % mmap.ALLOCATIONGRANULARITY
        # MAP_POPULATE maps every page at once rather than one fault at a time
        pages = mmap.mmap(
            descriptor,
            offset + size - first,
            flags=mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0),
            prot=mmap.PROT_READ,
            offset=first,
        )
        with warnings.catch_warnings():  # torch has no read-only tensors: nothing may write to this one
            warnings.filterwarnings("ignore", "The given buffer is not writable")
            found = torch.frombuffer(pages, dtype=torch.uint8, count=size, offset=offset - first)
        return found.view(dtype).reshape(shape)

    def mapped_rows(self, name: str, indices: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """`out` ([len(indices), row length] of the tensor's dtype) filled with the rows at `indices` of a plainly
        stored tensor, gathered from its file's pages mapped in place (only the pages those rows lie on are read);
        None for a tensor not stored plainly."""
        stored = self._stored(name)
        if stored is None or not hasattr(mmap, "MAP_POPULATE"):
            return None
        descriptor, offset, info = stored
        rows, length = row_count(info.shape)
        whole = self._mapped(descriptor, offset, (rows, length), info.dtype, name, populate=False)
        return torch.index_select(whole, 0, indices, out=out)

    def rows(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        """The rows at `indices` (sorted ascending), read one run of consecutive rows at a time where stored plainly."""
        stored = self._stored(name)
        if stored is None:
            part = self.source.row_reader(name)
            if part is None:
                whole = self.source.read(name)
                return whole.reshape(row_count(tuple(whole.shape)))[indices]
            pieces = [part(first, last) for first, last in runs(indices.tolist())]
            return torch.cat(pieces) if pieces else torch.empty(0, row_count(self.source.tensor_infos()[name].shape)[1])
        descriptor, offset, info = stored
        _, length = row_count(info.shape)
        row_bytes = length * info.dtype.itemsize
        found = torch.empty(len(indices), length, dtype=info.dtype)
        view = memoryview(found.view(torch.uint8).numpy()).cast("B")
        done = 0
        for first, last in runs(indices.tolist()):  # one pread a run of consecutive rows, straight into its place
            end = done + last - first
            self._pread_into(descriptor, offset + first * row_bytes, view[done * row_bytes : end * row_bytes], name)
            done = end
        return found

    def blocks_at(self, name: str, indices: torch.Tensor, rows_per_block: int) -> Iterator[torch.Tensor]:
        """The rows at `indices` (ascending), `rows_per_block` at a time; a tensor not stored plainly is read whole
        once and handed out in those blocks."""
        if self._stored(name) is None and self.source.row_reader(name) is None:
            whole = self.source.read(name)
            flat = whole.reshape(row_count(tuple(whole.shape)))
            for start in range(0, len(indices), rows_per_block):
                yield flat[indices[start : start + rows_per_block]]
            return
        for start in range(0, len(indices), rows_per_block):
            yield self.rows(name, indices[start : start + rows_per_block])

    def _pread(
        self, descriptor: int, offset: int, shape: tuple[int, int], dtype: torch.dtype, name: str
    ) -> torch.Tensor:
        try:
            return read_into(descriptor, offset, shape, dtype)
        except (OSError, EOFError) as error:
            raise ComposerError(
                f"Model '{self.source.reference}': tensor '{name}' could not be read ({error}). "
                "The file may have changed since it was opened."
            ) from None

    def _pread_into(self, descriptor: int, offset: int, view: memoryview, name: str) -> None:
        try:
            fill_from(descriptor, offset, view)
        except (OSError, EOFError) as error:
            raise ComposerError(
                f"Model '{self.source.reference}': tensor '{name}' could not be read ({error}). "
                "The file may have changed since it was opened."
            ) from None

    def close(self) -> None:
        descriptors, self._descriptors = self._descriptors, {}
        for descriptor in descriptors.values():
            os.close(descriptor)
