"""mergekit's multi-module configs (`modules: {NAME: {slices | models, parameters}}`) in composer's terms.

mergekit splits a model into modules: a text model has one, `default`; a vision-language model has a text decoder
(`text_decoder`), a vision tower and a projector (`vision_tower`, `multi_modal_projector`, ...). The language model's
module, `default` or `text_decoder`, is the same as its slices or models at the top level: it is lifted there, in the
data and in the YAML graph (so errors still name the lines of its keys), its `parameters:` winning over the merge's.
Every other module stays under `modules:`, with the merge's own parameters (as the file gives them, before the
language model's win over them) written into its `parameters:` beneath its own; the plan merges its tensors.
"""

from __future__ import annotations

from typing import Any

import yaml

from composer.errors import ComposerError
from composer.yaml_text import line_of, path_text

MODULE_KEYS = ("slices", "models", "parameters")
# the names mergekit gives the language model's module: `default` for a text model, `text_decoder` in a modular one
LANGUAGE_MODULES = ("default", "text_decoder")


def _value_node(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        return next((value for name, value in node.value if getattr(name, "value", None) == key), None)
    return None


def _key_node(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        return next((name for name, _ in node.value if getattr(name, "value", None) == key), None)
    return None


def _where(root: yaml.Node | None, source_name: str, location: tuple) -> str:
    line = line_of(root, location)
    return f"{source_name}, line {line}" if line else source_name


def _refuse(root, source_name: str, location: tuple, problem: str) -> None:
    raise ComposerError(f"{_where(root, source_name, location)}: '{path_text(location)}' {problem}")


def _check_module(root, source_name: str, location: tuple, module: Any) -> None:
    if not isinstance(module, dict):
        _refuse(root, source_name, location, "must be a mapping with 'slices' or 'models' (and optional 'parameters').")
    for key in module:
        if key not in MODULE_KEYS:
            _refuse(
                root,
                source_name,
                location + (key,),
                "is not a key of a module; a module takes 'models' or 'slices', and optional 'parameters'.",
            )


def _parameters_beneath(
    top: Any, top_node: yaml.Node | None, own: Any, own_node: yaml.Node | None
) -> tuple[Any, yaml.Node | None]:
    """A module's parameters with the merge's `top` ones beneath them (its own win), and their YAML node."""
    if not isinstance(top, dict) or not isinstance(own, dict):
        return own, own_node
    kept = [pair for pair in getattr(top_node, "value", []) if getattr(pair[0], "value", None) not in own]
    node = own_node
    if isinstance(own_node, yaml.MappingNode):
        node = yaml.MappingNode(own_node.tag, kept + own_node.value, own_node.start_mark, own_node.end_mark)
    return {**top, **own}, node


def _give_merge_parameters(data: dict, node: yaml.Node | None, modules: dict, modules_node: yaml.Node | None) -> None:
    """Write the merge's own parameters beneath each other module's, so that the language model's, once lifted to the
    top level, do not reach them."""
    top, top_node = data.get("parameters"), _value_node(node, "parameters")
    if not isinstance(top, dict):
        return
    for name, module in modules.items():
        if name in LANGUAGE_MODULES or not isinstance(module, dict):
            continue
        module_node = _value_node(modules_node, name)
        if "parameters" not in module:
            module["parameters"] = dict(top)
            if isinstance(module_node, yaml.MappingNode) and top_node is not None:
                module_node.value.append((_key_node(node, "parameters"), top_node))
            continue
        value, value_node = _parameters_beneath(
            top, top_node, module["parameters"], _value_node(module_node, "parameters")
        )
        module["parameters"] = value
        if isinstance(module_node, yaml.MappingNode) and value_node is not None:
            module_node.value = [
                (key, value_node if getattr(key, "value", None) == "parameters" else child)
                for key, child in module_node.value
            ]


def lift_language_module(
    root: yaml.Node | None, data: dict, source_name: str, node: Any = None, prefix: tuple = ()
) -> None:
    """Move the language model's module (`modules.default` or `modules.text_decoder`) to the merge (and to each
    stage's), in place; the other modules stay under `modules:`."""
    node = root if node is None else node
    stage_nodes, stages = _value_node(node, "stages"), data.get("stages")
    for index, stage in enumerate(stages if isinstance(stages, list) else []):
        if isinstance(stage, dict) and isinstance(stage_nodes, yaml.SequenceNode) and index < len(stage_nodes.value):
            lift_language_module(root, stage, source_name, stage_nodes.value[index], prefix + ("stages", index))
    if "modules" not in data:
        return
    location = prefix + ("modules",)
    modules = data["modules"]
    if not isinstance(modules, dict) or not modules:
        _refuse(
            root,
            source_name,
            location,
            "must map module names to their slices or models, e.g. 'text_decoder: {slices: [...]}'.",
        )
    for name, module in modules.items():
        _check_module(root, source_name, location + (name,), module)
    if all(name in modules for name in LANGUAGE_MODULES):
        _refuse(
            root,
            source_name,
            location + ("text_decoder",),
            "is given, and so is 'modules.default': both name the language model's module (mergekit calls it "
            "'default' in a text model and 'text_decoder' in a vision-language one); keep one of them.",
        )
    modules_node = _value_node(node, "modules")
    _give_merge_parameters(data, node, modules, modules_node)
    language = next((name for name in LANGUAGE_MODULES if name in modules), None)
    if language is None and not any(key in data for key in ("models", "slices", "stages")):
        _refuse(
            root,
            source_name,
            location,
            f"holds {', '.join(repr(name) for name in modules)} but no language model's module ('default' in a text "
            "model, 'text_decoder' in a vision-language one), and the merge has no 'models' or 'slices' of its own: "
            "name the language model's module one of those, or give its 'models' or 'slices' at the top level.",
        )
    if language is None:
        return
    module = modules.pop(language)
    location += (language,)
    for key in module:
        if key != "parameters" and key in data:
            _refuse(
                root,
                source_name,
                location + (key,),
                f"is given, and so is '{path_text(prefix + (key,))}'; give it once.",
            )
    module_node = _value_node(modules_node, language)
    pairs = list(getattr(node, "value", []))
    if isinstance(modules_node, yaml.MappingNode):
        modules_node.value = [pair for pair in modules_node.value if getattr(pair[0], "value", None) != language]
    if not modules:
        del data["modules"]
        pairs = [pair for pair in pairs if getattr(pair[0], "value", None) != "modules"]
    for key, value in module.items():
        key_node = _key_node(module_node, key)
        value_node = _value_node(module_node, key)
        if key == "parameters" and isinstance(data.get("parameters"), dict) and isinstance(value, dict):
            # the module's own values win over the merge's, as the more specific place
            value, value_node = _parameters_beneath(
                data["parameters"], _value_node(node, "parameters"), value, value_node
            )
            pairs = [pair for pair in pairs if getattr(pair[0], "value", None) != "parameters"]
        data[key] = value
        if key_node is not None and value_node is not None:  # (absent where a `<<` merge key brought the value)
            pairs.append((key_node, value_node))
    if isinstance(node, yaml.MappingNode):
        node.value = pairs
