"""A GGUF file appears complete or not at all: it is written under a hidden name beside OUT and renamed at the end.

The rules are those of output folders: an existing OUT is replaced only with --force, and then only when it is
a GGUF file composer wrote (its metadata says `general.quantized_by: composer`). The hidden file of a run that
died (SIGKILL, power loss) is removed by the next run that writes the same OUT.
"""

from __future__ import annotations

import glob
import os
import secrets
from contextlib import contextmanager
from pathlib import Path

from composer.errors import ComposerError
from composer.execute.output_folder import (
    check_name_length,
    hidden_stem,
    is_write_failure,
    process_alive,
    write_failure,
)
from composer.signals import signals_held

WRITER_NAME = "composer"  # general.quantized_by in every GGUF composer writes
PARTIAL = ".partial-"


def written_by_composer(path: Path) -> bool:
    from composer.sources.gguf_format import read_gguf_header

    try:
        return read_gguf_header(path).metadata.get("general.quantized_by") == WRITER_NAME
    except (ComposerError, OSError):
        return False


def _refusal(out: Path, force: bool) -> str | None:
    """Why OUT may not be written, or None."""
    if not (out.exists() or out.is_symlink()):
        return None
    if not force:
        return "already exists; composer will not overwrite it. Pass --force to replace it, or choose another path."
    if out.is_symlink() or not out.is_file():
        what = "a link" if out.is_symlink() else "not a file"
        return f"exists and is {what}; composer only replaces GGUF files it wrote, even with --force."
    if not written_by_composer(out):
        return (
            "exists and is not a GGUF file composer wrote; even with --force composer replaces only its own outputs. "
            "Move it away, remove it yourself, or choose another path."
        )
    return None


def check_gguf_output_free(out: Path, force: bool) -> None:
    """Refuse to touch what the user owns: without --force any existing OUT, with it anything but composer's own GGUF."""
    check_name_length(out)
    reason = _refusal(out, force)
    if reason is not None:
        raise ComposerError(f"Output {out} {reason}")


def _remove_abandoned(out: Path, stem: str) -> None:
    for leftover in out.parent.glob(f".{glob.escape(stem)}{PARTIAL}*"):
        pid = leftover.name.rsplit(PARTIAL, 1)[-1].split("-", 1)[0]
        if leftover.is_file() and not leftover.is_symlink() and pid.isdigit() and not process_alive(int(pid)):
            leftover.unlink(missing_ok=True)


@contextmanager
def gguf_output(out: Path, force: bool, durable: bool = False):
    """The hidden path to write OUT's bytes to; renamed to OUT when the block ends without an error, removed otherwise."""
    out = Path(os.path.abspath(out))
    check_gguf_output_free(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ComposerError(f"Output {out}: cannot create its folder {out.parent} ({error.strerror}).") from None
    stem = hidden_stem(out.name)
    _remove_abandoned(out, stem)
    partial = out.parent / f".{stem}{PARTIAL}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))  # the name is ours alone from here
    except OSError as error:
        raise ComposerError(f"Output {out}: cannot write in its folder {out.parent} ({error.strerror}).") from None
    try:
        try:
            yield partial
            if durable:
                descriptor = os.open(partial, os.O_RDONLY)
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
        except OSError as error:
            if is_write_failure(error):
                raise write_failure(out, error) from None
            raise
        with signals_held():
            check_gguf_output_free(out, force)  # again: something may have appeared there while the file was written
            os.replace(partial, out)
    finally:
        with signals_held():
            partial.unlink(missing_ok=True)
