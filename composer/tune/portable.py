"""The tuned recipe as a file that runs from any folder: model paths that were relative to the recipe's folder
made absolute (the tuned recipe is written into OUT, elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from composer.sources import local_path
from composer.tune.ranges import value_span, walk_nodes
from composer.yaml_text import parse_yaml

REFERENCE_KEYS = {"model", "base_model", "tokenizer_source", "source", "path"}


def with_absolute_models(text: str, recipe_dir: Path | None, source_name: str) -> str:
    if recipe_dir is None:
        return text
    root, data = parse_yaml(text, source_name)
    edits = []
    for node, value, location in walk_nodes(root, data, (), set()) if root is not None else ():
        if not (
            isinstance(node, yaml.ScalarNode) and isinstance(value, str) and location and location[-1] in REFERENCE_KEYS
        ):
            continue
        reference, plus, adapter = value.partition("+")
        if Path(reference).expanduser().is_absolute():
            continue
        path = local_path(reference, recipe_dir)
        if path.exists() and path != Path(reference):
            lora = local_path(adapter, recipe_dir) if plus else None
            resolved = str(path.resolve()) + (
                f"+{lora.resolve() if lora is not None and lora.exists() else adapter}" if plus else ""
            )
            edits.append((value_span(text, node), json.dumps(resolved)))
    for (start, end), replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text
