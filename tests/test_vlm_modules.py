"""mergekit's multi-module configs of vision-language models (`modules: {text_decoder, vision_tower,
multi_modal_projector}`): the language model's module is the merge's own slices or models, each other module's
tensors are merged over its models (or copied from its one model), the rest are the base's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_vlm import load_vision_language

from composer.compose import compose_text, plan_from_file
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.plan.schedule import make_schedule
from composer.plan.show import format_plan
from composer.recipe.load import parse_recipe
from helpers import load_state
from vlm_models import save_text_finetune, save_vision_language_model

LAYERS = 4
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> dict[str, Path]:
    """Two tiny Gemma 3 vision-language models (every tensor differs) and a text-only fine-tune of the first."""
    root = tmp_path_factory.mktemp("gemma3-modules")
    it = save_vision_language_model(root / "it", "gemma3", LAYERS, seed=0)
    ft = save_vision_language_model(root / "ft", "gemma3", LAYERS, seed=1)
    return {"it": it, "ft": ft, "text": save_text_finetune(it, root / "text", "gemma3")}


def compose(recipe: str, out: Path) -> dict[str, torch.Tensor]:
    compose_text(recipe, out, ExecutionOptions(progress=False))
    return load_state(out)


def refusal(recipe: str, tmp_path: Path) -> str:
    with pytest.raises(ComposerError) as caught:
        compose_text(recipe, tmp_path / "refused", ExecutionOptions(progress=False))
    assert not (tmp_path / "refused").exists()
    return " ".join(str(caught.value).split())


def modules_recipe(gemma: dict[str, Path]) -> str:
    return f"""merge_method: slerp
base_model: {gemma["it"]}
modules:
  text_decoder:
    slices:
      - sources:
          - {{model: {gemma["it"]}, layer_range: [0, {LAYERS}]}}
          - {{model: {gemma["ft"]}, layer_range: [0, {LAYERS}]}}
  vision_tower:
    models:
      - model: {gemma["it"]}
  multi_modal_projector:
    models:
      - model: {gemma["it"]}
parameters:
  t: 0.5
dtype: bfloat16
"""


def test_the_modules_config_is_the_plain_config(gemma, tmp_path):
    plain = f"""merge_method: slerp
base_model: {gemma["it"]}
slices:
  - sources:
      - {{model: {gemma["it"]}, layer_range: [0, {LAYERS}]}}
      - {{model: {gemma["ft"]}, layer_range: [0, {LAYERS}]}}
parameters:
  t: 0.5
dtype: bfloat16
"""
    expected = compose(plain, tmp_path / "plain")
    merged = compose(modules_recipe(gemma), tmp_path / "modules")
    assert merged.keys() == expected.keys()
    assert [name for name in expected if not torch.equal(merged[name], expected[name])] == []
    assert json.loads((tmp_path / "modules/config.json").read_text()) == json.loads(
        (tmp_path / "plain/config.json").read_text()
    )


def test_the_vision_tower_is_merged_and_the_language_model_as_the_plain_merge(gemma, tmp_path):
    # the top-level weight reaches the vision tower; the text decoder's own parameters reach only the language model
    models = f"""    models:
      - model: {gemma["it"]}
      - model: {gemma["ft"]}
"""
    recipe = f"""merge_method: linear
