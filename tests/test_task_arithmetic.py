"""The task-arithmetic family (task arithmetic, TIES, DARE, breadcrumbs, DELLA, SCE) against the
papers' formulas written out here, property tests, plan-time checks, and merges of tiny llamas."""

from __future__ import annotations

import itertools
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from composer.compose import compose_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.methods import get_method, order_statistics
from composer.methods.order_statistics import rank_window_mask
from composer.methods.task_arithmetic import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    sce,
    task_arithmetic,
    ties,
)
from composer.methods.task_arithmetic.sparsify import della_mask, magnitude_mask, outlier_mask, random_mask
from helpers import load_state, save_tiny_model

RANDOM_METHODS = ("dare_linear", "dare_ties", "della", "della_linear")
ALL_METHODS = ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "sce", *RANDOM_METHODS)


# --- reference formulas (float64, straight from the papers; ties broken by position) -------------


def models_near(base_seed=0, count=2, shape=(24, 40), scale=0.05):
    generator = torch.Generator().manual_seed(base_seed)
    base = torch.randn(shape, generator=generator)
    return [base + scale * torch.randn(shape, generator=generator) for _ in range(count)], base


def task_vectors_of(tensors, base):
    """tau_i = x_i - base, taken in float32 as the merge takes it, then widened."""
    return [(x - base).double() for x in tensors]


def reference_top_k(tau, density):
    """TIES trim: the max(1, int(density N)) entries of largest magnitude."""
    flat = tau.abs().reshape(-1)
    k = max(1, int(density * flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.argsort(flat, descending=True, stable=True)[:k]] = True
    return mask.reshape(tau.shape)


def reference_breadcrumbs(tau, density, gamma):
    """Drop the int(gamma N) largest magnitudes and the smallest, keeping int(density N)."""
    flat = tau.abs().reshape(-1)
    n = flat.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.argsort(flat, stable=True)[bottom : bottom + keep]] = True
    return mask.reshape(tau.shape)


def reference_merge(base, taus, masks, weights, *, consensus, normalize, rescale=False, lambda_=1.0):
    kept = []
    for tau, mask in zip(taus, masks):
        trimmed = tau * mask
        if rescale and trimmed.abs().sum() > 0:
            trimmed = trimmed * (tau.abs().sum() / trimmed.abs().sum())
        kept.append(trimmed)
    weighted = [w * t for w, t in zip(weights, kept)]
    if consensus:
        elected = torch.where(sum(weighted) >= 0, 1.0, -1.0).double()
        agree = [torch.sign(d) == elected for d in weighted]
        merged = sum(d * a for d, a in zip(weighted, agree))
        divisor = sum(w * a.double() for w, a in zip(weights, agree))
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        merged = sum(weighted)
        divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
    if normalize:
        merged = merged / divisor
    return base.double() + lambda_ * merged


def reference_sce(base, taus, select_topk):
    stacked = torch.stack(taus)
    if select_topk < 1:
        variance = stacked.var(dim=0, unbiased=False).reshape(-1)
        k = int(int((variance != 0).sum()) * select_topk)
        selected = torch.zeros(variance.numel(), dtype=torch.bool)
        selected[torch.argsort(variance, descending=True, stable=True)[:k]] = True
        stacked = stacked * selected.reshape(base.shape)
    sizes = stacked.square().reshape(len(taus), -1).mean(dim=1)
    c = sizes / sizes.sum() if sizes.sum() >= 1e-6 else torch.full_like(sizes, 1 / len(taus))
    elected = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).double()
    erased = [(torch.sign(t) == elected) * c_i for t, c_i in zip(stacked, c)]
    merged = sum(t * e for t, e in zip(stacked, erased))
    return base.double() + merged / torch.clamp(sum(erased), min=1e-6)


def close(result, expected):
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-6)


# --- deterministic methods against the formulas ----------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_is_base_plus_lambda_times_weighted_task_vectors(normalize):
    tensors, base = models_near(1, count=3)
    weights = [0.5, -0.3, 1.2]
    taus = task_vectors_of(tensors, base)
    expected = base.double() + 0.8 * sum(w * t for w, t in zip(weights, taus)) / (sum(weights) if normalize else 1)
    close(task_arithmetic(tensors, base, weights, normalize=normalize, lambda_=0.8), expected)


