"""Which kind a recipe file is (a merge or an MoE), and a fast check of either kind before any heavy import."""

from __future__ import annotations

from pathlib import Path

from composer.errors import ComposerError
from composer.files import YAML_FILE_LIMIT, read_text
from composer.moe.schema import is_moe_recipe, load_moe_config
from composer.yaml_text import parse_yaml


def is_moe_file(path: Path) -> bool:
    """Whether a recipe file is an MoE recipe (False for anything unreadable: the normal loader reports it)."""
    try:
        return is_moe_recipe(parse_yaml(read_text(Path(path), "Recipe file", YAML_FILE_LIMIT), str(path))[1])
    except ComposerError:
        return False


def check_recipe_file(path: Path) -> None:
    """Fast feedback on a recipe of either kind, before heavy imports."""
    if is_moe_file(path):
        load_moe_config(path)
    else:
        from composer.recipe import load_recipe

        load_recipe(path)
