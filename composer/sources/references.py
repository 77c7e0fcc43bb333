"""What a model reference names: a local path (relative to a recipe's folder when it exists there) or a hub id."""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


def local_path(reference: str, relative_to: Path | None = None) -> Path:
    """Where a reference points on disk: relative to `relative_to` (a recipe's folder) when it exists there."""
    path = Path(reference).expanduser()
    if not path.is_absolute() and relative_to is not None and (relative_to / path).exists():
        path = relative_to / path
    return path


def is_hub_id(text: str) -> bool:
    """Whether `text` has the form of a hub id, `org/name[@revision]` (not a path that starts like one)."""
    return bool(HUB_ID.match(text)) and not text.startswith((".", "/", "~"))
