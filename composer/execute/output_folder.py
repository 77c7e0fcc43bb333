"""Outputs appear complete or not at all: work happens in a hidden folder beside OUT, renamed at the end.

The hidden folder `.OUT.partial-PID` is locked (flock on the folder itself) for as long as its run lives,
so the kernel says whether a run is still working on one, whatever became of its process. A later run
finds the folders of runs that died (SIGKILL, power loss, out of memory): it resumes one that was
building the same output from the same recipe and inputs, and removes the others.

--force replaces only what composer wrote: an empty folder, or a flat folder that holds composer's card
or recipe and nothing but the files composer writes. The swap of a finished output for an old one is one
atomic exchange where the system has it (Linux renameat2), and is repaired by the next run elsewhere.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import fnmatch
import glob
import logging
import os
import secrets
import shutil
from pathlib import Path

from composer.errors import ComposerError
from composer.signals import signals_held
from composer.sources.base import TOKENIZER_FILES

log = logging.getLogger("composer")

RECIPE_FILE = "composer-recipe.yml"
CARD_FILE = "README.md"
# every name composer writes into an output folder (model weights, adapters, config, tokenizer, card, recipe, and
# what `compose tune` adds beside the model)
OWN_FILES = (
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "adapter_model.safetensors",
    "adapter_config.json",
    CARD_FILE,
    RECIPE_FILE,
    *TOKENIZER_FILES,
    "tuned-recipe.yml",
    "tune-report.json",
    "tune.png",
)
PARTIAL = ".partial-"
REPLACED = ".replaced-"


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def is_composer_card(path: Path) -> bool:
    """Whether `path` is a model card composer wrote (its front matter tags it `composer`)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as card:
            head = card.read(4096)
    except OSError:
        return False
    front = head.split("---", 2)[1] if head.startswith("---") and head.count("---") >= 2 else ""
    return "- composer" in front.splitlines()


def foreign_contents(folder: Path) -> str | None:
    """Why `folder` is not composer's to replace, or None when it is empty or one of composer's own outputs."""
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as error:
        return f"it cannot be listed ({error.strerror})"
    if not entries:
        return None
    folders = [entry.name for entry in entries if entry.is_dir(follow_symlinks=False)]
    if folders:
        return f"it holds folders ({_names(folders)}), and composer's outputs hold only files"
    names = [entry.name for entry in entries]
    if RECIPE_FILE not in names and not (CARD_FILE in names and is_composer_card(folder / CARD_FILE)):
        return f"it holds {_names(names)}, but no composer card or {RECIPE_FILE}, so composer did not write it"
    others = [name for name in names if not any(fnmatch.fnmatchcase(name, pattern) for pattern in OWN_FILES)]
    if others:
        return f"it holds files composer did not write ({_names(others)})"
    return None


def check_name_length(out: Path) -> None:
    if len(os.fsencode(out.name)) > 255:
        raise ComposerError(
            f"Output {out}: its name is {len(os.fsencode(out.name))} bytes long, and a file name may have at most 255."
        )


def check_output_free(out: Path, force: bool) -> None:
    """Refuse to touch anything the user owns: without --force any existing OUT, with it anything composer did not write."""
    check_name_length(out)
    if not _exists(out):
        return
    if not force:
        raise ComposerError(
            f"Output {out} already exists; composer will not overwrite it. Pass --force to replace it, or choose another path."
        )
    if out.is_symlink() or not out.is_dir():
        what = "a link" if out.is_symlink() else "not a folder"
        raise ComposerError(
            f"Output {out} exists and is {what}; composer only replaces folders it wrote, even with --force."
        )
    reason = foreign_contents(out)
    if reason is not None:
        raise ComposerError(
            f"Output {out} exists and {reason}; even with --force composer replaces only an empty folder or one of its own "
            "outputs. Move those files away, remove the folder yourself, or choose another path."
        )


def check_output_not_input(out: Path, inputs: dict[str, Path]) -> None:
    """Refuse an OUT that is, holds or lies inside something the run reads (a source model, the recipe), even with --force."""
    target = Path(os.path.abspath(out)).resolve()
    for what, path in inputs.items():
        resolved = Path(os.path.abspath(path)).resolve()
        if resolved == target or target in resolved.parents:
            raise ComposerError(
                f"Output {out} is or contains {what} ({path}), which this run reads; composer will not write over its own inputs, "
                "even with --force. Choose another output folder."
            )
        if resolved.is_dir() and resolved in target.parents:
            raise ComposerError(
                f"Output {out} is inside {what} ({path}), which this run reads; choose an output folder outside it."
            )


def hidden_stem(name: str) -> str:
    """The part of OUT's name the hidden folders beside it start with: the name itself, or, when the hidden names
    would pass the 255 bytes a file name may have, its start and a digest of the whole (a legal OUT must work)."""
    room = 255 - len(f".{PARTIAL}{2**22}-{'0' * 8}")  # the longest hidden name's other parts (process ids reach 2**22)
    if len(name.encode()) <= room:
        return name
    import hashlib

    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    start = name.encode()[: room - len(digest) - 1].decode(errors="ignore")
    return f"{start}~{digest}"


WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def is_write_failure(error: OSError) -> bool:
    """An error only writing can meet (a full disk, a quota, a read-only file system); a read's error names its input."""
    return error.errno in WRITE_ERRORS