base_model: {gemma["it"]}
parameters: {{weight: 0.5}}
modules:
  text_decoder:
    parameters: {{weight: 0.25, normalize: false}}
{models}  vision_tower:
{models}"""
    merged = compose(recipe, tmp_path / "modules")
    plain = f"merge_method: linear\nbase_model: {gemma['it']}\nparameters: {{weight: 0.25, normalize: false}}\n"
    expected = compose(plain + models.replace("    ", "", 1).replace("\n    ", "\n"), tmp_path / "plain")
    a, b = load_state(gemma["it"]), load_state(gemma["ft"])
    vision = [name for name in a if name.startswith("vision_tower.")]
    projector = [name for name in a if name.startswith("multi_modal_projector.")]
    assert vision and projector and merged.keys() == a.keys()
    for name in vision:
        assert torch.equal(merged[name], 0.5 * a[name] + 0.5 * b[name]), name
    for name in projector:  # in no listed module: the base's
        assert torch.equal(merged[name], a[name]), name
    for name in expected:
        if name.startswith("language_model."):
            assert torch.equal(merged[name], expected[name]), name
    model = load_vision_language(tmp_path / "modules")
    with torch.no_grad():
        first = model.model.vision_tower.encoder.layers[0].mlp.fc1.weight
        assert torch.equal(
            first,
            0.5 * a["vision_tower.encoder.layers.0.mlp.fc1.weight"]
            + 0.5 * b["vision_tower.encoder.layers.0.mlp.fc1.weight"],
        )


def test_compose_plan_shows_each_module(gemma, tmp_path):
    path = tmp_path / "r.yml"
    path.write_text(
        modules_recipe(gemma).replace(
            f"  vision_tower:\n    models:\n      - model: {gemma['it']}\n",
            f"  vision_tower:\n    slices:\n      - sources:\n          - {{model: {gemma['it']}, layer_range: [0, 1]}}\n"
            f"          - {{model: {gemma['ft']}, layer_range: [0, 1]}}\n",
        )
    )
    recipe, plan = plan_from_file(path)
    try:
        assert set(recipe.modules) == {"vision_tower", "multi_modal_projector"}
        assert recipe.modules["vision_tower"].parameters == {"t": 0.5}  # the merge's own, beneath the module's
        shown = format_plan(plan, make_schedule(plan))
    finally:
        plan.close()
    assert "note: module vision_tower:" in shown and "merged by slerp over" in shown
    assert f"note: module multi_modal_projector: 2 tensors copied from '{gemma['it']}'" in shown
    line = next(line for line in shown.splitlines() if line.startswith("vision_tower.post_layernorm.weight"))
    assert "slerp" in line and str(gemma["ft"]) in line


def test_a_module_of_one_model_copies_its_tensors_in_the_bases_layout(gemma, tmp_path):
    recipe = modules_recipe(gemma).replace(
        f"  vision_tower:\n    models:\n      - model: {gemma['it']}\n",
        f"  vision_tower:\n    models:\n      - model: {gemma['ft']}\n",
    )
    merged = compose(recipe, tmp_path / "out")
    ft = load_state(gemma["ft"])
    for name in (name for name in ft if name.startswith("vision_tower.")):
        assert torch.equal(merged[name], ft[name].to(torch.bfloat16)), name


# --- refusals -------------------------------------------------------------------------------------------------


def test_an_unknown_module_lists_the_known_ones(gemma, tmp_path):
    message = refusal(modules_recipe(gemma).replace("multi_modal_projector:", "vision_encoder:"), tmp_path)
    assert message.startswith("recipe, line 12: recipe key 'modules.vision_encoder'")
    assert "'text_decoder', 'vision_tower', 'multi_modal_projector'" in message


def test_a_module_over_a_text_only_base_is_refused(gemma, tmp_path):
    recipe = modules_recipe(gemma).replace(f"base_model: {gemma['it']}", f"base_model: {gemma['text']}")
    recipe = recipe.replace(f"model: {gemma['it']}, layer_range", f"model: {gemma['text']}, layer_range")
    message = refusal(recipe, tmp_path)
    assert "line 9: recipe key 'modules.vision_tower'" in message and "is a text-only model" in message


def test_a_module_model_without_the_tower_is_refused(gemma, tmp_path):
    recipe = modules_recipe(gemma).replace(
        f"  vision_tower:\n    models:\n      - model: {gemma['it']}\n",
        f"  vision_tower:\n    models:\n      - model: {gemma['it']}\n      - model: {gemma['text']}\n",
    )
    message = refusal(recipe, tmp_path)
    assert f"Module 'vision_tower' lists the model '{gemma['text']}', which is a text-only model" in message


def test_a_module_model_whose_tensor_has_another_shape_is_refused(gemma, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for file in gemma["ft"].iterdir():
        if file.suffix != ".safetensors":
            (other / file.name).write_bytes(file.read_bytes())
    state = load_file(str(gemma["ft"] / "model.safetensors"))
    state["vision_tower.post_layernorm.weight"] = state["vision_tower.post_layernorm.weight"][:-1].clone()
    save_file(state, str(other / "model.safetensors"), {"format": "pt"})
    recipe = modules_recipe(gemma).replace(
        f"  vision_tower:\n    models:\n      - model: {gemma['it']}\n",
        f"  vision_tower:\n    models:\n      - model: {gemma['it']}\n      - model: {other}\n",
    )
    message = refusal(recipe, tmp_path)
    assert "Module 'vision_tower'" in message and "'vision_tower.post_layernorm.weight' has shape [31]" in message


def test_module_keys_and_names_are_refused_with_their_line():
    text = "merge_method: linear\nmodules:\n  vision_tower:\n    models: [{model: a}]\n    weights: [1]\n"
    with pytest.raises(ComposerError, match=r"r.yml, line 5: 'modules.vision_tower.weights' is not a key of a module"):
        parse_recipe(text, "r.yml")
    both = "merge_method: linear\nmodules:\n  default:\n    models: [{model: a}]\n  text_decoder:\n    models: [{model: a}]\n"
    with pytest.raises(
        ComposerError, match=r"r.yml, line 5: 'modules.text_decoder' is given, and so is 'modules.default'"
    ):
        parse_recipe(both, "r.yml")
    unnamed = "modules:\n  text:\n    slices:\n      - sources: [{model: a, layer_range: [0, 4]}]\nmerge_method: passthrough\n"
    with pytest.raises(ComposerError, match=r"r.yml, line 1: 'modules' holds 'text' but no language model's module"):
        parse_recipe(unnamed, "r.yml")


def test_a_modules_slices_must_take_the_whole_tower(gemma, tmp_path):
    recipe = modules_recipe(gemma).replace(
        f"  vision_tower:\n    models:\n      - model: {gemma['it']}\n",
        f"  vision_tower:\n    slices:\n      - sources:\n          - {{model: {gemma['it']}, layer_range: [0, 2]}}\n",
    )
    message = refusal(recipe, tmp_path)
    assert "line 12: recipe key 'modules.vision_tower.slices[0].sources[0].layer_range'" in message
    assert "write [0, 1]" in message


def test_qwen2_vl_projector_inside_the_visual_tower_is_its_own_module(tmp_path):
    a = save_vision_language_model(tmp_path / "a", "qwen2_vl", 2, seed=0)
    b = save_vision_language_model(tmp_path / "b", "qwen2_vl", 2, seed=1)
    recipe = f"""merge_method: linear
