"""SUSPECT as a mixture of experts: which candidate's MLP each expert is, which candidate the rest of each layer
(attention, norms) comes from, and the mergekit-moe recipe that rebuilds it. Routers are not recoverable from
weights alone (composer sets them from prompts), so the recipe's gates are random and say so."""

from __future__ import annotations

import re
from collections import Counter

import yaml

from composer.trace.recipe_text import DTYPE_NAMES
from composer.trace.recover import LayerFit, TensorFit

EXPERT = re.compile(r"\.experts\.(\d+)\.")
ROUTER = re.compile(r"\.(gate|router)\.weight$|shared_expert_gate")


def is_mixture(names) -> bool:
    return any(EXPERT.search(name) for name in names)


def moe_layer(layer: LayerFit) -> LayerFit:
    """The layer's line: each source's share of the layer's (non-router) tensors, the worst relative error."""
    counted = [fit for fit in layer.tensors if not ROUTER.search(fit.name)]
    shares = Counter(fit.sources[0] for fit in counted if fit.sources and fit.method in ("copy", "scale"))
    total = max(len(counted), 1)
    sources = [(reference, layer.layer, count / total) for reference, count in shares.most_common()]
    error = max((fit.relative_error for fit in counted), default=1.0)
    return LayerFit(layer.layer, "moe", sources, error, layer.tensors)


def _vote(fits: list[TensorFit]) -> str | None:
    votes = Counter(fit.sources[0] for fit in fits if fit.sources)
    return votes.most_common(1)[0][0] if votes else None


def moe_recipe_text(layers: list[LayerFit], config: dict, dtype) -> str:
    fits = [fit for layer in layers for fit in layer.tensors]
    base = _vote([fit for fit in fits if not EXPERT.search(fit.name) and not ROUTER.search(fit.name)])
    experts: dict[int, list[TensorFit]] = {}
    for fit in fits:
        found = EXPERT.search(fit.name)
        if found:
            experts.setdefault(int(found.group(1)), []).append(fit)
    recipe = {
        "base_model": base,
        "gate_mode": "random",
        "experts_per_token": int(config.get("num_experts_per_tok") or 2),
        "dtype": DTYPE_NAMES.get(dtype, "float32"),
        "experts": [{"source_model": _vote(experts[index])} for index in sorted(experts)],
    }
    note = (
        "# recovered by compose trace: a mixture of experts; the routers cannot be recovered from the weights,\n"
        "# so gate_mode is random: give each expert positive_prompts and gate_mode: hidden to route by content\n"
    )
    return note + yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None, width=120)
