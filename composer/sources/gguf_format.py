"""The GGUF file format, header only: metadata and the tensor table, read without touching tensor data.

Layout (little-endian): magic `GGUF`, uint32 version (2 or 3), uint64 tensor count, uint64 metadata count,
then the metadata key/value pairs, then one entry per tensor (name, dimensions fastest-moving first, ggml
type, offset into the data section), then the data section, which starts at the next multiple of
`general.alignment` (32 unless the file says otherwise).

Walking the header here is much faster than `gguf.GGUFReader`, which builds a numpy view for every token
of the vocabulary; string arrays (vocabulary, merges) and arrays of more than MAX_KEPT_ARRAY numbers (token
scores and types) are skipped and recorded as their length (`read_gguf_tokenizer` reads the tokenizer's whole).
Files come from strangers, so every count and length is checked against the bytes left before it is used (see
_Cursor).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from composer.errors import ComposerError
from composer.files import open_regular, printable

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
PAIRS_START = 24  # magic, version, tensor count, pair count
STRING, ARRAY = 8, 9
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# Bounds a hostile header runs into long before it could hang composer or fill memory; real files stay far below
MAX_ARRAY_DEPTH = 8  # real files nest arrays one or two levels
MAX_ENTRIES = 1 << 24  # metadata pairs, array elements and tensors in all (a large vocabulary and its merges: ~1M)
MAX_KEPT_ARRAY = 4096  # longer arrays (token scores and types) are walked and recorded as their length
MAX_KEPT_VALUES = 1 << 20  # array values kept in all
MAX_NAME_BYTES = 65535  # GGUF's limit on a key; tensor names are far shorter


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
    skipped_spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> bytes of a pair kept as a count
    metadata_end: int = 0  # where the key/value pairs end and the tensor table starts
    table_end: int = 0  # where the tensor table ends (the data section starts at the next aligned byte)

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
    """Walks the header, refusing anything a hostile file could use to raise, hang or fill memory: counts that
    claim more entries than the bytes left could hold, more entries in all than any real header has, arrays
    nested past MAX_ARRAY_DEPTH, keys and names longer than GGUF allows."""

    def __init__(self, buffer, path: Path, whole: Callable[[str], bool] = lambda key: False):
        self.buffer = buffer
        self.position = 0
        self.path = path
        self.entries_left = MAX_ENTRIES
        self.values_left = MAX_KEPT_VALUES
        self.whole = whole  # keys whose arrays are kept whole, strings and all

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

    def claim(self, count: int, least_bytes: int, what: str) -> None:
        """`count` entries of at least `least_bytes` each are about to be read."""
        left = len(self.buffer) - self.position
        if count * least_bytes > left:
            raise ComposerError(
                f"{self.path} is truncated or not a GGUF file: {what} claims {count} entries at byte {self.position}, "
                f"more than the {left} bytes left in the file can hold."
            )
        if count > self.entries_left:
            raise ComposerError(
                f"{self.path}: {what} claims {count} entries, more than the {MAX_ENTRIES} a GGUF header holds in all; the file is damaged."
            )
        self.entries_left -= count

    def string(self, longest: int | None = None, what: str = "a string") -> str:
        length = self.unpack("Q")
        end = self.position + length
        if end > len(self.buffer):
            raise ComposerError(
                f"{self.path} is truncated or not a GGUF file: {what} in its header claims {length} bytes "
                f"at byte {self.position}, past the end of the file ({len(self.buffer)} bytes)."
            )
        if longest is not None and length > longest:
            raise ComposerError(
                f"{self.path}: {what} at byte {self.position} is {length} bytes long; GGUF allows {longest}. The file is damaged."
            )
        raw = bytes(self.buffer[self.position : end])
        self.position = end
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        length = self.unpack("Q")
        self.position += length
        if self.position > len(self.buffer):
            raise ComposerError(
                f"{self.path} is truncated or not a GGUF file: its header runs past the end of the file."
            )

    def value(self, value_type: int, key: str, depth: int = 0):
        if value_type in SCALAR_FORMATS:
            return self.unpack(SCALAR_FORMATS[value_type])
        if value_type == STRING:
            return self.string(what=f"the value of metadata key '{key}'")
        if value_type == ARRAY:
            return self.array(key, depth + 1)
        raise ComposerError(
            f"{self.path}: metadata key '{key}' has unknown value type {value_type}; the file is damaged or not GGUF."
        )

    def array(self, key: str, depth: int, wanted: bool = True):
        """A list of the values; for strings (vocabularies, merge tables) and long arrays, only their count."""
        if depth > MAX_ARRAY_DEPTH:
            raise ComposerError(
                f"{self.path}: metadata key '{key}' holds arrays nested more than {MAX_ARRAY_DEPTH} deep (real files nest "
                "one or two); the file is damaged."
            )
        element_type, count = self.unpack("IQ")
        whole = wanted and depth == 1 and self.whole(key)
        if element_type == STRING:  # walked, not kept
            self.claim(count, 8, f"metadata key '{key}'")
            if whole:
                return [self.string(what=f"an entry of metadata key '{key}'") for _ in range(count)]
            for _ in range(count):
                self.skip_string()
            return count
        if element_type not in SCALAR_FORMATS and element_type != ARRAY:
            raise ComposerError(
                f"{self.path}: metadata key '{key}' holds an array of unknown type {element_type}; the file is damaged."
            )
        size = struct.calcsize("<" + SCALAR_FORMATS[element_type]) if element_type in SCALAR_FORMATS else 12
        self.claim(count, size, f"metadata key '{key}'")
        keep = whole or (wanted and self.keeps(count))
        if element_type == ARRAY:
            items = [self.array(key, depth + 1, keep) for _ in range(count)]
            return items if keep else count
        values = (
            list(struct.unpack_from(f"<{count}{SCALAR_FORMATS[element_type]}", self.buffer, self.position))
            if keep
            else count
        )
        self.position += count * size
        return values

    def keeps(self, count: int) -> bool:
        """Whether an array of `count` values is kept as a list (small ones, within the header's total)."""
        if count > MAX_KEPT_ARRAY or count > self.values_left:
            return False
        self.values_left -= count
        return True


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
    with os.fdopen(open_regular(path), "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < 24:
            raise ComposerError(f"{path} is not a GGUF file: it is only {size} bytes long.")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            header, entries = _walk(path, buffer)
    return _tensor_table(path, size, header, entries)


def read_gguf_tokenizer(path: Path) -> dict:
    """The file's `tokenizer.*` metadata with every array whole (the vocabulary, its types and scores, the merges)."""
    with (
        os.fdopen(open_regular(path), "rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer,
    ):
        header, _ = _walk(path, buffer, whole=lambda key: key.startswith("tokenizer."))
    return {key: value for key, value in header.metadata.items() if key.startswith("tokenizer.")}


def write_metadata_copy(header: GGUFHeader, destination: Path) -> Path:
    """A copy of the GGUF file without the tokenizer's long arrays, for readers that parse every entry of every
    array (gguf's GGUFReader takes 16 s over Gemma 3's 262,144 tokens) when they want the config. The vocabulary's
    length is kept as `<architecture>.vocab_size` where the file has none (readers take the model's vocabulary
    size from it), and the tensor data is a hole of the original's length (the table's offsets stay right)."""
    dropped = sorted(span for key, span in header.skipped_spans.items() if key.startswith("tokenizer."))
    pairs = []
    size_key = f"{header.architecture}.vocab_size"
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    added = 0
    with os.fdopen(open_regular(header.path), "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            position = PAIRS_START
            for start, end in dropped:
                pairs.append(bytes(buffer[position:start]))
                position = end
            pairs.append(bytes(buffer[position : header.metadata_end]))
            if size_key not in header.metadata and isinstance(tokens, int):
                name = size_key.encode()
                pairs.append(struct.pack("<Q", len(name)) + name + struct.pack("<II", 4, tokens))  # type 4: uint32
                added = 1
            table = bytes(buffer[header.metadata_end : header.table_end])
    counts = struct.pack("<IQQ", header.version, len(header.tensors), len(header.metadata) - len(dropped) + added)
    alignment = header.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    with open(destination, "wb") as copy:
        copy.write(b"".join([MAGIC, counts, *pairs, table]))
        copy.truncate(-(-copy.tell() // alignment) * alignment + size - header.data_start)
    return destination


def _walk(
    path: Path, buffer, whole: Callable[[str], bool] = lambda key: False
) -> tuple[GGUFHeader, list[tuple[str, tuple[int, ...], int, int]]]:
    """The metadata, data start and the raw tensor entries (name, torch-order shape, ggml type, data offset)."""
    if bytes(buffer[:4]) != MAGIC:
        raise ComposerError(f"{path} is not a GGUF file: it does not start with the bytes 'GGUF'.")
    cursor = _Cursor(buffer, path, whole)
    cursor.position = 4
    version = cursor.unpack("I")
    if version not in VERSIONS:
        if struct.unpack(">I", struct.pack("<I", version))[0] in VERSIONS:
            raise ComposerError(f"{path} is a big-endian GGUF file, which composer does not read.")
        raise ComposerError(f"{path} is GGUF version {version}; composer reads versions 2 and 3.")
    tensor_count, metadata_count = cursor.unpack("QQ")
    header = GGUFHeader(path=path, version=version)
    cursor.claim(metadata_count, 13, "the metadata table")  # a key's length, its type, a one-byte value
    for _ in range(metadata_count):
        start = cursor.position
        key = cursor.string(MAX_NAME_BYTES, "a metadata key")
        value_type = cursor.unpack("I")
        header.metadata[key] = value = cursor.value(value_type, printable(key))  # the key as messages show it
        if value_type == ARRAY and isinstance(value, int):
            header.skipped_spans[key] = (start, cursor.position)
    header.metadata_end = cursor.position
    cursor.claim(tensor_count, 24, "the tensor table")  # a name's length, a dimension count, type and offset
    entries = []
    for _ in range(tensor_count):
        name = cursor.string(MAX_NAME_BYTES, "a tensor name")
        dim_count = cursor.unpack("I")
        if dim_count > 8:
            raise ComposerError(
                f"{path}: tensor '{printable(name)}' claims {dim_count} dimensions; the file is damaged."
            )
        dims = cursor.unpack(f"{dim_count}Q") if dim_count else ()
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        ggml_type, offset = cursor.unpack("IQ")
        entries.append((name, tuple(reversed(dims)), ggml_type, offset))
    header.table_end = cursor.position
    alignment = header.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
        raise ComposerError(f"{path}: metadata 'general.alignment' is {alignment!r}; the file is damaged.")
    header.data_start = (cursor.position + alignment - 1) // alignment * alignment
    return header, entries


def _tensor_table(
    path: Path, size: int, header: GGUFHeader, entries: list[tuple[str, tuple[int, ...], int, int]]
) -> GGUFHeader:
    """The tensor entries checked (known types, whole blocks, inside the file) into `header.tensors`."""
    for name, shape, ggml_type, offset in entries:
        label = printable(name)
        if name in header.tensors:
            raise ComposerError(f"{path} holds two tensors named '{label}'; the file is damaged.")
        sizes = _quant_sizes(ggml_type)
        if sizes is None:
            raise ComposerError(
                f"{path}: tensor '{label}' has ggml type {ggml_type}, which the installed gguf package does not know."
            )
        block, block_bytes = sizes
        elements = _count(shape)
        if shape and shape[-1] % block:
            raise ComposerError(
                f"{path}: tensor '{label}' has rows of {shape[-1]} values, not a multiple of the {type_name(ggml_type)} block of {block}; the file is damaged."
            )
        nbytes = elements // block * block_bytes
        start = header.data_start + offset
        if start + nbytes > size:
            raise ComposerError(
                f"{path} is truncated: tensor '{label}' ends at byte {start + nbytes}, but the file has only {size} bytes. "
                "Download or copy the file again."
            )
        header.tensors[name] = GGUFTensorEntry(name, shape, ggml_type, start, nbytes)
    return header
