"""Sharded safetensors output whose layout is fixed before any tensor exists.

Every shard's header is written first and each tensor is then written at its own offset, so tensors
may be computed in any order and never wait in memory for their neighbours.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch

from composer.errors import ComposerError
from composer.execute.direct_io import STAGING_BYTES, DirectWrites, open_direct, write_all
from composer.execute.journal import Journal, checksum_of_range
from composer.native.checksum import checksum_text
from composer.native.scan import scan
from composer.plan.model import PlannedTensor
from composer.sources.safetensors_format import build_header

INDEX_NAME = "model.safetensors.index.json"
_COPY_PIECE = 64 << 20  # bytes per read where a copy cannot go file to file


def shard_layout(
    tensors: list[PlannedTensor], shard_size: int, single: str | None = None
) -> list[tuple[str, list[PlannedTensor]]]:
    """(file name, its tensors in order) of every output file: tensors in plan order, a new shard whenever the next
    would take the current one past `shard_size`; `single` names the one file that holds them all."""
    shards: list[list[PlannedTensor]] = [[]]
    filled = 0
    for tensor in tensors:
        if shards[-1] and filled + tensor.nbytes > shard_size and single is None:
            shards.append([])
            filled = 0
        shards[-1].append(tensor)
        filled += tensor.nbytes
    count = len(shards)
    return [
        (single or ("model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"), members)
        for number, members in enumerate(shards, start=1)
    ]


class ShardedWriter:
    """`durable`: flush every shard to the disk before `finish` returns (safe against power loss, but the
    merge then waits for the disk); otherwise the page cache holds what the disk has not taken yet, as
    with any ordinary file write. `journal`: each finished tensor is recorded there. `reuse`: the shards
    of a dead run are kept (when their headers are the ones this layout writes) instead of truncated. `single`: one
    file of this name holds every tensor, whatever `shard_size`. `metadata`: text every file's header carries
    beside safetensors' "format" (composer's provenance record). `only`: open just the shards holding these tensors,
    as another process laid them out (a cluster's worker writing its unit of work into the driver's shards), or, with
    `lay_out`, laid out here (a worker writing its unit on its node's own disk, for the driver to gather)."""

    def __init__(
        self,
        folder: Path,
        tensors: list[PlannedTensor],
        shard_size: int,
        durable: bool = False,
        journal: Journal | None = None,
        reuse: bool = False,
        single: str | None = None,
        metadata: dict[str, str] | None = None,
        only: set[str] | None = None,
        lay_out: bool = False,
    ):
        self.durable = durable
        self.journal = journal
        opened_laid_out = only is not None and not lay_out
        self.reused = reuse or opened_laid_out  # every shard kept as the dead run (or the driver) left it
        self.files: list[Path] = []
        self._location: dict[str, tuple[int, int, PlannedTensor]] = {}
        self._descriptors: list[int] = []
        self._direct_descriptors: list[int | None] = []
        self._direct = DirectWrites()
        self.folder = folder
        self._sources: dict[Path, int] = {}  # input files copied from, opened once
        try:
            for name, members in shard_layout(tensors, shard_size, single):
                if only is not None and not any(tensor.name in only for tensor in members):
                    continue
                path = folder / name
                header, offsets = build_header(
                    [(t.name, t.shape, t.dtype) for t in members], {"format": "pt", **(metadata or {})}
                )
                self.files.append(path)
                if opened_laid_out:
                    self._descriptors.append(_open_laid_out(path, header))
                else:
                    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                    self._descriptors.append(descriptor)
                    if not (reuse and os.pread(descriptor, len(header), 0) == header):
                        self.reused = False
                        # only a file with bytes in it is emptied: on ext4, truncating a file to zero makes its
                        # close start writing back every dirty page first (~1 s a 1.6 GB shard, measured)
                        if os.fstat(descriptor).st_size:
                            os.ftruncate(descriptor, 0)
                        os.pwrite(descriptor, header, 0)
                    os.ftruncate(descriptor, len(header) + sum(t.nbytes for t in members))
                self._direct_descriptors.append(open_direct(path))
                for tensor in members:
                    self._location[tensor.name] = (len(self._descriptors) - 1, offsets[tensor.name], tensor)
        except BaseException:
            self.close()
            raise
        self.nonfinite: list[str] = []  # tensors written with NaN or infinite entries
        self._nonfinite_lock = threading.Lock()
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, offset, planned = self._location[name]
        if tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise RuntimeError(
                f"tensor {name} came out as {tuple(tensor.shape)} {tensor.dtype}, planned {planned.shape} {planned.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy()
        view = memoryview(data).cast("B")
        first, second, nonfinite = scan(view, tensor.dtype)
        if nonfinite:
            with self._nonfinite_lock:
                self.nonfinite.append(name)
        self._direct.write(self._descriptors[shard], self._direct_descriptors[shard], view, offset)
        self._wrote(name, shard, offset, len(view))
        if self.journal is not None:
            self.journal.computed(name, checksum_text(first, second), nonfinite > 0)

    def _wrote(self, name: str, shard: int, offset: int, length: int) -> None:
        if self.durable and hasattr(os, "posix_fadvise"):
            # Linux starts writing these pages back now (without waiting), so the final fsync does not find
            # the whole output still dirty and flush it after the last tensor, with nothing left to overlap.
            os.posix_fadvise(self._descriptors[shard], offset, length, os.POSIX_FADV_DONTNEED)
        self._written.add(name)

    @property
    def staging_bytes(self) -> int:
        """Memory the direct writes' staging buffer takes (one writing thread), none without direct writes."""
        return STAGING_BYTES if any(descriptor is not None for descriptor in self._direct_descriptors) else 0

    @property
    def direct_refused(self) -> bool:
        """Whether the filesystem refused a direct write (all later writes went through the page cache)."""
        return self._direct.refused

    def finished_earlier(self, entries: dict[str, dict]) -> set[str]:
        """The tensors a dead run's journal lists whose bytes are really in the kept shards (checked against the
        recorded checksum, or against the input they were copied from); each is counted as written."""
        if not self.reused:
            return set()
        finished = set()
        for name, entry in entries.items():
            if name not in self._location:
                continue
            shard, offset, planned = self._location[name]
            here = checksum_of_range(self.files[shard], offset, planned.nbytes)
            if isinstance(entry.get("checksum"), str):
                expected = entry["checksum"]
            elif isinstance(entry.get("source"), str) and isinstance(entry.get("offset"), int):
                expected = checksum_of_range(Path(entry["source"]), entry["offset"], planned.nbytes)
            else:
                continue
            if here is not None and here == expected:
                finished.add(name)
                if entry.get("nonfinite"):
                    self.nonfinite.append(name)
        self._written |= finished
        return finished

    def copy_range(self, name: str, source: Path, source_offset: int, length: int) -> None:
        """Write tensor `name` from `length` bytes of the file `source` at `source_offset`, file to file
        (`os.copy_file_range`: the kernel copies, or shares the blocks where the filesystem can; no
        tensor in this process's memory), or through a buffer where that is not possible."""
        shard, offset, planned = self._location[name]
        if length != planned.nbytes:
            raise RuntimeError(f"tensor {name}: {length} bytes to copy, {planned.nbytes} planned")
        descriptor = self._sources.get(source)
        if descriptor is None:
            descriptor = self._sources[source] = os.open(source, os.O_RDONLY)
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < length:
                    copied = os.copy_file_range(
                        descriptor, self._descriptors[shard], length - done, source_offset + done, offset + done
                    )
                    if copied == 0:
                        raise _ended_early(source, name)
                    done += copied
            except OSError:  # not between these files (another filesystem on an old kernel, a special file)
                pass
        while done < length:
            data = os.pread(descriptor, min(length - done, _COPY_PIECE), source_offset + done)
            if not data:
                raise _ended_early(source, name)
            write_all(self._descriptors[shard], memoryview(data), offset + done)
            done += len(data)
        self._wrote(name, shard, offset, length)
        if self.journal is not None:
            self.journal.copied(name, source, source_offset)

    def pieces(self, names) -> list[tuple[str, int, int]]:
        """(file name, offset, length) of the bytes of tensors `names`, neighbours joined: the stretches of these shards
        that another process wrote in a layout of its own, to be copied here (a node that wrote to its own disk)."""
        spans = sorted(
            (self._location[name][0], self._location[name][1], self._location[name][2].nbytes) for name in names
        )
        joined: list[list[int]] = []
        for shard, offset, length in spans:
            if joined and joined[-1][0] == shard and joined[-1][1] + joined[-1][2] == offset:
                joined[-1][2] += length
            else:
                joined.append([shard, offset, length])
        return [(self.files[shard].name, offset, length) for shard, offset, length in joined]

    def write_piece(self, file_name: str, offset: int, data) -> None:
        """Write bytes another process computed at `offset` of shard `file_name` (a stretch `pieces` named)."""
        shard = next(number for number, path in enumerate(self.files) if path.name == file_name)
        view = memoryview(data).cast("B")
        self._direct.write(self._descriptors[shard], self._direct_descriptors[shard], view, offset)
        if self.durable and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._descriptors[shard], offset, len(view), os.POSIX_FADV_DONTNEED)

    def mark_written(self, names, nonfinite=()) -> None:
        """Count tensors as written that another process wrote into these shards (a cluster's worker)."""
        self._written.update(names)
        self.nonfinite.extend(nonfinite)

    def sync(self) -> None:
        """With `durable`, wait until the shards' bytes are on the disk."""
        if self.durable:
            for descriptor in self._descriptors:
                os.fsync(descriptor)

    def finish(self) -> None:
        missing = set(self._location) - self._written
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {sorted(missing)[0]}")
        self.sync()
        self.close()
        if len(self.files) > 1:
            weight_map = {name: self.files[shard].name for name, (shard, _, _) in self._location.items()}
            total = sum(planned.nbytes for _, _, planned in self._location.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))

    def close(self) -> None:
        direct = [descriptor for descriptor in self._direct_descriptors if descriptor is not None]
        for descriptor in [*self._descriptors, *direct, *self._sources.values()]:
            try:
                os.close(descriptor)
            except OSError:
                pass
        self._descriptors = []
        self._direct_descriptors = []
        self._sources = {}


def _open_laid_out(path: Path, header: bytes) -> int:
    """A descriptor for writing into a shard another process made, once its header is the one expected."""
    try:
        descriptor = os.open(path, os.O_RDWR)
    except OSError as error:
        raise ComposerError(
            f"{path}: the shard to write into cannot be opened ({error.strerror}); the output's partial folder must be on "
            "storage that every machine of the run can write to."
        ) from None
    if os.pread(descriptor, len(header), 0) != header:
        os.close(descriptor)
        raise ComposerError(
            f"{path} is not the shard this run laid out (its header differs): something else changed the partial output. "
            "Run the command again."
        )
    return descriptor


def _ended_early(source: Path, name: str) -> ComposerError:
    return ComposerError(
        f"{source} ended before tensor '{name}' could be copied from it: the file was truncated or replaced while "
        "composer was reading it. Make sure nothing else writes to the input models during a run, then run again."
    )
