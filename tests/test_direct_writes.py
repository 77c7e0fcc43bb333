"""The writer's direct (O_DIRECT) writes: the same bytes as buffered ones, whatever the tensors' sizes and offsets,
and buffered writes where the filesystem refuses them."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from composer.execute import direct_io
from composer.execute.writer import ShardedWriter
from composer.plan.model import Operation, PlannedTensor

# sizes in bytes around the thresholds: under the smallest direct stretch, just over it, past one staging buffer,
# an exact number of blocks, and odd sizes that leave every tensor after them off the block boundaries
SIZES = [
    ("tiny", 3),
    ("small", direct_io.SMALLEST_DIRECT // 2 + 1),
    ("just_direct", direct_io.SMALLEST_DIRECT + 3 * direct_io.BLOCK - 1),
    ("whole_blocks", 2 * direct_io.SMALLEST_DIRECT),
    ("odd", 3 * 1_000_003),
    ("past_staging", direct_io.STAGING_BYTES + 5 * direct_io.BLOCK + 7),
]


def planned() -> list[PlannedTensor]:
    return [
        PlannedTensor(name, (size,), torch.uint8, (), Operation(label="test", fn=lambda inputs: inputs[0]))
        for name, size in SIZES
    ]


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator) for name, size in SIZES}


def write(folder: Path, shard_size: int = 1 << 40) -> ShardedWriter:
    folder.mkdir()
    writer = ShardedWriter(folder, planned(), shard_size)
    for name, tensor in reversed(list(tensors().items())):  # not in file order, as the executor may write them
        writer.write(name, tensor)
    writer.finish()
    return writer


def contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("shard_size", [1 << 40, direct_io.STAGING_BYTES])
def test_direct_writes_give_the_bytes_of_buffered_ones(tmp_path: Path, monkeypatch, shard_size: int):
    direct_calls = []
    real = direct_io.DirectWrites._write_direct

    def counted(self, descriptor, data, offset):
        direct_calls.append((offset, len(data)))
        assert offset % direct_io.BLOCK == 0 and len(data) % direct_io.BLOCK == 0
        return real(self, descriptor, data, offset)

    monkeypatch.setattr(direct_io.DirectWrites, "_write_direct", counted)
    direct_writer = write(tmp_path / "direct", shard_size)
    monkeypatch.setenv("COMPOSER_DIRECT_WRITES", "0")
    write(tmp_path / "buffered", shard_size)
    assert contents(tmp_path / "direct") == contents(tmp_path / "buffered")
    loaded = {}
    for path in (tmp_path / "direct").glob("*.safetensors"):
        loaded.update(load_file(path))
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors().items())
    if direct_writes_possible(tmp_path) and not direct_writer.direct_refused:
        # every tensor with a long enough aligned stretch went past the page cache (where the filesystem allows it)
        assert len(direct_calls) == 4


def direct_writes_possible(folder: Path) -> bool:
    """Whether this filesystem opens files for direct writes at all (some refuse, some only at the first write)."""
    probe = folder / "probe"
    probe.write_bytes(b"")
    descriptor = direct_io.open_direct(probe)
    if descriptor is None:
        return False
    os.close(descriptor)
    return True


def test_buffered_writes_everywhere_with_the_switch_off(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("COMPOSER_DIRECT_WRITES", "0")
    monkeypatch.setattr(direct_io.DirectWrites, "_write_direct", lambda *arguments: pytest.fail("wrote directly"))
    write(tmp_path / "out")


def test_a_filesystem_that_refuses_direct_writes_gets_buffered_ones(tmp_path: Path, monkeypatch):
    """EINVAL at the first direct write (a filesystem that accepts the flag at open but not the write)."""
    real_write_all = direct_io.write_all
    direct_attempts = []

    def refusing(descriptor, data, offset):
        if descriptor in direct_descriptors:
            direct_attempts.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write_all(descriptor, data, offset)

    direct_descriptors: set[int] = set()
    real_open = direct_io.open_direct

    def opened(path):
        descriptor = real_open(path)
        if descriptor is None:  # no O_DIRECT here at all: hand out an ordinary descriptor to refuse on
            descriptor = os.open(path, os.O_WRONLY)
        direct_descriptors.add(descriptor)
        return descriptor

    monkeypatch.setattr(direct_io, "write_all", refusing)
    monkeypatch.setattr("composer.execute.writer.open_direct", opened)
    writer = write(tmp_path / "refused")
    monkeypatch.setattr(direct_io, "write_all", real_write_all)
    monkeypatch.setenv("COMPOSER_DIRECT_WRITES", "0")
    write(tmp_path / "buffered")
    assert len(direct_attempts) == 1 and writer.direct_refused
    assert contents(tmp_path / "refused") == contents(tmp_path / "buffered")


def test_another_error_of_a_direct_write_is_raised(tmp_path: Path, monkeypatch):
    """A full disk is not a refusal: the run fails rather than hiding it behind a buffered retry."""
    direct = direct_io.DirectWrites()
    path = tmp_path / "file"
    path.write_bytes(b"\0" * (4 * direct_io.SMALLEST_DIRECT))
    buffered = os.open(path, os.O_WRONLY)

    def full(descriptor, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_io, "write_all", full)
    with pytest.raises(OSError) as raised:
        direct._write_direct(buffered, memoryview(bytes(direct_io.SMALLEST_DIRECT)), 0)
    os.close(buffered)
    assert raised.value.errno == errno.ENOSPC and not direct.refused
