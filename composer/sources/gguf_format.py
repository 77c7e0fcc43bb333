"""The GGUF file format, header only: metadata and the tensor table, read without touching tensor data.

Layout (little-endian): magic `GGUF`, uint32 version (2 or 3), uint64 tensor count, uint64 metadata count,
then the metadata key/value pairs, then one entry per tensor (name, dimensions fastest-moving first, ggml
type, offset into the data section), then the data section, which starts at the next multiple of
`general.alignment` (32 unless the file says otherwise).

Walking the header here is much faster than `gguf.GGUFReader`, which builds a numpy view for every token
of the vocabulary; string arrays (vocabulary, merges) are skipped and recorded as their length.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from composer.errors import ComposerError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
STRING, ARRAY = 8, 9
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass(frozen=True)
class GGUFTensorEntry:
    name: str
    shape: tuple[int, ...]  # torch order: slowest-moving dimension first
    ggml_type: int
    offset: int  # absolute position in the file
    nbytes: int

    @property
    def byte_shape(self) -> tuple[int, ...]:
        """The shape of the raw bytes: rows of the last dimension, each `row bytes` long."""
        rows = self.shape[:-1] if self.shape else ()
        return (*rows, self.nbytes // max(1, _count(rows)))


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict = field(default_factory=dict)
    tensors: dict[str, GGUFTensorEntry] = field(default_factory=dict)
    data_start: int = 0

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None


def _count(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


class _Cursor:
    def __init__(self, buffer, path: Path):
        self.buffer = buffer
        self.position = 0
        self.path = path

    def unpack(self, fmt: str):
        try:
            values = struct.unpack_from("<" + fmt, self.buffer, self.position)
        except struct.error:
            raise ComposerError(
                f"{self.path} is truncated or not a GGUF file: its header runs past the end of the file "
                f"(at byte {self.position} of {len(self.buffer)}). Download or copy the file again."
            ) from None
        self.position += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def string(self) -> str:
        length = self.unpack("Q")
        end = self.position + length
        if end > len(self.buffer):
            raise ComposerError(
                f"{self.path} is truncated or not a GGUF file: a string in its header claims {length} bytes "
                f"at byte {self.position}, past the end of the file ({len(self.buffer)} bytes)."
            )
        raw = bytes(self.buffer[self.position:end])
        self.position = end
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        length = self.unpack("Q")
        self.position += length
        if self.position > len(self.buffer):
            raise ComposerError(f"{self.path} is truncated or not a GGUF file: its header runs past the end of the file.")

    def value(self, value_type: int, key: str):
        if value_type in SCALAR_FORMATS:
            return self.unpack(SCALAR_FORMATS[value_type])
        if value_type == STRING:
            return self.string()
        if value_type == ARRAY:
            element_type, count = self.unpack("IQ")
            if element_type in SCALAR_FORMATS:
                fmt = SCALAR_FORMATS[element_type]
                if count == 0:
                    return []
                values = self.unpack(f"{count}{fmt}")
                return list(values) if count > 1 else [values]
            if element_type == STRING:  # vocabularies and merge tables: walked, not kept
                for _ in range(count):
                    self.skip_string()
                return count
            if element_type == ARRAY:
                return [self.value(ARRAY, key) for _ in range(count)]
            raise ComposerError(f"{self.path}: metadata key '{key}' holds an array of unknown type {element_type}; the file is damaged.")
        raise ComposerError(f"{self.path}: metadata key '{key}' has unknown value type {value_type}; the file is damaged or not GGUF.")


def _quant_sizes(ggml_type: int) -> tuple[int, int] | None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return None


def type_name(ggml_type: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def read_gguf_header(path: Path) -> GGUFHeader:
    """Metadata and tensor table of a GGUF file, checked against the file's real size."""
    size = path.stat().st_size
    if size < 24:
        raise ComposerError(f"{path} is not a GGUF file: it is only {size} bytes long.")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        if bytes(buffer[:4]) != MAGIC:
            raise ComposerError(f"{path} is not a GGUF file: it does not start with the bytes 'GGUF'.")
        cursor = _Cursor(buffer, path)
        cursor.position = 4
        version = cursor.unpack("I")
        if version not in VERSIONS:
            if struct.unpack(">I", struct.pack("<I", version))[0] in VERSIONS:
                raise ComposerError(f"{path} is a big-endian GGUF file, which composer does not read.")
            raise ComposerError(f"{path} is GGUF version {version}; composer reads versions 2 and 3.")
        tensor_count, metadata_count = cursor.unpack("QQ")
        header = GGUFHeader(path=path, version=version)
        for _ in range(metadata_count):
            key = cursor.string()
            value_type = cursor.unpack("I")
            header.metadata[key] = cursor.value(value_type, key)
        entries = []
        for _ in range(tensor_count):
            name = cursor.string()
            dim_count = cursor.unpack("I")
            if dim_count > 8:
                raise ComposerError(f"{path}: tensor '{name}' claims {dim_count} dimensions; the file is damaged.")
            dims = cursor.unpack(f"{dim_count}Q") if dim_count else ()
            dims = (dims,) if isinstance(dims, int) else tuple(dims)
            ggml_type, offset = cursor.unpack("IQ")
            entries.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = header.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise ComposerError(f"{path}: metadata 'general.alignment' is {alignment!r}; the file is damaged.")
        header.data_start = (cursor.position + alignment - 1) // alignment * alignment
    for name, shape, ggml_type, offset in entries:
        if name in header.tensors:
            raise ComposerError(f"{path} holds two tensors named '{name}'; the file is damaged.")
        sizes = _quant_sizes(ggml_type)
        if sizes is None:
            raise ComposerError(f"{path}: tensor '{name}' has ggml type {ggml_type}, which the installed gguf package does not know.")
        block, block_bytes = sizes
        elements = _count(shape)
        if shape and shape[-1] % block:
            raise ComposerError(
                f"{path}: tensor '{name}' has rows of {shape[-1]} values, not a multiple of the {type_name(ggml_type)} block of {block}; the file is damaged."
            )
        nbytes = elements // block * block_bytes
        start = header.data_start + offset
        if start + nbytes > size:
            raise ComposerError(
                f"{path} is truncated: tensor '{name}' ends at byte {start + nbytes}, but the file has only {size} bytes. "
                "Download or copy the file again."
            )
        header.tensors[name] = GGUFTensorEntry(name, shape, ggml_type, start, nbytes)
    return header
