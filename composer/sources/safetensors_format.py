"""The safetensors file format: an 8-byte little-endian header length, a JSON header, then raw data."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from composer.errors import ComposerError
from composer.memory import empty

DTYPE_BY_CODE = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attribute in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attribute):  # newer torch releases only
        DTYPE_BY_CODE[_code] = getattr(torch, _attribute)
CODE_BY_DTYPE = {dtype: code for code, dtype in DTYPE_BY_CODE.items()}
ALIGNMENT = 8


def read_header(path: Path) -> dict:
    """The header of a safetensors file, checked against the file's real size."""
    return read_layout(path)[0]


def read_layout(path: Path) -> tuple[dict, int]:
    """The checked header, and the file offset where the data section (which data_offsets count from) starts."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ComposerError(f"{path} is not a safetensors file: it is only {size} bytes long.")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > size - 8 or header_length > 100_000_000:
            raise ComposerError(
                f"{path} is truncated or not a safetensors file: its header claims {header_length} bytes but the file has {size}."
            )
        try:
            header = json.loads(handle.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ComposerError(f"{path} has a corrupt safetensors header (not valid JSON).") from None
    if not isinstance(header, dict):
        raise ComposerError(f"{path} has a corrupt safetensors header (not a JSON object).")
    data_size = size - 8 - header_length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            count = 1
            for dimension in shape:
                count *= int(dimension)
        except (KeyError, TypeError, ValueError):
            raise ComposerError(f"{path} has a corrupt safetensors header: the entry for tensor '{name}' needs dtype, shape and data_offsets.") from None
        if dtype_code not in DTYPE_BY_CODE:
            raise ComposerError(f"{path}: tensor '{name}' has dtype {dtype_code}, which composer does not read.")
        if end > data_size:
            raise ComposerError(
                f"{path} is truncated: tensor '{name}' ends at byte {end} of the data section, "
                f"but the file holds only {data_size} bytes of data. Download or copy the file again."
            )
        if not 0 <= begin <= end or end - begin != count * DTYPE_BY_CODE[dtype_code].itemsize:
            raise ComposerError(
                f"{path} has a corrupt safetensors header: tensor '{name}' ({dtype_code}, shape {list(shape)}) "
                f"spans bytes {begin}..{end} of the data section, which does not match its size."
            )
    return header, 8 + header_length


def read_into(descriptor: int, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new tensor filled straight from the file with pread: one copy, no memory map.

    Reading through the page cache keeps resident memory to the tensors in use (a map's touched pages
    count as the process's own), and the copy needs no Python lock, so a reader thread overlaps compute.
    """
    count = 1
    for size in shape:
        count *= size
    buffer = empty((count * dtype.itemsize,), torch.uint8)
    view = memoryview(buffer.numpy()).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(descriptor, [view[done:]], offset + done)
        if got == 0:
            raise EOFError(f"the file ends {len(view) - done} bytes before the tensor does")
        done += got
    return buffer.view(dtype).reshape(shape)


def build_header(entries: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """Header bytes (length prefix included) for tensors laid out in the given order, and each tensor's data offset."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offsets: dict[str, int] = {}
    position = 0
    for name, shape, dtype in entries:
        count = 1
        for size in shape:
            count *= size
        nbytes = count * dtype.itemsize
        header[name] = {"dtype": CODE_BY_DTYPE[dtype], "shape": list(shape), "data_offsets": [position, position + nbytes]}
        offsets[name] = position
        position += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % ALIGNMENT)
    prefix = struct.pack("<Q", len(encoded)) + encoded
    return prefix, {name: len(prefix) + offset for name, offset in offsets.items()}
