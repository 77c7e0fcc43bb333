"""Read a recipe file: YAML with positions kept, mergekit spellings normalised, then validated."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from composer.errors import ComposerError, ComposerWarning
from composer.files import YAML_FILE_LIMIT, read_text
from composer.recipe.documents import recipe_documents
from composer.recipe.modules import lift_language_module
from composer.recipe.schema import (
    IGNORED_MODEL_ENTRY_KEYS,
    IGNORED_SLICE_KEYS,
    IGNORED_SOURCE_KEYS,
    IGNORED_TOP_LEVEL_KEYS,
    Recipe,
)
from composer.sources.references import is_hub_id, local_path
from composer.yaml_text import check_duplicate_keys, has_location, line_of, path_text


def model_reference(value: Any) -> Any:
    """mergekit's dict spellings of a model reference, flattened to `path[@revision][+lora]`: `{model: {path,
    revision}}`, `{path, revision}`, and `{model: path, revision}` (a revision beside `model:`, which mergekit drops).
    A folder written with a trailing slash (`./models/base/`, as a shell completes it) is the same folder."""
    if isinstance(value, str):
        return "+".join(part.rstrip("/") or part for part in value.split("+"))
    if not isinstance(value, dict):
        return value
    inner = value.get("model", value)
    if isinstance(inner, dict):
        path, revision = inner.get("path"), inner.get("revision")
    else:
        path, revision = inner, None
    if revision is None and inner is not value:
        revision = value.get("revision")
    reference = f"{path}@{revision}" if revision is not None and revision != "" else path
    lora = value.get("lora")
    if isinstance(lora, dict):
        lora = lora.get("path")
    return f"{reference}+{lora}" if lora else reference


def _modules(data: dict) -> list[tuple[str, dict]]:
    """(name, mapping) of each of a merge's modules besides the language model's, which take models and slices as the
    merge does."""
    modules = data.get("modules")
    return (
        [(name, module) for name, module in modules.items() if isinstance(module, dict)]
        if isinstance(modules, dict)
        else []
    )


def _listed(value: Any) -> list:
    """The items of a recipe value meant to be a list; none for anything else (validation reports it)."""
    return value if isinstance(value, list) else []


def normalise_mergekit(data: dict) -> dict:
    data = dict(data)
    if isinstance(data.get("stages"), list):
        data["stages"] = [normalise_mergekit(stage) if isinstance(stage, dict) else stage for stage in data["stages"]]
    for name, module in _modules(data):
        data["modules"][name] = normalise_mergekit(module)
    for key in ("base_model", "tokenizer_source"):
        if key in data:
            data[key] = model_reference(data[key])
    for entry in _listed(data.get("models")):
        if isinstance(entry, dict) and "model" in entry:
            entry["model"] = model_reference(entry["model"])
    for output_slice in _listed(data.get("slices")):
        if not isinstance(output_slice, dict):
            continue
        if "base_model" in output_slice:
            output_slice["base_model"] = model_reference(output_slice["base_model"])
        for source in _listed(output_slice.get("sources")):
            if isinstance(source, dict) and "model" in source:
                source["model"] = model_reference(source["model"])
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, dict):
        if "source" in tokenizer:
            tokenizer["source"] = model_reference(tokenizer["source"])
        for setting in (tokenizer.get("tokens") or {}).values() if isinstance(tokenizer.get("tokens"), dict) else []:
            source = setting.get("source") if isinstance(setting, dict) else None
            if isinstance(source, dict) and "kind" not in source:
                setting["source"] = model_reference(source)
            elif isinstance(source, dict) and "model" in source:
                source["model"] = model_reference(source["model"])
    return data


def _revision_holders(data: dict, prefix: tuple = ()):
    """(location, mapping) of every place of a merge and its stages where `revision:` may stand beside `model:`: the
    `models` entries and slice sources, and model references written as mappings (`base_model: {model: ...}`,
    `tokenizer_source`, `tokenizer.source`, a slice's `base_model`, and `model:` itself written as a mapping)."""

    def mapping(location: tuple, value: Any):
        if isinstance(value, dict):
            yield location, value

    for index, stage in enumerate(_listed(data.get("stages"))):
        if isinstance(stage, dict):
            yield from _revision_holders(stage, prefix + ("stages", index))
    for name, module in _modules(data):
        yield from _revision_holders(module, prefix + ("modules", name))
    for key in ("base_model", "tokenizer_source"):
        yield from mapping(prefix + (key,), data.get(key))
    if isinstance(data.get("tokenizer"), dict):
        yield from mapping(prefix + ("tokenizer", "source"), data["tokenizer"].get("source"))
    for index, entry in enumerate(_listed(data.get("models"))):
        if isinstance(entry, dict):
            yield prefix + ("models", index), entry
            yield from mapping(prefix + ("models", index, "model"), entry.get("model"))
    for slice_index, output_slice in enumerate(_listed(data.get("slices"))):
        if not isinstance(output_slice, dict):
            continue
        yield from mapping(prefix + ("slices", slice_index, "base_model"), output_slice.get("base_model"))
        for index, source in enumerate(_listed(output_slice.get("sources"))):
            if isinstance(source, dict):
                yield prefix + ("slices", slice_index, "sources", index), source
                yield from mapping(prefix + ("slices", slice_index, "sources", index, "model"), source.get("model"))


def fold_revisions(data: dict, root: yaml.Node | None, source_name: str, recipe_dir: Path | None) -> None:
    """`revision:` beside `model:` (mergekit drops it and reads the main branch), in a `models` entry, a slice source
    or a model reference written as a mapping, becomes the hub revision of the model, `org/name@revision`, as its
    author meant. A local folder has no revisions: that is an error."""
    for location, holder in list(_revision_holders(data)):
        if "revision" not in holder or "model" not in holder:
            continue  # `{path: ..., revision: ...}` is mergekit's own spelling, read by model_reference
        revision, model = holder.pop("revision"), model_reference(holder["model"])
        key = location + ("revision",)
        line = line_of(root, key)
        where = f"{source_name}, line {line}" if line else source_name
        if not isinstance(revision, (str, int)) or isinstance(revision, bool) or not str(revision).strip():
            raise ComposerError(
                f"{where}: '{path_text(key)}' must be a branch, tag or commit of the hub model, e.g. 'main'."
            )
        if not isinstance(model, str):
            continue  # validation reports the model itself
        if "@" in model:
            raise ComposerError(
                f"{where}: '{path_text(key)}' is given, but the model '{model}' already names a revision after '@'; keep one of them."
            )
        if not is_hub_id(model) or local_path(model, recipe_dir).exists():
            raise ComposerError(
                f"{where}: '{path_text(key)}' is set, but the model '{model}' is a local path, which has no revisions; "
                "remove the revision, or give a hub id (org/name)."
            )
        holder["model"] = f"{model}@{revision}"


def drop_ignored_keys(data: dict, root: yaml.Node | None, source_name: str, prefix: tuple = ()) -> None:
    """Remove the keys mergekit ignores where they stand (IGNORED_TOP_LEVEL_KEYS at the top of a merge,
    IGNORED_SLICE_KEYS in its slices, IGNORED_SOURCE_KEYS in their sources, IGNORED_MODEL_ENTRY_KEYS in its `models`
    entries), with a warning naming each."""
    for index, stage in enumerate(_listed(data.get("stages"))):
        if isinstance(stage, dict):
            drop_ignored_keys(stage, root, source_name, prefix + ("stages", index))
    for name, module in _modules(data):  # (its own keys are models, slices and parameters: none is dropped)
        drop_ignored_keys(module, root, source_name, prefix + ("modules", name))
    holders = [(prefix, data, IGNORED_TOP_LEVEL_KEYS)]
    holders += [
        (prefix + ("slices", index), output_slice, IGNORED_SLICE_KEYS)
        for index, output_slice in enumerate(_listed(data.get("slices")))
        if isinstance(output_slice, dict)
    ]
    holders += [
        (prefix + ("slices", index, "sources", number), source, IGNORED_SOURCE_KEYS)
        for index, output_slice in enumerate(_listed(data.get("slices")))
        if isinstance(output_slice, dict)
        for number, source in enumerate(_listed(output_slice.get("sources")))
        if isinstance(source, dict)
    ]
    holders += [
        (prefix + ("models", index), entry, IGNORED_MODEL_ENTRY_KEYS)
        for index, entry in enumerate(_listed(data.get("models")))
        if isinstance(entry, dict)
    ]
    for location, holder, ignored in holders:
        for key in [key for key in holder if key in ignored]:  # in the file's order
            holder.pop(key)
            line = line_of(root, location + (key,))
            warnings.warn(
                f"{source_name}{f', line {line}' if line else ''}: '{path_text(location + (key,))}' has no effect "
                f"there ({ignored[key]}); mergekit ignores it, and so does composer.",
                ComposerWarning,
                stacklevel=3,
            )


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
    location = tuple(
        part
        for part in error["loc"]
        if isinstance(part, int)
        or (isinstance(part, str) and "[" not in part and part not in ("str", "float", "int", "bool", "function-after"))
    )
    line = line_of(root, location)
    where = f"{source_name}, line {line}" if line else source_name
    if error["type"] == "extra_forbidden":
        hint = (
            _suggestion(location[-1] if location else None) or " Check its spelling; docs/recipes.md lists every key."
        )
        return f"{where}: unknown key '{path_text(location)}'.{hint}"
    if error["type"] == "missing":
        return f"{where}: required key '{path_text(location)}' is missing."
    message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ").rstrip(".")
    if not location:
        return f"{where}: {message}."
    return f"{where}: '{path_text(location)}': {message}."


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
            root, _ = recipe_tree(recipe_text, source_name)
        except ComposerError:
            root = None
        present = has_location(root, self.location)
        line = line_of(root, self.location) if present else None
        where = f"{source_name}, line {line}" if line else source_name
        state = "" if present or not self.location else " (not set)"
        return ComposerError(f"{where}: recipe key '{path_text(self.location)}'{state}: {self.detail}")


def _tune_range_at(value: Any, location: tuple = ()) -> tuple | None:
    """Where the first `{tune: [lo, hi]}` mark is (a range for `compose tune`, not a number), or None."""
    if isinstance(value, dict):
        if isinstance(value.get("tune"), list):  # (a token named "tune" under tokenizer.tokens holds a mapping)
            return location
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    return next((found for key, item in items if (found := _tune_range_at(item, location + (key,))) is not None), None)


def recipe_tree(text: str, source_name: str) -> tuple[yaml.Node | None, Any]:
    """The recipe's YAML graph and data: several documents read as stages, the language model's module
    (`modules: {default | text_decoder: ...}`) lifted to the top level."""
    root, data = recipe_documents(text, source_name)
    if isinstance(data, dict):
        lift_language_module(root, data, source_name)
    return root, data


def parse_recipe(text: str, source_name: str = "recipe", recipe_dir: Path | None = None) -> Recipe:
    """The validated recipe; `recipe_dir` (the recipe file's folder) is where its relative model paths start."""
    root, data = recipe_tree(text, source_name)
    if not isinstance(data, dict):
        found = "it is empty" if data is None else f"it holds a {type(data).__name__}"
        raise ComposerError(
            f"{source_name} must be a YAML mapping of recipe keys (merge_method, models or slices, ...); {found}."
        )
    check_duplicate_keys(root, source_name)
    marked = _tune_range_at(data)
    if marked is not None:
        line = line_of(root, marked)
        raise ComposerError(
            f"{source_name}{f', line {line}' if line else ''}: '{path_text(marked)}' is a tune range, not a number; "
            "run the recipe with `compose tune` (docs/tune.md), which fits it on text and writes a recipe with numbers."
        )
    drop_ignored_keys(data, root, source_name)
    fold_revisions(data, root, source_name, recipe_dir)  # before the mapping spellings are flattened
    data = normalise_mergekit(data)
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        # unknown keys first: a misspelt key usually also makes a required one look missing
        problems = sorted(error.errors(), key=lambda problem: problem["type"] != "extra_forbidden")
        seen = []
        for problem in problems:
            message = _describe(problem, source_name, root)
            if message not in seen:
                seen.append(message)
        raise ComposerError(
            " ".join(seen[:4]) + (f" ({len(seen) - 4} more problems)" if len(seen) > 4 else "")
        ) from None


def load_recipe(path: Path) -> tuple[Recipe, str]:
    text = read_text(path, "Recipe file", YAML_FILE_LIMIT)
    return parse_recipe(text, str(path), Path(path).parent), text
