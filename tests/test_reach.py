"""Real-world mergekit config shapes that composer runs as their authors meant (issue 19): `revision:` beside
`model:`, keys mergekit ignores, mergekit-multi files, `modules:` configs and MoE checkpoints as inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from composer.compose import compose_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.recipe import parse_recipe
from helpers import load_state, save_fine_tune, save_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reach-models")
    base = save_tiny_model(root / "base", layers=4, seed=0)
    return {"base": base, "a": save_fine_tune(base, root / "a", seed=1), "b": save_fine_tune(base, root / "b", seed=2)}


def _refusal(text: str) -> str:
    """The message with which the recipe `text`, read as r.yml, is refused."""
    with pytest.raises(ComposerError) as caught:
        parse_recipe(text, "r.yml")
    return str(caught.value)


def _compose(text: str, out: Path) -> dict[str, torch.Tensor]:
    compose_text(text, out, ExecutionOptions())
    return load_state(out)


# ---- 1. `revision:` beside `model:` ------------------------------------------------------------------


def _cache_revision(cache: Path, repo_id: str, commit: str, branch: str, model_folder: Path) -> None:
    """A model in a Hugging Face hub cache as huggingface_hub lays it out: refs/BRANCH -> snapshots/COMMIT."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / branch).write_text(commit)
    for file in model_folder.iterdir():
        shutil.copyfile(file, snapshot / file.name)


