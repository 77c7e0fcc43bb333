"""The merge methods against formulas written out here, plus end-to-end merges of tiny llamas."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from composer.compose import compose_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.methods import METHODS, MergeMethod, Parameter, get_method, register
from composer.methods.linear import linear
from composer.methods.passthrough import passthrough
from composer.methods.slerp import slerp
from helpers import load_state, save_tiny_model

# --- reference formulas (float64, straight from the definitions) -----------------------------------


def reference_linear(tensors, weights, normalize):
    total = sum(w * x.double() for w, x in zip(weights, tensors))
    return total / sum(weights) if normalize else total


def reference_slerp(a, b, t):
    a64, b64 = a.double().flatten(), b.double().flatten()
    theta = math.acos(float(a64 @ b64 / (a64.norm() * b64.norm())))
    return (math.sin((1 - t) * theta) * a.double() + math.sin(t * theta) * b.double()) / math.sin(theta)


def random_tensors(count, shape=(16, 24), seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for _ in range(count)]


# --- linear ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_the_weighted_sum(normalize):
    tensors = random_tensors(3)
    weights = [0.2, 1.5, -0.4]
    result = linear(tensors, weights, normalize)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result.double(), reference_linear(tensors, weights, normalize), rtol=1e-5, atol=1e-5)


def test_linear_normalize_changes_the_scale_only():
    tensors = random_tensors(2, seed=3)
    raw = linear(tensors, [2.0, 2.0], normalize=False)
    averaged = linear(tensors, [2.0, 2.0], normalize=True)
    torch.testing.assert_close(raw, averaged * 4)
    torch.testing.assert_close(averaged, (tensors[0] + tensors[1]) / 2)


def test_linear_of_half_precision_returns_that_dtype_and_accumulates_finely():
    tensors = random_tensors(4, seed=5, dtype=torch.bfloat16)
    weights = [0.1, 0.2, 0.3, 0.4]
    result = linear(tensors, weights)
    assert result.dtype == torch.bfloat16
    torch.testing.assert_close(
        result.double(), reference_linear(tensors, weights, True).bfloat16().double(), rtol=0, atol=0.02
    )


def test_linear_weights_summing_to_zero_cannot_be_normalised():
    a, b = random_tensors(2)
    with pytest.raises(ValueError, match="sum to zero"):
        linear([a, b], [1.0, -1.0], normalize=True)
    torch.testing.assert_close(linear([a, b], [1.0, -1.0], normalize=False), a - b)


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_linear_of_identical_inputs_returns_the_input(weights, seed):
    assume(abs(sum(weights)) > 0.05 * sum(abs(w) for w in weights) and abs(sum(weights)) > 1e-3)
    (x,) = random_tensors(1, shape=(7, 5), seed=seed)
    result = linear([x] * len(weights), weights, normalize=True)
    torch.testing.assert_close(result, x, rtol=1e-4, atol=1e-4)


# --- slerp ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.1, 0.3, 0.5, 0.8, 0.95])
def test_slerp_matches_the_formula(t):
    a, b = random_tensors(2, seed=11)
    result = slerp(a, b, t)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result.double(), reference_slerp(a, b, t), rtol=1e-5, atol=1e-5)


def test_slerp_of_half_precision_tensors_in_chunks_is_the_whole_tensor_formula():
    """bf16 tensors of several cache-sized chunks: the angle from float64 dot products, then a * w_a + b * w_b
    in bf16, exactly as whole-tensor operations give it (and however torch splits them between threads)."""
    generator = torch.Generator().manual_seed(13)
    a = torch.randn(700, 1000, generator=generator).bfloat16()
    b = (a.float() + 0.3 * torch.randn(700, 1000, generator=generator)).bfloat16()
    from composer.methods.slerp import DOT_CHUNK

    a64, b64 = a.double().reshape(-1).split(DOT_CHUNK), b.double().reshape(-1).split(DOT_CHUNK)
    dot = lambda xs, ys: sum(float(x @ y) for x, y in zip(xs, ys))  # noqa: E731
    theta = math.acos(dot(a64, b64) / (math.sqrt(dot(a64, a64)) * math.sqrt(dot(b64, b64))))
    expected = a * (math.sin(0.6 * theta) / math.sin(theta)) + b * (math.sin(0.4 * theta) / math.sin(theta))
    assert torch.equal(slerp(a, b, 0.4), expected)


def test_slerp_endpoints_are_exact():
    a, b = random_tensors(2, seed=12)
    assert torch.equal(slerp(a, b, 0), a)
    assert torch.equal(slerp(a, b, 1), b)
    assert torch.equal(slerp(a, b, 0.0), a)


def test_slerp_keeps_unit_vectors_on_the_sphere():
    a = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    for t in (0.2, 0.5, 0.7):
        result = slerp(a, b, t)
        torch.testing.assert_close(
            result, torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2), 0.0], dtype=torch.float64)
        )


def unit_pair(cosine):
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([cosine, math.sqrt(1 - cosine**2)], dtype=torch.float64)
    return a, b


def test_slerp_falls_back_to_lerp_when_nearly_parallel():
    a, b = unit_pair(0.9999)  # above the 0.9995 threshold: (1-t) a + t b, whose norm dips below 1
    result = slerp(a, b, 0.5)
    torch.testing.assert_close(result, (a + b) / 2, rtol=0, atol=1e-15)
    assert float(result.norm()) < 1 - 1e-5
    a, b = unit_pair(0.999)  # below the threshold: true slerp stays on the unit circle
    assert float(slerp(a, b, 0.5).norm()) == pytest.approx(1.0, abs=1e-12)
    a, b = random_tensors(2, seed=13)
    near = a * 3 + b * 1e-3
    torch.testing.assert_close(slerp(a, near, 0.3), torch.lerp(a, near, 0.3))


def test_slerp_of_opposite_or_zero_tensors_is_lerp_not_nan():
    (a,) = random_tensors(1, seed=14)
    assert torch.allclose(slerp(a, -a, 0.5), torch.zeros_like(a))
    zero = torch.zeros_like(a)
    torch.testing.assert_close(slerp(zero, a, 0.25), 0.25 * a)


def test_slerp_of_bfloat16_matches_float32():
    a, b = random_tensors(2, shape=(64, 64), seed=15, dtype=torch.bfloat16)
    result = slerp(a, b, 0.4)
    assert result.dtype == torch.bfloat16
    torch.testing.assert_close(result.double(), reference_slerp(a, b, 0.4), rtol=0, atol=0.03)


@settings(max_examples=60, deadline=None)
@given(t=st.floats(0, 1), seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3))
def test_slerp_of_a_tensor_with_itself_returns_it(t, seed, scale):
    (x,) = random_tensors(1, shape=(9, 4), seed=seed)
    x = x * scale
    torch.testing.assert_close(slerp(x, x.clone(), t), x, rtol=1e-5, atol=1e-6 * scale)


@settings(max_examples=40, deadline=None)
@given(t=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_slerp_interpolates_the_norm_of_unit_vectors_exactly(t, seed):
    a, b = random_tensors(2, shape=(32,), seed=seed, dtype=torch.float64)
    a, b = a / a.norm(), b / b.norm()
    assume(abs(float(a @ b)) < 0.999)
    assert float(slerp(a, b, t).norm()) == pytest.approx(1.0, abs=1e-9)


# --- passthrough and the registry -----------------------------------------------------------------


def test_passthrough_copies_or_scales():
    (x,) = random_tensors(1, seed=16)
    assert passthrough(x) is x
    assert passthrough(x, 1) is x
    torch.testing.assert_close(passthrough(x, 0.5), x * 0.5)
    assert torch.equal(passthrough(x, 0.0), torch.zeros_like(x))
    method = get_method("passthrough")
    torch.testing.assert_close(method.apply([x], None, {"scale": [2.0]}), 2 * x)


def test_registry_describes_each_method():
    assert get_method("linear").parameter("weight").per_model
    assert get_method("linear").parameter("normalize").default is True
    assert get_method("slerp").needs_base and get_method("slerp").parameter("t").required
    with pytest.raises(ComposerError, match="Unknown merge_method 'slurp'"):
        get_method("slurp")


def test_a_new_method_is_one_function_and_one_register_line(tmp_path, monkeypatch):
    monkeypatch.setattr("composer.methods.registry.METHODS", dict(METHODS))

    def difference(tensors, base, params):  # base + alpha * (model - base)
        return base + params["alpha"] * (tensors[0] - base)

    register(
        MergeMethod("difference_test", difference, (Parameter("alpha", default=1.0),), needs_base=True, max_models=1)
    )
    a = save_tiny_model(tmp_path / "a", "llama", 2, seed=1)
    b = save_tiny_model(tmp_path / "b", "llama", 2, seed=2)
    compose_text(
        f"merge_method: difference_test\nbase_model: {a}\nmodels:\n  - model: {b}\nparameters:\n  alpha: 0.5\n",
        tmp_path / "out",
        ExecutionOptions(),
    )
    out, state_a, state_b = load_state(tmp_path / "out"), load_state(a), load_state(b)
    for name, tensor in out.items():
        torch.testing.assert_close(tensor, (state_a[name] + state_b[name]) / 2)


# --- end to end on tiny llamas -------------------------------------------------------------------


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("method-models")
    return save_tiny_model(root / "a", "llama", 3, seed=1), save_tiny_model(root / "b", "llama", 3, seed=2)


def compose(text: str, out: Path) -> dict[str, torch.Tensor]:
    compose_text(text, out, ExecutionOptions())
    return load_state(out)


@pytest.mark.parametrize("t, expected", [(0, "a"), (1, "b")])
def test_slerp_endpoints_reproduce_the_parents(llamas, tmp_path, t, expected):
    a, b = llamas
    state = compose(
        f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  t: {t}\n",
        tmp_path / "out",
    )
    parent = load_state(a if expected == "a" else b)
    assert state.keys() == parent.keys()
    for name, tensor in parent.items():
        assert torch.equal(state[name], tensor), name


def test_slerp_with_a_gradient_and_filters_matches_the_formula_per_tensor(llamas, tmp_path):
    a, b = llamas
    text = (
        f"merge_method: slerp\nbase_model: {a}\nslices:\n  - sources:\n"
        f"      - model: {a}\n        layer_range: [0, 3]\n      - model: {b}\n        layer_range: [0, 3]\n"
        "parameters:\n  t:\n    - filter: self_attn\n      value: [0, 1]\n    - value: 0.3\n"
    )
    state, state_a, state_b = compose(text, tmp_path / "out"), load_state(a), load_state(b)
    for i, t in enumerate([0.0, 0.5, 1.0]):
        name = f"model.layers.{i}.self_attn.k_proj.weight"
        torch.testing.assert_close(
            state[name].double(),
            reference_slerp(state_a[name], state_b[name], t)
            if 0 < t < 1
            else (state_a, state_b)[int(t)][name].double(),
        )
        name = f"model.layers.{i}.mlp.up_proj.weight"
        torch.testing.assert_close(
            state[name].double(), reference_slerp(state_a[name], state_b[name], 0.3), rtol=1e-5, atol=1e-6
        )


def test_linear_of_a_model_with_itself_is_that_model(llamas, tmp_path):
    a, _ = llamas
    state_a = load_state(a)
    state = compose(
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters:\n      weight: 1.0\n  - model: {a}\n    parameters:\n      weight: 1.0\n",
        tmp_path / "equal",
    )
    assert state.keys() == state_a.keys()
    for name, tensor in state_a.items():
        assert torch.equal(state[name], tensor), name
    state = compose(
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters:\n      weight: 0.3\n  - model: {a}\n    parameters:\n      weight: 0.7\n",
        tmp_path / "uneven",
    )
    for name, tensor in state_a.items():
        torch.testing.assert_close(state[name], tensor)


def test_linear_unnormalised_and_passthrough_scale_end_to_end(llamas, tmp_path):
    a, b = llamas
    state_a, state_b = load_state(a), load_state(b)
    state = compose(
        f"merge_method: linear\nparameters:\n  normalize: false\nmodels:\n  - model: {a}\n    parameters:\n      weight: 0.5\n  - model: {b}\n    parameters:\n      weight: 2\n",
        tmp_path / "linear",
    )
    for name in state_a:
        torch.testing.assert_close(state[name], 0.5 * state_a[name] + 2 * state_b[name])
    state = compose(
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 3]\n"
        "parameters:\n  scale:\n    - filter: o_proj\n      value: 0.0\n    - filter: down_proj\n      value: 0.5\n    - value: 1.0\n",
        tmp_path / "scaled",
    )
    for name, tensor in state_a.items():
        factor = 0.0 if "o_proj" in name else 0.5 if "down_proj" in name else 1.0
        assert torch.equal(state[name], tensor * factor), name


def test_mergekit_style_config_with_bfloat16(llamas, tmp_path):
    a, b = llamas
    text = f"""
