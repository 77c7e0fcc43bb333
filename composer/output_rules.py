"""What an output's config.json and tensors must be for transformers to load them, from the architecture definition
alone (its `output_rules:`), so that a run need not import transformers (seconds and ~170 MB) to know.

A definition's rules say, for its model type:
- `config`: every key transformers' config class declares, as `TYPE [= DEFAULT] [within LOW..HIGH]`. transformers
  checks these types strictly (a bool is not an int, an int is not a float, a tuple is not a list);
- `derived`: what transformers sets a key to when the config leaves it out or gives null (`head_dim`);
- `multiple_of`: pairs `[a, b]` where a must be a whole multiple of b (the width and the attention heads);
- `shapes`: each tensor's shape as expressions of config keys (`num_attention_heads * head_dim`), by full name for
  tensors outside the layer stack and by the name within a layer for the rest; an optional tensor says `when:` a
  config key (or `not KEY`, or `KEY and KEY`) makes the model hold it, and is refused otherwise. A mixture of
  experts' rules name per-expert tensors with `{e}` and read the family's expert count as `experts`;
- `layer_sets`: which layers hold some of a layer's tensors, where that is not the same for every layer: the layers
  a config key lists, or (where it gives none) every step-th layer (Llama 4's `moe_layers`, else every
  `interleave_moe_layer_step`-th); a layer tensor's `when:` names the set (`when: moe`, `when: not moe`);
- `model_types`: the model types the rules hold for, where the definition's model types have different config
  classes (DeepSeek-V2 and V3); a config of another of its model types is left to transformers' own check.

tests/test_output_rules.py holds each definition against the installed transformers: its `config` against the
config class's declared fields, its shapes against models built on the meta device over many configs.
transformers' checks of values beyond these (RoPE parameters' fields, token ids) are not repeated here; `compose
plan` still builds the output in transformers."""

from __future__ import annotations

import ast
import re
import reprlib

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from composer.errors import ComposerError

_DECLARATION = re.compile(
    r"^(?P<type>[^=]+?)\s*(?:=\s*(?P<default>.+?))?\s*(?:within\s+(?P<low>\S+)\.\.(?P<high>\S+))?$"
)
_KINDS = {"int", "float", "bool", "str", "dict", "None", "list[int]", "list[str]"}
_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv)
_NODES = (ast.Expression, ast.BinOp, ast.Name, ast.Load, ast.UnaryOp, ast.Not, ast.BoolOp, ast.And, *_OPERATORS)


class TensorRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    shape: list[str | int]
    when: str | None = None  # a config key (or `not KEY`, `KEY and KEY`) that makes the model hold this tensor


class LayerSetRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    listed: str  # a config key listing the layers (by index) in the set ...
    step: str  # ... and where it is null or left out, every step-th layer is: (index + 1) % step == 0


class OutputRulesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config_class: str  # the transformers class the `config` table was read from (for messages)
    model_types: list[str] = []  # the model types the rules hold for (none listed: every one of the definition)
    config: dict[str, str]
    derived: dict[str, str] = {}
    multiple_of: list[tuple[str, str]] = []
    layer_sets: dict[str, LayerSetRule] = {}
    shapes: dict[str, TensorRule]  # a plain list is read as {shape: LIST}

    @field_validator("shapes", mode="before")
    @classmethod
    def _rules(cls, value):
        if not isinstance(value, dict):
            return value
        return {name: rule if isinstance(rule, dict) else {"shape": rule} for name, rule in value.items()}