@pytest.mark.parametrize("normalize, rescale", [(True, False), (False, False), (True, True)])
def test_ties_trims_elects_signs_and_takes_the_disjoint_mean(normalize, rescale):
    tensors, base = models_near(2, count=3)
    weights, densities = [1.0, 0.6, -0.4], [0.3, 0.5, 0.8]
    taus = task_vectors_of(tensors, base)
    masks = [reference_top_k(t, d) for t, d in zip(taus, densities)]
    expected = reference_merge(
        base, taus, masks, weights, consensus=True, normalize=normalize, rescale=rescale, lambda_=1.5
    )
    close(ties(tensors, base, weights, densities, normalize=normalize, rescale=rescale, lambda_=1.5), expected)


@pytest.mark.parametrize("density, gamma", [(0.5, 0.05), (0.9, 0.01), (0.95, 0.2), (0.2, 0.0)])
def test_breadcrumbs_drops_the_largest_and_the_smallest(density, gamma):
    tensors, base = models_near(3, count=2)
    weights = [0.7, 0.4]
    taus = task_vectors_of(tensors, base)
    masks = [reference_breadcrumbs(t, density, gamma) for t in taus]
    expected = reference_merge(base, taus, masks, weights, consensus=False, normalize=False)
    close(breadcrumbs(tensors, base, weights, [density] * 2, [gamma] * 2), expected)
    expected = reference_merge(base, taus, masks, weights, consensus=True, normalize=True, rescale=True)
    close(breadcrumbs_ties(tensors, base, weights, [density] * 2, [gamma] * 2, normalize=True, rescale=True), expected)


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
def test_sce_selects_calculates_and_erases(select_topk):
    tensors, base = models_near(4, count=3)
    close(sce(tensors, base, select_topk), reference_sce(base, task_vectors_of(tensors, base), select_topk))


def test_methods_take_large_tensors_through_the_bracketed_selection():
    tensors, base = models_near(5, count=2, shape=(640, 512))  # above the exact-kthvalue limit
    taus = task_vectors_of(tensors, base)
    masks = [reference_top_k(t, 0.3) for t in taus]
    close(
        ties(tensors, base, [1.0, 1.0], [0.3, 0.3]),
        reference_merge(base, taus, masks, [1.0, 1.0], consensus=True, normalize=True),
    )
    masks = [reference_breadcrumbs(t, 0.6, 0.1) for t in taus]
    close(
        breadcrumbs(tensors, base, [1.0, 0.5], [0.6, 0.6], [0.1, 0.1]),
        reference_merge(base, taus, masks, [1.0, 0.5], consensus=False, normalize=False),
    )


def test_half_precision_inputs_merge_in_their_dtype():
    tensors, base = models_near(6, count=2)
    tensors, base = [t.bfloat16() for t in tensors], base.bfloat16()
    result = task_arithmetic(tensors, base, [0.5, 0.5])
    assert result.dtype == torch.bfloat16
    taus = task_vectors_of(tensors, base)
    torch.testing.assert_close(result.double(), base.double() + 0.5 * (taus[0] + taus[1]), rtol=0, atol=0.02)


def test_inputs_are_not_modified():
    tensors, base = models_near(7, count=2)
    copies, base_copy = [t.clone() for t in tensors], base.clone()
    for name in ALL_METHODS:
        method = get_method(name)
        params = defaults(name, density=0.5)
        method.apply(tensors, base, params)
        assert all(torch.equal(a, b) for a, b in zip(tensors, copies)) and torch.equal(base, base_copy), name


# --- properties -------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    weight=st.floats(-3, 3).filter(lambda w: abs(w) > 1e-3),
    lambda_=st.floats(-2, 2),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_ties_of_one_model_at_density_one_is_task_arithmetic(weight, lambda_, normalize, seed):
    tensors, base = models_near(seed, count=1, shape=(9, 7))
    assert torch.equal(
        ties(tensors, base, [weight], [1.0], normalize=normalize, lambda_=lambda_),
        task_arithmetic(tensors, base, [weight], normalize=normalize, lambda_=lambda_),
    )


