"""Staged recipes: stages fuse into one plan that gives exactly what running them one by one gives."""

from pathlib import Path

import pytest
import torch

from composer.compose import compose_text, plan_from_file
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.plan.schedule import make_schedule
from composer.plan.show import format_plan
from helpers import load_state, logits_of, save_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("staged-models")
    return {
        name: save_tiny_model(root / name, layers=4, seed=number) for number, name in enumerate(("base", "a", "b", "c"))
    }


PAIR = """merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.7}}
  - model: {b}
    parameters: {{weight: 0.3}}
"""
WITH_C = """merge_method: slerp
base_model: {ab}
models:
  - model: {ab}
  - model: {c}
parameters:
  t: [0.2, 0.8]
"""
STAGED = """name: pairs in one pass
stages:
  - name: ab
    merge_method: linear
    models:
      - model: {a}
        parameters: {{weight: 0.7}}
      - model: {b}
        parameters: {{weight: 0.3}}
  - name: abc
    merge_method: slerp
    base_model: ab
    models:
      - model: ab
      - model: {c}
    parameters:
      t: [0.2, 0.8]
"""


def _assert_same_tensors(first: Path, second: Path) -> None:
    one, two = load_state(first), load_state(second)
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name], two[name]), name


def test_two_stages_in_one_pass_equal_two_runs(models, tmp_path: Path):
    compose_text(PAIR.format(**models), tmp_path / "ab", ExecutionOptions())
    compose_text(WITH_C.format(ab=tmp_path / "ab", c=models["c"]), tmp_path / "two-runs", ExecutionOptions())
    report = compose_text(STAGED.format(**models), tmp_path / "one-pass", ExecutionOptions())
    _assert_same_tensors(tmp_path / "two-runs", tmp_path / "one-pass")
    assert max(report.reads.values()) == 1  # every input tensor of a, b and c read once, nothing written between stages
    assert {ref.model for ref in report.reads} == {str(models[name]) for name in ("a", "b", "c")}
    assert sorted(p.name for p in (tmp_path / "one-pass").iterdir() if p.suffix == ".safetensors") == [
        "model.safetensors"
    ]
    torch.testing.assert_close(logits_of(tmp_path / "one-pass"), logits_of(tmp_path / "two-runs"), rtol=0, atol=0)


def test_card_credits_the_real_parents_and_lists_the_stages(models, tmp_path: Path):
    compose_text(STAGED.format(**models), tmp_path / "out", ExecutionOptions())
    card = (tmp_path / "out" / "README.md").read_text()
    for name in ("a", "b", "c"):
        assert f"`{models[name]}`" in card
    assert "1. `ab`: linear" in card and "2. `abc`: slerp" in card
    assert "- slerp" in card and "- linear" in card  # both methods tagged
    assert (tmp_path / "out" / "composer-recipe.yml").read_text() == STAGED.format(**models)


def test_plan_shows_the_fused_tensors_over_real_models_only(models, tmp_path: Path):
    recipe = tmp_path / "staged.yml"
    recipe.write_text(STAGED.format(**models))
    _, plan = plan_from_file(recipe)
    text = format_plan(plan, make_schedule(plan))
    plan.close()
    line = next(line for line in text.splitlines() if line.startswith("model.layers.0.mlp.up_proj.weight"))
    assert "ab=linear" in line and "slerp" in line
    inputs = line.split("<- ")[1]
    assert "ab:" not in inputs and all(
        f"{models[name]}:model.layers.0.mlp.up_proj.weight" in inputs for name in ("a", "b", "c")
    )


def test_a_stage_can_be_sliced_deeper_and_the_top_level_merge_is_the_output(models, tmp_path: Path):
    """Merge, then depth-upscale the merge: the top-level merge uses the stage twice."""
    staged = f"""stages:
  - name: ab
    merge_method: linear
    models:
      - model: {models['a']}
      - model: {models['b']}
    parameters: {{weight: 0.5}}
merge_method: passthrough
slices:
  - sources: [{{model: ab, layer_range: [0, 3]}}]
  - sources: [{{model: ab, layer_range: [1, 4]}}]
"""
    compose_text(
        f"merge_method: linear\nmodels:\n  - model: {models['a']}\n  - model: {models['b']}\nparameters: {{weight: 0.5}}\n",
        tmp_path / "ab",
        ExecutionOptions(),
    )
    upscale = f"merge_method: passthrough\nslices:\n  - sources: [{{model: {tmp_path / 'ab'}, layer_range: [0, 3]}}]\n  - sources: [{{model: {tmp_path / 'ab'}, layer_range: [1, 4]}}]\n"
    compose_text(upscale, tmp_path / "two-runs", ExecutionOptions())
    compose_text(staged, tmp_path / "one-pass", ExecutionOptions())
    _assert_same_tensors(tmp_path / "two-runs", tmp_path / "one-pass")