models:
  - model:
      model:
        path: {b}
    parameters:
      weight: 0.6
  - model: {a}
    parameters:
      weight: 0.4
merge_method: linear
base_model:
  model:
    path: {a}
parameters:
  normalize: true
dtype: bfloat16
"""
    state, state_a, state_b = compose(text, tmp_path / "out"), load_state(a), load_state(b)
    assert state.keys() == state_a.keys()
    for name, tensor in state.items():
        assert tensor.dtype == torch.bfloat16, name
        expected = 0.6 * state_b[name].bfloat16().double() + 0.4 * state_a[name].bfloat16().double()
        torch.testing.assert_close(tensor.double(), expected, rtol=0.01, atol=0.01)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"

    slerp_text = f"""
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
      - model: {b}
        layer_range: [0, 3]
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""
    state = compose(slerp_text, tmp_path / "slerp")
    assert all(tensor.dtype == torch.bfloat16 for tensor in state.values())
    assert torch.equal(
        state["model.layers.0.self_attn.q_proj.weight"], state_a["model.layers.0.self_attn.q_proj.weight"].bfloat16()
    )
    assert torch.equal(
        state["model.layers.0.mlp.up_proj.weight"], state_b["model.layers.0.mlp.up_proj.weight"].bfloat16()
    )
