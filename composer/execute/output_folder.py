"""Outputs appear complete or not at all: work happens in a hidden folder beside OUT, renamed at the end."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from composer.errors import ComposerError

# a folder holding any of these is a model folder (composer's own outputs always hold config.json) or an adapter
MODEL_FOLDER_MARKERS = ("config.json", "composer-recipe.yml", "model.safetensors", "model.safetensors.index.json", "adapter_config.json")


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def check_output_free(out: Path, force: bool) -> None:
    """Refuse to touch anything the user owns unless --force, and even then replace only a model folder."""
    if not _exists(out):
        return
    if not force:
        raise ComposerError(f"Output {out} already exists; composer will not overwrite it. Pass --force to replace it, or choose another path.")
    if not out.is_dir():
        raise ComposerError(f"Output {out} exists and is not a folder; composer only replaces folders, even with --force.")
    if any(out.iterdir()) and not any((out / marker).exists() for marker in MODEL_FOLDER_MARKERS):
        raise ComposerError(
            f"Output {out} is a folder that is not empty and does not look like a model (no config.json); "
            "even with --force composer replaces only model folders. Remove it yourself or choose another path."
        )


def check_output_not_input(out: Path, inputs: dict[str, Path]) -> None:
    """Refuse an OUT that is, or holds, something the run reads (a source model, the recipe), even with --force."""
    target = Path(os.path.abspath(out)).resolve()
    for what, path in inputs.items():
        resolved = Path(os.path.abspath(path)).resolve()
        if resolved == target or target in resolved.parents:
            raise ComposerError(
                f"Output {out} is or contains {what} ({path}), which this run reads; composer will not write over its own inputs, "
                "even with --force. Choose another output folder."
            )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_abandoned(out: Path) -> None:
    """Partial folders of runs that were killed outright (SIGKILL, power loss) before they could clean up."""
    for leftover in out.parent.glob(f".{out.name}.partial-*") if out.parent.is_dir() else []:
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


class OutputFolder:
    def __init__(self, out: Path, force: bool):
        check_output_free(out, force)
        out = Path(os.path.abspath(out))  # '.' and 'a/..' have no usable name to put a partial folder beside
        if not out.name:
            raise ComposerError(f"Output {out} is a filesystem root; choose a folder to write the model into.")
        self.out = out
        self.force = force
        blocking = next((folder for folder in [out.parent, *out.parent.parents] if folder.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise ComposerError(f"Output {out}: {blocking} is a file, so no folder can be made inside it.")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ComposerError(f"Output {out}: cannot create its parent folder {out.parent} ({error.strerror}).") from None
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise ComposerError(f"Output {out}: its folder {out.parent} is not writable, so the model cannot be written there.")
        _remove_abandoned(out)
        self.partial = out.parent / f".{out.name}.partial-{os.getpid()}"
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir()

    def commit(self) -> None:
        old = None
        if _exists(self.out):
            check_output_free(self.out, self.force)
            old = self.out.parent / f".{self.out.name}.replaced-{os.getpid()}"
            self.out.rename(old)
        self.partial.rename(self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()

    def discard(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
