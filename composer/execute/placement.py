"""Which nodes of a cluster hold which input models (`--ray-input-on MODEL=NAME`), and so where each unit may run.

A model placed with NAME is held by the nodes that carry NAME as a Ray node label (`ray start --labels NAME=...`) or
a custom resource (`ray start --resources '{"NAME": 1}'`); a model not placed is on storage every node reads (or each
node's hub cache). A unit runs only on a node that holds every model it reads. Nothing here knows of Ray.
"""

from __future__ import annotations

from pathlib import Path

from composer.errors import ComposerError
from composer.execute.units import Unit
from composer.plan.model import Plan


def parse_placement(texts: list[str]) -> dict[str, str]:
    """`--ray-input-on MODEL=NAME` options as {MODEL: NAME} (a model's path may hold '=': the last one splits)."""
    placed: dict[str, str] = {}
    for text in texts:
        model, equals, name = text.rpartition("=")
        if not equals or not model.strip() or not name.strip():
            raise ComposerError(
                f"--ray-input-on '{text}' is not MODEL=NAME: give the model as the recipe names it, then the Ray node "
                "label or custom resource that the nodes holding it carry, e.g. --ray-input-on /data/llama-a=holds-llama-a."
            )
        placed[model.strip()] = name.strip()
    return placed


def node_tags(labels: dict | None, resources: dict | None) -> set[str]:
    """The names a node carries: its labels' keys and its custom resources (a model placed with one is there)."""
    return set(labels or {}) | {name for name, amount in (resources or {}).items() if amount and amount > 0}


def placed_models(plan: Plan, rules: dict[str, str]) -> dict[str, str]:
    """{reference as the plan names it: NAME} for each rule; a model the plan does not read is an error."""
    placed = {}
    for model, name in rules.items():
        placed[_reference_in(plan, model)] = name
    return placed


def _reference_in(plan: Plan, model: str) -> str:
    if model in plan.sources:
        return model
    wanted = Path(model).expanduser().resolve()
    for reference, source in plan.sources.items():
        where = getattr(source, "folder", None) or getattr(source, "path", None)
        if isinstance(where, Path) and where.resolve() == wanted:
            return reference
    read = ", ".join(sorted(plan.sources))
    raise ComposerError(
        f"--ray-input-on {model}=...: the recipe reads no model '{model}' (it reads {read}); name a model as the "
        "recipe does, or by its folder."
    )


def lacking(placed: dict[str, str], tags: set[str]) -> frozenset[str]:
    """The placed models a node with these names does not hold."""
    return frozenset(reference for reference, name in placed.items() if name not in tags)


def runs_on(unit: Unit, lacks: frozenset[str]) -> bool:
    return not lacks.intersection(unit.models)


def check_placed(placed: dict[str, str], units: list[Unit], lacks_of_nodes: list[frozenset[str]]) -> None:
    """Every placed model is held by some node, and every unit can run on some node (one that holds all it reads)."""
    for reference, name in placed.items():
        if all(reference in lacks for lacks in lacks_of_nodes):
            raise ComposerError(
                f"--ray-input-on {reference}={name}: no node of the cluster carries a label or custom resource '{name}' "
                f"(and a CPU to run units), so no node holds '{reference}'. Start the nodes that hold it with "
                f"`ray start ... --labels {name}=1` (or --resources '{{\"{name}\": 1}}'), or leave it out of --ray-input-on "
                "if every node can read it."
            )
    for unit in units:
        if not any(runs_on(unit, lacks) for lacks in lacks_of_nodes):
            models = [model for model in unit.models if model in placed]
            raise ComposerError(
                f"--ray-input-on: {unit.describe()} reads {' and '.join(repr(model) for model in models)}, and no node "
                "holds all of them; put those models on the same nodes (or on storage every node reads). Nothing was "
                "written."
            )
