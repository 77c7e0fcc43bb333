"""Every output records its parents (hub id and revision where known, else the path, and their weight files'
header digests), composer's version and the recipe's digest, in each weights file's header and in its card."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from composer.compose import compose_text
from composer.execute import ExecutionOptions
from composer.safetensors_header import read_header
from composer.sources import open_source
from composer.sources.digests import header_digest, source_digests
from composer.sources.identity import PROVENANCE_KEY, hub_snapshot, recorded_provenance
from helpers import save_fine_tune, save_tiny_model

QUIET = ExecutionOptions(progress=False)


def linear(first, second) -> str:
    return (
        f"merge_method: linear\nmodels:\n  - model: {first}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {second}\n    parameters: {{weight: 0.7}}\n"
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("provenance")
    base = save_tiny_model(root / "base")
    # a hub snapshot as huggingface_hub lays it out in its cache
    snapshot = root / "hub" / "models--someorg--tiny-ft" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.parent.mkdir(parents=True)
    save_fine_tune(base, snapshot, seed=1)
    return {"base": base, "hub": snapshot}


def test_every_weights_file_records_the_parents_and_the_recipe(models, tmp_path):
    recipe = linear(models["base"], models["hub"])
    out = tmp_path / "out"
    compose_text(recipe, out, ExecutionOptions(progress=False, shard_size=40_000))
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    records = [json.loads(read_header(shard)["__metadata__"][PROVENANCE_KEY]) for shard in shards]
    assert all(record == records[0] for record in records)
    record = records[0]
    assert record["recipe_sha256"] == hashlib.sha256((out / "composer-recipe.yml").read_bytes()).hexdigest()
    assert record["method"] == "linear" and record["conversion"] is False
    base, hub = record["parents"]
    assert (
        base["model"] == str(models["base"])
        and base["hub_id"] is None
        and base["path"] == str(models["base"].resolve())
    )
    assert hub["hub_id"] == "someorg/tiny-ft" and hub["revision"] == "0123456789abcdef0123456789abcdef01234567"
    for parent, folder in ((base, models["base"]), (hub, models["hub"])):
        assert parent["weights"] == source_digests(open_source(str(folder)))
        assert parent["weights"][0]["header_sha256"] == header_digest(folder / "model.safetensors")
    assert read_header(shards[0])["__metadata__"]["format"] == "pt"


def test_the_card_credits_hub_ids_and_embeds_the_record(models, tmp_path):
    out = tmp_path / "out"
    compose_text(linear(models["base"], models["hub"]), out, QUIET)
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert (
        "base_model:\n- someorg/tiny-ft\n" in front and str(models["base"]) not in front
    )  # the hub's field takes hub ids only
    assert "[someorg/tiny-ft](https://huggingface.co/someorg/tiny-ft) (revision 0123456789ab)" in card
    assert f"- `{models['base']}`" in card
    embedded = json.loads(card.split("## Provenance")[1].split("```json")[1].split("```")[0])
    assert embedded == recorded_provenance(out / "model.safetensors")


def test_a_conversion_passes_its_parents_hub_id_on(models, tmp_path):
    """A copy of one model with every tensor as it was (a dtype conversion) is that model: what is built from the
    copy credits the original's hub id, as the demo credits SmolLM2's."""
    copy = tmp_path / "copy"
    compose_text(f"merge_method: passthrough\nmodels:\n  - model: {models['hub']}\ndtype: bfloat16\n", copy, QUIET)
    record = recorded_provenance(copy / "model.safetensors")
    assert record["conversion"] is True
    out = tmp_path / "out"
    compose_text(linear(models["base"], copy), out, QUIET)
    parents = recorded_provenance(out / "model.safetensors")["parents"]
    assert parents[1]["model"] == str(copy) and parents[1]["hub_id"] == "someorg/tiny-ft"
    assert parents[1]["revision"] == "0123456789abcdef0123456789abcdef01234567"


def test_a_blend_is_no_conversion_and_passes_no_hub_id_on(models, tmp_path):
    blend = tmp_path / "blend"
    compose_text(linear(models["hub"], models["hub"]), blend, QUIET)
    assert recorded_provenance(blend / "model.safetensors")["conversion"] is False
    out = tmp_path / "out"
    compose_text(linear(models["base"], blend), out, QUIET)
    assert recorded_provenance(out / "model.safetensors")["parents"][1]["hub_id"] is None


def test_a_hub_snapshot_is_recognised_only_in_the_caches_layout(tmp_path):
    assert hub_snapshot(tmp_path / "models--a--b" / "snapshots" / "abc" / "sub") == ("a/b", "abc")
    assert hub_snapshot(tmp_path / "models--a--b") is None
    assert hub_snapshot(tmp_path / "models" / "snapshots" / "abc") is None


def test_a_stripped_or_foreign_header_records_nothing(models, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(models["base"], folder)
    assert recorded_provenance(folder / "model.safetensors") is None


def test_fine_tunes_saved_alike_share_header_digests_but_not_samples(models, tmp_path):
    """The header digest names the layout; the sample of tensor bytes tells fine-tunes of one base apart."""
    from composer.sources.digests import file_digests

    first = save_fine_tune(models["base"], tmp_path / "first", seed=5)
    second = save_fine_tune(models["base"], tmp_path / "second", seed=6)
    one, two = file_digests(first / "model.safetensors"), file_digests(second / "model.safetensors")
    assert one["header_sha256"] == two["header_sha256"]
    assert one["sample_sha256"] != two["sample_sha256"]
    assert file_digests(first / "model.safetensors") == one
