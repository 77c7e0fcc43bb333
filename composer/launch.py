"""The `compose` command's entry point. A Ctrl-C in the first tenth of a second, while the CLI's own modules are
still importing (before it handles stop signals), ends the run with one line, as later ones do, not with Python's
traceback."""

from __future__ import annotations

import sys

INTERRUPTED = "error: interrupted while starting; nothing was written.\n"


def main() -> None:
    try:
        from composer.cli import main as run

        run()  # it reports a stop itself once it handles stop signals
    except KeyboardInterrupt:
        sys.stderr.write(INTERRUPTED)
        sys.exit(130)
