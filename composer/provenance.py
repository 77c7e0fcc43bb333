"""The provenance record of a build: who its parents are (hub id and revision where known, else the path, and their
weight files' header digests), composer's version and the recipe's digest. It goes into every weights file's header
(`composer.provenance`) and the model card, so that `compose trace` can compare what the weights say with it."""

from __future__ import annotations

import hashlib
import json

from composer import __version__
from composer.plan.model import Plan
from composer.sources.identity import PROVENANCE_KEY, model_identity


def is_conversion(plan: Plan) -> bool:
    """One model with every tensor as it was (a format or dtype conversion): such an output is its parent's copy."""
    return (
        plan.method == "passthrough"
        and len(plan.parents) == 1
        and all(len(tensor.inputs) == 1 and tensor.inputs[0].name == tensor.name for tensor in plan.tensors)
    )


def provenance_record(plan: Plan) -> dict:
    return {
        "composer_version": __version__,
        "recipe_sha256": hashlib.sha256(plan.recipe_text.encode()).hexdigest(),
        "method": plan.method,
        "conversion": is_conversion(plan),
        "parents": [
            model_identity(reference, plan.sources[reference])
            for reference in plan.parents
            if reference in plan.sources
        ],
    }


def shard_metadata(record: dict) -> dict[str, str]:
    return {PROVENANCE_KEY: json.dumps(record, sort_keys=True, separators=(",", ":"))}
