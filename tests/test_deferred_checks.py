"""The output config is checked from the architecture definition while planning, and, for a family whose definition
has no `output_rules:`, by transformers (a meta-device build, which takes seconds to import) beside the first writes: a run whose output transformers would not load
fails, and leaves nothing at OUT; `compose plan` does the whole check before it shows anything."""

import json
from pathlib import Path

import pytest

from composer.compose import compose_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.plan import build_plan
from composer.recipe import parse_recipe
from helpers import compose_in_process, save_tiny_model


def _with_config(folder: Path, **changes) -> Path:
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def biased_config_model(tmp_path_factory) -> Path:
    """Weights with attention biases under a config that says they have none, of a family whose definition has no
    `output_rules:` for its model type (DeepSeek-V2): only transformers knows that `attention_bias` decides those
    tensors, so only the late check can refuse the output. (For a family with rules, planning refuses it:
    tests/test_output_rules.py.)"""
    folder = save_tiny_model(tmp_path_factory.mktemp("biased") / "model", "deepseek_v2", layers=2, attention_bias=True)
    return _with_config(folder, attention_bias=False)


def _passthrough(model: Path) -> str:
    return f"merge_method: passthrough\nslices:\n  - sources: [{{model: {model}, layer_range: [0, 2]}}]\n"


def test_the_transformers_check_is_left_to_the_executor(biased_config_model):
    text = _passthrough(biased_config_model)
    plan = build_plan(parse_recipe(text, "recipe"), text)  # planning alone does not ask transformers
    try:
        assert len(plan.deferred_checks) == 1
        with pytest.raises(ComposerError, match="would not load with transformers"):
            plan.run_deferred_checks()
    finally:
        plan.close()


def test_a_run_that_fails_the_late_check_leaves_no_output(biased_config_model, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ComposerError) as raised:
        compose_text(_passthrough(biased_config_model), out, ExecutionOptions(progress=False))
    message = str(raised.value)
    assert "would not load with transformers" in message and ".bias" in message, message
    assert "Nothing was written" in message
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial folder left beside OUT either


@pytest.mark.parametrize("command", ["plan", "check"])
def test_compose_plan_and_check_do_the_whole_check_up_front(
    biased_config_model, tmp_path, monkeypatch, capsys, command
):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(_passthrough(biased_config_model))
    assert compose_in_process(monkeypatch, command, recipe) != 0
    shown = capsys.readouterr()
    assert "would not load with transformers" in shown.err and shown.out == ""


def test_a_vocab_size_the_weights_lack_is_refused_while_planning(tmp_path):
    model = _with_config(save_tiny_model(tmp_path / "model", layers=2), vocab_size=321)
    text = _passthrough(model)
    with pytest.raises(ComposerError, match="321") as raised:
        build_plan(parse_recipe(text, "recipe"), text)
    assert "model.embed_tokens.weight" in str(raised.value) and "320 vocabulary rows" in str(raised.value)
