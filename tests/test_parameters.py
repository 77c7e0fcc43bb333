"""Parameter semantics: value forms (scalar, gradient, filter list), t over slices, precedence, checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from composer.errors import ComposerError
from composer.plan import build_plan
from composer.recipe import parse_recipe
from composer.recipe.parameters import evaluate, interpolate_gradient, layer_t
from composer.recipe.schema import ConditionalParameter
from helpers import save_tiny_model

LAYERS = 5


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("parameter-models")
    return save_tiny_model(root / "a", "llama", LAYERS, seed=1), save_tiny_model(root / "b", "llama", LAYERS, seed=2)


def arguments_of(text: str) -> dict[str, dict]:
    """Output tensor name -> resolved parameters, plus '@inputs' -> {name: inputs} for checking sources."""
    plan = build_plan(parse_recipe(text), text)
    try:
        result = {tensor.name: dict(tensor.operation.arguments) for tensor in plan.tensors}
        result["@inputs"] = {tensor.name: [(ref.model, ref.name) for ref in tensor.inputs] for tensor in plan.tensors}
        return result
    finally:
        plan.close()


def layer(i: int, suffix: str) -> str:
    return f"model.layers.{i}.{suffix}"


def slerp_recipe(a: Path, b: Path, parameters: str) -> str:
    return f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n{parameters}"


# --- evaluating one setting ---------------------------------------------------------------------


def cond(value, filter=None):
    return ConditionalParameter(filter=filter, value=value)


def test_scalar_is_the_same_everywhere():
    assert evaluate(0.3, "model.layers.0.mlp.up_proj.weight", 0.0) == 0.3
    assert evaluate(True, "anything", 0.7) is True


@pytest.mark.parametrize(
    "values, t, expected",
    [
        ([0, 1], 0.0, 0.0),
        ([0, 1], 0.25, 0.25),
        ([0, 1], 1.0, 1.0),
        ([1, 2, 3], 0.25, 1.5),
        ([1, 2, 3], 0.5, 2.0),
        ([1, 2, 3], 0.75, 2.5),
        ([0, 0.5, 0.3, 0.7, 1], 0.125, 0.25),
        ([0, 0.5, 0.3, 0.7, 1], 0.625, 0.5),
        ([4], 0.6, 4),
    ],
)
def test_gradient_interpolates_linearly_between_evenly_spaced_points(values, t, expected):
    assert interpolate_gradient(values, t) == pytest.approx(expected)
    assert evaluate(values, "x", t) == pytest.approx(expected)


def test_filter_list_takes_the_first_matching_entry_and_a_filterless_default():
    setting = [cond(0.1, "self_attn"), cond(0.2, "mlp"), cond(0.3, "self_attn.q_proj"), cond(0.9)]
    assert evaluate(setting, "model.layers.2.self_attn.q_proj.weight", 0.5) == 0.1  # first match wins
    assert evaluate(setting, "model.layers.2.mlp.down_proj.weight", 0.5) == 0.2
    assert evaluate(setting, "model.embed_tokens.weight", 0.0) == 0.9
    star = [cond(0.4, "mlp"), cond(0.6, "*")]
    assert evaluate(star, "model.norm.weight", 1.0) == 0.6


def test_filter_list_without_a_match_gives_none_and_entries_may_hold_gradients():
    assert evaluate([cond(0.5, "mlp")], "model.layers.0.self_attn.o_proj.weight", 0.0) is None
    assert evaluate([cond([0, 1], "mlp")], "model.layers.3.mlp.up_proj.weight", 0.75) == pytest.approx(0.75)


def test_string_list_steps_over_depth():
    assert [evaluate(["a", "b", "c"], "x", t) for t in (0, 0.4, 0.5, 0.99, 1.0)] == ["a", "a", "b", "b", "c"]


def test_t_of_a_layer_within_a_slice():
    assert [layer_t(i, 5) for i in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    assert layer_t(0, 1) == 1.0


def test_schema_accepts_the_three_forms_and_rejects_an_empty_gradient(models):
    a, b = models
    recipe = parse_recipe(slerp_recipe(a, b, "  t:\n    - filter: mlp\n      value: [0, 1]\n    - value: 0.5\n"))
    assert isinstance(recipe.parameters["t"][0], ConditionalParameter)
    assert parse_recipe(slerp_recipe(a, b, "  t: [0, 0.5, 1]\n")).parameters["t"] == [0, 0.5, 1]
    with pytest.raises(ComposerError, match="parameters.t"):
        parse_recipe(slerp_recipe(a, b, "  t: []\n"))


# --- t over layers and slices, resolved by the planner --------------------------------------------


def test_gradient_gives_each_layer_its_value_and_the_tensors_outside_the_layers_t0(models):
    """As mergekit: embeddings, final norm and head all take the gradient's value at t = 0."""
    a, b = models
    args = arguments_of(slerp_recipe(a, b, "  t: [0, 1]\n"))
    for i, expected in enumerate([0, 0.25, 0.5, 0.75, 1]):
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert args[layer(i, suffix)]["t"] == pytest.approx(expected)
    assert args["model.embed_tokens.weight"]["t"] == 0
    assert args["model.norm.weight"]["t"] == 0
    assert args["lm_head.weight"]["t"] == 0


