"""nuslerp, multislerp, karcher, model_stock, nearswap, arcee_fusion, ram and ramplus_tl: each against a
reference written here from its defining formula (float64, not calling composer's code), properties
checked with hypothesis, the registry entries, and end-to-end merges of tiny llamas."""

from __future__ import annotations

import math
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from composer.compose import compose_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.methods import get_method
from composer.methods.model_stock import model_stock
from composer.methods.selection import arcee_fusion, nearswap, ram, ramplus_tl
from composer.methods.spherical import karcher, multislerp, nuslerp, nuslerp_t
from helpers import load_state, logits_of, save_fine_tune, save_tiny_model


def random_tensors(count, shape=(12, 20), seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for _ in range(count)]


def fine_tunes(count, shape=(12, 20), seed=0, scale=0.05, density=1.0):
    """A base and `count` tensors near it (as fine-tunes are); with density < 1 each changes only some entries."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    tuned = []
    for _ in range(count):
        change = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
        if density < 1:
            change *= torch.rand(shape, generator=generator, dtype=torch.float64) < density
        tuned.append((base + change).float())
    return tuned, base.float()


def close(actual, expected, tolerance=2e-5):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tolerance, atol=tolerance)


# --- reference formulas (float64) -----------------------------------------------------------------


def ref_slerp_vector(a, b, t):
    """Shoemake's slerp of two vectors; linear interpolation when they are colinear."""
    cosine = float(a @ b / (a.norm() * b.norm()))
    theta = math.acos(max(-1.0, min(1.0, cosine)))
    if math.sin(theta) < 1e-12:
        return (1 - t) * a + t * b
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def ref_nuslerp(x0, x1, weights, base=None, row_wise=False, flatten=True):
    t = weights[1] / sum(weights)
    x0, x1 = x0.double(), x1.double()
    if base is not None:
        x0, x1 = x0 - base.double(), x1 - base.double()
    if flatten:
        result = ref_slerp_vector(x0.flatten(), x1.flatten(), t).reshape(x0.shape)
    elif row_wise:  # every column of a matrix
        result = torch.stack([ref_slerp_vector(x0[:, j], x1[:, j], t) for j in range(x0.shape[1])], dim=1)
    else:  # every row
        result = torch.stack([ref_slerp_vector(x0[i], x1[i], t) for i in range(x0.shape[0])])
    return result if base is None else result + base.double()


def ref_multislerp(tensors, weights, base=None):
    """Closed form: the weighted mean of the unit directions, put back on the sphere, times the weighted mean norm."""
    w = [x / sum(weights) for x in weights]
    xs = [x.double().flatten() - (0 if base is None else base.double().flatten()) for x in tensors]
    direction = sum(wi * x / x.norm() for wi, x in zip(w, xs))
    result = direction / direction.norm() * sum(wi * x.norm() for wi, x in zip(w, xs))
    result = result.reshape(tensors[0].shape)
    return result if base is None else result + base.double()


def ref_karcher(tensors, steps=200):
    """Riemannian gradient descent for argmin_m sum_i d(m, u_i)^2 on the sphere, started from the first direction."""
    units = [x.double().flatten() / x.double().norm() for x in tensors]
    m = units[0].clone()
    for _ in range(steps):
        tangent = torch.zeros_like(m)
        for u in units:
            c = float((m @ u).clamp(-1, 1))
            theta = math.acos(c)
            if theta > 1e-15:
                tangent += theta / math.sin(theta) * (u - c * m) / len(units)
        step = float(tangent.norm())
        if step < 1e-15:
            break
        m = math.cos(step) * m + math.sin(step) * tangent / step
        m = m / m.norm()
    scale = sum(float(x.double().norm()) for x in tensors) / len(tensors)
    return (scale * m).reshape(tensors[0].shape)