base_model: {a}
parameters: {{weight: 0.5}}
models: [{{model: {a}}}, {{model: {b}}}]
modules:
  vision_tower:
    models: [{{model: {a}}}, {{model: {b}}}]
"""
    merged = compose(recipe, tmp_path / "out")
    first, second = load_state(a), load_state(b)
    merger = [name for name in first if name.startswith("visual.merger.")]
    blocks = [name for name in first if name.startswith("visual.blocks.")]
    assert merger and blocks
    assert all(torch.equal(merged[name], first[name]) for name in merger)
    assert all(torch.equal(merged[name], 0.5 * first[name] + 0.5 * second[name]) for name in blocks)


def test_module_entries_are_read_as_mergekit_spells_them():
    text = """merge_method: linear
models: [{model: a}]
modules:
  vision_tower:
    models:
      - {model: {path: org/x, revision: v1}, layer_range: [0, 3]}
      - model: ./b/
        parameters: {weight: 1}
"""
    with pytest.warns(match=r"line 6: 'modules.vision_tower.models\[0\].layer_range' has no effect"):
        recipe = parse_recipe(text, "r.yml")
    assert recipe.module_models() == ["org/x@v1", "./b"]
    assert recipe.input_models() == ["a", "org/x@v1", "./b"]


def test_a_module_with_language_model_only_is_refused(gemma, tmp_path):
    message = refusal(
        modules_recipe(gemma).replace("dtype: bfloat16", "dtype: bfloat16\nlanguage_model_only: true"), tmp_path
    )
    assert "line 9: recipe key 'modules.vision_tower'" in message and "'language_model_only' writes" in message
