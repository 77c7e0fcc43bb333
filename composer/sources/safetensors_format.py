"""The safetensors file format's tensors: dtypes, reads into tensors, headers for writing (the header itself is read
and checked by composer.safetensors_header, which needs no torch)."""

from __future__ import annotations

import json
import struct

import torch

from composer.files import fill_from
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
for _code, _attribute in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attribute):  # newer torch releases only
        DTYPE_BY_CODE[_code] = getattr(torch, _attribute)
CODE_BY_DTYPE = {dtype: code for code, dtype in DTYPE_BY_CODE.items()}
ALIGNMENT = 8


def read_into(descriptor: int, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new tensor filled straight from the file with pread: one copy, no memory map.

    Reading through the page cache keeps resident memory to the tensors in use (a map's touched pages
    count as the process's own), and the copy needs no Python lock, so a reader thread overlaps compute.
    """
    count = 1
    for size in shape:
        count *= size
    buffer = empty((count * dtype.itemsize,), torch.uint8)
    fill_from(descriptor, offset, memoryview(buffer.numpy()).cast("B"))
    return buffer.view(dtype).reshape(shape)


def build_header(
    entries: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, int]]:
    """Header bytes (length prefix included) for tensors laid out in the given order, and each tensor's data offset."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offsets: dict[str, int] = {}
    position = 0
    for name, shape, dtype in entries:
        count = 1
        for size in shape:
            count *= size
        nbytes = count * dtype.itemsize
        header[name] = {
            "dtype": CODE_BY_DTYPE[dtype],
            "shape": list(shape),
            "data_offsets": [position, position + nbytes],
        }
        offsets[name] = position
        position += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % ALIGNMENT)
    prefix = struct.pack("<Q", len(encoded)) + encoded
    return prefix, {name: len(prefix) + offset for name, offset in offsets.items()}
