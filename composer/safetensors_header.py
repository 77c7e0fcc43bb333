"""The safetensors header, read and checked without torch (the trace's prescan reads headers while torch is still
importing): an 8-byte little-endian header length, a JSON object naming each tensor's dtype, shape and data_offsets
(counted from the end of the header), then the raw data. Files come from strangers: every entry is checked against
the format and the file's real size, and no two tensors may share bytes."""

from __future__ import annotations

import json
import os
import reprlib
import struct
from pathlib import Path

from composer.errors import ComposerError
from composer.files import open_regular, printable

# bytes per element of each dtype code safetensors writes
ITEM_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
MAX_HEADER_BYTES = 100_000_000  # real headers are kilobytes to a few megabytes


def read_header(path: Path) -> dict:
    """The header of a safetensors file, checked against the file's real size."""
    return read_layout(path)[0]


def read_layout(path: Path) -> tuple[dict, int]:
    """The checked header, and the file offset where the data section (which data_offsets count from) starts."""
    with os.fdopen(open_regular(path), "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        length = header_length(path, handle.read(8), size)
        raw = handle.read(length)
    return parse_header(path, raw, size), 8 + length


def header_length(where: Path | str, prefix: bytes, size: int) -> int:
    """The header's length from a file's first 8 bytes, checked against the file's size (`where` names the file)."""
    if len(prefix) < 8:
        raise ComposerError(f"{where} is not a safetensors file: it is only {size} bytes long.")
    (length,) = struct.unpack("<Q", prefix)
    if length > size - 8 or length > MAX_HEADER_BYTES:
        raise ComposerError(
            f"{where} is truncated or not a safetensors file: its header claims {length} bytes but the file has {size}."
        )
    return length


def parse_header(path: Path | str, raw: bytes, size: int) -> dict:
    """The header's JSON, every tensor's entry checked against the format and the size of the file (`path`, which
    may name a file on the hub) it came from."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # bad JSON or UTF-8, a number Python will not convert, nesting past the limit
        raise ComposerError(f"{path} has a corrupt safetensors header (not valid JSON).") from None
    if not isinstance(header, dict):
        raise ComposerError(f"{path} has a corrupt safetensors header (not a JSON object).")
    metadata = header.get("__metadata__")  # optional (null too, as safetensors reads it), else text by name
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values())
    ):
        raise ComposerError(f"{path} has a corrupt safetensors header: '__metadata__' must map names to strings.")
    data_size = size - 8 - len(raw)
    spans = []
    for name, entry in header.items():
        if name != "__metadata__":
            spans.append(_checked_span(path, name, entry, data_size))
    _refuse_overlaps(path, spans)
    return header


def _shown(value: object) -> str:
    """A header value for a message, cut short: a hostile header's values can be megabytes long."""
    return reprlib.repr(value)


def _tensor(name: str) -> str:
    return f"tensor '{printable(name)}'"


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_span(path: Path | str, name: str, entry: object, data_size: int) -> tuple[int, int, str]:
    """One tensor's entry checked against the format and the file's data size: (begin, end, name)."""
    tensor = _tensor(name)
    corrupt = f"{path} has a corrupt safetensors header: {tensor}"
    if not isinstance(entry, dict) or not all(key in entry for key in ("dtype", "shape", "data_offsets")):
        raise ComposerError(
            f"{path} has a corrupt safetensors header: the entry for {tensor} needs dtype, shape and data_offsets."
        )
    dtype_code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype_code, str):
        raise ComposerError(f"{corrupt} has dtype {_shown(dtype_code)}; a dtype is a string such as \"BF16\".")
    if not isinstance(shape, list) or not all(_whole(size) and size >= 0 for size in shape):
        raise ComposerError(f"{corrupt} has shape {_shown(shape)}; a shape is a list of whole numbers, none negative.")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(offset) for offset in offsets):
        raise ComposerError(
            f"{corrupt} has data_offsets {_shown(offsets)}; they must be two whole numbers, [begin, end]."
        )
    if dtype_code not in ITEM_BYTES:
        raise ComposerError(f"{path}: {tensor} has dtype {_shown(dtype_code)}, which composer does not read.")
    begin, end = offsets
    if end > data_size:
        raise ComposerError(
            f"{path} is truncated: {tensor} ends at byte {end} of the data section, "
            f"but the file holds only {data_size} bytes of data. Download or copy the file again."
        )
    count = 0 if 0 in shape else 1
    for dimension in shape if count else ():
        count *= dimension
        if count > data_size:  # already too big to match; a long list of huge sizes would make a vast product
            break
    if not 0 <= begin <= end or end - begin != count * ITEM_BYTES[dtype_code]:
        raise ComposerError(
            f"{corrupt} ({dtype_code}, shape {_shown(shape)}) "
            f"spans bytes {begin}..{end} of the data section, which does not match its size."
        )
    return begin, end, name


def _refuse_overlaps(path: Path | str, spans: list[tuple[int, int, str]]) -> None:
    """Two tensors may not share bytes (writing one in place would change the other)."""
    furthest = None  # of the spans so far, the one that ends last
    for span in sorted(span for span in spans if span[1] > span[0]):
        if furthest is not None and span[0] < furthest[1]:
            raise ComposerError(
                f"{path} has a corrupt safetensors header: {_tensor(furthest[2])} (bytes {furthest[0]}..{furthest[1]}) and "
                f"{_tensor(span[2])} (bytes {span[0]}..{span[1]}) overlap in the data section; each tensor needs bytes of its own."
            )
        if furthest is None or span[1] > furthest[1]:
            furthest = span


def tensor_spans(header: dict, data_start: int) -> list[tuple[int, int]]:
    """(offset in the file, length) of each tensor's bytes in a checked header, in file order."""
    return sorted(
        (data_start + entry["data_offsets"][0], entry["data_offsets"][1] - entry["data_offsets"][0])
        for name, entry in header.items()
        if name != "__metadata__"
    )
