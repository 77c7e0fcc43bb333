"""Runs on a Ray cluster (a local instance with two worker slots, started once for the module): the output is
byte-identical to a run on this machine for a passthrough upscale, a TIES merge and an MoE with hidden-state gates
(a chain of steps: one unit of its own), also when a worker dies in the middle of a unit and when a run that failed
is resumed; unreachable addresses, inputs the workers cannot read and an OUT they cannot reach are refused with the
node and the file named, before anything is written, and nothing that looks complete is left.

The Ray instance takes 20-40 s to start on the shared 2-core machine and each worker a few seconds to import torch;
the runs themselves take seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import pytest
from test_cli import tiny_tokenizer

from composer.cli import with_ray_address
from composer.compose import compose_moe_text, compose_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.execute.cluster import CRASH_HOOK, HIDDEN_HOOK
from composer.execute.units import partition
from helpers import compose_in_process, save_tiny_model

pytestmark = pytest.mark.ray

SIZES = dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
SHARD = 1_000_000  # bytes: several shards, so several units


def options(**changes) -> ExecutionOptions:
    return ExecutionOptions(**({"progress": False, "shard_size": SHARD} | changes))


def digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def nothing_left(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.iterdir())


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=80 << 20,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ray-models")
    made = {name: save_tiny_model(root / name, layers=4, seed=seed, **SIZES) for seed, name in enumerate("xab")}
    for folder in made.values():
        tiny_tokenizer(folder)
    return made


def upscale(models) -> str:
    return f"""merge_method: passthrough
slices:
  - sources: [{{model: {models['x']}, layer_range: [0, 3]}}]
  - sources: [{{model: {models['x']}, layer_range: [1, 4]}}]
dtype: bfloat16
"""


def ties(models) -> str:
    return f"""merge_method: ties
base_model: {models['x']}
models:
  - model: {models['a']}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {models['b']}
    parameters: {{weight: 0.4, density: 0.7}}
dtype: bfloat16
"""


def moe(models) -> str:
    prompts = [["the quick brown fox", "a fox jumps over"], ["the lazy dog sleeps", "dogs bark at the moon"]]
    lines = [f"base_model: {models['x']}", "gate_mode: hidden", "experts_per_token: 2", "dtype: float32", "experts:"]
    for name, expert_prompts in zip("ab", prompts):
        lines += [f"  - source_model: {models[name]}", f"    positive_prompts: {json.dumps(expert_prompts)}"]
    return "\n".join(lines) + "\n"


RECIPES = {"passthrough upscale": (upscale, compose_text), "ties": (ties, compose_text), "moe": (moe, compose_moe_text)}


@pytest.fixture(scope="module")
def references(models, tmp_path_factory) -> dict[str, dict[str, str]]:
    """Each recipe's output digests from a run on this machine."""
    root = tmp_path_factory.mktemp("ray-references")
    found = {}
    for name, (recipe, compose) in RECIPES.items():
        compose(recipe(models), root / name, options())
        found[name] = digests(root / name)
    return found


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_run_on_two_workers_writes_the_bytes_of_a_run_here(cluster, models, references, name, tmp_path):
    recipe, compose = RECIPES[name]
    # TIES also splits its shards into runs of tensors, so two workers write into one shard file at once
    unit_size = 300_000 if name == "ties" else None
    report = compose(recipe(models), tmp_path / "out", options(ray="local", unit_size=unit_size))
    assert digests(tmp_path / "out") == references[name]
    assert len(report.units) > 2 and report.retried == 0
    assert sum(node.bytes_written for node in report.nodes) == report.bytes_written
    assert nothing_left(tmp_path) == ["out"]


def test_the_command_line_runs_on_the_cluster_and_says_what_each_node_did(
    cluster, models, references, tmp_path, monkeypatch, capsys
):
    recipe = tmp_path / "ties.yml"
    recipe.write_text(ties(models))
    code = compose_in_process(monkeypatch, recipe, tmp_path / "out", "--shard-size", SHARD, "--no-progress", "--ray")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert re.search(r"wrote \d+ tensors .* on 1 Ray node \(\d+ units\)", captured.out)
    assert re.search(r"note: node \S+.*: \d+ units, read [\d.]+ MB, wrote [\d.]+ MB, [\d.]+ s of work", captured.err)
    weights = {name: digest for name, digest in references["ties"].items() if name.startswith("model")}
    assert {name: digest for name, digest in digests(tmp_path / "out").items() if name.startswith("model")} == weights


@pytest.mark.parametrize("where", ["local", None], ids=["on the cluster", "on this machine"])
def test_a_failed_run_resumes_from_its_finished_units(cluster, models, references, tmp_path, monkeypatch, where):
    recipe = ties(models)
    last = len(partition_of(recipe, models)) - 1
    monkeypatch.setenv(CRASH_HOOK, f"{last}:1:raise")  # the last unit fails after its first tensor
    with pytest.raises(ComposerError, match=rf"unit {last} .*failed 1 times"):
        compose_text(recipe, tmp_path / "out", options(ray="local", unit_retries=0, keep_partial=True))
    assert not (tmp_path / "out").exists()
    [partial] = tmp_path.iterdir()
    assert partial.name.startswith(".out.partial-")
    monkeypatch.delenv(CRASH_HOOK)
    report = compose_text(recipe, tmp_path / "out", options(ray=where, resume="require"))
    assert digests(tmp_path / "out") == references["ties"]
    assert report.resumed > 0  # the finished units' tensors were checked and kept, not written again
    assert nothing_left(tmp_path) == ["out"]