def test_revision_beside_model_is_the_hub_revision(tiny, tmp_path: Path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    _cache_revision(cache, "tiny-org/tiny", "1" * 40, "main", tiny["a"])
    _cache_revision(cache, "tiny-org/tiny", "2" * 40, "v2", tiny["b"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder named tiny-org/tiny
    text = f"""merge_method: linear
models:
  - model: tiny-org/tiny
    revision: v2
    parameters: {{weight: 1.0}}
  - model: {tiny["base"]}
    parameters: {{weight: 0.0}}
dtype: float32
"""
    assert parse_recipe(text).input_models()[0] == "tiny-org/tiny@v2"
    merged = _compose(text, tmp_path / "out")
    expected = load_state(tiny["b"])
    assert all(torch.equal(merged[name], expected[name]) for name in expected)


def test_revision_of_a_local_path_is_an_error_naming_the_key_and_line(tiny):
    text = f"""merge_method: linear
slices:
  - sources:
      - model: {tiny["a"]}
        layer_range: [0, 4]
      - model: {tiny["b"]}
        revision: main
        layer_range: [0, 4]
"""
    message = _refusal(text)
    assert "r.yml, line 7" in message and "slices[0].sources[1].revision" in message and "local path" in message
    with pytest.raises(ComposerError, match="already names a revision"):
        parse_recipe("merge_method: linear\nmodels:\n  - model: org/x@dev\n    revision: main\n")


# ---- 2. keys in the wrong place that mergekit ignores -------------------------------------------------


def test_keys_mergekit_ignores_warn_by_name_and_the_config_runs(tiny, tmp_path: Path):
    from composer.errors import ComposerWarning

    text = f"""merge_method: dare_ties
base_model: {tiny["base"]}
models:
  - model: {tiny["a"]}
    parameters: {{weight: 0.5, density: 1.0}}
  - model: {tiny["b"]}
    parameters: {{weight: 0.5, density: 1.0}}
parameters:
  smooth: false
  allow_negative_weights: true
int8_mask: true
dtype: float32
"""
    with pytest.warns(ComposerWarning) as caught:
        merged = _compose(text, tmp_path / "out")
    messages = " ".join(str(warning.message) for warning in caught)
    assert "'int8_mask'" in messages and "line 11" in messages
    assert "'smooth'" in messages and "'allow_negative_weights'" in messages
    assert set(merged) == set(load_state(tiny["base"]))


@pytest.mark.parametrize(
    ("typo", "key"),
    [("dype: float32\n", "dype"), ("merge_methd: linear\n", "merge_methd")],
    ids=["dype", "merge_methd"],
)
def test_real_typos_stay_refused(tiny, typo: str, key: str):
    text = f"merge_method: linear\nmodels:\n  - model: {tiny['a']}\n  - model: {tiny['b']}\n{typo}"
    with pytest.raises(ComposerError, match=f"unknown key '{key}'"):
        parse_recipe(text, "r.yml")


# ---- 3. mergekit-multi files: several documents, each a named merge -------------------------------------

MULTI_STAGE = """name: ab
merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.6}}}}
  - {{model: {b}, parameters: {{weight: 0.4}}}}
dtype: float32
"""
MULTI_FINAL = """merge_method: slerp
base_model: ab
models:
  - model: ab
  - model: {base}
parameters:
  t: 0.25
dtype: float32
"""


def test_multi_document_file_runs_as_stages(tiny, tmp_path: Path):
    stage, final = MULTI_STAGE.format(**tiny), MULTI_FINAL.format(**tiny)
    indented = "".join(f"    {line}\n" if line else "\n" for line in stage.splitlines()).replace(
        "    name:", "  - name:", 1
    )
    staged = _compose(f"stages:\n{indented}{final}", tmp_path / "staged")
    # the final merge last and unnamed, as mergekit-multi writes it
    assert_same(_compose(f"{stage}---\n{final}", tmp_path / "unnamed-last"), staged)
    # every document named, the final one first: the one no other document uses is the output
    assert_same(_compose(f"name: final\n{final}---\n{stage}", tmp_path / "named-first"), staged)


def assert_same(merged: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(merged) == set(expected)
    assert all(torch.equal(merged[name], expected[name]) for name in expected)


def test_multi_document_errors_name_the_line(tiny):
    stage, final = MULTI_STAGE.format(**tiny), MULTI_FINAL.format(**tiny)
    with pytest.raises(ComposerError, match=r"r.yml, line 17: unknown key 'stages\[0\].dype'"):
        parse_recipe(f"{final}---\n{stage}dype: float16\n", "r.yml")
    with pytest.raises(ComposerError, match="no 'name:'"):
        parse_recipe(f"{final}---\n{final}", "r.yml")
    with pytest.raises(ComposerError, match="in a circle"):
        parse_recipe(f"name: x\n{final}---\n{stage.replace(str(tiny['a']), 'x')}", "r.yml")
    with pytest.raises(ComposerError, match="one model a recipe"):
        parse_recipe(f"{stage}---\n{stage.replace('name: ab', 'name: cd')}", "r.yml")


def test_multi_document_bounds_count_every_document():
    # each document's aliases expand to some 40 000 values: fine alone, too many together
    document = "name: d{n}\nrows: &r [" + ", ".join(["1"] * 200) + "]\nmany: [" + ", ".join(["*r"] * 200) + "]\n"
    with pytest.raises(ComposerError, match="more than 100000 values"):
        parse_recipe("---\n".join(document.format(n=n) for n in range(3)), "r.yml")


# ---- 4. `modules:` configs ----------------------------------------------------------------------------

SLICES = """  - sources:
      - model: {a}
        layer_range: [0, 4]
      - model: {b}
        layer_range: [0, 4]
"""


def test_default_module_is_the_top_level_slices(tiny, tmp_path: Path):
    top = f"merge_method: slerp\nbase_model: {tiny['a']}\nparameters: {{t: 0.3}}\ndtype: float32\nslices:\n"
    expected = _compose(top + SLICES.format(**tiny), tmp_path / "top")
    indented = "".join(f"    {line}\n" for line in SLICES.format(**tiny).splitlines())
    module = (
        f"merge_method: slerp\nbase_model: {tiny['a']}\nparameters: {{t: 0.9}}\ndtype: float32\nmodules:\n  default:\n"
    )
    module += f"    parameters: {{t: 0.3}}\n    slices:\n{indented}"  # the module's parameters win over the merge's
    assert_same(_compose(module, tmp_path / "module"), expected)
    with pytest.raises(ComposerError, match=r"r.yml, line 11: 'slices\[0\].sources\[0\].layer_range\[1\]'"):
        parse_recipe(module.replace("[0, 4]", "[0, x]", 1), "r.yml")


def test_a_vision_module_over_a_text_model_is_refused_clearly(tiny, tmp_path: Path):
    # `text_decoder` is the language model's module, as `default` is; a vision tower needs a vision-language base
    text = f"""merge_method: linear
modules:
  text_decoder:
    models: [{{model: {tiny["a"]}}}]
  vision_tower:
    models: [{{model: {tiny["b"]}}}]
"""
    with pytest.raises(ComposerError) as caught:
        compose_text(text, tmp_path / "out", ExecutionOptions())
    message = str(caught.value)
    assert "recipe, line 5: recipe key 'modules.vision_tower'" in message and "is a text-only model" in message
    with pytest.raises(ComposerError, match="give it once"):
        parse_recipe("merge_method: linear\nmodels: [{model: x}]\nmodules:\n  default:\n    models: [{model: y}]\n")


# ---- 5. MoE checkpoints as inputs: planned under the names their files hold -----------------------------

MOE_FAMILIES = {
    "mixtral": dict(num_local_experts=3, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=3, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48
    ),
}


def _moe_model(folder: Path, model_type: str, seed: int) -> Path:
    return save_tiny_model(folder, model_type, layers=2, seed=seed, **MOE_FAMILIES[model_type])


def _mixtral_by_hand(base: Path, folder: Path, seed: int) -> Path:
    """A Mixtral checkpoint written without transformers: the on-disk layout spelt out, in two shards."""
    import json

    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    hidden, inner, experts = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for i in range(config["num_hidden_layers"]):
        shapes = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,)}
        shapes |= {f"self_attn.{p}_proj.weight": (n, hidden) for p, n in (("q", hidden), ("k", kv), ("v", kv))}
        shapes |= {"self_attn.o_proj.weight": (hidden, hidden), "block_sparse_moe.gate.weight": (experts, hidden)}
        for e in range(experts):
            shapes |= {f"block_sparse_moe.experts.{e}.w{w}.weight": (inner, hidden) for w in (1, 3)}
            shapes[f"block_sparse_moe.experts.{e}.w2.weight"] = (hidden, inner)
        layers |= {f"model.layers.{i}.{name}": shape for name, shape in shapes.items()}
    shapes = {
        "model.embed_tokens.weight": (320, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (320, hidden),
    }
    state = {name: torch.randn(shape, generator=generator) * 0.05 for name, shape in (layers | shapes).items()}
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({name: state[name] for name in part}, str(folder / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {name: file for file, part in halves.items() for name in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _loads_cleanly(folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(1, 9).unsqueeze(0)).logits).all()


@pytest.mark.parametrize("model_type", sorted(MOE_FAMILIES))
def test_moe_checkpoints_merge_under_their_on_disk_names(model_type: str, tmp_path: Path):
    base = _moe_model(tmp_path / "base", model_type, seed=0)
    a = save_fine_tune(base, tmp_path / "a", seed=1)
    b = (
        _mixtral_by_hand(base, tmp_path / "b", seed=2)
        if model_type == "mixtral"
        else save_fine_tune(base, tmp_path / "b", seed=2)
    )
    states = {name: load_state(folder) for name, folder in (("base", base), ("a", a), ("b", b))}
    assert any(".experts.0." in name for name in states["base"])  # the per-expert layout the files hold

    linear = f"""merge_method: linear
models:
  - {{model: {a}, parameters: {{weight: 0.25}}}}
  - {{model: {b}, parameters: {{weight: 0.75}}}}
dtype: float32
"""
    merged = _compose(linear, tmp_path / "linear")
    assert set(merged) == set(states["base"])
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, 0.25 * states["a"][name] + 0.75 * states["b"][name])
    _loads_cleanly(tmp_path / "linear")

    # dare_ties of one fine-tune at full density and weight is that fine-tune
    dare = f"""merge_method: dare_ties
base_model: {base}
models:
  - {{model: {b}, parameters: {{weight: 1.0, density: 1.0}}}}
dtype: float32
"""
    merged = _compose(dare, tmp_path / "dare")
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, states["b"][name])
    _loads_cleanly(tmp_path / "dare")


def test_multi_document_names_must_be_text():
    with pytest.raises(ComposerError, match="must be text"):
        parse_recipe("name: [1]\nmerge_method: linear\n---\nname: x\nmerge_method: linear\n", "r.yml")