def test_filter_list_gives_attention_mlp_and_default_values(models):
    a, b = models
    args = arguments_of(
        slerp_recipe(
            a,
            b,
            (
                "  t:\n"
                "    - filter: self_attn\n      value: [0, 1]\n"
                "    - filter: mlp\n      value: [1, 0]\n"
                "    - value: 0.5\n"
            ),
        )
    )
    for i in range(LAYERS):
        depth = i / (LAYERS - 1)
        for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert args[layer(i, f"self_attn.{projection}.weight")]["t"] == pytest.approx(depth)
        for projection in ("gate_proj", "up_proj", "down_proj"):
            assert args[layer(i, f"mlp.{projection}.weight")]["t"] == pytest.approx(1 - depth)
        assert args[layer(i, "input_layernorm.weight")]["t"] == 0.5
        assert args[layer(i, "post_attention_layernorm.weight")]["t"] == 0.5
    assert args["model.embed_tokens.weight"]["t"] == 0.5
    assert args["lm_head.weight"]["t"] == 0.5


def test_t_restarts_in_every_slice_and_edges_follow_first_and_last_slice(models):
    a, b = models
    text = (
        "merge_method: slerp\n"
        f"base_model: {a}\n"
        "parameters:\n  t: [0, 1]\n"
        "slices:\n"
        f"  - sources:\n      - model: {a}\n        layer_range: [0, 3]\n      - model: {b}\n        layer_range: [0, 3]\n"
        f"  - sources:\n      - model: {a}\n        layer_range: [3, 5]\n      - model: {b}\n        layer_range: [3, 5]\n"
        f"  - sources:\n      - model: {a}\n        layer_range: [4, 5]\n      - model: {b}\n        layer_range: [4, 5]\n"
    )
    args = arguments_of(text)
    expected = [0, 0.5, 1, 0, 1, 1]  # slices of 3, 2 and 1 layers; a one-layer slice has t=1
    assert [args[layer(i, "self_attn.q_proj.weight")]["t"] for i in range(6)] == pytest.approx(expected)
    assert args["@inputs"][layer(5, "mlp.up_proj.weight")] == [
        (str(b), layer(4, "mlp.up_proj.weight")),
        (str(a), layer(4, "mlp.up_proj.weight")),
    ]
    assert args["model.embed_tokens.weight"]["t"] == 0
    assert args["model.norm.weight"]["t"] == 0