def test_random_stages_are_reproducible_and_draw_apart_from_the_output(models, tmp_path: Path):
    recipe = """random_seed: 5
stages:
  - name: first
    merge_method: dare_linear
    base_model: {base}
    models:
      - model: {a}
        parameters: {{weight: 1.0, density: 0.5}}
  - name: second
    merge_method: dare_linear
    base_model: {base}
    models:
      - model: first
        parameters: {{weight: 1.0, density: 0.5}}
"""
    text = recipe.format(**models)
    compose_text(text, tmp_path / "one", ExecutionOptions())
    compose_text(text, tmp_path / "again", ExecutionOptions(memory_budget=1))
    _assert_same_tensors(tmp_path / "one", tmp_path / "again")
    name = "model.layers.0.mlp.up_proj.weight"
    base, a, out = load_state(models["base"])[name], load_state(models["a"])[name], load_state(tmp_path / "one")[name]
    kept = (out - base).abs() > 1e-6
    # independent masks keep about a quarter of the task vector (the same mask twice would keep half)
    assert 0.18 < kept.float().mean().item() < 0.32
    ratio = (out - base)[kept] / (a - base)[kept]  # each stage rescales what it keeps by about 1 / density
    assert 3.6 < ratio.mean().item() < 4.4 and ratio.std().item() < 1e-2


@pytest.mark.parametrize(
    "recipe, message",
    [
        (
            "stages:\n  - name: x\n    merge_method: linear\n    models: [{{model: y}}, {{model: {a}}}]\n"
            "  - name: y\n    merge_method: linear\n    models: [{{model: x}}, {{model: {a}}}]\n",
            "line 4: recipe key 'stages[0].models[0].model': stage 'x' uses stage 'y', which comes later",
        ),
        (
            "stages:\n  - name: x\n    merge_method: linear\n    models: [{{model: {a}}}, {{model: {b}}}]\n"
            "  - name: y\n    merge_method: linear\n    models: [{{model: {a}}}, {{model: {b}}}]\n",
            "line 2: recipe key 'stages[0].name': stage 'x' is not used by any later stage or by the output",
        ),
        (
            "stages:\n  - name: x\n    merge_method: linear\n    models: [{{model: {a}}}]\n"
            "  - name: x\n    merge_method: linear\n    models: [{{model: x}}]\n",
            "two stages are named 'x'",
        ),
        (
            "models: [{{model: {a}}}]\nstages:\n  - name: x\n    merge_method: linear\n    models: [{{model: {a}}}]\n",
            "models at the top level belong to a merge",
        ),
        (
            "stages:\n  - name: x\n    merge_method: linear\n    models: [{{model: {a}}}, {{model: {b}}}]\n    parameters: {{weihgt: 0.5}}\n"
            "merge_method: linear\nmodels: [{{model: x}}, {{model: {a}}}]\n",
            "line 5: recipe key 'stages[0].parameters.weihgt': merge method 'linear' does not take 'weihgt'",
        ),
        (
            "stages:\n  - name: x\n    merge_method: linear\n    models: [{{model: {a}, paramters: {{weight: 1}}}}]\n",
            "unknown key 'stages[0].models[0].paramters'",
        ),
    ],
    ids=["forward-reference", "unused-stage", "duplicate-name", "stray-top-level-key", "stage-parameter", "stage-typo"],
)
def test_bad_staged_recipes_are_refused_before_work(models, tmp_path: Path, recipe: str, message: str):
    recipe_path = tmp_path / "bad.yml"
    recipe_path.write_text(recipe.format(**models))
    with pytest.raises(ComposerError) as caught:
        plan_from_file(recipe_path)
    assert message in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_the_output_takes_its_tokenizer_through_the_stages(models, tmp_path: Path):
    import shutil

    a = tmp_path / "a-with-tokenizer"
    shutil.copytree(models["a"], a)
    (a / "tokenizer.json").write_text('{"marker": "from a"}')
    compose_text(STAGED.format(**{**models, "a": a}), tmp_path / "out", ExecutionOptions())
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"marker": "from a"}'


@pytest.mark.real_model
def test_staged_example_recipe_equals_its_one_stage_form(smollm2_dir, tmp_path: Path):
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    for name in ("smollm2-damped-upscale", "smollm2-staged-damped-upscale"):
        text = (recipes / f"{name}.yml").read_text().replace("HuggingFaceTB/SmolLM2-135M-Instruct", str(smollm2_dir))
        report = compose_text(text, tmp_path / name, ExecutionOptions())
        assert max(report.reads.values()) == 1
    _assert_same_tensors(tmp_path / "smollm2-damped-upscale", tmp_path / "smollm2-staged-damped-upscale")