def ref_model_stock(tensors, base, filter_wise=False):
    """Jang et al. 2024, eq. for N fine-tunes: t = N cos / (1 + (N-1) cos), w = t avg + (1-t) w0."""
    w0 = base.double()
    ws = [x.double() for x in tensors]
    rows = (lambda x: x.reshape(1, -1)) if not filter_wise else (lambda x: x.reshape(-1, x.shape[-1]))
    offsets = [rows(w - w0) for w in ws]
    n = len(ws)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            a, b = offsets[i], offsets[j]
            cosines.append((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)))
    cosine = torch.stack(cosines).mean(0).unsqueeze(-1)
    t = n * cosine / (1 + (n - 1) * cosine)
    average = rows(sum(ws) / n)
    return (t * average + (1 - t) * rows(w0)).reshape(base.shape)


def ref_nearswap(base, other, t):
    out = []
    for a, b in zip(base.double().flatten().tolist(), other.double().flatten().tolist()):
        distance = abs(a - b)
        w = 1.0 if distance <= t else t / distance  # the 1e-6 floor only matters for t < 1e-6
        out.append(w * b + (1 - w) * a)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def ref_arcee_fusion(base, other):
    """(result, borderline): borderline marks entries whose importance is within 1e-3 (relative) of the
    threshold, where float32 and float64 may fall on different sides (a small KL summed in float32 is
    only good to about 1e-4)."""
    a, b = base.double(), other.double()
    p = torch.softmax(b, dim=-1) + 1e-8
    q = torch.softmax(a, dim=-1) + 1e-8
    kl = (p * (p / q).log()).sum(-1, keepdim=True)
    importance = ((b - a).abs() * kl).flatten()
    ordered = importance.sort().values
    n = importance.numel()
    q1, median, q3 = (ordered[k * (n - 1) // 4] for k in (1, 2, 3))
    threshold = median + 1.5 * (q3 - q1)
    keep = (importance >= threshold).reshape(a.shape)
    borderline = ((importance - threshold).abs() <= 1e-3 * threshold.abs()).reshape(a.shape)
    return torch.where(keep, b, a), borderline


def check_fusion(result, base, other):
    expected, borderline = ref_arcee_fusion(base, other)
    assert int(borderline.sum()) <= max(2, borderline.numel() // 1000)
    close(result[~borderline], expected[~borderline], tolerance=1e-6)


def ref_ram(tensors, base, epsilon=1e-5, r=None, alpha=None):
    """RAM (and, with r and alpha, RAM+ tensor-local), entry by entry."""
    b = base.double().flatten().tolist()
    deltas = [(x.double().flatten() - base.double().flatten()).tolist() for x in tensors]
    changed = [[abs(d) > epsilon for d in row] for row in deltas]
    counts = [sum(column) for column in zip(*changed)]
    scales = [1.0] * len(tensors)
    if r is not None:
        for i, row in enumerate(changed):
            shared = sum(1 for c, k in zip(row, counts) if c and k > 1)
            unique = sum(1 for c, k in zip(row, counts) if c and k == 1)
            scales[i] = 1 + r * min(max(shared / max(unique, epsilon), 0), alpha)
    out = []
    for j, value in enumerate(b):
        if counts[j] == 1:
            value += sum(scales[i] * deltas[i][j] for i in range(len(tensors)) if changed[i][j])
        elif counts[j] > 1:
            value += sum(deltas[i][j] for i in range(len(tensors)) if changed[i][j]) / counts[j]
        out.append(value)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


# --- nuslerp --------------------------------------------------------------------------------------


@pytest.mark.parametrize("row_wise, flatten", [(False, True), (False, False), (True, False)])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_matches_slerp_per_vector(row_wise, flatten, with_base):
    x0, x1, base = random_tensors(3, seed=1)
    weights = [0.7, 1.3]
    result = nuslerp([x0, x1], weights, base if with_base else None, row_wise, flatten)
    assert result.dtype == torch.float32 and result.shape == x0.shape
    close(result, ref_nuslerp(x0, x1, weights, base if with_base else None, row_wise, flatten))


def test_nuslerp_of_colinear_vectors_is_linear_and_weights_that_cancel_give_the_midpoint():
    (x,) = random_tensors(1, seed=2)
    close(nuslerp([x, 3 * x], [1.0, 1.0]), 2 * x)  # same direction: (1 - t) x + t 3x
    y = random_tensors(1, seed=3)[0]
    close(nuslerp([x, y], [2.0, -2.0]), ref_nuslerp(x, y, [1.0, 1.0]))  # sum 0: t = 0.5 (mergekit's choice)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), weight=st.floats(0.01, 100), first=st.booleans(), with_base=st.booleans())
def test_nuslerp_with_all_weight_on_one_model_returns_it(seed, weight, first, with_base):
    x0, x1, base = random_tensors(3, shape=(6, 5), seed=seed)
    weights = [weight, 0.0] if first else [0.0, weight]
    result = nuslerp([x0, x1], weights, base if with_base else None)
    torch.testing.assert_close(result, x0 if first else x1, rtol=1e-5, atol=1e-5)


# --- multislerp -----------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_matches_the_normalised_mean_direction(count, with_base):
    tensors, base = fine_tunes(count, seed=count)
    weights = [0.5 + 0.4 * i for i in range(count)]
    result = multislerp(tensors, weights, base if with_base else None)
    close(result, ref_multislerp(tensors, weights, base if with_base else None))


def test_multislerp_of_two_equal_norm_tensors_with_equal_weights_is_the_slerp_midpoint():
    a, b = random_tensors(2, seed=4)
    b = b * (a.norm() / b.norm())
    close(
        multislerp([a, b], [1.0, 1.0]),
        ref_slerp_vector(a.double().flatten(), b.double().flatten(), 0.5).reshape(a.shape),
    )


def test_multislerp_normalize_weights_and_cancelling_directions():
    tensors, _ = fine_tunes(3, seed=5)
    torch.testing.assert_close(multislerp(tensors, [2.0, 4.0, 6.0]), multislerp(tensors, [1.0, 2.0, 3.0]))
    (x,) = random_tensors(1, seed=6)
    close(multislerp([x, -x], [1.0, 1.0]), torch.zeros_like(x))  # two opposite tensors: the weighted sum
    with pytest.raises(ComposerError, match="cancel"):
        multislerp([x, -x, x, -x], [1.0, 1.0, 1.0, 1.0])


@settings(max_examples=40, deadline=None)
@given(
    weights=st.lists(st.floats(0.01, 10), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-2, 1e2),
)
def test_multislerp_of_identical_inputs_returns_the_input(weights, seed, scale):
    (x,) = random_tensors(1, shape=(7, 5), seed=seed)
    x = x * scale
    torch.testing.assert_close(multislerp([x] * len(weights), weights), x, rtol=1e-5, atol=1e-5 * scale)


# --- karcher --------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3, 4])
def test_karcher_matches_riemannian_gradient_descent(count):
    tensors, _ = fine_tunes(count, seed=10 + count, scale=0.5)
    close(karcher(tensors), ref_karcher(tensors), tolerance=1e-4)  # stops once the step is below tol = 1e-5
    as_float64 = [t.double() for t in tensors]
    close(karcher(as_float64, max_iter=100, tol=1e-12), ref_karcher(as_float64), tolerance=1e-10)
    spread = random_tensors(count, shape=(8, 6), seed=20 + count)  # far apart: needs more steps
    close(karcher(spread, max_iter=100, tol=1e-9), ref_karcher(spread), tolerance=1e-4)


def test_karcher_mean_is_a_critical_point_and_zero_tensors_only_count_in_the_scale():
    tensors = random_tensors(3, seed=7, dtype=torch.float64)
    mean = karcher(tensors, max_iter=200, tol=1e-12)
    m = mean.flatten() / mean.norm()
    gradient = torch.zeros_like(m)  # sum of the log maps log_m(u_i): zero at the Karcher mean
    for x in tensors:
        u = x.flatten() / x.norm()
        theta = math.acos(float(m @ u))
        gradient += theta / math.sin(theta) * (u - (m @ u) * m)
    assert float(gradient.norm()) < 1e-9
    a, b = random_tensors(2, seed=8)
    with_zero = karcher([a, b, torch.zeros_like(a)])
    close(with_zero, karcher([a, b]) * 2 / 3)


@settings(max_examples=30, deadline=None)
@given(count=st.integers(1, 5), seed=st.integers(0, 2**16), scale=st.floats(1e-2, 1e2))
def test_karcher_of_identical_inputs_returns_the_input(count, seed, scale):
    (x,) = random_tensors(1, shape=(6, 4), seed=seed)
    x = x * scale
    torch.testing.assert_close(karcher([x.clone() for _ in range(count)]), x, rtol=1e-5, atol=1e-5 * scale)


# --- model_stock ----------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_the_paper(count, filter_wise):
    tensors, base = fine_tunes(count, seed=30 + count)
    tensors = [t + 0.03 * tensors[0] for t in tensors]  # correlated updates: 0 < cos < 1
    close(model_stock(tensors, base, filter_wise), ref_model_stock(tensors, base, filter_wise))


@pytest.mark.parametrize("count", [2, 3])
def test_model_stock_of_bf16_tensors_matches_the_paper(count):
    """The half-precision path (angle from float32/float64 sums over pieces, blend in bf16): the float64 formula
    applied to the bf16 inputs, to within the rounding of the bf16 blend."""
    tensors, base = fine_tunes(count, shape=(300, 900), seed=50 + count)
    tensors = [(t + 0.03 * tensors[0]).bfloat16() for t in tensors]
    base = base.bfloat16()
    result = model_stock(tensors, base)
    assert result.dtype == torch.bfloat16
    expected = ref_model_stock([t.double() for t in tensors], base.double())
    torch.testing.assert_close(result.double(), expected, rtol=2**-6, atol=2**-8)


def test_model_stock_of_a_vector_and_its_geometry():
    tensors, base = fine_tunes(2, shape=(32,), seed=40)
    close(model_stock(tensors, base, filter_wise=True), ref_model_stock(tensors, base))  # 1-D: one row either way
    # orthogonal updates of equal length: cos = 0, t = 0, the base; opposite updates of two: 1 + cos = 0, the base
    base = torch.zeros(4)
    assert torch.equal(model_stock([torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])], base), base)
    assert torch.equal(model_stock([torch.tensor([1.0, 2, 0, 0]), torch.tensor([-1.0, -2, 0, 0])], base), base)


@settings(max_examples=40, deadline=None)
@given(count=st.integers(2, 5), seed=st.integers(0, 2**16), filter_wise=st.booleans())
def test_model_stock_of_identical_fine_tunes_returns_that_fine_tune(count, seed, filter_wise):
    (tuned,), base = fine_tunes(1, shape=(5, 6), seed=seed)
    torch.testing.assert_close(
        model_stock([tuned.clone() for _ in range(count)], base, filter_wise), tuned, rtol=1e-5, atol=1e-6
    )


# --- nearswap -------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.001, 0.02, 0.1, 1.0])
def test_nearswap_matches_the_formula(t):
    (other,), base = fine_tunes(1, seed=50, scale=0.05)
    result = nearswap(base, other, t)
    close(result, ref_nearswap(base, other, t), tolerance=1e-6)
    assert torch.equal(nearswap(base, other, 0.0), base)
    assert torch.equal(nearswap(base, other, 1e9), other)


# --- arcee_fusion ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64,), (24, 40), (3, 8, 16)])
def test_arcee_fusion_keeps_the_outlier_changes(shape):
    (other,), base = fine_tunes(1, shape=shape, seed=60, scale=0.1)
    result = arcee_fusion(base, other)
    check_fusion(result, base, other)
    taken = result != base
    assert 0 < int(taken.sum()) < taken.numel() // 2  # a minority of entries move
    assert torch.equal(arcee_fusion(base, base.clone()), base)


# --- ram and ramplus_tl ---------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("epsilon", [1e-5, 0.02])
def test_ram_and_ramplus_match_the_definitions(count, epsilon):
    tensors, base = fine_tunes(count, shape=(10, 12), seed=70 + count, density=0.4)
    close(ram(tensors, base, epsilon), ref_ram(tensors, base, epsilon), tolerance=1e-6)
    for r, alpha in [(0.1, 0.2), (0.5, 3.0)]:
        close(ramplus_tl(tensors, base, r, alpha, epsilon), ref_ram(tensors, base, epsilon, r, alpha), tolerance=1e-6)


def test_ramplus_with_r_zero_is_ram_and_without_models_is_the_base():
    tensors, base = fine_tunes(3, seed=80, density=0.5)
    assert torch.equal(ramplus_tl(tensors, base, r=0.0), ram(tensors, base))
    assert ram([], base) is base and ramplus_tl([], base) is base


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), density=st.floats(0.05, 1.0))
def test_ram_of_one_model_is_that_model_where_it_changed(seed, density):
    (tuned,), base = fine_tunes(1, shape=(6, 7), seed=seed, density=density)
    result = ram([tuned], base, epsilon=0.0)
    torch.testing.assert_close(result, tuned, rtol=0, atol=1e-6)


