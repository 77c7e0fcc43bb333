"""The provenance record composer writes into its outputs, read back and checked against the weights.

Every safetensors shard composer writes carries `composer.provenance` in its `__metadata__`: JSON naming the
composer version, the recipe's digest and each parent with the header digests of its weight files. The trace
reads it from SUSPECT's first weights file, pairs each recorded parent with the candidate whose weight files have
the same header digests (and the samples of their tensor bytes; where a record has header digests only, fine-tunes saved alike share
them, and the recorded path or hub id breaks the tie),
and says whether those are exactly the candidates the weights call parents. A record
can be stripped or forged, so nothing else in the trace reads it."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

from composer.errors import ComposerError
from composer.safetensors_header import read_header
from composer.sources.digests import source_digests, weight_files_of
from composer.trace.layout import TracedModel

METADATA_KEY = "composer.provenance"


@dataclass
class Provenance:
    recorded: bool
    agrees: bool | None = None
    composer_version: str | None = None
    recipe_sha256: str | None = None
    parents: list[dict] = field(default_factory=list)  # as recorded, each with "matched": a candidate reference or None
    note: str = ""

    def as_json(self) -> dict:
        found: dict = {"recorded": self.recorded, "agrees": self.agrees}
        if self.recorded:
            found.update(composer_version=self.composer_version, recipe_sha256=self.recipe_sha256, parents=self.parents)
        if self.note:
            found["note"] = self.note
        return found

    def lines(self) -> list[str]:
        if not self.recorded:
            return [
                f"provenance record: none{' (' + self.note + ')' if self.note else ''}; the verdicts rest on the weights alone"
            ]
        shown = {
            True: "the weights agree with it",
            False: "the weights DO NOT agree with it",
            None: "nothing to compare",
        }[self.agrees]
        lines = [
            f"provenance record: written by composer {self.composer_version}, recipe sha256 {str(self.recipe_sha256)[:12]}...; {shown}"
        ]
        for parent in self.parents:
            where = parent.get("hub_id") or parent.get("path") or parent.get("model")
            matched = f"= candidate {parent['matched']}" if parent.get("matched") else "matches no candidate"
            if parent.get("ambiguous"):
                matched = f"its header digests equal those of {', '.join(parent['ambiguous'])}"
            lines.append(f"  recorded parent {parent.get('model')} ({where}): {matched}")
        return lines


def read_record(suspect: TracedModel) -> tuple[dict | None, str]:
    """The record in SUSPECT's first safetensors file, and why there is none."""
    paths = sorted(weight_files_of(suspect.source), key=lambda path: path.name)
    if not paths or paths[0].suffix != ".safetensors":
        return None, "SUSPECT's weights are not safetensors"
    try:
        metadata = read_header(paths[0]).get("__metadata__") or {}
    except ComposerError:
        return None, "SUSPECT's header cannot be read"
    text = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    if text is None:
        return None, ""
    try:
        record = json.loads(text)
    except (TypeError, ValueError):
        return None, f"'{METADATA_KEY}' in {paths[0].name} is not JSON"
    if not isinstance(record, dict) or not isinstance(record.get("parents"), list):
        return None, f"'{METADATA_KEY}' in {paths[0].name} has no list of parents"
    return record, ""


def _digests(entries, sampled: bool = True) -> Counter:
    """The weight files' digests; `sampled`: with their tensor-byte samples (records of composer 0.1.0 before
    they were added have headers only)."""
    return Counter(
        (entry.get("header_sha256"), entry.get("sample_sha256") if sampled else None)
        for entry in entries or []
        if isinstance(entry, dict)
    )


def _names(model: TracedModel, parent: dict) -> bool:
    """Whether the record's path or hub id for `parent` names `model`."""
    if parent.get("hub_id") and model.reference.split("@")[0] == parent["hub_id"]:
        return True
    where = getattr(model.source, "folder", None) or getattr(model.source, "path", None)
    recorded = parent.get("path")
    return bool(recorded and where is not None and os.path.realpath(str(where)) == os.path.realpath(str(recorded)))


def check_provenance(suspect: TracedModel, candidates: list[TracedModel], parents: set[str]) -> Provenance:
    """The record, each recorded parent matched to a candidate by its weight files' header digests, and whether
    the matched candidates are exactly `parents` (the candidates the weight analysis calls parents)."""
    record, note = read_record(suspect)
    if record is None:
        return Provenance(False, note=note)
    theirs = {}
    for model in candidates:
        try:
            theirs[model.reference] = source_digests(model.source)
        except (ComposerError, OSError):
            continue
    listed = []
    for parent in record["parents"]:
        parent = dict(parent) if isinstance(parent, dict) else {"model": str(parent)}
        sampled = any(isinstance(entry, dict) and entry.get("sample_sha256") for entry in parent.get("weights") or [])
        recorded = _digests(parent.get("weights"), sampled)
        equal = [
            reference for reference, digests in theirs.items() if recorded and _digests(digests, sampled) == recorded
        ]
        named = [model.reference for model in candidates if model.reference in equal and _names(model, parent)]
        if len(equal) > 1 and len(named) == 1:
            equal = named  # fine-tunes saved alike have equal headers: the recorded path or hub id tells them apart
        parent["matched"] = equal[0] if equal else None
        if len(equal) > 1:
            parent["ambiguous"] = equal
        listed.append(parent)
    matched = {parent["matched"] for parent in listed if parent["matched"]}
    return Provenance(True, matched == parents, record.get("composer_version"), record.get("recipe_sha256"), listed)