class KeyDeclaration(BaseModel):
    model_config = ConfigDict(frozen=True)
    kinds: tuple[str, ...]
    default: object = None
    has_default: bool = False
    low: float | None = None
    high: float | None = None

    @classmethod
    def parse(cls, text: str) -> KeyDeclaration:
        match = _DECLARATION.match(text.strip())
        kinds = tuple(part.strip() for part in match.group("type").split("|")) if match else ()
        if not kinds or not set(kinds) <= _KINDS:
            raise ValueError(f"'{text}' is not TYPE [= DEFAULT] [within LOW..HIGH] with types from {sorted(_KINDS)}")
        default_text = match.group("default")
        low, high = match.group("low"), match.group("high")
        return cls(
            kinds=kinds,
            default=_default_value(default_text) if default_text is not None else None,
            has_default=default_text is not None,
            low=float(low) if low is not None else None,
            high=float(high) if high is not None else None,
        )

    def accepts(self, value) -> bool:
        if not any(_is_kind(value, kind) for kind in self.kinds):
            return False
        if self.low is not None and isinstance(value, (int, float)) and not self.low <= value <= self.high:
            return False
        return True


def _default_value(text: str):
    if text == "~":
        return None
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _is_kind(value, kind: str) -> bool:
    if kind == "None":
        return value is None
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, float)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "dict":
        return isinstance(value, dict)
    item_kind = kind[len("list[") : -1]
    return isinstance(value, list) and all(_is_kind(item, item_kind) for item in value)


def _expression(text: str | int) -> ast.Expression:
    tree = ast.parse(str(text), mode="eval")
    for node in ast.walk(tree):
        if not isinstance(node, _NODES) and not (isinstance(node, ast.Constant) and type(node.value) is int):
            raise ValueError(f"'{text}' is not arithmetic (+ - * //, not, and) on config keys and whole numbers")
    return tree


def _names(tree: ast.Expression) -> set[str]:
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


def _evaluate(node: ast.AST, values: dict):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, values)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.UnaryOp):
        return not _evaluate(node.operand, values)
    if isinstance(node, ast.BoolOp):  # `and`, as Python: the first false operand, else the last
        for operand in node.values:
            value = _evaluate(operand, values)
            if not value:
                return value
        return value
    left, right = _evaluate(node.left, values), _evaluate(node.right, values)
    if isinstance(node.op, ast.Add):
        return left + right
    if isinstance(node.op, ast.Sub):
        return left - right
    if isinstance(node.op, ast.Mult):
        return left * right
    return left // right


