"""YAML from users (recipes, MoE configs, prompt lists, model cards), parsed once with bounds, with the node
graph kept so that messages can name the line of a key.

Aliases are legal YAML and recipes use them, but an alias names a whole subtree: nine aliases to a list of
nine aliases to ... (a "billion laughs") is a few hundred bytes that expand to 9**9 values in anything that
walks the data. So the composed graph is measured as if every alias were expanded (each node once, memoised)
and refused past MAX_VALUES values or MAX_DEPTH levels before anything walks it.
"""

from __future__ import annotations

import warnings
from typing import Any

import yaml

from composer.errors import ComposerError, ComposerWarning
from composer.files import printable

MAX_VALUES = 100_000
MAX_DEPTH = 100
MAX_NUMBER_LENGTH = 4300  # Python's own limit on the digits of an int read from text


def load_package_data(text: str) -> Any:
    """A YAML file composer ships (an architecture definition), parsed by libyaml where PyYAML has it: ~10x the pure
    Python parser, which spent 0.2 s of every run's start on these files. Users' YAML goes through the bounded
    loader below instead."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def path_text(location: tuple) -> str:
    """`('slices', 0, 'sources', 1, 'layer_range')` -> `slices[0].sources[1].layer_range`."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{printable(str(part))}" if text else printable(str(part)))
    return text or "(top level)"


def yaml_problem(error: yaml.YAMLError, source_name: str) -> str:
    """A PyYAML error as one sentence with the line and column (1-based)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is None or problem is None:
        return f"{source_name} is not valid YAML: {' '.join(str(error).split())}"
    context = getattr(error, "context", None)
    context_mark = getattr(error, "context_mark", None)
    detail = problem
    if context:
        detail += (
            f" ({context}" + (f" that starts at line {context_mark.line + 1}" if context_mark is not None else "") + ")"
        )
    return f"{source_name}, line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {detail}."


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer stops at MAX_DEPTH levels and MAX_VALUES nodes, long before Python's recursion
    limit or the memory a huge file would take."""

    def __init__(self, text: str, source_name: str):
        super().__init__(text)
        self.source_name = source_name
        self.depth = 0
        self.composed = 0

    def compose_node(self, parent, index):
        self.depth += 1
        self.composed += 1
        if self.depth > MAX_DEPTH or self.composed > MAX_VALUES:
            line = self.peek_event().start_mark.line + 1
            raise ComposerError(_too_big(self.source_name, line, self.depth > MAX_DEPTH, aliases=False))
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_number(self, node):
        # PyYAML builds a sexagesimal number (1:2:3, YAML 1.1) with one big-integer product a part: a long one takes
        # hours; and it reads a tagged value (`!!int`, `!!float`) without checking it first
        if len(node.value) > MAX_NUMBER_LENGTH:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"a number written with {len(node.value)} characters (composer reads at most {MAX_NUMBER_LENGTH})",
                node.start_mark,
            )
        try:
            return (self.construct_yaml_int if node.tag.endswith(":int") else self.construct_yaml_float)(node)
        except (ValueError, IndexError):
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value[:40]!r} is not a number", node.start_mark
            ) from None

    def construct_bool(self, node):
        if self.construct_scalar(node).lower() not in self.bool_values:
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value[:40]!r} is not true or false", node.start_mark
            )
        return self.construct_yaml_bool(node)

    def construct_timestamp(self, node):
        if self.timestamp_regexp.match(self.construct_scalar(node)) is None:
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value[:40]!r} is not a date or time", node.start_mark
            )
        return self.construct_yaml_timestamp(node)


for _tag, _constructor in (
    ("int", _BoundedLoader.construct_number),
    ("float", _BoundedLoader.construct_number),
    ("bool", _BoundedLoader.construct_bool),
    ("timestamp", _BoundedLoader.construct_timestamp),
):
    _BoundedLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _constructor)


def _too_big(source_name: str, line: int, deep: bool, aliases: bool) -> str:
    where = f"{source_name}, line {line}"
    if deep:
        through = " (counting what its aliases stand for)" if aliases else ""
        return f"{where}: the YAML nests more than {MAX_DEPTH} levels deep{through}; real files need only a few levels."
    if aliases:
        return (
            f"{where}: its aliases expand too far: written out, the YAML would hold more than {MAX_VALUES} values "
            "(aliases that repeat aliases multiply). Write the values out, or alias fewer times."
        )
    return f"{where}: the YAML holds more than {MAX_VALUES} values; composer reads smaller files."


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return node.value
    return []