def test_edge_tensors_come_from_the_first_and_last_slice_sources(models):
    a, b = models
    text = (
        "merge_method: passthrough\n"
        "parameters:\n  scale: [0.5, 1.5]\n"
        "slices:\n"
        f"  - sources:\n      - model: {a}\n        layer_range: [0, 3]\n"
        f"  - sources:\n      - model: {b}\n        layer_range: [2, 5]\n"
    )
    args = arguments_of(text)
    assert args["@inputs"]["model.embed_tokens.weight"] == [(str(a), "model.embed_tokens.weight")]
    assert args["@inputs"]["model.norm.weight"] == [(str(b), "model.norm.weight")]
    assert args["@inputs"]["lm_head.weight"] == [(str(b), "lm_head.weight")]
    assert args["model.embed_tokens.weight"]["scale"] == [0.5]
    assert args["lm_head.weight"]["scale"] == [0.5]  # the last slice's sources, at t = 0 as in mergekit
    assert [args[layer(i, "mlp.up_proj.weight")]["scale"][0] for i in range(6)] == pytest.approx([0.5, 1, 1.5] * 2)
    assert args["@inputs"][layer(3, "mlp.up_proj.weight")] == [(str(b), layer(2, "mlp.up_proj.weight"))]


# --- precedence -----------------------------------------------------------------------------------


def two_source_linear(
    a: Path, b: Path, top: str = "", per_slice: str = "", source_a: str = "", source_b: str = ""
) -> str:
    def block(indent: str, body: str) -> str:
        return f"{indent}parameters:\n" + "".join(f"{indent}  {line}\n" for line in body.splitlines()) if body else ""

    return (
        "merge_method: linear\n"
        + block("", top)
        + "slices:\n  - sources:\n"
        + f"      - model: {a}\n        layer_range: [0, {LAYERS}]\n"
        + block("        ", source_a)
        + f"      - model: {b}\n        layer_range: [0, {LAYERS}]\n"
        + block("        ", source_b)
        + block("    ", per_slice)
    )


def test_per_source_beats_per_slice_beats_top_level(models):
    a, b = models
    args = arguments_of(
        two_source_linear(a, b, top="weight: 1\nnormalize: false", per_slice="weight: 2", source_a="weight: 3")
    )
    name = layer(1, "mlp.up_proj.weight")
    assert args[name]["weight"] == [3, 2]
    assert args[name]["normalize"] is False
    args = arguments_of(two_source_linear(a, b, top="weight: 1", source_a="weight: 3"))
    assert args[name]["weight"] == [3, 1]
    assert args[name]["normalize"] is True  # the default


def test_a_filter_that_does_not_match_falls_through_to_the_next_level(models):
    a, b = models
    source_a = "weight:\n  - filter: mlp\n    value: 5"
    args = arguments_of(two_source_linear(a, b, per_slice="weight: 2", source_a=source_a))
    assert args[layer(0, "mlp.gate_proj.weight")]["weight"] == [5, 2]
    assert args[layer(0, "self_attn.v_proj.weight")]["weight"] == [2, 2]
    assert args["model.embed_tokens.weight"]["weight"] == [2, 2]


def test_models_entry_parameters_beat_top_level(models):
    a, b = models
    text = f"merge_method: linear\nparameters:\n  weight: 1\nmodels:\n  - model: {a}\n    parameters:\n      weight: [0, 1]\n  - model: {b}\n"
    args = arguments_of(text)
    assert [args[layer(i, "self_attn.o_proj.weight")]["weight"][0] for i in range(LAYERS)] == pytest.approx(
        [0, 0.25, 0.5, 0.75, 1]
    )
    assert all(args[layer(i, "self_attn.o_proj.weight")]["weight"][1] == 1 for i in range(LAYERS))
    assert args["model.embed_tokens.weight"]["weight"] == [0, 1]
    assert args["lm_head.weight"]["weight"] == [0, 1]


