"""A cluster's node fetches only the hub shards its units read: models it opens for the plan come from their config,
index and safetensors headers, and each weights file is fetched into the node's hub cache when one of its tensors is
first read. The hub is simulated here (no network): the snapshot in the cache holds the small files, the shards lie in
a folder standing for the hub, and fetching a file copies it from there (counted). A worker's unit runs in this process
through the worker's own code (composer.execute.worker.run_unit), with the files it opens recorded."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from composer import __version__
from composer.compose import merge_plan
from composer.execute import ExecutionOptions
from composer.execute.executor import plan_digest
from composer.execute.units import Unit
from composer.execute.worker import PlanOrder, UnitJob, forget_plan, run_unit
from composer.execute.writer import ShardedWriter, shard_layout
from composer.recipe import parse_recipe
from composer.safetensors_header import read_layout
from composer.sources import hub_headers, open_source, opened_on_a_node
from composer.sources.folder import read_index
from helpers import reshard, save_tiny_model

COMMIT = "c" * 40
SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub model 'org/tiny' of four shards: (its weight map, the files fetched so far, the snapshot folder)."""
    remote = save_tiny_model(tmp_path / "remote", layers=2, **SIZES)
    reshard(remote, 4)
    snapshot = tmp_path / "cache" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for path in remote.iterdir():
        if not path.name.endswith(".safetensors"):
            shutil.copy(path, snapshot / path.name)
    fetched: list[str] = []

    def fetch(reference, filename, commit):
        assert (reference, commit) == ("org/tiny", COMMIT)
        fetched.append(filename)
        return Path(shutil.copy(remote / filename, snapshot / filename))

    def layout(reference, filename, commit):
        header, start = read_layout(remote / filename)
        return header, start, (remote / filename).stat().st_size

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_headers, "download", lambda reference, repo_id, revision, patterns: snapshot)
    monkeypatch.setattr(hub_headers, "read_hub_layout", layout)
    monkeypatch.setattr(hub_headers, "fetch_hub_file", fetch)
    monkeypatch.chdir(tmp_path)
    return read_index(remote, "model.safetensors.index.json"), fetched, snapshot, remote


def test_a_node_fetches_a_hub_shard_only_when_a_tensor_of_it_is_read(hub):
    weight_map, fetched, _, remote = hub
    name = "model.layers.1.mlp.up_proj.weight"
    with opened_on_a_node():
        source = open_source("org/tiny")
    try:
        assert fetched == [] and name in source.tensor_infos()  # planned from the headers alone
        assert torch.equal(source.read(name), load_file(remote / weight_map[name])[name])
        source.read(name)
        assert fetched == [weight_map[name]]  # that shard, once
    finally:
        source.close()


def test_a_workers_unit_fetches_and_opens_only_the_shards_it_reads(hub, tmp_path):
    weight_map, fetched, snapshot, remote = hub
    recipe = (
        "merge_method: passthrough\nslices:\n  - sources: [{model: org/tiny, layer_range: [0, 2]}]\ndtype: float32\n"
    )
    options = ExecutionOptions(progress=False, shard_size=200_000)
    with opened_on_a_node():  # the driver's plan, without fetching any weights either
        plan = merge_plan(parse_recipe(recipe, "recipe"), recipe, None, "recipe")
    partial = tmp_path / "partial"
    partial.mkdir()
    try:
        ShardedWriter(partial, plan.tensors, options.shard_size, metadata=plan.shard_metadata).close()
        wanted = [weight_map[t.name] for t in plan.tensors]
        shard = wanted[len(wanted) // 2]  # a unit of the tensors read from one input shard
        tensors = tuple(t.name for t in plan.tensors if weight_map[t.name] == shard)
        unit = Unit(0, tensors, 0, 0, (str(snapshot / shard),), False, ("org/tiny",))
        order = PlanOrder(plan.replay, plan_digest(plan, options), dict(plan.shard_metadata), os.getcwd(), __version__)
        result = run_unit(UnitJob(order, options, str(partial), "identity", unit, 1, {}))
    finally:
        plan.close()
        forget_plan()
    assert fetched == [shard]
    # (the stand-in hub's own file is opened too, by the fetch that copies it)
    assert [path for path in result.opened if not path.startswith(str(remote))] == [str(snapshot / shard)]
    expected = load_file(remote / shard)
    for file_name, members in shard_layout(plan.tensors, options.shard_size):
        with safe_open(partial / file_name, "pt") as written:
            for member in members:
                if member.name in tensors:
                    assert torch.equal(written.get_tensor(member.name), expected[member.name])
