"""The journal of a partial output folder: which tensors are finished, so a run that died can be resumed.

One JSON object a line, appended as each tensor's bytes are handed to the kernel: first the run's
identity (a digest of everything that decides the output's bytes), then one line per finished tensor
with the checksum of its bytes (composer.native.checksum), or, for a tensor copied file to file, where it
was copied from. A process
that is killed leaves at worst a torn last line, which is ignored. Resuming checks every entry against
the bytes really in the shard (a power loss can lose what the journal says was written) and redoes
the tensors that do not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from composer.files import fill_from
from composer.native.checksum import checksum_of_pieces

JOURNAL_FILE = ".composer-journal.jsonl"
# on a cluster, each try of a unit of work journals into a file of its own here (many machines never append to one
# file); the driver copies a finished unit's entries into JOURNAL_FILE
UNITS_FOLDER = ".composer-units"
_CHECK_PIECE = 16 << 20  # bytes read at a time when checking a finished tensor (a multiple of the scan's block)


def identity_digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def read_identity(folder: Path, name: str = JOURNAL_FILE) -> str | None:
    """The identity a partial folder's journal `name` was started with (None without a readable journal)."""
    try:
        with open(folder / name, encoding="utf-8") as journal:
            first = json.loads(journal.readline())
    except (OSError, ValueError):
        return None
    return first.get("identity") if isinstance(first, dict) else None


def read_entries(folder: Path, name: str = JOURNAL_FILE) -> dict[str, dict]:
    """Finished tensors by name, as the journal `name` records them (lines that do not parse are skipped)."""
    entries: dict[str, dict] = {}
    try:
        with open(folder / name, encoding="utf-8", errors="replace") as journal:
            journal.readline()
            for line in journal:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("tensor"), str):
                    entries[entry["tensor"]] = entry
    except OSError:
        pass
    return entries


def checksum_of_range(path: Path, offset: int, length: int) -> str | None:
    """The checksum of `length` bytes of a file at `offset`; None when the file is shorter or unreadable."""
    buffer = bytearray(min(length, _CHECK_PIECE))

    def pieces(descriptor: int):
        for start in range(0, length, _CHECK_PIECE):
            view = memoryview(buffer)[: min(length - start, _CHECK_PIECE)]
            fill_from(descriptor, offset + start, view)
            yield view

    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return checksum_of_pieces(pieces(descriptor))
    except (OSError, EOFError):
        return None
    finally:
        os.close(descriptor)


def remove_unit_journals(folder: Path) -> None:
    """Remove the units' journals of a cluster's run (an output holds no folders)."""
    import shutil

    shutil.rmtree(folder / UNITS_FOLDER, ignore_errors=True)


class Journal:
    """Appends finished tensors to a partial folder's journal `name` (from any thread)."""

    def __init__(self, folder: Path, identity: str, fresh: bool, name: str = JOURNAL_FILE):
        self.path = folder / name
        self._lock = threading.Lock()
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if fresh else 0)
        self._descriptor: int | None = os.open(self.path, flags, 0o644)
        if fresh:
            self._append({"identity": identity})
        else:
            self._append({})  # ends a torn last line of the dead run, if it left one

    def _append(self, entry: dict) -> None:
        line = ("\n" if not entry else json.dumps(entry, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._descriptor is not None:
                os.write(self._descriptor, line)

    def record(self, entry: dict) -> None:
        """Append an entry as another journal recorded it (a cluster's unit of work, finished)."""
        self._append(entry)

    def computed(self, name: str, checksum: str, nonfinite: bool = False) -> None:
        self._append({"tensor": name, "checksum": checksum} | ({"nonfinite": True} if nonfinite else {}))

    def copied(self, name: str, source: Path, offset: int) -> None:
        self._append({"tensor": name, "source": str(source), "offset": offset})

    def remove(self) -> None:
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def close(self) -> None:
        with self._lock:
            if self._descriptor is not None:
                os.close(self._descriptor)
                self._descriptor = None