def test_the_same_model_twice_in_a_slice_keeps_its_layers_and_parameters_apart(models):
    a, _ = models
    text = (
        "merge_method: linear\nslices:\n  - sources:\n"
        f"      - model: {a}\n        layer_range: [0, 2]\n        parameters:\n          weight: 0.25\n"
        f"      - model: {a}\n        layer_range: [3, 5]\n        parameters:\n          weight: 0.75\n"
    )
    args = arguments_of(text)
    assert args["@inputs"][layer(1, "mlp.up_proj.weight")] == [
        (str(a), layer(1, "mlp.up_proj.weight")),
        (str(a), layer(4, "mlp.up_proj.weight")),
    ]
    assert args[layer(1, "mlp.up_proj.weight")]["weight"] == [0.25, 0.75]


# --- mistakes are errors that name the place -------------------------------------------------------


def test_a_per_tensor_parameter_set_per_model_is_an_error(models):
    a, b = models
    text = f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n    parameters:\n      t: 0.5\n"
    with pytest.raises(ComposerError, match=r"models\[1\]\.parameters\.t.*not per model"):
        arguments_of(text)


def test_unknown_and_missing_and_ill_typed_parameters_are_errors(models):
    a, b = models
    with pytest.raises(ComposerError, match="does not take 'desnity'.*Did you mean 'density'"):
        arguments_of(slerp_recipe(a, b, "  desnity: 0.5\n"))
    with pytest.raises(ComposerError, match="needs parameter 't'"):
        arguments_of(f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n")
    with pytest.raises(ComposerError, match="needs parameter 'weight' for model"):
        arguments_of(two_source_linear(a, b, source_a="weight: 1"))
    with pytest.raises(ComposerError, match="'t' must be a number"):
        arguments_of(slerp_recipe(a, b, "  t: half\n"))
    with pytest.raises(ComposerError, match="sum to zero"):
        arguments_of(two_source_linear(a, b, source_a="weight: 1", source_b="weight: -1"))
    args = arguments_of(
        two_source_linear(a, b, top="weight: 1\nnormalize: 0.0")
    )  # mergekit configs write flags as numbers
    assert args[layer(0, "mlp.up_proj.weight")]["normalize"] is False
    args = arguments_of(two_source_linear(a, b, top="normalize: false", source_a="weight: 1", source_b="weight: -1"))
    assert args[layer(0, "mlp.up_proj.weight")]["weight"] == [1, -1]


def test_slerp_needs_a_base_model(models):
    a, b = models
    with pytest.raises(ComposerError, match="needs a base_model"):
        arguments_of(f"merge_method: slerp\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  t: 0.5\n")


def test_mergekit_dict_spellings_of_model_references(models):
    a, b = models
    text = (
        f"merge_method: slerp\nbase_model:\n  model:\n    path: {a}\n"
        f"models:\n  - model:\n      model:\n        path: {a}\n  - model:\n      model:\n        path: {b}\n"
        "parameters:\n  t: 0.5\n"
    )
    recipe = parse_recipe(text)
    assert recipe.base_model == str(a)
    assert [entry.model for entry in recipe.models] == [str(a), str(b)]
    args = arguments_of(text)
    assert args["@inputs"][layer(0, "mlp.up_proj.weight")] == [
        (str(b), layer(0, "mlp.up_proj.weight")),
        (str(a), layer(0, "mlp.up_proj.weight")),
    ]
    sliced = f"merge_method: passthrough\nslices:\n  - sources:\n      - model:\n          model:\n            path: {b}\n        layer_range: [0, 2]\n"
    assert parse_recipe(sliced).slices[0].sources[0].model == str(b)
    assert arguments_of(sliced)["@inputs"]["model.norm.weight"] == [(str(b), "model.norm.weight")]


def test_a_parameter_of_another_method_is_ignored_with_a_warning_as_mergekit_does(models):
    """mergekit configs in the wild carry leftovers such as density on slerp; they must run unchanged."""
    from composer.errors import ComposerWarning

    a, b = models
    with pytest.warns(
        ComposerWarning, match=r"parameters\.density': merge method 'slerp' does not use 'density'.*ignored"
    ):
        with_leftover = arguments_of(slerp_recipe(a, b, "  t: 0.5\n  density: 0.5\n"))
    assert with_leftover == arguments_of(slerp_recipe(a, b, "  t: 0.5\n"))