# --- all methods: the registry, inputs left alone, half precision ----------------------------------

DEFAULTS = {
    "nuslerp": {"weight": None, "nuslerp_row_wise": False, "nuslerp_flatten": True},
    "multislerp": {"weight": None, "normalize_weights": True, "eps": 1e-8},
    "karcher": {"max_iter": 10, "tol": 1e-5},
    "model_stock": {"filter_wise": False},
    "nearswap": {"t": None},
    "arcee_fusion": {},
    "ram": {"epsilon": 1e-5},
    "ramplus_tl": {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
}


def test_registry_has_mergekit_names_parameters_and_defaults():
    for name, defaults in DEFAULTS.items():
        method = get_method(name)
        assert {p.name: p.default for p in method.parameters} == defaults, name
    assert get_method("nuslerp").parameter("weight").required and get_method("nuslerp").parameter("weight").per_model
    assert (
        get_method("multislerp").parameter("weight").required and get_method("multislerp").parameter("weight").per_model
    )
    assert get_method("nearswap").parameter("t").required and not get_method("nearswap").parameter("t").per_model
    for name in ("model_stock", "nearswap", "arcee_fusion", "ram", "ramplus_tl"):
        assert get_method(name).needs_base, name
    for name in ("nuslerp", "multislerp"):
        assert get_method(name).optional_base and not get_method(name).needs_base, name
    assert not get_method("karcher").needs_base and not get_method("karcher").optional_base
    assert (get_method("nuslerp").min_models, get_method("nuslerp").max_models) == (2, 2)
    assert get_method("model_stock").min_models == 2
    assert get_method("nearswap").max_models == 1 and get_method("arcee_fusion").max_models == 1


def method_inputs(name, dtype=torch.float32):
    count = {"nuslerp": 2, "nearswap": 1, "arcee_fusion": 1}.get(name, 3)
    tensors, base = fine_tunes(count, shape=(16, 24), seed=90, density=0.5 if name.startswith("ram") else 1.0)
    tensors, base = [t.to(dtype) for t in tensors], base.to(dtype)
    params = {k: v for k, v in DEFAULTS[name].items()}
    if "weight" in params:
        params["weight"] = [1.0 + i for i in range(count)]
    if name == "nearswap":
        params["t"] = 0.01
    uses_base = get_method(name).needs_base or name in ("nuslerp", "multislerp")
    return tensors, base if uses_base else None, params


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_methods_leave_their_inputs_alone_and_keep_the_shape(name):
    tensors, base, params = method_inputs(name)
    copies = [t.clone() for t in tensors] + ([base.clone()] if base is not None else [])
    result = get_method(name).apply(tensors, base, params)
    assert result.shape == tensors[0].shape and torch.isfinite(result).all()
    for original, copy in zip(tensors + ([base] if base is not None else []), copies):
        assert torch.equal(original, copy), name


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_bfloat16_inputs_agree_with_float32_to_bfloat16_precision(name):
    tensors, base, params = method_inputs(name, torch.bfloat16)
    low = get_method(name).apply(tensors, base, params)
    high = get_method(name).apply([t.float() for t in tensors], None if base is None else base.float(), params)
    if name == "arcee_fusion":  # a threshold on a noisy score: each entry is still one parent's or the other's
        (other,) = tensors
        assert bool(((low == base) | (low == other)).all())
        assert abs(float((low != base).float().mean()) - float((high != base.float()).float().mean())) < 0.05
        return
    torch.testing.assert_close(low.float(), high, rtol=0.02, atol=0.05)  # about 1.5 bfloat16 steps at |x| ~ 4


# --- end to end on tiny llamas --------------------------------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("more-methods")
    base = save_tiny_model(root / "base", "llama", 2, seed=3)
    dense = [save_fine_tune(base, root / f"dense{i}", seed=i) for i in range(3)]
    sparse = [save_fine_tune(base, root / f"sparse{i}", seed=10 + i, density=0.3) for i in range(3)]
    return base, dense, sparse


CHECKED = (
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.embed_tokens.weight",
)


def compose(text: str, out: Path) -> dict[str, torch.Tensor]:
    compose_text(text, out, ExecutionOptions())
    return load_state(out)


def models_yaml(folders, weights=None):
    lines = ["models:"]
    for i, folder in enumerate(folders):
        lines.append(f"  - model: {folder}")
        if weights is not None:
            lines.append(f"    parameters:\n      weight: {weights[i]}")
    return "\n".join(lines) + "\n"


def test_end_to_end_spherical_methods(family, tmp_path):
    base, dense, _ = family
    states = [load_state(folder) for folder in dense]
    state_base = load_state(base)
    # nuslerp, rows separately (a mergekit-style config)
    out = compose(
        "merge_method: nuslerp\n"
        + models_yaml(dense[:2], [0.4, 0.6])
        + "parameters:\n  nuslerp_flatten: false\ndtype: float32\n",
        tmp_path / "nuslerp",
    )
    assert out.keys() == state_base.keys()
    for name in CHECKED[:2]:
        expected = ref_nuslerp(states[0][name], states[1][name], [0.4, 0.6], flatten=len(states[0][name].shape) == 1)
        close(out[name], expected)
    # multislerp of three
    out = compose("merge_method: multislerp\n" + models_yaml(dense, [1.0, 2.0, 3.0]), tmp_path / "multislerp")
    for name in CHECKED:
        close(out[name], ref_multislerp([s[name] for s in states], [1.0, 2.0, 3.0]))
    # karcher with mergekit's parameter names, written out in bfloat16
    out = compose(
        "merge_method: karcher\n"
        + models_yaml(dense)
        + "parameters:\n  max_iter: 20\n  tol: 1.0e-9\nout_dtype: bfloat16\n",
        tmp_path / "karcher",
    )
    for name in CHECKED:
        assert out[name].dtype == torch.bfloat16
        close(out[name], ref_karcher([s[name] for s in states]).bfloat16(), tolerance=1e-2)
    assert torch.isfinite(logits_of(tmp_path / "karcher")).all()


def test_end_to_end_base_methods(family, tmp_path):
    base, dense, sparse = family
    state_base = load_state(base)
    states = [load_state(folder) for folder in dense]
    sparse_states = [load_state(folder) for folder in sparse]
    out = compose(
        f"merge_method: model_stock\nbase_model: {base}\n" + models_yaml(dense) + "parameters:\n  filter_wise: true\n",
        tmp_path / "stock",
    )
    assert out.keys() == state_base.keys()
    for name in CHECKED:
        close(out[name], ref_model_stock([s[name] for s in states], state_base[name], filter_wise=True))
    out = compose(
        f"merge_method: nearswap\nbase_model: {base}\n" + models_yaml(dense[:1]) + "parameters:\n  t: 0.01\n",
        tmp_path / "nearswap",
    )
    for name in CHECKED:
        close(out[name], ref_nearswap(state_base[name], states[0][name], 0.01), tolerance=1e-6)
    out = compose(
        f"merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {dense[0]}\n",
        tmp_path / "fusion",
    )
    for name in CHECKED:
        check_fusion(out[name], state_base[name], states[0][name])
    out = compose(f"merge_method: ram\nbase_model: {base}\n" + models_yaml(sparse), tmp_path / "ram")
    for name in CHECKED:
        close(out[name], ref_ram([s[name] for s in sparse_states], state_base[name]), tolerance=1e-6)
    out = compose(
        f"merge_method: ramplus_tl\nbase_model: {base}\n"
        + models_yaml(sparse)
        + "parameters:\n  r: 0.5\n  alpha: 1.0\n",
        tmp_path / "ramplus",
    )
    for name in CHECKED:
        close(out[name], ref_ram([s[name] for s in sparse_states], state_base[name], 1e-5, 0.5, 1.0), tolerance=1e-6)
    assert torch.isfinite(logits_of(tmp_path / "ramplus")).all()


def test_end_to_end_optional_base_is_used(family, tmp_path):
    base, dense, _ = family
    state_base, states = load_state(base), [load_state(folder) for folder in dense]
    out = compose(
        f"merge_method: nuslerp\nbase_model: {base}\n" + models_yaml(dense[:2], [1.0, 1.0]), tmp_path / "nuslerp"
    )
    name = CHECKED[0]
    close(out[name], ref_nuslerp(states[0][name], states[1][name], [1.0, 1.0], state_base[name]))


@pytest.mark.parametrize(
    "text, message",
    [
        ("merge_method: multislerp\n{models2w}", "sum to zero"),
        ("merge_method: karcher\n{models2}parameters:\n  max_iter: 2.5\n", "max_iter"),
        ("merge_method: nuslerp\n{models3}", "exactly 2"),
        ("merge_method: model_stock\nbase_model: {base}\n{models1}", "at least 2"),
        ("merge_method: nearswap\n{models1}parameters:\n  t: 0.1\n", "needs a base_model"),
        ("merge_method: nearswap\nbase_model: {base}\n{models1}", "needs parameter 't'"),
        (
            "merge_method: ram\nbase_model: {base}\n{models1}parameters:\n  epsilonn: 0.1\n",
            "does not take 'epsilonn'.*Did you mean 'epsilon'",
        ),
    ],
)
def test_plan_time_errors(family, tmp_path, text, message):
    base, dense, _ = family
    text = text.format(
        base=base,
        models1=models_yaml(dense[:1]),
        models2=models_yaml(dense[:2]),
        models3=models_yaml(dense, [1, 1, 1]),
        models2w=models_yaml(dense[:2], [1.0, -1.0]),
    )
    with pytest.raises(ComposerError, match=message):
        compose_text(text, tmp_path / "out", ExecutionOptions())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elementwise_selection_methods_run_in_chunks_with_the_same_bits(dtype):
    """nearswap, ram and ramplus_tl go a chunk at a time over large tensors (ramplus_tl counts in a first pass)."""
    from composer.methods import chunks

    generator = torch.Generator().manual_seed(5)
    base = (torch.randn(300, 77, generator=generator) * 0.02).to(dtype)
    tuned = [
        base
        + (torch.randn(300, 77, generator=generator) * 0.001 * (torch.rand(300, 77, generator=generator) < 0.6)).to(
            dtype
        )
        for _ in range(3)
    ]
    runs = []
    for chunk in (1 << 20, 1000):  # one whole chunk, then 24 chunks (the last one short)
        with mock.patch.object(chunks, "ELEMENTWISE_CHUNK", chunk):
            runs.append([nearswap(base, tuned[0], 0.0005), ram(tuned, base), ramplus_tl(tuned, base, r=0.5, alpha=1.0)])
    for whole, chunked in zip(*runs):
        assert whole.shape == chunked.shape == base.shape and whole.dtype == chunked.dtype
        assert torch.equal(whole, chunked) and torch.equal(torch.signbit(whole), torch.signbit(chunked))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(300, 77), (9, 400), (6, 5, 40)])