def _check_expansion(root: yaml.Node, source_name: str, limit: int = MAX_VALUES) -> tuple[list[yaml.Node], int]:
    """Refuse a graph that, with its aliases expanded, holds more than `limit` nodes or nests deeper than
    MAX_DEPTH (an alias inside its own anchor expands forever). Returns every distinct node, and the count of
    nodes with aliases expanded."""
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, depth) when expanded
    open_nodes: set[int] = set()
    nodes: list[yaml.Node] = []

    def measure(node: yaml.Node, level: int) -> tuple[int, int]:
        known = measured.get(id(node))
        if known is not None:
            count, depth = known
        else:
            if id(node) in open_nodes:
                raise ComposerError(
                    f"{source_name}, line {node.start_mark.line + 1}: an alias stands for a node that holds it, so it "
                    "would expand forever. Alias only values written out in full."
                )
            if level > MAX_DEPTH:
                raise ComposerError(_too_big(source_name, node.start_mark.line + 1, True, aliases=True))
            open_nodes.add(id(node))
            count, depth = 1, 1
            for child in _children(node):
                child_count, child_depth = measure(child, level + 1)
                count, depth = count + child_count, max(depth, child_depth + 1)
                if count > limit:
                    raise ComposerError(_too_big(source_name, node.start_mark.line + 1, False, aliases=True))
            open_nodes.discard(id(node))
            measured[id(node)] = (count, depth)
            nodes.append(node)
        if level + depth - 1 > MAX_DEPTH:
            raise ComposerError(_too_big(source_name, node.start_mark.line + 1, True, aliases=True))
        return count, depth

    count, _ = measure(root, 1)
    return nodes, count


def _read_with_bounds(text: str, source_name: str, read):
    """`read(loader)` on a bounded loader of `text`, with every YAML error as a ComposerError naming the line."""
    loader = None
    try:
        loader = _BoundedLoader(text, source_name)  # checks the characters at once
        return read(loader)
    except yaml.YAMLError as error:
        raise ComposerError(yaml_problem(error, source_name)) from None
    except (ValueError, OverflowError) as error:  # a value PyYAML matches but cannot build, e.g. the date 2024-13-45
        raise ComposerError(f"{source_name}: a value cannot be read ({error}).") from None
    finally:
        if loader is not None:
            loader.dispose()


def _construct(loader: _BoundedLoader, root: yaml.Node, source_name: str, limit: int) -> tuple[Any, int]:
    """The data of one composed document, once its expansion is measured; and that expanded size."""
    nodes, count = _check_expansion(root, source_name, limit)
    as_composed = [(node, list(node.value)) for node in nodes if isinstance(node, yaml.MappingNode)]
    data = loader.construct_document(root)
    for node, pairs in as_composed:  # building the data flattened merge keys into the nodes
        node.value = pairs
    return data, count


def parse_yaml(text: str, source_name: str) -> tuple[yaml.Node | None, Any]:
    """The composed node graph (positions kept, None for an empty document) and the data built from it.

    Errors are ComposerErrors naming `source_name` and the line. The graph is the one composed from the text:
    merge keys (`<<`) are applied to the data only, so lines found in it are where the text puts them.
    """

    def read(loader: _BoundedLoader) -> tuple[yaml.Node | None, Any]:
        root = loader.get_single_node()
        return (None, None) if root is None else (root, _construct(loader, root, source_name, MAX_VALUES)[0])

    return _read_with_bounds(text, source_name, read)


def parse_yaml_documents(text: str, source_name: str) -> list[tuple[yaml.Node, Any]]:
    """Like parse_yaml, for a stream of several documents (`---` between them): (graph, data) of each non-empty
    one. The bounds hold for the whole stream: MAX_VALUES counts the values of every document together."""

    def read(loader: _BoundedLoader) -> list[tuple[yaml.Node, Any]]:
        documents, remaining = [], MAX_VALUES
        while loader.check_node():
            root = loader.get_node()
            if root is not None:
                data, count = _construct(loader, root, source_name, remaining)
                remaining -= count
                documents.append((root, data))
        return documents

    return _read_with_bounds(text, source_name, read)


def line_of(node: yaml.Node | None, location: tuple) -> int | None:
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


def has_location(node: yaml.Node | None, location: tuple) -> bool:
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


def same_node(first: yaml.Node, second: yaml.Node) -> bool:
    """Whether two YAML nodes spell the same value (same tags, scalars and structure)."""
    if type(first) is not type(second) or first.tag != second.tag:
        return False
    if isinstance(first, yaml.ScalarNode):
        return first.value == second.value
    if len(first.value) != len(second.value):
        return False
    if isinstance(first, yaml.MappingNode):
        return all(same_node(a, c) and same_node(b, d) for (a, b), (c, d) in zip(first.value, second.value))
    return all(same_node(a, b) for a, b in zip(first.value, second.value))


def check_duplicate_keys(node: yaml.Node | None, source_name: str, location: tuple = ()) -> None:
    """YAML lets a later key silently replace an earlier one; in a recipe that is a mistake: an error where the two
    values differ, a warning where the key is only written twice with the same value (mergekit runs both).
    Only for a graph parse_yaml accepted (its size and depth are bounded)."""
    if isinstance(node, yaml.MappingNode):
        first: dict[str, tuple[int, yaml.Node]] = {}
        for key, value in node.value:
            name = getattr(key, "value", None)
            if isinstance(name, str):
                where = f"{source_name}, line {key.start_mark.line + 1}: key '{path_text(location + (name,))}'"
                if name in first and same_node(first[name][1], value):
                    warnings.warn(
                        f"{where} appears twice with the same value (first at line {first[name][0]}); remove one.",
                        ComposerWarning,
                        stacklevel=2,
                    )
                elif name in first:
                    raise ComposerError(
                        f"{where} appears twice with different values (first at line {first[name][0]}); YAML would "
                        "silently keep only the last one. Remove the one you did not mean."
                    )
                first.setdefault(name, (key.start_mark.line + 1, value))
            check_duplicate_keys(value, source_name, location + (name,))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            check_duplicate_keys(item, source_name, location + (index,))
