"""The progress bar every long command shows: bytes done, the total and an ETA, on stderr."""

from __future__ import annotations

import sys


def progress_bar(total_bytes: int, description: str, enabled: bool | None):
    """A bar of bytes written on stderr (only on a terminal unless `enabled`), with units done and ETA."""
    from tqdm import tqdm

    return tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=description,
        disable=(not sys.stderr.isatty()) if enabled is None else not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )
