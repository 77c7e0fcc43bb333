"""Outputs appear complete or not at all: work happens in a hidden folder beside OUT, renamed at the end."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from composer.errors import ComposerError


def check_output_free(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ComposerError(f"Output {out} already exists; composer will not overwrite it. Pass --force to replace it, or choose another path.")
    if out.exists() and not out.is_dir():
        raise ComposerError(f"Output {out} exists and is not a folder; composer only replaces folders, even with --force.")


class OutputFolder:
    def __init__(self, out: Path, force: bool):
        check_output_free(out, force)
        self.out = out
        self.force = force
        out.parent.mkdir(parents=True, exist_ok=True)
        self.partial = out.parent / f".{out.name}.partial-{os.getpid()}"
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir()

    def commit(self) -> None:
        old = None
        if self.out.exists():
            check_output_free(self.out, self.force)
            old = self.out.parent / f".{self.out.name}.replaced-{os.getpid()}"
            self.out.rename(old)
        self.partial.rename(self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
