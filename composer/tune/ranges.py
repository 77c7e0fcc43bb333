"""The numbers a recipe asks to tune, written `{tune: [lo, hi]}` (optionally with `start: x`) where a number goes,
and the ordinary recipe text of a trial, with a number in each such place.

A trial's recipe is made by replacing each mark in the text, so comments, anchors and layout stay as written and
the result is a recipe like any other, validated and planned by the usual code."""

from __future__ import annotations

import math
from dataclasses import dataclass

import yaml

from composer.errors import ComposerError
from composer.tune.domains import ANY, LAYER_BOUND, TUNE_ALL, Domain, parameter_domain, range_around
from composer.yaml_text import line_of, parse_yaml, path_text

MARK = "tune"
MARK_KEYS = {MARK, "start"}
HOW_TO_MARK = (
    "write a range in place of a number to tune it, e.g. `weight: {tune: [0, 1]}` or `density: {tune: [0.1, 0.9]}` "
    "(a list of ranges, `weight: [{tune: [0, 1]}, {tune: [0, 1]}]`, tunes a gradient across depth; a "
    "passthrough slice's `layer_range: [{tune: [0, 4]}, 12]` tunes where it starts), or pass --tune-all to "
    "tune every weight, density, t and scale around its value."
)


@dataclass(frozen=True)
class TuneRange:
    location: tuple  # the key path where the mark is written (first place, when aliases repeat it)
    line: int
    low: float
    high: float
    start: float
    integer: bool
    span: tuple[int, int]  # characters of the recipe text that a trial's number replaces

    @property
    def key(self) -> str:
        return path_text(self.location)

    def value_at(self, share: float) -> float:
        """The value at `share` of the way from low to high (whole numbers rounded)."""
        value = self.low + min(max(share, 0.0), 1.0) * (self.high - self.low)
        return round(value) if self.integer else value

    def share_of(self, value: float) -> float:
        return (value - self.low) / (self.high - self.low)


def number_text(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _last_node(node: yaml.Node) -> yaml.Node:
    while (
        isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.value and not node.flow_style
    ):  # a flow node ends at its bracket
        last = node.value[-1]
        node = last[1] if isinstance(node, yaml.MappingNode) else last
    return node


def value_span(text: str, node: yaml.Node) -> tuple[int, int]:
    """The characters of a node's value: an anchor or tag before it stays, and a block node ends at its last value
    (its end mark would take the line break and the next line's indent with it)."""
    start = node.start_mark.index
    while start < len(text) and text[start] in "&!":
        while start < len(text) and not text[start].isspace():
            start += 1
        while start < len(text) and text[start] in " \t":
            start += 1
    whole = isinstance(node, yaml.ScalarNode) or node.flow_style
    return start, (node if whole else _last_node(node)).end_mark.index


def _domain_at(location: tuple, source_name: str, line: int) -> tuple[str, Domain]:
    """(what the number is, its domain) for a mark at `location`; an error for a place composer cannot tune."""
    if len(location) >= 2 and location[-2] == "layer_range" and location[-1] in (0, 1):
        return "a slice bound", LAYER_BOUND
    if len(location) >= 2 and location[-2] == "lines" and location[-1] in ("alpha", "beta"):
        return f"LiNeS '{location[-1]}'", ANY
    if "parameters" in location:
        at = len(location) - 1 - location[::-1].index("parameters")
        if at + 1 < len(location) and isinstance(location[at + 1], str):
            name = location[at + 1]
            return f"'{name}'", parameter_domain(name)
    raise ComposerError(
        f"{source_name}, line {line}: a tune range at '{path_text(location)}' stands where composer has no number to tune; "
        "tune ranges go in place of a method parameter (under a `parameters:` key), a `lines` alpha or beta, or a passthrough "
        "`layer_range` bound."
    )


def _read_mark(
    node: yaml.MappingNode, data: dict, location: tuple, text: str, source_name: str, line: int
) -> TuneRange:
    where = f"{source_name}, line {line}: recipe key '{path_text(location)}'"
    stray = sorted(str(key) for key in data if key not in MARK_KEYS)
    if stray:
        raise ComposerError(
            f"{where}: a tune range holds only 'tune' (and optionally 'start'), not {', '.join(stray)}; write it as {{tune: [lo, hi]}}."
        )
    bounds = data[MARK]
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(map(_is_number, bounds)) and bounds[0] < bounds[1]):
        raise ComposerError(
            f"{where}: 'tune' must be two finite numbers, low then high (low < high), like {{tune: [0, 1]}}; it is {bounds!r}."
        )
    what, domain = _domain_at(location, source_name, line)
    low, high = bounds
    if not (domain.holds(low) and domain.holds(high)):
        raise ComposerError(
            f"{where}: the range [{number_text(low)}, {number_text(high)}] leaves the domain of {what}, which takes "
            f"{domain.text()}; give a range inside it."
        )
    if domain.integer and not all(float(bound).is_integer() for bound in bounds):
        raise ComposerError(f"{where}: {what} is a whole number, so its range needs whole-number ends, not {bounds!r}.")
    start = data.get("start", (low + high) / 2)
    if not _is_number(start) or not low <= start <= high:
        raise ComposerError(
            f"{where}: 'start' must be a number inside the range [{number_text(low)}, {number_text(high)}], not {start!r}."
        )
    integer = domain.integer
    return TuneRange(location, line, low, high, round(start) if integer else start, integer, value_span(text, node))


