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
    if isinstance(data.get("stages"), list):
        data["stages"] = [normalise_mergekit(stage) if isinstance(stage, dict) else stage for stage in data["stages"]]
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
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, dict):
        if "source" in tokenizer:
            tokenizer["source"] = _model_reference(tokenizer["source"])
        for setting in (tokenizer.get("tokens") or {}).values() if isinstance(tokenizer.get("tokens"), dict) else []:
            source = setting.get("source") if isinstance(setting, dict) else None
            if isinstance(source, dict) and "kind" not in source:
                setting["source"] = _model_reference(source)
            elif isinstance(source, dict) and "model" in source:
                source["model"] = _model_reference(source["model"])
    return data


def _line_of(node: yaml.Node | None, location: tuple) -> int | None:
    """The line (1-based) of the key or list item at `location`; for a key that is absent, its closest present parent's."""
    line = None
    for part in location:
        if isinstance(node, yaml.MappingNode):
            pair = next(((key, value) for key, value in node.value if getattr(key, "value", None) == str(part)), None)
            if pair is None:
                break
            line, node = pair[0].start_mark.line + 1, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _has_location(node: yaml.Node | None, location: tuple) -> bool:
    for part in location:
        if isinstance(node, yaml.MappingNode):
            node = next((value for key, value in node.value if getattr(key, "value", None) == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
        else:
            return False
        if node is None:
            return False
    return True


def path_text(location: tuple) -> str:
    """`('slices', 0, 'sources', 1, 'layer_range')` -> `slices[0].sources[1].layer_range`."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _schema_keys() -> set[str]:
    """Every key name the schema knows, at any depth (for 'did you mean' hints)."""
    import typing

    from pydantic import BaseModel

    names: set[str] = set()
    seen: set[type] = set()

    def visit(annotation) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation in seen:
                return
            seen.add(annotation)
            for name, field in annotation.model_fields.items():
                names.add(field.alias or name)
                visit(field.annotation)
            return
        for argument in typing.get_args(annotation):
            visit(argument)

    visit(Recipe)
    return names


def _suggestion(key: object) -> str:
    import difflib

    if not isinstance(key, str):
        return ""
    close = difflib.get_close_matches(key, sorted(_schema_keys()), n=1, cutoff=0.7)
    return f" Did you mean '{close[0]}'?" if close else ""


def _describe(error: dict, source_name: str, root: yaml.Node | None) -> str:
    # pydantic appends union-member names (e.g. 'list[...]') to locations; keep only real keys and indexes
    location = tuple(part for part in error["loc"] if isinstance(part, int) or (isinstance(part, str) and "[" not in part and part not in ("str", "float", "int", "bool", "function-after")))
    line = _line_of(root, location)
    where = f"{source_name}, line {line}" if line else source_name
    if error["type"] == "extra_forbidden":
        hint = _suggestion(location[-1] if location else None) or " Check its spelling; docs/recipes.md lists every key."
        return f"{where}: unknown key '{path_text(location)}'.{hint}"
    if error["type"] == "missing":
        return f"{where}: required key '{path_text(location)}' is missing."
    message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ").rstrip(".")
    if not location:
        return f"{where}: {message}."
    return f"{where}: '{path_text(location)}': {message}."


def _yaml_problem(error: yaml.YAMLError, source_name: str) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is None or problem is None:
        return f"{source_name} is not valid YAML: {' '.join(str(error).split())}"
    context = getattr(error, "context", None)
    context_mark = getattr(error, "context_mark", None)
    detail = problem
    if context:
        detail += f" ({context}" + (f" that starts at line {context_mark.line + 1}" if context_mark is not None else "") + ")"
    return f"{source_name}, line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {detail}."


def _check_duplicate_keys(node: yaml.Node | None, source_name: str, location: tuple = ()) -> None:
    """YAML lets a later key silently replace an earlier one; in a recipe that is always a mistake."""
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key, value in node.value:
            name = getattr(key, "value", None)
            if isinstance(name, str):
                if name in first_line:
                    raise ComposerError(
                        f"{source_name}, line {key.start_mark.line + 1}: key '{path_text(location + (name,))}' appears twice "
                        f"(first at line {first_line[name]}); YAML would silently keep only the last one. Remove one of them."
                    )
                first_line[name] = key.start_mark.line + 1
            _check_duplicate_keys(value, source_name, location + (name,))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicate_keys(item, source_name, location + (index,))


class RecipeKeyError(ComposerError):
    """A problem with one recipe key, found after parsing (e.g. while planning).

    `location` is the key path, e.g. ('slices', 0, 'sources', 0, 'layer_range'). The message reads
    "Recipe key 'PATH': ..." until `located` gives it the recipe file's name and the key's line.
    """

    def __init__(self, location: tuple, message: str):
        self.location = tuple(location)
        self.detail = message
        super().__init__(f"Recipe key '{path_text(self.location)}': {message}")

    def located(self, recipe_text: str, source_name: str) -> ComposerError:
        try:
            root = yaml.compose(recipe_text)
        except yaml.YAMLError:
            root = None
        present = _has_location(root, self.location)
        line = _line_of(root, self.location) if present else None
        where = f"{source_name}, line {line}" if line else source_name
        state = "" if present or not self.location else " (not set)"
        return ComposerError(f"{where}: recipe key '{path_text(self.location)}'{state}: {self.detail}")


def parse_recipe(text: str, source_name: str = "recipe") -> Recipe:
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ComposerError(_yaml_problem(error, source_name)) from None
    if not isinstance(data, dict):
        found = "it is empty" if data is None else f"it holds a {type(data).__name__}"
        raise ComposerError(f"{source_name} must be a YAML mapping of recipe keys (merge_method, models or slices, ...); {found}.")
    _check_duplicate_keys(root, source_name)
    if "modules" in data:
        raise ComposerError(f"{source_name}: 'modules' (multi-module mergekit configs) is not supported; use 'slices' or 'models'.")
    try:
        return Recipe.model_validate(normalise_mergekit(data))
    except ValidationError as error:
        # unknown keys first: a misspelt key usually also makes a required one look missing
        problems = sorted(error.errors(), key=lambda problem: problem["type"] != "extra_forbidden")
        seen = []
        for problem in problems:
            message = _describe(problem, source_name, root)
            if message not in seen:
                seen.append(message)
        raise ComposerError(" ".join(seen[:4]) + (f" ({len(seen) - 4} more problems)" if len(seen) > 4 else "")) from None


def load_recipe(path: Path) -> tuple[Recipe, str]:
    if path.is_dir():
        raise ComposerError(f"Recipe file {path} is a folder; give the recipe's YAML file.")
    if not path.is_file():
        raise ComposerError(f"Recipe file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ComposerError(f"Recipe file {path} is not UTF-8 text (byte {error.start} cannot be decoded); a recipe is a YAML text file.") from None
    except OSError as error:
        raise ComposerError(f"Recipe file {path} cannot be read: {error.strerror}.") from None
    return parse_recipe(text, str(path)), text
