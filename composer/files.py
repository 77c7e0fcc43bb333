"""Bounded reading of the small files composer takes from users and downloads: recipes, configs, index files,
prompt lists and texts to score.

Each file must be a regular file (a named pipe would block a read forever and a device like /dev/zero never
ends), no larger than a limit named in the error, and UTF-8 text; JSON must hold an object and nest only a
few levels. Every refusal is a ComposerError naming the file.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from composer.errors import ComposerError

MiB = 1024**2
# config.json, index files (the largest MoE models' index files are about 10 MB), adapter and tokenizer configs
SMALL_FILE_LIMIT = 32 * MiB
# recipes and YAML prompt lists: PyYAML parses about a megabyte a second
YAML_FILE_LIMIT = 4 * MiB
# texts to score (eval, transplant --report)
TEXT_FILE_LIMIT = 256 * MiB
JSON_DEPTH_LIMIT = 100


def _named(path: Path, what: str) -> str:
    return f"{what} {path}" if what else str(path)


def _size_text(limit: int) -> str:
    return f"{limit // MiB} MB" if limit % MiB == 0 else f"{limit} bytes"


def kind_of(mode: int) -> str:
    """What a file that is not a regular file is, from its stat mode: a folder, a named pipe, a device..."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(path: Path, what: str = "") -> int:
    """A read-only descriptor of `path`, which must be a regular file (symlinks followed).

    Opened without blocking and checked with fstat on the open descriptor, so a named pipe is refused instead
    of waiting for a writer, and the file checked is the file read.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ComposerError(f"{_named(path, what)} does not exist.") from None
    except OSError as error:
        raise ComposerError(f"{_named(path, what)} cannot be read: {error.strerror or error}.") from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise ComposerError(
            f"{_named(path, what)} is {kind_of(mode)}, not a regular file; give a file that holds the data."
        )
    return descriptor


def fill_from(descriptor: int, offset: int, view: memoryview) -> None:
    """Fill `view` with the file's bytes from `offset` on, with pread (no map, no file position shared between
    threads). EOFError, saying how many bytes were missing, where the file ends first; OSError as pread raises it."""
    done = 0
    while done < len(view):
        got = os.preadv(descriptor, [view[done:]], offset + done)
        if got == 0:
            raise EOFError(f"the file ends {len(view) - done} bytes before the tensor does")
        done += got


def read_bytes(path: Path, what: str = "", limit: int = SMALL_FILE_LIMIT) -> bytes:
    """The whole of a regular file of at most `limit` bytes."""
    descriptor = open_regular(path, what)
    with os.fdopen(descriptor, "rb") as handle:
        size = os.fstat(descriptor).st_size
        data = b"" if size > limit else handle.read(size + 1)
        if size < len(data) <= limit:  # it grew, or does not know its size (/proc): read on, one byte past the limit
            data += handle.read(limit + 1 - len(data))
    if size > limit or len(data) > limit:
        raise ComposerError(
            f"{_named(path, what)} is larger than the {_size_text(limit)} composer reads from such a file; "
            "check that the path names the right file."
        )
    return data


def _decoded(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ComposerError(f"{name} is not UTF-8 text (byte {error.start} cannot be decoded).") from None


def read_text(path: Path, what: str = "", limit: int = SMALL_FILE_LIMIT) -> str:
    """A regular file's UTF-8 text, at most `limit` bytes of it."""
    return _decoded(read_bytes(path, what, limit), _named(path, what))


def _json_type(value: object) -> str:
    names = {list: "a list", str: "a string", bool: "true or false", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _deeper_than(value: object, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def parse_json_object(text: str, name: str) -> dict:
    """JSON text that must hold an object at the top, nested at most JSON_DEPTH_LIMIT levels; `name` says
    what it is in messages (e.g. the file's path)."""
    too_deep = f"{name} nests more than {JSON_DEPTH_LIMIT} levels deep, which no real file does; the file is damaged."
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ComposerError(
            f"{name} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})."
        ) from None
    except RecursionError:
        raise ComposerError(too_deep) from None
    except ValueError as error:  # e.g. an integer longer than Python converts
        raise ComposerError(f"{name} is not valid JSON ({error}).") from None
    if not isinstance(value, dict):
        raise ComposerError(f"{name} must hold a JSON object ({{...}}) at the top; it holds {_json_type(value)}.")
    if _deeper_than(value, JSON_DEPTH_LIMIT):
        raise ComposerError(too_deep)
    return value


def read_json_object(path: Path, what: str = "", limit: int = SMALL_FILE_LIMIT) -> dict:
    """A regular file holding one JSON object."""
    return parse_json_object(read_text(path, what, limit), _named(path, what))


def read_text_to_score(path: Path) -> str:
    """A text file for eval or transplant --report: UTF-8, at most TEXT_FILE_LIMIT bytes, not empty."""
    text = read_text(path, "Text file", TEXT_FILE_LIMIT)
    if not text.strip():
        raise ComposerError(f"Text file {path} is empty; there is nothing to score.")
    return text


def printable(name: str, longest: int = 200) -> str:
    """A name read from a file (a key, a tensor name), safe to put in a one-paragraph message: control
    characters escaped, and cut short when it is long."""
    if name.isprintable() and len(name) <= longest:
        return name
    shown = name.encode("unicode_escape").decode("ascii") if not name.isprintable() else name
    return shown if len(shown) <= longest else shown[: longest - 3] + "..."


def check_report_path(path: Path, option: str, image: bool = False) -> None:
    """Refuse a path a command's report (`option`: --json, --png) cannot be written to, before the command's work: a
    folder, a file in a folder that does not exist, or for an `image` a name whose extension Pillow does not write."""
    if path.is_dir():
        raise ComposerError(f"{option} {path} is a folder; give the path of the file to write.")
    if not path.absolute().parent.is_dir():
        raise ComposerError(f"{option} {path}: the folder {path.absolute().parent} does not exist.")
    if image:
        from PIL import Image

        Image.init()
        if path.suffix.lower() not in Image.registered_extensions():
            raise ComposerError(
                f"{option} {path}: '{path.suffix or 'no extension'}' is not an image format Pillow writes; give a path "
                "ending in .png."
            )