@settings(max_examples=40, deadline=None)
@given(raw=st.lists(st.floats(0.05, 5), min_size=1, max_size=5), seed=st.integers(0, 2**16), density=st.floats(0.05, 1))
def test_identical_models_with_weights_summing_to_one_give_that_model(raw, seed, density):
    weights = [w / sum(raw) for w in raw]
    (x,), base = models_near(seed, count=1, shape=(6, 5))
    tensors = [x] * len(weights)
    for name, result in [
        ("task_arithmetic", task_arithmetic(tensors, base, weights)),
        ("task_arithmetic normalised", task_arithmetic(tensors, base, raw, normalize=True)),
        ("ties", ties(tensors, base, raw, [1.0] * len(raw))),
        ("dare_linear at density 1", dare_linear(tensors, base, weights, [1.0] * len(raw), generator=seed)),
        ("della_linear at density 1", della_linear(tensors, base, weights, [1.0] * len(raw), generator=seed)),
        ("breadcrumbs at density 1", breadcrumbs(tensors, base, weights, [1.0] * len(raw), [0.1] * len(raw))),
        ("sce", sce(tensors, base, 1.0)),
    ]:
        torch.testing.assert_close(result, x, rtol=1e-5, atol=1e-5, msg=name)


def test_dare_equals_the_undropped_merge_in_expectation():
    tensors, base = models_near(8, count=2, shape=(16, 24))
    weights, densities = [0.6, 0.9], [0.5, 0.3]
    undropped = task_arithmetic(tensors, base, weights).double() - base.double()
    draws = 400
    for rescale, expected in [(True, undropped), (False, None)]:
        total = torch.zeros_like(undropped)
        for seed in range(draws):
            total += (
                dare_linear(tensors, base, weights, densities, rescale=rescale, generator=seed).double() - base.double()
            )
        mean = total / draws
        if expected is None:  # without rescaling each task vector shrinks to density times itself
            taus = task_vectors_of(tensors, base)
            expected = sum(w * d * t for w, d, t in zip(weights, densities, taus))
        error = float((mean - expected).norm() / expected.norm())
        assert error < 0.12, (rescale, error)


def test_dare_is_the_formula_for_the_mask_it_drew():
    (x,), base = models_near(9, count=1, shape=(30, 20))
    tau = (x - base).double()
    dropped = dare_linear([x], base, [1.0], [0.4], rescale=False, generator=5).double() - base.double()
    mask = dropped.abs() > 0
    assert abs(mask.double().mean().item() - 0.4) < 0.08
    torch.testing.assert_close(dropped, tau * mask, rtol=1e-5, atol=1e-6)
    rescaled = dare_linear([x], base, [1.0], [0.4], rescale=True, generator=5).double() - base.double()
    torch.testing.assert_close(
        rescaled, tau * mask * (tau.abs().sum() / (tau * mask).abs().sum()), rtol=1e-5, atol=1e-6
    )
    signed = dare_ties([x], base, [2.0], [0.4], rescale=False, normalize=True, generator=5).double() - base.double()
    torch.testing.assert_close(signed, tau * mask, rtol=1e-5, atol=1e-6)


def test_della_keeps_larger_entries_more_often_ranking_within_rows():
    m, draws, density, epsilon = 11, 3000, 0.5, 0.3
    row = torch.linspace(0.1, 1.1, m)[torch.randperm(m, generator=torch.Generator().manual_seed(0))]
    tensor = torch.stack([row * 1000, -row])  # very different scales per row: ranks are taken per row
    counts = torch.zeros(2, m)
    for seed in range(draws):
        counts += della_mask(tensor, density, epsilon, torch.Generator().manual_seed(seed))
    frequency = counts / draws
    rank = torch.argsort(torch.argsort(row)).double()
    expected = density - epsilon + 2 * epsilon * rank / (m - 1)
    for r in range(2):
        assert (frequency[r].double() - expected).abs().max() < 0.04
    one_d = (
        torch.stack([della_mask(row, density, epsilon, torch.Generator().manual_seed(s)) for s in range(draws)])
        .double()
        .mean(0)
    )
    assert (one_d - expected).abs().max() < 0.04


