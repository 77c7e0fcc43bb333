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
        "tags": ["composer", "merge", plan.method],
    }
    known = sorted({value for value in licences.values() if value})
    if len(known) == 1:
        front["license"] = known[0]
    layer_count = plan.config.get("num_hidden_layers", plan.config.get("n_layer"))
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        f"# {name or 'Merged model'}",
        "",
        f"Built with [composer](https://pypi.org/project/composer-merge/) {__version__} using the `{plan.method}` method, "
        f"with no training. It has {layer_count} layers and {len(plan.tensors)} tensors.",
        "",
        "## Parents",
        "",
    ]
    for ref in plan.parents:
        licence = licences.get(ref)
        lines.append(f"- `{ref}` (licence: {licence or 'not stated in its files; check the original model'})")
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
