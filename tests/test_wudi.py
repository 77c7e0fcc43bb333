"""WUDI merging against references written here from the paper's objective: Adam on the loss as the paper writes
it (autograd through the stacked task vectors), and the loss's closed-form minimiser (a linear system) that many
steps must approach; its invariants; and recipes on a tiny model that load and run."""

from __future__ import annotations

import pytest
import torch

from composer.compose import compose_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.methods.wudi import wudi
from helpers import load_state, save_fine_tune, save_tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def models(shape, count, seed=0, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + scale * torch.randn(shape, generator=generator) for _ in range(count)]


def task_sum(xs, base):
    return sum(x - base for x in xs)


# --- the references ----------------------------------------------------------------------------------------------


def paper_loss(merged, taus):
    """sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2, with the task vectors stacked ([n, out, in])."""
    norms = taus.flatten(1).norm(dim=1) ** 2
    return ((merged - taus) @ taus.transpose(1, 2)).square().div(norms[:, None, None]).sum()


def reference_adam(xs, base, steps, learning_rate):
    """Adam (torch's defaults, unfused) from the sum of the task vectors, gradients by autograd on the paper's loss."""
    taus = torch.stack([x - base for x in xs])
    merged = torch.nn.Parameter(taus.sum(0))
    optimizer = torch.optim.Adam([merged], lr=learning_rate)
    for _ in range(steps):
        optimizer.zero_grad()
        paper_loss(merged, taus).backward()
        optimizer.step()
    return base + merged.detach()


def reference_minimiser(xs, base):
    """The loss is quadratic in tau_m; its gradient vanishes where tau_m M = T, M = sum_i w_i tau_i^T tau_i and
    T = sum_i w_i tau_i tau_i^T tau_i (w_i = 1/||tau_i||^2): solved in float64 (M is invertible for tall
    matrices of task vectors in general position)."""
    taus = [(x - base).double() for x in xs]
    metric = sum(tau.T @ tau / tau.norm() ** 2 for tau in taus)
    target = sum(tau @ tau.T @ tau / tau.norm() ** 2 for tau in taus)
    return (base.double() + torch.linalg.solve(metric, target.T).T).float()


# --- against the references --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, count", [((40, 12), 2), ((40, 12), 3), ((12, 40), 3), ((6, 60), 2)])
def test_the_steps_are_adam_on_the_papers_loss(shape, count):
    """Tall (the [in, in] metric), wide (the metric, the target through [out, out]) and very wide matrices (the
    stacked form) take the same steps as autograd and torch's Adam on the loss as the paper writes it."""
    base, xs = models(shape, count)
    moved = wudi(xs, base, steps=40) - base - task_sum(xs, base)
    expected = reference_adam(xs, base, 40, 1e-5) - base - task_sum(xs, base)
    assert float(expected.abs().max()) > 2e-4  # the steps went somewhere (each entry moves at most 40 * 1e-5)
    torch.testing.assert_close(moved, expected, rtol=0, atol=1e-3 * float(expected.abs().max()))


@pytest.mark.parametrize("count", [2, 3])
def test_enough_steps_reach_the_closed_form_minimiser(count):
    base, xs = models((40, 12), count, seed=count)
    minimiser = reference_minimiser(xs, base)
    merged = wudi(xs, base, steps=1500, learning_rate=1e-3)
    size = float((minimiser - base).abs().max())
    torch.testing.assert_close(merged, minimiser, rtol=0, atol=1e-3 * size)
    assert float((minimiser - base - task_sum(xs, base)).abs().max()) > 0.1 * size  # the minimiser is not the sum


def test_wide_matrices_reach_the_least_loss():
    """A wide matrix's metric is singular (the task vectors' rows span less than the inputs): the minimiser is not
    unique, but the least loss is, and the steps lower the loss to it from the sum's."""
    base, xs = models((6, 40), 3, seed=5)
    taus = torch.stack([x - base for x in xs]).double()
    metric = sum(tau.T @ tau / tau.norm() ** 2 for tau in taus)
    target = sum(tau @ tau.T @ tau / tau.norm() ** 2 for tau in taus)
    least = float(paper_loss(target @ torch.linalg.pinv(metric), taus))
    start = float(paper_loss(taus.sum(0), taus))
    reached = float(paper_loss((wudi(xs, base, steps=1500, learning_rate=1e-3) - base).double(), taus))
    assert least < 0.5 * start
    assert reached - least < 1e-3 * (start - least)


# --- invariants ------------------------------------------------------------------------------------------------


def test_one_model_is_returned():
    """Its task vector is the minimiser (loss 0): no step is taken, and a task vector of zeros beside it adds
    nothing (its weight 1/0 leaves it out of the loss)."""
    base, (x,) = models((30, 20), 1)
    torch.testing.assert_close(wudi([x], base), x, rtol=0, atol=1e-6)
    torch.testing.assert_close(wudi([x, base.clone()], base), x, rtol=0, atol=1e-6)
    assert torch.equal(wudi([base.clone(), base.clone()], base), base)


def test_identical_models_give_that_model():
    """n copies of tau: the loss is n times one model's, minimised at tau (not at the sum n tau, where it starts)."""
    base, (x,) = models((40, 12), 1, seed=3)
    merged = wudi([x, x.clone()], base, steps=2000, learning_rate=1e-3)
    torch.testing.assert_close(merged, x, rtol=0, atol=1e-3 * float((x - base).abs().max()))