class OutputRules:
    """A definition's `output_rules:`, parsed and checked once (a mistake in a shipped definition fails at load)."""

    def __init__(self, spec: OutputRulesFile, tensor_names: set[str]):
        self.config_class = spec.config_class
        self.model_types = tuple(spec.model_types)
        self.declarations = {key: KeyDeclaration.parse(text) for key, text in spec.config.items()}
        self.derived = {key: _expression(text) for key, text in spec.derived.items()}
        self.multiple_of = list(spec.multiple_of)
        self.layer_sets = dict(spec.layer_sets)
        self.shapes = {
            name: ([_expression(size) for size in rule.shape], _expression(rule.when) if rule.when else None)
            for name, rule in spec.shapes.items()
        }
        unknown = sorted(set(self.shapes) - tensor_names)
        if unknown:
            raise ValueError(f"shapes are given for tensors the definition does not list: {unknown}")
        used = set(self.derived) | {key for pair in self.multiple_of for key in pair}
        used |= {key for rule in self.layer_sets.values() for key in (rule.listed, rule.step)}
        for sizes, when in self.shapes.values():
            used |= {name for tree in sizes + ([when] if when else []) for name in _names(tree)}
        for tree in self.derived.values():
            used |= _names(tree)
        undeclared = sorted(used - set(self.declarations) - set(self.derived) - set(self.layer_sets) - {"experts"})
        if undeclared:
            raise ValueError(f"rules use config keys the `config` table does not declare: {undeclared}")

    def hold_for(self, model_type: str | None) -> bool:
        """Whether the rules describe configs of `model_type` (one of their definition's model types)."""
        return not self.model_types or model_type in self.model_types

    def check_config(self, config: dict, reference: str) -> dict:
        """The values the rules read (declared keys with transformers' defaults and derived values filled in), after
        refusing a value of a type transformers refuses, a width the heads do not divide, or a dtype torch lacks."""
        for key, declaration in self.declarations.items():
            if key in config and not declaration.accepts(config[key]):
                raise ComposerError(
                    f"The config.json of {reference} gives '{key}' as {reprlib.repr(config[key])}, which transformers' "
                    f"{self.config_class} refuses: it takes {_wanted(declaration)}. Correct '{key}' in that "
                    "config.json. Nothing was written."
                )
        _check_dtype(config, reference)
        values = {key: config.get(key, declaration.default) for key, declaration in self.declarations.items()}
        for key in self.derived:  # a key the config class does not declare, which its model still reads if given
            if key in config and key not in self.declarations:
                if not _is_size(config[key]):
                    raise ComposerError(
                        f"The config.json of {reference} gives '{key}' as {reprlib.repr(config[key])}; transformers' model "
                        f"reads it as a size, a whole number of at least 1. Correct or remove '{key}' in that "
                        "config.json. Nothing was written."
                    )
                values[key] = config[key]
        for key, tree in self.derived.items():
            if values.get(key) is None:
                values[key] = _evaluate(tree, values) if all(values.get(n) is not None for n in _names(tree)) else None
        for whole, part in self.multiple_of:
            if (
                isinstance(values.get(whole), int)
                and isinstance(values.get(part), int)
                and values[part] > 0
                and values[whole] % values[part]
            ):
                raise ComposerError(
                    f"The config.json of {reference} gives '{whole}' {values[whole]} for '{part}' {values[part]}; "
                    f"transformers' {self.config_class} needs '{whole}' to be a whole multiple of '{part}' "
                    f"({_what(whole, part)}). Nothing was written."
                )
        return values

    def expected(
        self, name: str, suffix: str, values: dict, reference: str, layer: int | None = None
    ) -> tuple[int, ...] | None:
        """The shape transformers' model has for tensor `name` (`suffix`: its name within layer `layer`, else `name`);
        None when the config makes the model lack it."""
        sizes, when = self.shapes[suffix]
        if when is not None and layer is not None and self.layer_sets:
            values = values | {
                key: self._in_set(rule, layer, values, reference) for key, rule in self.layer_sets.items()
            }
        if when is not None and not _evaluate(when, values):
            return None
        try:
            shape = tuple(_evaluate(tree, values) for tree in sizes)
        except (TypeError, ZeroDivisionError):
            keys = sorted({key for tree in sizes for key in _names(tree)})
            raise ComposerError(
                f"The config.json of {reference} does not give the sizes {keys} that tensor '{name}' needs "
                f"(transformers' {self.config_class} has no value for them). Nothing was written."
            ) from None
        return shape

    def _in_set(self, rule: LayerSetRule, layer: int, values: dict, reference: str) -> bool:
        listed = values.get(rule.listed)
        if listed is not None:
            return layer in listed
        step = values.get(rule.step)
        if not _is_size(step):
            raise ComposerError(
                f"The config.json of {reference} gives '{rule.step}' as {reprlib.repr(step)} and no '{rule.listed}'; "
                f"transformers' {self.config_class} needs a whole number of at least 1 there. Nothing was written."
            )
        return (layer + 1) % step == 0


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _wanted(declaration: KeyDeclaration) -> str:
    names = {"int": "a whole number", "float": "a decimal number (1.0, not 1)", "bool": "true or false",
             "str": "a string", "dict": "a mapping", "None": "null", "list[int]": "a list of whole numbers",
             "list[str]": "a list of strings"}  # fmt: skip
    text = " or ".join(names[kind] for kind in declaration.kinds)
    if declaration.low is not None:
        text += f" from {declaration.low} to {declaration.high}"
    return text


def _what(whole: str, part: str) -> str:
    return "its attention heads split the width evenly" if "head" in part else "the sizes must divide evenly"


def _check_dtype(config: dict, reference: str) -> None:
    for key in ("dtype", "torch_dtype"):
        name = config.get(key)
        if name is None:
            continue
        if not isinstance(name, str) or not isinstance(getattr(torch, name, None), torch.dtype):
            raise ComposerError(
                f"The config.json of {reference} gives '{key}' as {reprlib.repr(name)}, which is not a torch dtype "
                "(bfloat16, float16, float32, ...). Correct it in that config.json. Nothing was written."
            )
