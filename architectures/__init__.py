"""Declarative architecture definitions, one YAML file a family, shipped as package data."""

from pathlib import Path

DEFINITIONS_DIR = Path(__file__).parent


def definition_files() -> list[Path]:
    return sorted(DEFINITIONS_DIR.glob("*.yaml"))