def test_filter_wise_model_stock_in_row_blocks_has_the_same_bits(dtype, shape):
    """Each row is merged on its own, so a large matrix goes a block of rows at a time (one row when a row is larger)."""
    from composer.methods import chunks as module

    generator = torch.Generator().manual_seed(2)
    base = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
    tuned = [base + (torch.randn(shape, generator=generator) * 0.001).to(dtype) for _ in range(3)]
    tuned[1][0] = base[0]  # a row with no update
    whole = model_stock(tuned, base, filter_wise=True)
    with mock.patch.object(module, "ROW_BLOCK", 300):
        blocks = model_stock(tuned, base, filter_wise=True)
    assert blocks.dtype == whole.dtype and blocks.shape == whole.shape
    assert torch.equal(blocks, whole) and torch.equal(torch.signbit(blocks), torch.signbit(whole))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(300, 77), (9, 400), (6, 5, 40)])
def test_arcee_fusion_in_row_blocks_has_the_same_bits(dtype, shape):
    """A large matrix's importances are taken a block of rows at a time (softmax and KL stay within rows)
    and the fusion a chunk at a time: the whole tensor's result, bit for bit."""
    from composer.methods import chunks

    (other,), base = fine_tunes(1, shape=shape, seed=61, scale=0.1)
    base, other = base.to(dtype), other.to(dtype)
    whole = arcee_fusion(base, other)
    with mock.patch.object(chunks, "ROW_BLOCK", 300), mock.patch.object(chunks, "ELEMENTWISE_CHUNK", 1000):
        blocks = arcee_fusion(base, other)
    assert blocks.dtype == whole.dtype and blocks.shape == whole.shape
    assert torch.equal(blocks, whole) and torch.equal(torch.signbit(blocks), torch.signbit(whole))
    assert 0 < int((whole != base).sum()) < whole.numel() // 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("negative", [False, True])
