"""The model card (README.md) every output gets: parents, their licences, the method and the recipe."""

from __future__ import annotations

import yaml

from composer import __version__
from composer.plan.model import Plan


def render_card(plan: Plan, name: str | None = None) -> str:
    licences = {ref: plan.sources[ref].license() for ref in plan.parents if ref in plan.sources}
    front = {
        "base_model": plan.parents,
        "library_name": "transformers",
        "tags": ["composer", "merge"] + list(dict.fromkeys(method for _, method in plan.stages or [("", plan.method)])),
    }
    known = sorted({value for value in licences.values() if value})
    if len(known) == 1:
        front["license"] = known[0]
    layer_count = plan.config.get("num_hidden_layers", plan.config.get("n_layer"))
    how = f"in {len(plan.stages)} stages" if plan.stages else f"using the `{plan.method}` method"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        f"# {name or 'Merged model'}",
        "",
        f"Built with [composer](https://pypi.org/project/composer-merge/) {__version__} {how}, "
        f"with no training. It has {layer_count} layers and {len(plan.tensors)} tensors.",
        "",
        "## Parents",
        "",
    ]
    for ref in plan.parents:
        licence = licences.get(ref)
        lines.append(f"- `{ref}` (licence: {licence or 'not stated in its files; check the original model'})")
    if plan.stages:
        lines += ["", "## Stages", "", "Computed in one pass; no intermediate model was written.", ""]
        lines += [f"{number}. `{name}`: {method}" for number, (name, method) in enumerate(plan.stages, 1)]
    lines += [
        "",
        "The output inherits its parents' licences and terms of use.",
        "",
        "## Recipe",
        "",
        "```yaml",
        plan.recipe_text.strip(),
        "```",
        "",
    ]
    return "\n".join(lines)
