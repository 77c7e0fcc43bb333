"""Every example recipe in recipes/ runs, with its hub ids pointed at the locally cached real models."""

from pathlib import Path

import pytest
import yaml

from composer.compose import compose_text
from composer.evaluate import load_model, score_text
from composer.execute import ExecutionOptions

# MoE recipes are run by tests/test_moe_routing.py, which routes held-out prompts through them
RECIPES = sorted(p for p in (Path(__file__).resolve().parents[1] / "recipes").glob("*.yml") if "moe" not in p.stem)
pytestmark = pytest.mark.real_model


@pytest.fixture(scope="session")
def local_models(smollm2_dir):
    return {"HuggingFaceTB/SmolLM2-135M-Instruct": str(smollm2_dir)}


@pytest.mark.parametrize("recipe_path", RECIPES, ids=[p.stem for p in RECIPES])
def test_example_recipe_runs(recipe_path: Path, local_models, tmp_path: Path):
    text = recipe_path.read_text()
    for hub_id, local in local_models.items():
        text = text.replace(hub_id, local)
    assert "HuggingFaceTB/" not in text, "the test lacks a local copy of a model the recipe uses"
    out = tmp_path / "out"
    compose_text(text, out, ExecutionOptions())
    model, tokenizer = load_model(str(out))
    expected_layers = sum(
        end - start for s in yaml.safe_load(text)["slices"] for start, end in [s["sources"][0]["layer_range"]]
    )
    assert model.config.num_hidden_layers == expected_layers
    score = score_text(model, tokenizer, "The cat sat on the mat and looked out of the window at the rain.")
    assert score.perplexity < 1e4
