"""The model card (README.md) every output gets: parents, their licences, the method and the recipe."""

from __future__ import annotations

import json

import yaml

from composer import __version__
from composer.plan.model import Plan


def credit(identity: dict) -> str:
    """A parent as the card names it: its hub id (and revision) where known, else the reference it was given as."""
    if identity.get("hub_id"):
        revision = f" (revision {identity['revision'][:12]})" if identity.get("revision") else ""
        return f"[{identity['hub_id']}](https://huggingface.co/{identity['hub_id']}){revision}"
    return f"`{identity['model']}`"


def render_card(plan: Plan, name: str | None = None, provenance: dict | None = None) -> str:
    """`provenance`: the build's record (composer.provenance), whose parents' hub ids the card credits."""
    licences = {ref: plan.sources[ref].license() for ref in plan.parents if ref in plan.sources}
    identities = {parent["model"]: parent for parent in (provenance or {}).get("parents", [])}
    hub_ids = list(dict.fromkeys(identity["hub_id"] for identity in identities.values() if identity.get("hub_id")))
    front = {
        **({"base_model": hub_ids} if hub_ids else {}),
        "library_name": "transformers",
        "tags": ["composer", "merge"] + list(dict.fromkeys(method for _, method in plan.stages or [("", plan.method)])),
    }
    known = sorted({value for value in licences.values() if value})
    if len(known) == 1:
        front["license"] = known[0]
    text_config = plan.config.get("text_config")  # a vision-language model's language model
    text_config = text_config if isinstance(text_config, dict) and "num_hidden_layers" in text_config else plan.config
    layer_count = text_config.get("num_hidden_layers", text_config.get("n_layer"))
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
        named = credit(identities.get(ref, {"model": ref}))
        lines.append(f"- {named} (licence: {licence or 'not stated in its files; check the original model'})")
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
    if provenance is not None:
        lines += [
            "## Provenance",
            "",
            "Also in every weights file's header (`composer.provenance`); `compose trace` checks the weights against it.",
            "",
            "```json",
            json.dumps(provenance, indent=2, sort_keys=True),
            "```",
            "",
        ]
    return "\n".join(lines)
