"""Runs on a Ray cluster of several nodes, simulated on this machine (ray.cluster_utils.Cluster, started once for the
module: a head without CPUs, node A carrying the Ray label `holds-a` and node B the custom resource `holds-b`, one CPU
each). Inputs placed on one node each (--ray-input-on) are read only there; units written on the nodes' own disks
(--ray-local-disk) are gathered by the driver in pieces; each unit opens only the input files it reads. Every output
is compared byte for byte with a run on this machine.

What is simulated, and how: all nodes are processes of this machine and see the same files. "Node B does not hold
model a" is asserted from the input files each node's processes opened (a Python audit hook on the workers): node B
never opens a file of a, and node A never one of b. "The nodes cannot reach OUT" is the test hook that makes the workers
act as if OUT's parent folder were not there; their own disk is a scratch folder only they write to.

Starting the three nodes takes 15-30 s on the shared 2-core machine, each node's first worker a few seconds more.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import pytest
from test_cli import tiny_tokenizer

from composer.compose import compose_text, merge_plan
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.execute import cluster as cluster_module
from composer.execute.cluster import CRASH_HOOK, HIDDEN_HOOK
from composer.execute.units import partition
from composer.recipe import parse_recipe
from helpers import reshard, save_tiny_model

pytestmark = pytest.mark.ray

SIZES = dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
SHARD = 1_000_000
UNIT = 400_000


def options(**changes) -> ExecutionOptions:
    return ExecutionOptions(**({"progress": False, "shard_size": SHARD, "unit_size": UNIT} | changes))


def digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def nodes():
    """{"a": node id, "b": node id} of a running three-node cluster this process is connected to."""
    import ray
    from ray.cluster_utils import Cluster

    store = dict(object_store_memory=80 << 20)
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=False, **store))
    try:
        cluster.add_node(num_cpus=1, labels={"holds-a": "yes"}, **store)
        cluster.add_node(num_cpus=1, resources={"holds-b": 1}, **store)
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
        found = {}
        for entry in ray.nodes():
            if "holds-a" in entry.get("Labels", {}):
                found["a"] = entry["NodeID"]
            if entry.get("Resources", {}).get("holds-b"):
                found["b"] = entry["NodeID"]
        yield found
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ray-node-models")
    made = {}
    for seed, name in enumerate("ab"):
        made[name] = save_tiny_model(root / name, layers=4, seed=seed, **SIZES)
        tiny_tokenizer(made[name])
        reshard(made[name], 4)
    return made


def stacked(models) -> str:
    """A frankenmerge: a's first two layers under b's last two (a's embeddings, b's head)."""
    return f"""merge_method: passthrough
slices:
  - sources: [{{model: {models['a']}, layer_range: [0, 2]}}]
  - sources: [{{model: {models['b']}, layer_range: [2, 4]}}]
dtype: bfloat16
"""


def ties(models) -> str:
    return f"""merge_method: ties
base_model: {models['a']}
models:
  - model: {models['b']}
    parameters: {{weight: 0.6, density: 0.5}}