def test_della_ranks_equal_half_precision_magnitudes_by_position():
    """bf16 task vectors often hold equal magnitudes: they are ranked lowest position first (a stable sort), so the
    mask is the one drawn for those ranks, the same on every machine."""
    from composer.methods.task_arithmetic.draws import random_levels, stream_key
    from composer.methods.task_arithmetic.sparsify import della_mask_

    delta = torch.tensor([[0.5, -0.25, 0.5, 0.25, -0.5, 0.125, 0.25, 0.5]] * 3, dtype=torch.bfloat16)
    key = stream_key(torch.Generator().manual_seed(4))
    mask = della_mask_(delta, 0.5, 0.3, key) > 0
    order = torch.sort(delta.float().abs(), dim=1, stable=True).indices
    m = delta.shape[1]
    probabilities = 0.5 - 0.3 + 2 * 0.3 * torch.arange(m, dtype=torch.float64) / (m - 1)
    thresholds = (probabilities * 65536).round() - 32768
    keep_by_rank = random_levels(delta.shape, key, delta.device).to(torch.float64) < thresholds
    expected = torch.zeros(delta.shape, dtype=torch.bool).scatter_(1, order, keep_by_rank)
    assert torch.equal(mask, expected)


def test_della_is_the_formula_for_the_mask_it_drew():
    tensors, base = models_near(10, count=2, shape=(12, 16))
    taus = task_vectors_of(tensors, base)
    weights, densities, epsilons = [1.0, 0.5], [0.5, 0.6], [0.2, 0.1]
    # recover the masks by merging each model alone (same seed, same draws for the first model)
    generator = torch.Generator().manual_seed(3)
    masks = [della_mask(tensors[i] - base, densities[i], epsilons[i], generator) for i in range(2)]
    for consensus, method, normalize in [(True, della, True), (False, della_linear, False)]:
        expected = reference_merge(
            base, taus, masks, weights, consensus=consensus, normalize=normalize, rescale=True, lambda_=0.9
        )
        close(method(tensors, base, weights, densities, epsilons, lambda_=0.9, generator=3), expected)


@pytest.mark.parametrize("name", RANDOM_METHODS)
def test_the_same_seed_gives_the_same_merge_and_another_seed_another(name):
    tensors, base = models_near(11, count=2)
    method = get_method(name)
    first = method.apply(tensors, base, defaults(name, density=0.5, seed=7))
    again = method.apply(tensors, base, defaults(name, density=0.5, seed=7))
    other = method.apply(tensors, base, defaults(name, density=0.5, seed=8))
    unseeded = method.apply(tensors, base, {k: v for k, v in defaults(name, density=0.5).items() if k != "seed"})
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(unseeded, method.apply(tensors, base, defaults(name, density=0.5, seed=0)))


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(0, 6), min_size=1, max_size=80),
    window=st.tuples(st.integers(-2, 85), st.integers(-2, 85)),
    descending=st.booleans(),
    bracketed=st.booleans(),
)
def test_rank_windows_select_exactly_by_stable_rank_even_with_ties(values, window, descending, bracketed):
    tensor = torch.tensor(values, dtype=torch.float32)
    start, stop = window
    order = torch.argsort(tensor, descending=descending, stable=True)
    expected = torch.zeros(len(values), dtype=torch.bool)
    expected[order[max(start, 0) : max(stop, 0)]] = True
    limit = 4 if bracketed else order_statistics.EXACT_LIMIT
    with mock.patch.object(order_statistics, "EXACT_LIMIT", limit):
        assert torch.equal(rank_window_mask(tensor, start, stop, descending), expected)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    density=st.floats(0.01, 1),
    gamma=st.floats(0, 0.5),
    seed=st.integers(0, 2**16),
)
def test_sparsification_keeps_the_stated_fraction(rows, cols, density, gamma, seed):
    generator = torch.Generator().manual_seed(seed)
    delta = torch.randn(rows, cols, generator=generator)
    n = rows * cols
    top = magnitude_mask(delta, density)
    assert int(top.sum()) == max(1, int(density * n))
    assert delta.abs()[top].min() >= delta.abs()[~top].max() if (~top).any() else True
    crumbs = outlier_mask(delta, density, gamma)
    assert int(crumbs.sum()) == int(density * n)
    dropped_top = min(int(gamma * n), n - int(density * n))
    largest = torch.argsort(delta.abs().reshape(-1), descending=True)[:dropped_top]
    assert not crumbs.reshape(-1)[largest].any()


