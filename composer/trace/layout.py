"""A traced model: its source, and which of its tensors belong to which layer of its stack."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from composer.architecture import architecture_for
from composer.errors import ComposerError
from composer.sources import ModelSource, TensorInfo, open_source
from composer.trace.reading import RowReader
from composer.trace.unfused import unfused

NUMBERED = re.compile(r"^(.*?\.)(\d+)\.(.+)$")


@dataclass
class TracedModel:
    reference: str  # exactly as given on the command line
    source: ModelSource
    config: dict
    architecture: str
    layer_prefix: str  # "model.layers.{i}."
    layers: dict[int, dict[str, str]] = field(default_factory=dict)  # layer -> name within the layer -> full name
    outer: list[str] = field(default_factory=list)  # tensors before and after the stack (embeddings, final norm, head)
    reader: RowReader | None = None

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self.source.tensor_infos()

    @property
    def layer_count(self) -> int:
        return len(self.layers)

    def layer_of(self, name: str) -> int | None:
        for index, members in self.layers.items():
            if name in members.values():
                return index
        return None

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        self.source.close()


def _stack_prefix(names: list[str], config: dict, reference: str) -> tuple[str, str]:
    """(architecture name, layer prefix with {i}) from the architecture definition, else from the numbered names."""
    try:
        architecture = architecture_for(config, reference)
        return architecture.name, architecture.layer_prefix
    except ComposerError:
        pass
    counts: dict[str, int] = {}
    for name in names:
        match = NUMBERED.match(name)
        if match:
            counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    if not counts:
        return str(config.get("model_type") or "unknown"), ""
    prefix = max(counts, key=counts.get)
    return str(config.get("model_type") or "unknown"), prefix + "{i}."


def open_traced(reference: str, role: str) -> TracedModel:
    """Open `reference` (any model reference composer reads); `role` ("SUSPECT", "candidate") names it in errors."""
    try:
        source = open_source(reference)
    except ComposerError as error:
        raise ComposerError(f"The {role} '{reference}' cannot be read: {error}") from None
    try:
        config = source.config()
    except ComposerError as error:
        source.close()
        raise ComposerError(f"The {role} '{reference}' cannot be read: {error}") from None
    source = unfused(source, config)
    names = list(source.tensor_infos())
    if not names:
        source.close()
        raise ComposerError(f"The {role} '{reference}' holds no tensors; give a model with weights.")
    architecture, prefix = _stack_prefix(names, config, reference)
    model = TracedModel(reference, source, config, architecture, prefix, reader=RowReader(source))
    pattern = re.compile("^" + re.escape(prefix).replace(re.escape("{i}"), r"(\d+)") + "(.+)$") if prefix else None
    for name in names:
        match = pattern.match(name) if pattern else None
        if match:
            model.layers.setdefault(int(match.group(1)), {})[match.group(2)] = name
        else:
            model.outer.append(name)
    model.layers = dict(sorted(model.layers.items()))
    return model
