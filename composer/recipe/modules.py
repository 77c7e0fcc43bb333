"""mergekit's multi-module configs (`modules: {NAME: {slices | models, parameters}}`) in composer's terms.

mergekit splits a model into modules: a text model has one, `default`; a vision-language model has a text
decoder, a vision tower and a projector. composer merges text models, so the one `default` module is the
same as its slices or models at the top level: it is lifted there, in the data and in the YAML graph (so
errors still name the lines of its keys). Any other module is refused with what to do instead.
"""

from __future__ import annotations

from typing import Any

import yaml

from composer.errors import ComposerError
from composer.yaml_text import line_of, path_text

MODULE_KEYS = ("slices", "models", "parameters")


def _value_node(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        return next((value for name, value in node.value if getattr(name, "value", None) == key), None)
    return None


def _where(root: yaml.Node | None, source_name: str, location: tuple) -> str:
    line = line_of(root, location)
    return f"{source_name}, line {line}" if line else source_name


def _refuse(root, source_name: str, location: tuple, problem: str) -> None:
    raise ComposerError(f"{_where(root, source_name, location)}: '{path_text(location)}' {problem}")


def lift_default_module(
    root: yaml.Node | None, data: dict, source_name: str, node: Any = None, prefix: tuple = ()
) -> None:
    """Move `modules.default`'s slices, models and parameters to the merge (and to each stage's), in place."""
    node = root if node is None else node
    stage_nodes, stages = _value_node(node, "stages"), data.get("stages")
    for index, stage in enumerate(stages if isinstance(stages, list) else []):
        if isinstance(stage, dict) and isinstance(stage_nodes, yaml.SequenceNode) and index < len(stage_nodes.value):
            lift_default_module(root, stage, source_name, stage_nodes.value[index], prefix + ("stages", index))
    if "modules" not in data:
        return
    location = prefix + ("modules",)
    modules = data["modules"]
    if not isinstance(modules, dict) or not modules:
        _refuse(
            root,
            source_name,
            location,
            "must map module names to their slices or models, e.g. 'default: {slices: [...]}'.",
        )
    if set(modules) != {"default"}:
        others = ", ".join(f"'{name}'" for name in modules if name != "default")
        _refuse(
            root,
            source_name,
            location,
            f"names the modules {others}: composer merges text models, whose one "
            "module is 'default', and does not merge a vision tower, projector or other module on its own. Put the "
            "slices or models of the language model under 'default' (or at the top level), and leave the others out.",
        )
    module = modules["default"]
    location += ("default",)
    if not isinstance(module, dict):
        _refuse(root, source_name, location, "must be a mapping with 'slices' or 'models' (and optional 'parameters').")
    for key in module:
        if key not in MODULE_KEYS:
            _refuse(
                root,
                source_name,
                location + (key,),
                "is not a key of a module; a module takes slices, models and parameters.",
            )
        if key != "parameters" and key in data:
            _refuse(
                root,
                source_name,
                location + (key,),
                f"is given, and so is '{path_text(prefix + (key,))}'; give it once.",
            )
    module_node = _value_node(_value_node(node, "modules"), "default")
    pairs = [pair for pair in getattr(node, "value", []) if getattr(pair[0], "value", None) != "modules"]
    for key, value in module.items():
        key_node = next(
            (name for name, _ in getattr(module_node, "value", []) if getattr(name, "value", None) == key), None
        )
        value_node = _value_node(module_node, key)
        if key == "parameters" and isinstance(data.get("parameters"), dict) and isinstance(value, dict):
            # the module's own values win over the merge's, as the more specific place
            value = {**data["parameters"], **value}
            top = _value_node(node, "parameters")
            kept = [
                pair
                for pair in getattr(top, "value", [])
                if getattr(pair[0], "value", None) not in module["parameters"]
            ]
            if isinstance(value_node, yaml.MappingNode):
                value_node = yaml.MappingNode(
                    value_node.tag, kept + value_node.value, value_node.start_mark, value_node.end_mark
                )
            pairs = [pair for pair in pairs if getattr(pair[0], "value", None) != "parameters"]
        data[key] = value
        if key_node is not None and value_node is not None:  # (absent where a `<<` merge key brought the value)
            pairs.append((key_node, value_node))
    del data["modules"]
    if isinstance(node, yaml.MappingNode):
        node.value = pairs