def write_failure(out: Path, error: OSError) -> ComposerError:
    """An OSError met while writing the output, as one error naming OUT."""
    where = f" (at {Path(error.filename).name})" if error.filename else ""
    advice = " Free space there or choose another output folder." if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return ComposerError(f"Writing the output {out} failed: {error.strerror or error}{where}.{advice}")


def _lock(folder: Path) -> int | None:
    """A descriptor holding an exclusive lock on `folder`, or None when another process holds it (or it is gone)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        return None
    return descriptor


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_current, rename_exchange = -100, 2
    if renameat2(at_current, os.fsencode(first), at_current, os.fsencode(second), rename_exchange) == 0:
        return True
    failure = ctypes.get_errno()
    if failure in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(failure, os.strerror(failure), str(second))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif _exists(path):
        path.unlink()


class OutputFolder:
    """The hidden folder a run writes into, locked while it lives. `adopt(match)` takes over the folder of a
    dead run for which `match(folder)` is true, instead of starting empty."""

    def __init__(self, out: Path, force: bool):
        check_output_free(out, force)
        out = Path(os.path.abspath(out))  # '.' and 'a/..' have no usable name to put a partial folder beside
        if not out.name:
            raise ComposerError(f"Output {out} is a filesystem root; choose a folder to write the model into.")
        check_name_length(out)
        self.out = out
        self.stem = hidden_stem(out.name)
        self.force = force
        self.committed = False
        self.resumed_from: str | None = None  # the dead run's partial folder this run took over
        blocking = next((folder for folder in [out.parent, *out.parent.parents] if folder.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise ComposerError(f"Output {out}: {blocking} is a file, so no folder can be made inside it.")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ComposerError(
                f"Output {out}: cannot create its parent folder {out.parent} ({error.strerror})."
            ) from None
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise ComposerError(
                f"Output {out}: its folder {out.parent} is not writable, so the model cannot be written there."
            )
        self._restore_interrupted_swaps()
        # the process id says whose it is; the random part keeps two runs of one process (a library's user) apart
        self.partial = out.parent / f".{self.stem}{PARTIAL}{os.getpid()}-{secrets.token_hex(4)}"
        self.opened = False
        self._lock_descriptor: int | None = None
        self.abandoned: list[tuple[Path, int]] = self._abandoned()

    def _abandoned(self) -> list[tuple[Path, int]]:
        """Partial folders of this OUT whose runs are gone, each locked by this run now."""
        found = []
        for leftover in sorted(self.out.parent.glob(f".{glob.escape(self.stem)}{PARTIAL}*")):
            if leftover.is_symlink() or not leftover.is_dir():
                continue
            descriptor = _lock(leftover)
            if descriptor is not None:
                found.append((leftover, descriptor))
        return found

    def _restore_interrupted_swaps(self) -> None:
        """A run killed between its two renames (where no exchange exists) left the old OUT aside: put it back
        if OUT is missing, else remove it."""
        for aside in self.out.parent.glob(f".{glob.escape(self.stem)}{REPLACED}*"):
            pid = aside.name.rsplit("-", 1)[-1]
            if pid.isdigit() and process_alive(int(pid)):
                continue
            if _exists(self.out):
                _remove(aside)
            else:
                aside.rename(self.out)
                log.info("put back %s, which an interrupted run had moved aside to replace it", self.out)

    def open(self, resumable=None) -> bool:
        """Make the partial folder, or take over a dead run's for which `resumable(folder)` is true; True when
        taken over. Every other dead run's partial folder is removed (saying so)."""
        adopted = None
        for leftover, descriptor in self.abandoned:
            if adopted is None and resumable is not None and resumable(leftover):
                adopted = (leftover, descriptor)
                continue
            _remove(leftover)
            os.close(descriptor)
            log.info("removed %s, the partial output of an earlier run that stopped before it finished", leftover)
        self.abandoned = []
        self.opened = True
        if adopted is not None:
            self.resumed_from = adopted[0].name
            adopted[0].rename(self.partial)
            self._lock_descriptor = adopted[1]
            return True
        self.partial.mkdir()
        self._lock_descriptor = _lock(self.partial)
        return False

    def commit(self) -> None:
        with signals_held():
            if not _exists(self.out):
                self.partial.rename(self.out)
            else:
                check_output_free(self.out, self.force)
                if _exchange(self.partial, self.out):
                    old = self.partial  # now the old output, under the partial's name (and lock) until removed
                else:
                    old = self.out.parent / f".{self.stem}{REPLACED}{os.getpid()}"
                    self.out.rename(old)
                    self.partial.rename(self.out)
                _remove(old)
            self.committed = True
            self._unlock()

    def discard(self, keep: bool = False) -> None:
        """Remove the partial folder (`keep`: leave it, unlocked, for a later run to resume). A second Ctrl-C
        waits until it is gone: cut short, it would leave half a partial folder behind."""
        with signals_held():
            if self.opened and not keep:
                shutil.rmtree(self.partial, ignore_errors=True)
            for _, descriptor in self.abandoned:
                os.close(descriptor)
            self.abandoned = []
            self._unlock()

    def _unlock(self) -> None:
        if self._lock_descriptor is not None:
            os.close(self._lock_descriptor)
            self._lock_descriptor = None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