def test_heavily_tied_large_tensors_keep_exactly_the_stated_count():
    # task vectors of bf16 checkpoints take few distinct values: many entries tie at the threshold
    values = torch.randint(-20, 21, (600, 500), generator=torch.Generator().manual_seed(3)).float() * 2**-12
    for density in (0.1, 0.5, 0.93):
        kept = magnitude_mask(values, density)
        assert int(kept.sum()) == int(density * values.numel())
        assert values.abs()[kept].min() >= values.abs()[~kept].max()
        crumbs = outlier_mask(values, density, 0.02)
        assert int(crumbs.sum()) == int(density * values.numel())


@settings(max_examples=30, deadline=None)
@given(
    count=st.integers(1, 6),
    size=st.integers(1, 3000),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    spread=st.integers(0, 24),
)
def test_population_variance_is_torch_var_bit_for_bit(count, size, seed, dtype, spread):
    from composer.methods.task_arithmetic import population_variance

    generator = torch.Generator().manual_seed(seed)
    stacked = torch.randn(count, size, generator=generator) * 0.01 + torch.randn(size, generator=generator)
    # entries of very different sizes (float16 keeps to its range), and some equal across models
    scales = torch.pow(
        2.0,
        -torch.randint(
            0, 1 + (min(spread, 10) if dtype == torch.float16 else spread), (size,), generator=generator
        ).float(),
    )
    stacked = (stacked * scales).to(dtype)
    stacked[:, : size // 10] = stacked[0, : size // 10].clone()
    with mock.patch("composer.methods.task_arithmetic.select_calculate_erase.VARIANCE_CHUNK", 257):
        found, expected = population_variance(stacked), torch.var(stacked, dim=0, unbiased=False)
    assert found.dtype == expected.dtype and torch.equal(found, expected)


def test_random_sparsification_keeps_the_fraction_on_average():
    delta = torch.randn(200, 100)
    kept = random_mask(delta, 0.3, torch.Generator().manual_seed(1)).double().mean().item()
    assert abs(kept - 0.3) < 0.01  # 20000 draws: standard deviation 0.003
    kept = della_mask(delta, 0.3, 0.1, torch.Generator().manual_seed(1)).double().mean().item()
    assert abs(kept - 0.3) < 0.01


# --- parameters and their checks ------------------------------------------------------------------


def defaults(name, density=1.0, seed=None, **overrides):
    """The resolved parameters the planner would pass for two models, with method defaults."""
    method = get_method(name)
    params = {}
    for parameter in method.parameters:
        value = parameter.default
        params[parameter.name] = [value] * 2 if parameter.per_model else value
    if "weight" in params:
        params["weight"] = [0.6, 0.5]
    if "density" in params:
        params["density"] = [density] * 2
    if seed is not None:
        params["seed"] = seed
    params.update(overrides)
    return params


def test_registry_has_mergekits_parameters_and_defaults():
    expected = {  # name: (normalize, rescale)
        "task_arithmetic": (False, False),
        "ties": (True, False),
        "dare_linear": (False, True),
        "dare_ties": (False, True),
        "breadcrumbs": (False, False),
        "breadcrumbs_ties": (False, False),
        "della": (True, True),
        "della_linear": (False, True),
    }
    for name, (normalize, rescale) in expected.items():
        method = get_method(name)
        assert method.needs_base
        assert method.parameter("weight").required and method.parameter("weight").per_model
        assert method.parameter("density").default == 1.0 and method.parameter("density").per_model
        assert (method.parameter("normalize").default, method.parameter("rescale").default) == (normalize, rescale), (
            name
        )
        assert method.parameter("lambda").default == 1.0 and not method.parameter("lambda").per_model
        assert method.parameter("int8_mask").default is False
        assert (method.parameter("gamma") is not None) == name.startswith("breadcrumbs")
        assert (method.parameter("epsilon") is not None) == name.startswith("della")
    assert get_method("breadcrumbs").parameter("gamma").default == 0.01
    assert get_method("della").parameter("epsilon").default == 0.15
    sce_method = get_method("sce")
    assert (
        sce_method.needs_base
        and sce_method.parameter("select_topk").default == 1.0
        and sce_method.parameter("weight") is None
    )


@pytest.mark.parametrize(
    "name", ["ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]
)
@pytest.mark.parametrize("density", [0.0, -0.5, 1.5])
def test_a_density_outside_zero_to_one_is_refused(name, density):
    problem = get_method(name).check(defaults(name, density=0.5) | {"density": [0.5, density]})
    assert problem and "density must be in (0, 1]" in problem and "2nd model" in problem


def test_other_bad_parameters_are_refused_and_good_ones_pass():
    for name in ALL_METHODS:
        assert get_method(name).check(defaults(name, density=0.5)) is None, name
    assert (
        get_method("task_arithmetic").check(defaults("task_arithmetic", density=0.0)) is None
    )  # unused, as in mergekit
    assert "gamma" in get_method("breadcrumbs").check(defaults("breadcrumbs", density=0.5, gamma=[0.1, 1.5]))
    problem = get_method("della").check(defaults("della", density=0.9, epsilon=[0.15, 0.15]))
    assert "density - epsilon and density + epsilon" in problem
    assert get_method("della").check(defaults("della", density=1.0, epsilon=[0.5, 0.5])) is None  # nothing is dropped
    assert "epsilon must be >= 0" in get_method("della_linear").check(
        defaults("della_linear", density=0.5, epsilon=[-0.1, 0.1])
    )
    assert "select_topk" in get_method("sce").check({"select_topk": 0.0, "int8_mask": False})


# --- end to end on tiny llamas ------------------------------------------------------------------------


def save_fine_tune(base: Path, folder: Path, seed: int, scale: float = 0.02) -> Path:
    """A copy of the base model with every tensor moved a little (a stand-in for a fine-tune)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("task-arithmetic-models")
    base = save_tiny_model(root / "base", "llama", 2, seed=0)
    return base, save_fine_tune(base, root / "ft1", 1), save_fine_tune(base, root / "ft2", 2)


WEIGHTS, DENSITIES = [0.7, 0.5], [0.5, 0.7]
CHECKED = (
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.norm.weight",
    "model.embed_tokens.weight",
)


def recipe(name, base, ft1, ft2, parameters=""):
    if name == "sce":
        models = f"  - model: {ft1}\n  - model: {ft2}\n"
    else:
        models = "".join(
            f"  - model: {m}\n    parameters: {{weight: {w}, density: {d}}}\n"
            for m, w, d in zip((ft1, ft2), WEIGHTS, DENSITIES)
        )
    return f"merge_method: {name}\nbase_model: {base}\nmodels:\n  - model: {base}\n{models}" + (
        f"parameters:\n{parameters}" if parameters else ""
    )


def loads_and_runs(folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(1, 9).unsqueeze(0)).logits).all()


DETERMINISTIC_CASES = {
    "task_arithmetic": (
        "  lambda: 0.9\n",
        lambda base, taus: reference_merge(base, taus, [1, 1], WEIGHTS, consensus=False, normalize=False, lambda_=0.9),
    ),
    "ties": (
        "",
        lambda base, taus: reference_merge(
            base,
            taus,
            [reference_top_k(t, d) for t, d in zip(taus, DENSITIES)],
            WEIGHTS,
            consensus=True,
            normalize=True,
        ),
    ),
    "breadcrumbs": (
        "  gamma: 0.05\n",
        lambda base, taus: reference_merge(
            base,
            taus,
            [reference_breadcrumbs(t, d, 0.05) for t, d in zip(taus, DENSITIES)],
            WEIGHTS,
            consensus=False,
            normalize=False,
        ),
    ),
    "breadcrumbs_ties": (
        "  normalize: true\n",
        lambda base, taus: reference_merge(
            base,
            taus,
            [reference_breadcrumbs(t, d, 0.01) for t, d in zip(taus, DENSITIES)],
            WEIGHTS,
            consensus=True,
            normalize=True,
        ),
    ),
    "sce": ("  select_topk: 0.4\n", lambda base, taus: reference_sce(base, taus, 0.4)),
}


@pytest.mark.parametrize("name", list(DETERMINISTIC_CASES))
def test_deterministic_methods_end_to_end(family, tmp_path, name):
    base, ft1, ft2 = family
    parameters, reference = DETERMINISTIC_CASES[name]
    compose_text(recipe(name, base, ft1, ft2, parameters), tmp_path / "out", ExecutionOptions())
    loads_and_runs(tmp_path / "out")
    out, states = load_state(tmp_path / "out"), [load_state(m) for m in (base, ft1, ft2)]
    for tensor in CHECKED:
        base_tensor = states[0][tensor]
        taus = task_vectors_of([states[1][tensor], states[2][tensor]], base_tensor)
        close(out[tensor], reference(base_tensor, taus))


@pytest.mark.parametrize("name", RANDOM_METHODS)
def test_random_methods_end_to_end(family, tmp_path, name):
    """Without rescaling, every entry of the merged task vector is the (normalised) sum over some
    subset of the models of w_i tau_i; about `density` of each model's entries take part."""
    base, ft1, ft2 = family
    text = recipe(name, base, ft1, ft2, "  rescale: false\n" + ("  epsilon: 0.2\n" if name.startswith("della") else ""))
    compose_text(text, tmp_path / "out", ExecutionOptions())
    compose_text(text, tmp_path / "again", ExecutionOptions())
    loads_and_runs(tmp_path / "out")
    out, again, states = (
        load_state(tmp_path / "out"),
        load_state(tmp_path / "again"),
        [load_state(m) for m in (base, ft1, ft2)],
    )
    assert all(torch.equal(out[k], again[k]) for k in out)
    normalize = name == "della"
    for tensor in CHECKED:
        base_tensor = states[0][tensor].double()
        taus = task_vectors_of([states[1][tensor], states[2][tensor]], states[0][tensor])
        merged = out[tensor].double() - base_tensor
        candidates, membership = [], []
        for subset in itertools.product([0, 1], repeat=2):
            total = sum(s * w * t for s, w, t in zip(subset, WEIGHTS, taus))
            weight = sum(s * w for s, w in zip(subset, WEIGHTS))
            candidates.append(total / weight if normalize and weight else total * torch.ones_like(merged))
            membership.append(subset)
        errors = torch.stack([(merged - c).abs() for c in candidates])
        assert float(errors.min(dim=0).values.max()) < 1e-5, tensor
        if not name.endswith("ties") and name != "della":  # no sign election: membership is the drawn mask
            chosen = errors.argmin(dim=0)
            for i, density in enumerate(DENSITIES):
                kept = torch.tensor([m[i] for m in membership])[chosen].double().mean().item()
                assert abs(kept - density) < 0.12, (tensor, i, kept)


def test_a_mergekit_ties_config_runs_as_it_is(family, tmp_path):
    base, ft1, ft2 = family
    text = f"""
models:
  - model: {base}
    # no parameters necessary for base model
  - model: {ft1}
    parameters:
      density: 0.5
      weight: 0.7
  - model: {ft2}
    parameters:
      density: 0.7
      weight: 0.5
merge_method: ties
base_model: {base}
parameters:
  normalize: 1.0
  int8_mask: true
dtype: float32
"""
    compose_text(text, tmp_path / "out", ExecutionOptions())
    out, states = load_state(tmp_path / "out"), [load_state(m) for m in (base, ft1, ft2)]
    for tensor in CHECKED[:2]:
        taus = task_vectors_of([states[1][tensor], states[2][tensor]], states[0][tensor])
        masks = [reference_top_k(t, d) for t, d in zip(taus, DENSITIES)]
        close(out[tensor], reference_merge(states[0][tensor], taus, masks, WEIGHTS, consensus=True, normalize=True))


def test_bad_parameters_fail_the_plan_with_a_clear_error(family, tmp_path):
    base, ft1, ft2 = family
    text = recipe("ties", base, ft1, ft2).replace("density: 0.7", "density: 1.5")
    with pytest.raises(ComposerError, match=r"ties.*density must be in \(0, 1\].*1.5"):
        compose_text(text, tmp_path / "dense", ExecutionOptions())
    text = f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{density: 0.5}}\n"
    with pytest.raises(ComposerError, match="needs parameter 'weight'"):
        compose_text(text, tmp_path / "weightless", ExecutionOptions())
    text = f"merge_method: ties\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 1.0}}\n"
    with pytest.raises(ComposerError, match="base_model"):
        compose_text(text, tmp_path / "baseless", ExecutionOptions())
    assert not any((tmp_path / name).exists() for name in ("dense", "weightless", "baseless"))
