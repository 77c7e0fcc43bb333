"""composer's cache folder: `$COMPOSER_CACHE`, default `~/.cache/composer`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    path = Path(os.environ.get("COMPOSER_CACHE", Path.home() / ".cache" / "composer"))
    path.mkdir(parents=True, exist_ok=True)
    return path
