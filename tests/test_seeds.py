"""Random methods are reproducible run to run, change with the seed, and do not depend on execution order."""

from pathlib import Path

import torch

from composer.compose import compose_text
from composer.execute import ExecutionOptions
from composer.plan import build_plan
from composer.recipe import parse_recipe
from helpers import load_state, save_tiny_model

RECIPE = """merge_method: dare_ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5, density: 0.5}}
{seed}"""


def _models(tmp_path: Path) -> dict:
    return {
        name: save_tiny_model(tmp_path / name, layers=2, seed=number) for number, name in enumerate(("base", "a", "b"))
    }


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path):
    models = _models(tmp_path)
    outputs = {}
    for label, seed in (("first", "random_seed: 7"), ("again", "random_seed: 7"), ("other", "random_seed: 8")):
        compose_text(
            RECIPE.format(seed=seed, **models),
            tmp_path / label,
            ExecutionOptions(memory_budget=1 if label == "again" else 2**30),
        )
        outputs[label] = load_state(tmp_path / label)
    name = "model.layers.1.mlp.up_proj.weight"
    assert all(torch.equal(outputs["first"][key], outputs["again"][key]) for key in outputs["first"])
    assert not torch.equal(outputs["first"][name], outputs["other"][name])


def test_every_tensor_gets_its_own_seed_and_only_random_methods_get_one(tmp_path: Path):
    models = _models(tmp_path)
    text = RECIPE.format(seed="random_seed: 3", **models)
    seeds = [t.operation.arguments["seed"] for t in build_plan(parse_recipe(text), text).tensors]
    assert len(set(seeds)) == len(seeds)
    linear = f"merge_method: linear\nmodels:\n  - model: {models['a']}\n  - model: {models['b']}\nparameters: {{weight: 1.0}}\n"
    assert all("seed" not in t.operation.arguments for t in build_plan(parse_recipe(linear), linear).tensors)


def test_seed_option_overrides_the_recipe(tmp_path: Path):
    from composer.compose import compose_file

    models = _models(tmp_path)
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(RECIPE.format(seed="random_seed: 1", **models))
    compose_file(recipe_path, tmp_path / "seed2", ExecutionOptions(), seed=2)
    compose_text(RECIPE.format(seed="random_seed: 2", **models), tmp_path / "recipe2", ExecutionOptions())
    first, second = load_state(tmp_path / "seed2"), load_state(tmp_path / "recipe2")
    assert all(torch.equal(first[key], second[key]) for key in first)
    # the recipe kept with the output (and in its card) runs again to the same weights
    kept = (tmp_path / "seed2" / "composer-recipe.yml").read_text()
    assert "random_seed: 2" in kept and "random_seed: 1" not in kept
    compose_text(kept, tmp_path / "rerun", ExecutionOptions())
    rerun = load_state(tmp_path / "rerun")
    assert all(torch.equal(first[key], rerun[key]) for key in first)
