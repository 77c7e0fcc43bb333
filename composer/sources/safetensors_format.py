"""The safetensors file format: an 8-byte little-endian header length, a JSON header, then raw data."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from composer.errors import ComposerError

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
CODE_BY_DTYPE = {dtype: code for code, dtype in DTYPE_BY_CODE.items()}
ALIGNMENT = 8


def read_header(path: Path) -> dict:
    """The header of a safetensors file, checked against the file's real size."""
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
    data_size = size - 8 - header_length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        end = entry["data_offsets"][1]
        if end > data_size:
            raise ComposerError(
                f"{path} is truncated: tensor '{name}' ends at byte {end} of the data section, "
                f"but the file holds only {data_size} bytes of data. Download or copy the file again."
            )
        if entry["dtype"] not in DTYPE_BY_CODE:
            raise ComposerError(f"{path}: tensor '{name}' has dtype {entry['dtype']}, which composer does not read.")
    return header


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