def test_the_steps_stay_within_adams_reach_of_the_sum():
    """At the defaults (300 steps of 1e-5) an entry moves at most about 300 * 1e-5 from the sum: on task vectors
    much larger than that, WUDI is the sum slightly corrected (the paper's setting has small task vectors)."""
    base, xs = models((40, 12), 2, scale=1.0)
    moved = wudi(xs, base) - base - task_sum(xs, base)
    assert 1e-3 < float(moved.abs().max()) < 300 * 1e-5 * 1.01


def test_steps_zero_is_the_sum_and_lambda_scales_it():
    base, xs = models((30, 20), 3)
    torch.testing.assert_close(wudi(xs, base, steps=0), base + task_sum(xs, base))
    merged = wudi(xs, base, steps=20)
    torch.testing.assert_close(wudi(xs, base, 0.5, steps=20), base + 0.5 * (merged - base), rtol=0, atol=1e-6)


def test_tensors_that_are_not_matrices_take_the_mean_task_vector():
    for shape in ((17,), (3, 4, 5)):
        base, xs = models(shape, 3)
        torch.testing.assert_close(wudi(xs, base), base + task_sum(xs, base) / 3)


def test_deterministic_and_float32_work_for_bfloat16():
    base, xs = models((48, 16), 2, scale=0.01)
    assert torch.equal(wudi(xs, base), wudi(xs, base))
    half = [x.bfloat16() for x in xs]
    merged = wudi(half, base.bfloat16())
    assert merged.dtype == torch.bfloat16
    widened = wudi([x.float() for x in half], base.bfloat16().float())
    torch.testing.assert_close(merged, widened.bfloat16(), rtol=0, atol=0)


# --- recipes on a tiny model -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("wudi")
    base = save_tiny_model(root / "base", "llama", 2, seed=4)
    return {
        "base": base,
        "ft1": save_fine_tune(base, root / "ft1", seed=1, scale=0.002),
        "ft2": save_fine_tune(base, root / "ft2", seed=2, scale=0.002),
    }


def recipe(tiny, extra=""):
    return (
        f"merge_method: wudi\nbase_model: {tiny['base']}\nmodels:\n  - model: {tiny['ft1']}\n  - model: {tiny['ft2']}\n"
        f"dtype: float32\n{extra}"
    )


def test_a_recipe_runs_end_to_end_and_lines_scales_it(tiny, tmp_path):
    compose_text(recipe(tiny), tmp_path / "plain", ExecutionOptions())
    compose_text(recipe(tiny, "lines: {alpha: 0.25, beta: 1.0}\n"), tmp_path / "lines", ExecutionOptions())
    plain, scaled, base = (load_state(path) for path in (tmp_path / "plain", tmp_path / "lines", tiny["base"]))
    one, two = load_state(tiny["ft1"]), load_state(tiny["ft2"])
    name = "model.layers.0.mlp.down_proj.weight"
    expected = wudi([one[name], two[name]], base[name])
    torch.testing.assert_close(plain[name], expected, rtol=0, atol=1e-6)
    assert float((plain[name] - one[name] - two[name] + base[name]).abs().max()) > 1e-4  # not the sum
    norm = "model.layers.0.input_layernorm.weight"
    torch.testing.assert_close(plain[norm], (one[norm] + two[norm]) / 2, rtol=0, atol=1e-6)
    for layer, scale in ((0, 0.25), (1, 1.0)):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        torch.testing.assert_close(scaled[name] - base[name], scale * (plain[name] - base[name]), rtol=0, atol=1e-6)


def test_steps_set_per_tensor_and_bfloat16_run(tiny, tmp_path):
    """`steps: 0` by a filter takes the sum for the embedding; a bfloat16 merge computes in float32."""
    extra = "parameters:\n  steps:\n    - filter: embed_tokens\n      value: 0\n    - value: 300\n"
    compose_text(recipe(tiny, extra).replace("float32", "bfloat16"), tmp_path / "out", ExecutionOptions())
    out, base = load_state(tmp_path / "out"), load_state(tiny["base"])
    one, two = load_state(tiny["ft1"]), load_state(tiny["ft2"])
    assert all(tensor.dtype == torch.bfloat16 and torch.isfinite(tensor.float()).all() for tensor in out.values())
    name = "model.embed_tokens.weight"
    expected = one[name] + two[name] - base[name]
    assert float((out[name].float() - expected).abs().max()) < 0.02  # bfloat16's rounding of values near 1


@pytest.mark.parametrize(
    "extra, words",
    [
        ("parameters: {steps: -1}\n", "'steps' must be a whole number"),
        ("parameters: {steps: 2.5}\n", "'steps' must be a whole number"),
        ("parameters: {learning_rate: 0}\n", "'learning_rate' must be a number above 0"),
    ],
)
def test_impossible_settings_are_clear_errors_before_any_work(tiny, tmp_path, extra, words):
    with pytest.raises(ComposerError, match=words):
        compose_text(recipe(tiny, extra), tmp_path / "out", ExecutionOptions())
    assert not (tmp_path / "out").exists()


def test_plan_counts_the_float32_work(tiny):
    from composer.plan import build_plan
    from composer.plan.schedule import step_bytes
    from composer.recipe.load import parse_recipe

    text = recipe(tiny).replace("float32", "bfloat16")
    plan = build_plan(parse_recipe(text, "recipe"), text, None)
    (down,) = [tensor for tensor in plan.tensors if tensor.name == "model.layers.0.mlp.down_proj.weight"]
    assert down.operation.working_dtype == torch.float32
    entries = down.nbytes // down.dtype.itemsize
    assert step_bytes(plan, down) >= down.nbytes + (6 + 2 * 2) * entries * 4
    plan.close()
