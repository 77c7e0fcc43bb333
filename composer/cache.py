"""composer's cache folder: `$COMPOSER_CACHE`, default `~/.cache/composer`.

Folders composer makes here are private (0o700), made one level at a time so that no umask, not even 000, leaves
one writable by others. A folder that already exists is never changed; `unsafe_reason` says whether one can be
trusted with code (composer.native loads compiled kernels only from a folder that passes it).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def cache_dir() -> Path:
    path = Path(os.environ.get("COMPOSER_CACHE", Path.home() / ".cache" / "composer"))
    make_private_dirs(path)
    return path


def make_private_dirs(path: Path) -> None:
    """Create `path` and any missing parents, each 0o700 (folders that exist are left as they are)."""
    missing = []
    while not path.is_dir() and path != path.parent:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:  # made meanwhile by another process (or a file: the caller's open fails and says so)
            continue
        os.chmod(folder, 0o700)  # the mode mkdir got is 0o700 narrowed by the umask; make it exactly 0o700


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[BinaryIO]:
    """A binary file that replaces `path` in one step when the block ends without an error. It is a fresh file
    beside `path` (never a fixed name, which a link planted in a shared folder could send elsewhere)."""
    descriptor, partial = tempfile.mkstemp(suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def unsafe_reason(folder: Path) -> str | None:
    """Why another user could change what `folder` holds, or None where only this user (and root) can.

    The folder must be owned by this user and writable by nobody else, and every folder above it owned by this
    user or root and writable by nobody else unless sticky (as /tmp is, where others cannot rename what is ours)."""
    if not hasattr(os, "geteuid"):
        return "on a system where composer cannot check who may write to it"
    user = os.geteuid()
    real = Path(os.path.realpath(folder))
    for current in (real, *real.parents):
        try:
            status = os.lstat(current)
        except OSError as error:
            return f"unreadable ({error.strerror}: {current})"
        writable_by_others = status.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if current == real:
            if status.st_uid != user:
                return f"owned by another user (uid {status.st_uid})"
            if writable_by_others:
                return f"writable by other users (mode {stat.S_IMODE(status.st_mode):o})"
        else:
            if status.st_uid not in (user, 0):
                return f"inside {current}, which is owned by another user (uid {status.st_uid})"
            if writable_by_others and not status.st_mode & stat.S_ISVTX:
                return f"inside {current}, which other users can write to (mode {stat.S_IMODE(status.st_mode):o})"
    return None
