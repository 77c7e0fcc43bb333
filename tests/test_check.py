"""`compose check RECIPE` (issue 19): a recipe planned from its models' configs and safetensors headers alone. Hub
models come from a stand-in hub on 127.0.0.1 (tests/fake_hub.py) that counts every byte it sends, so the tests
can say that only config files and headers were fetched, never tensor data."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from composer.check import check_recipe
from composer.errors import ComposerError
from fake_hub import FakeHub, commit_of, use_fake_hub
from helpers import (
    BYTE_LEVEL_SPECIAL,
    byte_level_tokenizer,
    compose_in_process,
    load_state,
    save_fine_tune,
    save_tiny_model,
    save_tokenizer,
)

BUDGET = 1 << 30


def reshard(folder: Path, shards: int) -> Path:
    """The folder's model.safetensors split into `shards` files with an index, as large checkpoints are stored."""
    state = load_state(folder)
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    weight_map = {}
    for number in range(shards):
        file = f"model-{number + 1:05d}-of-{shards:05d}.safetensors"
        save_file({name: state[name] for name in names[number::shards]}, str(folder / file), metadata={"format": "pt"})
        weight_map |= {name: file for name in names[number::shards]}
    total = sum(tensor.nbytes for tensor in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def header_bytes(folder: Path) -> int:
    """What reading every safetensors header of `folder` takes: each file's 8-byte length and its header."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as handle:
            total += 8 + struct.unpack("<Q", handle.read(8))[0]
    return total


@pytest.fixture(scope="module")
def repositories(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("check-hub")
    base = save_tiny_model(root / "base", layers=4, seed=0)
    save_tokenizer(byte_level_tokenizer(300), base, **BYTE_LEVEL_SPECIAL)  # the fine-tunes copy it
    a = save_fine_tune(base, root / "a", seed=1)
    b = save_fine_tune(base, root / "b", seed=2)
    v2 = save_fine_tune(base, root / "v2", seed=3)
    wide = save_tiny_model(root / "wide", layers=4, seed=4, intermediate_size=96)
    reshard(base, 3)
    bin_only = root / "bin-only"
    bin_only.mkdir()
    (bin_only / "config.json").write_text((base / "config.json").read_text())
    torch.save(load_state(a), bin_only / "pytorch_model.bin")
    return {"base": base, "a": a, "b": b, "v2": v2, "wide": wide, "bin-only": bin_only}


@pytest.fixture()
def hub(repositories, tmp_path: Path, monkeypatch):
    served = FakeHub(
        {
            "org/base": {"main": repositories["base"], "v2": repositories["v2"]},
            "org/a": {"main": repositories["a"]},
            "org/b": {"main": repositories["b"]},
            "org/wide": {"main": repositories["wide"]},
            "org/bin-only": {"main": repositories["bin-only"]},
        }
    )
    use_fake_hub(monkeypatch, served, tmp_path / "hub-cache")
    monkeypatch.chdir(tmp_path)  # no local folder is named like a hub id
    with served.running():
        yield served


def write_recipe(folder: Path, text: str) -> Path:
    path = folder / "recipe.yml"
    path.write_text(text)
    return path


TIES = """merge_method: ties
base_model: org/base
models:
  - model: org/a
    parameters: {weight: 0.5, density: 0.5}
  - model: MODEL
    parameters: {weight: 0.5, density: 0.5}
dtype: bfloat16
"""


def test_check_reads_only_configs_and_headers_from_the_hub_and_reports_the_run(hub, repositories, tmp_path: Path):
    report = check_recipe(write_recipe(tmp_path, TIES.replace("MODEL", "org/b")), BUDGET)

    # every byte of weights sent was a header: each file's 8-byte length, then exactly its header
    assert hub.file_bytes(".safetensors") == sum(header_bytes(repositories[name]) for name in ("base", "a", "b"))
    assert all(wanted is not None for _, name, wanted in hub.ranges if name.endswith(".safetensors"))
    assert not list((tmp_path / "hub-cache").rglob("*.safetensors"))

    downloads = sum(p.stat().st_size for name in ("base", "a", "b") for p in repositories[name].glob("*.safetensors"))
    state = load_state(repositories["base"])
    out_bytes = sum(tensor.numel() * 2 for tensor in state.values())  # bf16
    lines = report.splitlines()
    assert lines[0].endswith("method ties")
    assert (
        f"org/base: hub, commit {commit_of('org/base', 'main')[:12]}: only the headers of its 3 weights files" in report
    )
    assert "only the headers of its 1 weights file were fetched" in report  # org/a, org/b: one model.safetensors
    assert f"the merge reads {len(state)} of its {len(state)} tensors" in report
    assert f"  {len(state)} tensors, " in report and f"({len(state)} bfloat16)" in report
    assert "config: architectures ['LlamaForCausalLM'], model_type 'llama', num_hidden_layers 4" in report
    assert "config changes from 'org/base': dtype: 'float32' -> 'bfloat16'" in report
    assert "tokenizer from: org/base" in report
    assert lines[-1].startswith("ok: a run would download ")
    from composer.plan.show import format_bytes

    assert f"download {format_bytes(downloads)} from the hub" in lines[-1]
    assert f"write {format_bytes(out_bytes)}" in lines[-1]


def test_check_of_an_moe_recipe_fetches_the_tokenizer_and_headers_only(hub, repositories, tmp_path: Path):
    text = """base_model: org/base
gate_mode: hidden
experts_per_token: 2
experts:
  - source_model: org/a
    positive_prompts: ["def main(): return 0"]
  - source_model: org/b
    positive_prompts: ["Roses are red, violets are blue"]
"""
    report = check_recipe(write_recipe(tmp_path, text), BUDGET)
    assert "model_type 'mixtral'" in report and report.splitlines()[-1].startswith("ok: ")
    assert hub.file_bytes(".safetensors") == sum(header_bytes(repositories[name]) for name in ("base", "a", "b"))
    assert ("org/base", "tokenizer.json") in hub.served  # the prompts are tokenized while planning


def test_check_reports_an_incompatible_model_from_its_headers(hub, repositories, tmp_path: Path):
    with pytest.raises(ComposerError) as caught:
        check_recipe(write_recipe(tmp_path, TIES.replace("MODEL", "org/wide")), BUDGET)
    message = str(caught.value)
    assert "'model.layers.0.mlp.down_proj.weight'" in message or "'model.layers.0.mlp.gate_proj.weight'" in message
    assert "in model 'org/wide'" in message and "shapes agree" in message
    assert hub.file_bytes(".safetensors") == sum(header_bytes(repositories[name]) for name in ("base", "a", "wide"))


def test_check_names_every_model_it_cannot_open(hub, tmp_path: Path):
    text = TIES.replace("org/a", "org/missing-one").replace("MODEL", "org/missing-two")
    with pytest.raises(ComposerError) as caught:
        check_recipe(write_recipe(tmp_path, text), BUDGET)
    message = str(caught.value)
    assert message.startswith("2 of the recipe's models cannot be used: (1) Model 'org/missing-one'")
    assert "(2) Model 'org/missing-two'" in message and "\n" not in message


def test_check_of_a_hub_model_without_safetensors_says_why(hub, tmp_path: Path):
    with pytest.raises(ComposerError, match=r"'org/bin-only': its hub repository holds only \.bin weights"):
        check_recipe(write_recipe(tmp_path, TIES.replace("MODEL", "org/bin-only")), BUDGET)


def test_revision_in_a_mapping_is_checked_and_run_at_that_revision(hub, repositories, tmp_path: Path):
    text = f"""merge_method: linear
models:
  - model: {{model: org/base, revision: v2}}
    parameters: {{weight: 1.0}}
  - model: {repositories["a"]}
    parameters: {{weight: 0.0}}
dtype: float32
"""
    recipe = write_recipe(tmp_path, text)
    report = check_recipe(recipe, BUDGET)
    assert f"org/base@v2: hub, commit {commit_of('org/base', 'v2')[:12]}" in report
    assert hub.file_bytes(".safetensors") == header_bytes(repositories["v2"])

    out = tmp_path / "out"
    assert compose_in_process(pytest.MonkeyPatch(), recipe, out) == 0
    merged, expected = load_state(out), load_state(repositories["v2"])
    assert all(torch.equal(merged[name], expected[name]) for name in expected)

    fetched = hub.file_bytes(".safetensors")
    assert "org/base@v2: in the hub cache" in check_recipe(recipe, BUDGET)  # the weights are there now: no request
    assert hub.file_bytes(".safetensors") == fetched


def test_compose_check_on_the_command_line(hub, tmp_path: Path, monkeypatch, capsys):
    good = write_recipe(tmp_path, TIES.replace("MODEL", "org/b"))
    assert compose_in_process(monkeypatch, "check", good) == 0
    assert "ok: a run would download" in capsys.readouterr().out
    bad = write_recipe(tmp_path, TIES.replace("MODEL", "org/wide"))
    assert compose_in_process(monkeypatch, "check", bad) == 2
    error = capsys.readouterr().err
    message = error[error.index("error: ") :]  # after huggingface_hub's progress bars
    assert "org/wide" in message and "shapes agree" in message and "Traceback" not in error