def walk_nodes(node: yaml.Node, data, location: tuple, seen: set[int]):
    """(node, data, location) for every node, each node once (an alias repeats its anchor's node)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    yield node, data, location
    if _is_mark(node, data):  # its numbers are the range, not values to walk into
        return
    if isinstance(node, yaml.MappingNode) and isinstance(data, dict):
        for key, value in node.value:
            name = getattr(key, "value", None)
            if name != "<<" and name in data:
                yield from walk_nodes(value, data[name], location + (name,), seen)
    elif isinstance(node, yaml.SequenceNode) and isinstance(data, list):
        for index, (item, value) in enumerate(zip(node.value, data)):
            yield from walk_nodes(item, value, location + (index,), seen)


def _is_mark(node: yaml.Node, data) -> bool:
    return isinstance(node, yaml.MappingNode) and isinstance(data, dict) and MARK in data


def find_ranges(text: str, source_name: str) -> list[TuneRange]:
    """Every tune mark in the recipe text, checked against its parameter's domain, in the order written."""
    root, data = parse_yaml(text, source_name)
    if root is None:
        return []
    found = []
    for node, value, location in walk_nodes(root, data, (), set()):
        if _is_mark(node, value):
            found.append(
                _read_mark(
                    node, value, location, text, source_name, line_of(root, location) or node.start_mark.line + 1
                )
            )
    return sorted(found, key=lambda mark: mark.span)


def with_values(text: str, ranges: list[TuneRange], values: list[float]) -> str:
    """The recipe text with each range replaced by its value."""
    for mark, value in sorted(zip(ranges, values), key=lambda pair: pair[0].span, reverse=True):
        start, end = mark.span
        text = text[:start] + number_text(value) + text[end:]
    return text


def mark_everything(text: str, source_name: str) -> str:
    """--tune-all: every number of a merge's own parameters (weight, density, t, ...) given a range around itself,
    starting from itself. Marks already written stay as they are."""
    root, data = parse_yaml(text, source_name)
    if root is None:
        return text
    edits = []
    for node, value, location in walk_nodes(root, data, (), set()):
        if not isinstance(node, yaml.ScalarNode) or not _is_number(value) or "parameters" not in location:
            continue
        at = len(location) - 1 - location[::-1].index("parameters")
        name = location[at + 1] if at + 1 < len(location) else None
        if name not in TUNE_ALL or (location[-1] == "filter"):
            continue
        low, high = range_around(float(value), parameter_domain(name))
        if low < high:
            edits.append(
                (
                    value_span(text, node),
                    f"{{tune: [{number_text(low)}, {number_text(high)}], start: {number_text(value)}}}",
                )
            )
    for (start, end), replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text