def test_half_precision_quartiles_from_pattern_counts_are_the_sorted_values(dtype, negative):
    """Arcee Fusion's quartiles of 16-bit importances come from counting bit patterns (no widened copy);
    a negative value (a KL rounded below zero) falls back to sorting. Either way: the sorted values."""
    from composer.methods import chunks
    from composer.methods.selection import quartiles

    generator = torch.Generator().manual_seed(9)
    values = (torch.randn(5001, generator=generator).abs() * 0.01).to(dtype)
    values[:1200] = 0  # many ties
    if negative:
        values[77] = -0.5
    expected = values.float().sort().values[[k * (values.numel() - 1) // 4 for k in (1, 2, 3)]].to(dtype)
    with mock.patch.object(chunks, "ELEMENTWISE_CHUNK", 1000):
        found = quartiles(values)
    assert all(value.dim() == 0 and value.dtype == dtype for value in found)
    assert torch.equal(torch.stack(found), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_base", [False, True])
def test_flat_nuslerp_in_chunks_has_the_whole_tensor_bits(dtype, with_base):
    """nuslerp of whole tensors builds the directions' product a chunk at a time and blends a chunk at a
    time: bit for bit the whole-tensor computation (`slerp_vectors`)."""
    from composer.methods import chunks
    from composer.methods.spherical import slerp_vectors

    x0, x1, base = (tensor.to(dtype) for tensor in random_tensors(3, shape=(300, 77), seed=12))
    t = nuslerp_t([0.7, 1.3])
    expected = (
        base + slerp_vectors(x0 - base, x1 - base, t, False, True)
        if with_base
        else slerp_vectors(x0, x1, t, False, True)
    )
    with mock.patch.object(chunks, "ELEMENTWISE_CHUNK", 1000):
        chunked = nuslerp([x0, x1], [0.7, 1.3], base if with_base else None)
    assert chunked.dtype == expected.dtype and chunked.shape == expected.shape
    assert torch.equal(chunked, expected) and torch.equal(torch.signbit(chunked), torch.signbit(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("count", [2, 3])
def test_karcher_in_chunks_has_the_whole_tensor_bits(dtype, count):
    """Karcher's elementwise updates go a chunk at a time (its dot products and norms stay whole): the same
    bits as updating whole tensors."""
    from composer.methods import chunks

    tensors = [tensor.to(dtype) for tensor in random_tensors(count, shape=(300, 77), seed=20 + count)]
    whole = karcher(tensors, max_iter=20, tol=1e-7)
    with mock.patch.object(chunks, "ELEMENTWISE_CHUNK", 1000):
        chunked = karcher(tensors, max_iter=20, tol=1e-7)
    assert chunked.dtype == whole.dtype and chunked.shape == whole.shape
    assert torch.equal(chunked, whole) and torch.equal(torch.signbit(chunked), torch.signbit(whole))