dtype: bfloat16
"""


@pytest.fixture(scope="module")
def references(models, tmp_path_factory) -> dict[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("ray-node-references")
    found = {}
    for name, recipe in (("stacked", stacked), ("ties", ties)):
        compose_text(recipe(models), root / name, options())
        found[name] = digests(root / name)
    return found


def units_of(recipe: str, apart: frozenset[str] = frozenset()) -> dict[int, object]:
    plan = merge_plan(parse_recipe(recipe, "recipe"), recipe, None, "recipe")
    try:
        return {unit.number: unit for unit in partition(plan, SHARD, slots=2, unit_size=UNIT, apart=apart)}
    finally:
        plan.close()


def node_of(name: str, nodes: dict[str, str]) -> str:
    """Which of the fixture's nodes a report's node name ("ADDRESS [ID8]") is."""
    short = re.search(r"\[(\w{8})\]", name).group(1)
    return next(key for key, node_id in nodes.items() if node_id.startswith(short))


def files_of(model: Path) -> set[str]:
    return {str(path) for path in model.glob("*.safetensors")}


def test_units_reading_a_placed_model_run_only_on_the_node_that_holds_it(nodes, models, references, tmp_path):
    recipe = stacked(models)
    placed = {str(models["a"]): "holds-a", str(models["b"]): "holds-b"}
    report = compose_text(recipe, tmp_path / "out", options(ray="local", ray_inputs=placed))
    assert digests(tmp_path / "out") == references["stacked"]
    units = units_of(recipe, frozenset(placed))
    assert len(report.units) == len(units) > 4
    for record in report.units:
        unit = units[record.number]
        [model] = unit.models  # each unit reads one of the two models
        assert node_of(record.node, nodes) == Path(model).name
        assert record.opened and set(record.opened) <= set(unit.files)  # only the input files it reads
    opened = {node_of(summary.node, nodes): summary.opened for summary in report.nodes}
    assert opened["a"] and opened["a"] <= files_of(models["a"])  # checks, plan and units: never a file of b
    assert opened["b"] and opened["b"] <= files_of(models["b"])


def test_placements_that_cannot_run_are_refused_before_anything_is_written(nodes, models, tmp_path):
    apart = {str(models["a"]): "holds-a", str(models["b"]): "holds-b"}
    with pytest.raises(
        ComposerError, match=r"--ray-input-on: unit \d+ .* reads '\S+/a' and '\S+/b', and no node holds"
    ):
        compose_text(ties(models), tmp_path / "out", options(ray="local", ray_inputs=apart))
    with pytest.raises(ComposerError, match=r"no node of the cluster carries a label or custom resource 'holds-c'"):
        compose_text(ties(models), tmp_path / "out", options(ray="local", ray_inputs={str(models["a"]): "holds-c"}))
    with pytest.raises(ComposerError, match=r"the recipe reads no model '/nowhere'"):
        compose_text(ties(models), tmp_path / "out", options(ray="local", ray_inputs={"/nowhere": "holds-a"}))
    assert list(tmp_path.iterdir()) == []


def test_units_written_on_the_nodes_own_disks_are_gathered_into_the_output(
    nodes, models, references, tmp_path, tmp_path_factory, monkeypatch
):
    scratch = tmp_path_factory.mktemp("node-disk")
    monkeypatch.setenv(HIDDEN_HOOK, str(tmp_path))  # the workers cannot see OUT's folder
    with pytest.raises(ComposerError, match=r"not every node can reach .*--ray-local-disk DIR"):
        compose_text(ties(models), tmp_path / "out", options(ray="local"))
    monkeypatch.setattr(cluster_module, "GATHER_PIECE", 64_000)  # several pieces a unit, at most 4 asked for at once
    report = compose_text(ties(models), tmp_path / "out", options(ray="local", ray_local_disk=str(scratch)))
    assert digests(tmp_path / "out") == references["ties"]
    assert sum(summary.gathered for summary in report.nodes) == report.bytes_written
    assert {node_of(summary.node, nodes) for summary in report.nodes} == {"a", "b"}
    assert list(tmp_path.iterdir()) == [tmp_path / "out"] and list(scratch.iterdir()) == []


def test_a_failed_run_on_the_nodes_own_disks_leaves_nothing_complete_and_resumes(
    nodes, models, references, tmp_path, tmp_path_factory, monkeypatch
):
    scratch = tmp_path_factory.mktemp("node-disk")
    monkeypatch.setenv(HIDDEN_HOOK, str(tmp_path))
    last = max(units_of(ties(models)))
    monkeypatch.setenv(CRASH_HOOK, f"{last}:1:raise")  # the last unit fails after its first tensor
    local = dict(ray="local", ray_local_disk=str(scratch))
    with pytest.raises(ComposerError, match=rf"unit {last} .*failed 1 times"):
        compose_text(ties(models), tmp_path / "out", options(**local, unit_retries=0, keep_partial=True))
    [partial] = tmp_path.iterdir()
    assert partial.name.startswith(".out.partial-") and list(scratch.iterdir()) == []
    monkeypatch.delenv(CRASH_HOOK)
    report = compose_text(ties(models), tmp_path / "out", options(**local, resume="require"))
    assert digests(tmp_path / "out") == references["ties"]
    assert report.resumed > 0  # the driver checked the finished units' tensors and kept them
    assert len(report.units) < len(units_of(ties(models)))  # only the units not finished were run again
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]


def test_the_placement_options_are_checked_before_any_model_is_opened(tmp_path, monkeypatch, capsys):
    from helpers import compose_in_process

    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: passthrough\nslices:\n  - sources: [{model: /nowhere, layer_range: [0, 1]}]\n")
    out = tmp_path / "out"
    assert compose_in_process(monkeypatch, recipe, out, "--ray-input-on", "/nowhere=holds-a") == 2
    assert "error: --ray-input-on applies to a run on a Ray cluster: add --ray" in capsys.readouterr().err
    assert compose_in_process(monkeypatch, recipe, out, "--ray=127.0.0.1:9", "--ray-input-on", "holds-a") == 2
    assert "error: --ray-input-on 'holds-a' is not MODEL=NAME" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [recipe]
