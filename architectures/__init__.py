"""Declarative architecture definitions, one YAML file a family, shipped as package data."""

from pathlib import Path

DEFINITIONS_DIR = Path(__file__).parent


def definition_files() -> list[Path]:
    return sorted(DEFINITIONS_DIR.glob("*.yaml"))


def vision_language_files() -> list[Path]:
    """Vision-language families: where each keeps its language model, whose layers the text definitions describe."""
    return sorted((DEFINITIONS_DIR / "vision_language").glob("*.yaml"))