def partition_of(recipe: str, models) -> list:
    from composer.compose import merge_plan
    from composer.recipe import parse_recipe

    plan = merge_plan(parse_recipe(recipe, "recipe"), recipe, None, "recipe")
    try:
        return partition(plan, SHARD, slots=2)
    finally:
        plan.close()


def test_inputs_a_node_cannot_read_are_named_before_anything_is_written(cluster, models, tmp_path, monkeypatch):
    monkeypatch.setenv(HIDDEN_HOOK, str(models["b"]))  # the workers act as if b's folder were not there
    with pytest.raises(ComposerError, match=r"node \S+ .*cannot read \S*/b/model\.safetensors \(No such file"):
        compose_text(ties(models), tmp_path / "out", options(ray="local"))
    assert nothing_left(tmp_path) == []


def test_an_output_the_nodes_cannot_reach_is_refused_and_nothing_is_left(cluster, models, tmp_path, monkeypatch):
    monkeypatch.setenv(HIDDEN_HOOK, str(tmp_path))
    with pytest.raises(ComposerError, match=r"the output \S+/out is on storage that not every node can reach"):
        compose_text(ties(models), tmp_path / "out", options(ray="local"))
    assert nothing_left(tmp_path) == []


def test_an_address_where_no_cluster_answers_is_refused_at_once(models, tmp_path):
    with pytest.raises(ComposerError, match=r"--ray 127\.0\.0\.1:9: no Ray cluster can be reached there"):
        compose_text(ties(models), tmp_path / "out", options(ray="127.0.0.1:9"))
    with pytest.raises(ComposerError, match=r"--ray 'nowhere' is not a Ray address"):
        compose_text(ties(models), tmp_path / "out", options(ray="nowhere"))
    assert nothing_left(tmp_path) == []


def test_without_ray_installed_the_error_says_how_to_install_it(models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    with pytest.raises(ComposerError, match=r"--ray needs Ray, .*pip install 'composer-merge\[ray\]'"):
        compose_text(ties(models), tmp_path / "out", options(ray="local"))
    assert nothing_left(tmp_path) == []


def test_ray_alone_starts_a_local_instance_and_an_address_after_it_is_taken():
    assert with_ray_address(["r.yml", "out", "--ray"]) == ["r.yml", "out", "--ray=local"]
    assert with_ray_address(["r.yml", "--ray", "out"]) == ["r.yml", "--ray=local", "out"]
    assert with_ray_address(["r.yml", "--ray", "--force"]) == ["r.yml", "--ray=local", "--force"]
    assert with_ray_address(["r.yml", "out", "--ray", "10.0.0.5:6379"]) == ["r.yml", "out", "--ray", "10.0.0.5:6379"]
    assert with_ray_address(["--ray", "auto", "r.yml"]) == ["--ray", "auto", "r.yml"]


def test_units_cover_every_tensor_once_and_keep_a_chain_whole(models):
    from composer.compose import moe_plan
    from composer.moe.schema import parse_moe_config

    text = moe(models)
    plan = moe_plan(parse_moe_config(text, "recipe"), text, None)
    try:
        units = partition(plan, SHARD, slots=2, unit_size=200_000)
        names = [name for unit in units for name in unit.tensors]
        assert sorted(names) == sorted(t.name for t in plan.tensors)
        chained = {t.name for t in plan.tensors if t.operation.chain is not None}
        [chain_unit] = [unit for unit in units if unit.chained]
        assert chained and set(chain_unit.tensors) == chained
        sizes = {t.name: t.nbytes for t in plan.tensors}
        assert all(unit.nbytes <= 200_000 or len(unit.tensors) == 1 for unit in units if not unit.chained)
        assert all(unit.nbytes == sum(sizes[name] for name in unit.tensors) for unit in units)
        assert all(os.path.isfile(path) for unit in units for path in unit.files)
    finally:
        plan.close()


def test_a_worker_killed_in_the_middle_of_a_unit_is_replaced_and_the_bytes_are_the_same(
    cluster, models, references, tmp_path, monkeypatch
):  # last: the worker Ray starts in place of the one killed is not waited for by another test
    monkeypatch.setenv(CRASH_HOOK, "1:2")  # unit 1's first try ends its process after its second tensor
    report = compose_text(ties(models), tmp_path / "out", options(ray="local"))
    assert digests(tmp_path / "out") == references["ties"]
    assert report.retried == 1 and sum(node.failures for node in report.nodes) == 1
    assert nothing_left(tmp_path) == ["out"]
