"""Read a recipe file: YAML with positions kept, mergekit spellings normalised, then validated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from composer.errors import ComposerError
from composer.recipe.schema import Recipe


def _model_reference(value: Any) -> Any:
    """mergekit's dict spellings of a model reference, flattened to `path[@revision][+lora]`."""
    if not isinstance(value, dict):
        return value
    inner = value.get("model", value)
    if isinstance(inner, dict):
        path = inner.get("path")
        revision = inner.get("revision")
        reference = f"{path}@{revision}" if revision else path
    else:
        reference = inner
    lora = value.get("lora")
    if isinstance(lora, dict):
        lora = lora.get("path")
    return f"{reference}+{lora}" if lora else reference


def normalise_mergekit(data: dict) -> dict:
    data = dict(data)
    for key in ("base_model", "tokenizer_source"):
        if key in data:
            data[key] = _model_reference(data[key])
    for entry in data.get("models") or []:
        if isinstance(entry, dict) and "model" in entry:
            entry["model"] = _model_reference(entry["model"])
    for output_slice in data.get("slices") or []:
        if not isinstance(output_slice, dict):
            continue
        if "base_model" in output_slice:
            output_slice["base_model"] = _model_reference(output_slice["base_model"])
        for source in output_slice.get("sources") or []:
            if isinstance(source, dict) and "model" in source:
                source["model"] = _model_reference(source["model"])
    if isinstance(data.get("tokenizer"), dict) and "source" in data["tokenizer"]:
        data["tokenizer"]["source"] = _model_reference(data["tokenizer"]["source"])
    return data


def _line_of(node: yaml.Node | None, location: tuple) -> int | None:
    line = node.start_mark.line + 1 if node is not None else None
    for part in location:
        if isinstance(node, yaml.MappingNode):
            child = next((value for key, value in node.value if key.value == part), None)
            if child is None:
                key_node = next((key for key, _ in node.value if key.value == part), None)
                return key_node.start_mark.line + 1 if key_node is not None else line
            node = child
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _path_text(location: tuple) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _describe(error: dict, source_name: str, root: yaml.Node | None) -> str:
    # pydantic appends union-member names (e.g. 'list[...]') to locations; keep only real keys and indexes
    location = tuple(part for part in error["loc"] if isinstance(part, int) or (isinstance(part, str) and "[" not in part and part not in ("str", "float", "int", "bool", "function-after")))
    line = _line_of(root, location)
    where = f"{source_name}, line {line}" if line else source_name
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key '{_path_text(location)}'. Check its spelling; docs/recipes.md lists every key."
    if error["type"] == "missing":
        return f"{where}: required key '{_path_text(location)}' is missing."
    return f"{where}: '{_path_text(location)}': {error['msg']}."


def parse_recipe(text: str, source_name: str = "recipe") -> Recipe:
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ComposerError(f"{source_name} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ComposerError(f"{source_name} must be a YAML mapping of recipe keys (merge_method, models or slices, ...).")
    if "modules" in data:
        raise ComposerError(f"{source_name}: 'modules' (multi-module mergekit configs) is not supported; use 'slices' or 'models'.")
    try:
        return Recipe.model_validate(normalise_mergekit(data))
    except ValidationError as error:
        problems = error.errors()
        seen = []
        for problem in problems:
            message = _describe(problem, source_name, root)
            if message not in seen:
                seen.append(message)
        raise ComposerError(" ".join(seen[:4]) + (f" ({len(seen) - 4} more problems)" if len(seen) > 4 else "")) from None


def load_recipe(path: Path) -> tuple[Recipe, str]:
    if not path.is_file():
        raise ComposerError(f"Recipe file {path} does not exist.")
    text = path.read_text()
    return parse_recipe(text, str(path)), text
