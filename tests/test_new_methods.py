"""TSV-M, Iso-C, Iso-CTS, CART and PCB-merging: each against a reference written here from its paper's formula
(plain torch, full SVDs), their invariants, the randomised SVD's error against an exact one, their plan-time
errors, LiNeS on each, and recipes on tiny models that load and run."""

from __future__ import annotations

import pytest
import torch

from composer.compose import compose_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.methods import METHODS
from composer.methods.cart import cart
from composer.methods.isotropic import common_and_task_ranks, iso_c, iso_cts
from composer.methods.pcb import pcb
from composer.methods.svd import (
    cpu_multiplies_bfloat16,
    exact_svd,
    orthonormal_span,
    randomized_svd,
    sketch_dtype,
    top_singular,
    uses_randomized,
)
from composer.methods.tsv import tsv
from helpers import load_state, save_fine_tune, save_tiny_model

NEW_METHODS = ("tsv", "iso_c", "iso_cts", "cart", "pcb")

pytestmark = pytest.mark.usefixtures("single_thread")


def models(shape, count, seed=0, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + scale * torch.randn(shape, generator=generator) for _ in range(count)]


def close(actual, expected, tolerance=2e-5):
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))


# --- the references: the papers' formulas, whole tensors, full SVDs --------------------------------------------


def svd(matrix):
    return torch.linalg.svd(matrix.double(), full_matrices=False)


def procrustes(matrix):
    p, _, qh = svd(matrix)
    return p @ qh


def reference_tsv(xs, base, k, lambda_=1.0):
    us, ss, vs = [], [], []
    for x in xs:
        u, s, vh = svd(x - base)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    delta = procrustes(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ procrustes(torch.cat(vs, 1)).T
    return (base.double() + lambda_ * delta).float()


def reference_iso_c(xs, base, lambda_=1.0):
    u, s, vh = svd(sum(x - base for x in xs))
    return (base.double() + lambda_ * s.mean() * u @ vh).float()


def reference_iso_cts(xs, base, fraction=0.8, lambda_=1.0):
    r, n = min(base.shape), len(xs)
    k = int(r * fraction)
    k = r - round((r - k) / n) * n
    s_task = (r - k) // n
    u, s, vh = svd(sum(x - base for x in xs))
    us, ss, vs = [u[:, :k]], [s[:k]], [vh[:k].T]
    for x in xs:
        tau = (x - base).double()
        ut, st, vht = svd(tau - u[:, :k] @ u[:, :k].T @ tau)
        us.append(ut[:, :s_task])
        ss.append(st[:s_task])
        vs.append(vht[:s_task].T)
    delta = torch.cat(ss).mean() * procrustes(torch.cat(us, 1)) @ procrustes(torch.cat(vs, 1)).T
    return (base.double() + lambda_ * delta).float()


def reference_cart(xs, k, lambda_=1.0):
    average = sum(x.double() for x in xs) / len(xs)
    out = average.clone()
    for x in xs:
        u, s, vh = svd(x.double() - average)
        out += lambda_ * u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    return out.float()


def reference_pcb(xs, base, densities, lambda_=1.0):
    taus = [(x - base).double().reshape(-1) for x in xs]
    n, d = len(taus), taus[0].numel()

    def norm(v):
        return (v - v.min()) / (v.max() - v.min())

    numerator = torch.zeros(d, dtype=torch.float64)
    denominator = torch.zeros(d, dtype=torch.float64)
    for i, tau in enumerate(taus):
        intra = torch.softmax(n * norm(tau * tau), 0)
        inter = sum(torch.softmax(norm(tau * other), 0) for other in taus)
        beta = intra * inter
        kept = torch.zeros(d, dtype=torch.float64)
        kept[torch.argsort(beta, descending=True)[: int(densities[i] * d)]] = 1
        numerator += kept * beta * tau
        denominator += kept * beta
    merged = torch.where(denominator > 0, numerator / denominator, 0)
    return (base.double() + lambda_ * merged.reshape(base.shape)).float()


# --- against the references ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, count", [((48, 32), 3), ((20, 36), 2), ((30, 30), 1)])
def test_tsv_matches_the_papers_formula(shape, count):
    base, xs = models(shape, count)
    close(tsv(xs, base), reference_tsv(xs, base, min(shape) // count))
    close(tsv(xs, base, 0.7, rank=5), reference_tsv(xs, base, 5, 0.7))


@pytest.mark.parametrize("shape, count", [((48, 32), 3), ((20, 36), 2)])
def test_iso_c_and_iso_cts_match_the_papers_formulas(shape, count):
    base, xs = models(shape, count)
    close(iso_c(xs, base, 1.3), reference_iso_c(xs, base, 1.3))
    close(iso_cts(xs, base), reference_iso_cts(xs, base))
    close(iso_cts(xs, base, 0.9, 0.5), reference_iso_cts(xs, base, 0.5, 0.9))


@pytest.mark.parametrize("shape, count", [((48, 32), 3), ((20, 36), 4)])
def test_cart_matches_the_papers_formula(shape, count):
    _, xs = models(shape, count)
    close(cart(xs), reference_cart(xs, max(1, int(0.08 * min(shape)))))
    close(cart(xs, 1.5, rank=6), reference_cart(xs, 6, 1.5))


@pytest.mark.parametrize("shape, count", [((40, 30), 3), ((500,), 2)])
def test_pcb_matches_the_papers_formula(shape, count):
    base, xs = models(shape, count)
    densities = [0.1, 0.3, 0.6][:count]
    close(pcb(xs, base, densities), reference_pcb(xs, base, densities))
    close(pcb(xs, base, [1.0] * count, 0.8), reference_pcb(xs, base, [1.0] * count, 0.8))


def test_pcb_over_several_chunks_matches_one(monkeypatch):
    """The four passes over flat chunks give what one chunk does."""
    base, xs = models((64, 50), 2, seed=3)
    whole = pcb(xs, base, [0.2, 0.4])
    monkeypatch.setattr("composer.methods.pcb.ELEMENTWISE_CHUNK", 700)
    torch.testing.assert_close(pcb(xs, base, [0.2, 0.4]), whole, rtol=1e-5, atol=1e-7)


def test_tensors_that_are_not_matrices_take_the_mean_task_vector():
    base, xs = models((24,), 3)
    mean = base + sum(x - base for x in xs) / 3
    for merge in (tsv, iso_c, iso_cts):
        close(merge(xs, base, 0.5), base + 0.5 * (mean - base))
    close(cart(xs), sum(xs) / 3)


# --- invariants ----------------------------------------------------------------------------------------------


def test_one_model_is_returned_where_the_paper_implies_it():
    base, (x,) = models((30, 20), 1)
    close(tsv([x], base), x)
    close(cart([x]), x)
    close(pcb([x], base, [1.0]), x)


def test_lambda_scales_the_merged_task_vector():
    """Three models: with two, CART's low-rank parts cancel (see below) and there is nothing to scale."""
    base, xs = models((30, 20), 3)
    for name in NEW_METHODS:
        method = METHODS[name]
        params = {p.name: ([p.default] * 3 if p.per_model else p.default) for p in method.parameters}
        if name == "pcb":
            params["density"] = [0.5] * 3
        origin = sum(xs) / 3 if name == "cart" else base
        full = method.apply(xs, base, params) - origin
        half = method.apply(xs, base, params | {"lambda": 0.5}) - origin
        close(half, 0.5 * full, 1e-4)


def test_tsv_of_equal_task_vectors_is_their_truncation():
    """n equal task vectors: each keeps its top r // n singular triplets, and the stacked copies are averaged
    back (the rank-deficient stack is orthonormalised on its range, not filled with arbitrary directions)."""
    base, (x,) = models((36, 24), 1)
    u, s, vh = svd(x - base)
    truncation = (base.double() + u[:, :8] @ torch.diag(s[:8]) @ vh[:8]).float()
    close(tsv([x, x, x], base), truncation, 1e-4)


def test_tsv_of_task_vectors_in_orthogonal_subspaces_is_task_arithmetic():
    """Nothing to decorrelate: the stacked singular vectors are already orthonormal."""
    generator = torch.Generator().manual_seed(1)
    left = torch.linalg.qr(torch.randn(40, 30, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(30, 30, generator=generator)).Q
    taus = [
        left[:, 10 * i : 10 * i + 8] @ torch.diag(torch.rand(8) + 0.5) @ right[:, 10 * i : 10 * i + 8].T
        for i in range(3)
    ]
    base = torch.randn(40, 30, generator=generator)
    close(tsv([base + tau for tau in taus], base), base + sum(taus), 1e-4)


def test_iso_c_makes_the_spectrum_flat_and_stays_in_the_tasks_span():
    base, xs = models((40, 30), 2)
    delta = iso_c(xs, base) - base
    spectrum = torch.linalg.svdvals(delta.double())
    expected = torch.linalg.svdvals(sum(x - base for x in xs).double()).mean()
    torch.testing.assert_close(spectrum, torch.full_like(spectrum, float(expected)), rtol=1e-4, atol=0)
    # rank-3 task vectors: the flattened sum keeps rank 6 and adds no arbitrary directions
    generator = torch.Generator().manual_seed(2)
    low = [base + torch.randn(40, 3, generator=generator) @ torch.randn(3, 30, generator=generator) for _ in range(2)]
    for merge in (iso_c, iso_cts):
        values = torch.linalg.svdvals((merge(low, base) - base).double())
        assert int((values > 1e-4 * values[0]).sum()) == 6, merge.__name__
        assert torch.allclose(values[:6], values[0].expand(6), rtol=1e-4)


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    base, xs = models((40, 30), 3)
    close(iso_cts(xs, base, 1.0, 1.0), iso_c(xs, base), 1e-4)
    assert common_and_task_ranks(30, 3, 0.8) == (24, 2)
    assert common_and_task_ranks(3, 2, 0.0) == (1, 1)  # never more task directions than the matrix has


def test_cart_of_two_models_is_their_average_at_any_rank():
    """The two centred vectors are each other's negatives, and so are their truncations."""
    _, xs = models((40, 30), 2)
    for rank in (1, 5, 30):
        close(cart(xs, rank=rank), (xs[0] + xs[1]) / 2, 1e-4)
    _, three = models((40, 30), 3)
    close(cart(three, rank_fraction=1.0), sum(three) / 3, 1e-4)


def test_pcb_of_equal_task_vectors_is_that_task_vector_and_density_zero_is_the_base():
    base, (x,) = models((20, 10), 1)
    close(pcb([x, x], base, [1.0, 1.0]), x)
    close(pcb([x, x], base, [0.0, 0.0]), base)
    close(pcb([base, base], base, [0.5, 0.5]), base)  # zero task vectors: no 0/0


# --- the randomised SVD ------------------------------------------------------------------------------------------


def decaying_matrix(rows, columns, seed=0):
    """Singular values falling as 1 / (1 + i)^0.7 (a task vector's spectrum falls about so), random vectors."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, min(rows, columns), generator=generator)).Q
    v = torch.linalg.qr(torch.randn(columns, min(rows, columns), generator=generator)).Q
    values = (1 + torch.arange(min(rows, columns), dtype=torch.float32)) ** -0.7
    return (u * values) @ v.T


@pytest.mark.parametrize("products", [torch.float32, torch.bfloat16])
def test_randomized_svd_error_against_an_exact_svd(products):
    """The rank-k approximation of the randomised solver is within 1% of the best one's error (measured here:
    0.10% with 2 power iterations and 32 extra columns, with the sketch's products in float32 or in bfloat16;
    on SmolLM2-135M fine-tunes' task vectors, CART's centred ones at rank 46 0.27-0.44%, TSV-M's at rank 192
    0.43-0.91%, bench/RESULTS.md), its top singular values within 5%, and it is the same from run to run."""
    matrix = decaying_matrix(900, 600)
    rank = 48
    assert uses_randomized(tuple(matrix.shape), rank)
    u, s, vh = randomized_svd(matrix, rank, products=products)
    exact_u, exact_s, exact_vh = torch.linalg.svd(matrix, full_matrices=False)
    best = torch.linalg.norm(matrix - (exact_u[:, :rank] * exact_s[:rank]) @ exact_vh[:rank])
    error = torch.linalg.norm(matrix - (u * s) @ vh)
    assert error / best - 1 < 0.01, float(error / best - 1)
    assert float(((s - exact_s[:rank]).abs() / exact_s[:rank]).max()) < 0.05
    torch.testing.assert_close(torch.linalg.svdvals(u.T @ u), torch.ones(rank), rtol=1e-4, atol=1e-4)
    again = randomized_svd(matrix, rank, products=products)
    assert all(torch.equal(a, b) for a, b in zip((u, s, vh), again))
    # a wide matrix is sketched on its long side
    wide_u, wide_s, wide_vh = randomized_svd(matrix.T.contiguous(), rank, products=products)
    torch.testing.assert_close(wide_s, s, rtol=1e-5, atol=1e-6)


def test_the_sketch_multiplies_in_bfloat16_only_where_the_hardware_does():
    """bfloat16 products take a third of float32's time on a CPU with AVX512-BF16 (bench/RESULTS.md) and are
    emulated, slower, elsewhere; float64 work keeps its precision."""
    expected = torch.bfloat16 if cpu_multiplies_bfloat16() else torch.float32
    assert sketch_dtype(torch.zeros(4, 4)) == expected
    assert sketch_dtype(torch.zeros(4, 4, dtype=torch.float64)) == torch.float64
    matrix = decaying_matrix(900, 600)
    default = randomized_svd(matrix, 48)
    assert all(torch.equal(a, b) for a, b in zip(default, randomized_svd(matrix, 48, products=expected)))


@pytest.mark.parametrize("products", [torch.float32, torch.bfloat16])
def test_randomized_svd_of_a_matrix_of_lower_rank_than_its_sketch(products):
    """A task vector of rank 5 (a LoRA fine-tune's) sketched with 80 columns: the intermediate bases' Cholesky
    QR meets Gram matrices that are singular (and takes Householder QR) or nearly so; the 5 real triplets come
    out exact and nothing is amplified, also when the sketch's products are in bfloat16 (its last product is
    taken in full, so the basis lies in the matrix's range to rounding)."""
    generator = torch.Generator().manual_seed(3)
    matrix = torch.randn(900, 5, generator=generator) @ torch.randn(5, 600, generator=generator)
    u, s, vh = randomized_svd(matrix, 48, products=products)
    assert all(torch.isfinite(t).all() for t in (u, s, vh))
    torch.testing.assert_close(s[:5], torch.linalg.svdvals(matrix)[:5], rtol=1e-5, atol=0)
    assert float(s[5:].max()) < 1e-5 * float(s[0])
    torch.testing.assert_close((u * s) @ vh, matrix, rtol=0, atol=1e-5 * float(matrix.abs().max()))


def test_orthonormal_span_keeps_the_span():
    block = decaying_matrix(700, 60) * 1e3
    basis = orthonormal_span(block)
    torch.testing.assert_close(basis.T @ basis, torch.eye(60), rtol=0, atol=1e-4)
    torch.testing.assert_close(basis @ (basis.T @ block), block, rtol=0, atol=1e-4 * float(block.abs().max()))
    repeated = torch.cat([block[:, :30], block[:, :30]], 1)  # rank 30 in 60 columns: Householder QR
    torch.testing.assert_close(orthonormal_span(repeated), torch.linalg.qr(repeated).Q)


def test_a_wide_matrix_is_decomposed_as_its_transpose():
    matrix = decaying_matrix(300, 700)
    u, s, vh = exact_svd(matrix)
    torch.testing.assert_close(s, torch.linalg.svdvals(matrix), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close((u * s) @ vh, matrix, rtol=0, atol=1e-5)
    torch.testing.assert_close(u.T @ u, torch.eye(300), rtol=0, atol=1e-5)
    assert u.shape == (300, 300) and vh.shape == (300, 700)


def test_cart_through_the_randomised_svd_against_the_exact_formula():
    """Matrices large enough for the randomised SVD: CART's low-rank part (the merge less the average) within 15%
    of the exact formula's (measured: 8.8%). The rank-k subspace of a slowly decaying spectrum is ill-determined,
    so this is loose where the approximation error is tight: on SmolLM2-135M fine-tunes (spectra flatter still)
    the part differs by 40-59% (36-47% with the former 4 power iterations) while each truncation's error is
    within 0.5% of the best one's (test_randomized_svd_error_against_an_exact_svd)."""
    base = torch.randn(600, 400, generator=torch.Generator().manual_seed(0))
    xs = [base + decaying_matrix(600, 400, seed) for seed in (1, 2, 3)]
    assert uses_randomized((600, 400), 32)
    average = sum(xs) / 3
    expected = reference_cart(xs, 32) - average
    assert torch.linalg.norm(cart(xs) - average - expected) / torch.linalg.norm(expected) < 0.15


def test_small_matrices_and_large_ranks_take_the_exact_svd():
    assert not uses_randomized((200, 200), 10)
    assert not uses_randomized((1000, 600), 200)
    assert uses_randomized((1000, 600), 48)
    with pytest.raises(ValueError, match="rank 31"):
        top_singular(torch.zeros(40, 30), 31)


# --- recipes on tiny models ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("new-methods")
    base = save_tiny_model(root / "base", "llama", 2, seed=4)
    return {
        "base": base,
        "ft1": save_fine_tune(base, root / "ft1", seed=1),
        "ft2": save_fine_tune(base, root / "ft2", seed=2),
    }


def recipe(tiny, method, extra="", base=True, models=("ft1", "ft2")):
    lines = [f"merge_method: {method}"]
    if base:
        lines.append(f"base_model: {tiny['base']}")
    lines.append("models:")
    lines += [f"  - model: {tiny[role]}" for role in models]
    return "\n".join(lines) + "\ndtype: float32\n" + extra


@pytest.mark.parametrize("method", NEW_METHODS)
def test_lines_scales_each_new_method_by_depth(tiny, tmp_path, method):
    """LiNeS on each method: layer 0's task vector takes alpha, the last layer's beta, of the plain merge's."""
    compose_text(recipe(tiny, method), tmp_path / "plain", ExecutionOptions())
    compose_text(recipe(tiny, method, "lines: {alpha: 0.25, beta: 1.0}\n"), tmp_path / "lines", ExecutionOptions())
    plain, scaled, base = (load_state(path) for path in (tmp_path / "plain", tmp_path / "lines", tiny["base"]))
    for layer, scale in ((0, 0.25), (1, 1.0)):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        close(scaled[name] - base[name], scale * (plain[name] - base[name]), 1e-4)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_bfloat16_recipes_run(tiny, tmp_path, method):
    """A half-precision compute dtype: the SVDs run in float32 and the output is written in bfloat16."""
    compose_text(recipe(tiny, method).replace("float32", "bfloat16"), tmp_path / "out", ExecutionOptions())
    out = load_state(tmp_path / "out")
    assert all(tensor.dtype == torch.bfloat16 and torch.isfinite(tensor.float()).all() for tensor in out.values())


def test_plan_counts_the_svd_workspace(tiny):
    """The planner's memory estimate holds the SVD's float32 buffers, whatever the compute dtype."""
    from composer.plan import build_plan
    from composer.plan.schedule import step_bytes
    from composer.recipe.load import parse_recipe

    text = recipe(tiny, "tsv").replace("float32", "bfloat16")
    plan = build_plan(parse_recipe(text, "recipe"), text, None)
    (down,) = [tensor for tensor in plan.tensors if tensor.name == "model.layers.0.mlp.down_proj.weight"]
    assert down.operation.working_dtype == torch.float32
    entries = down.nbytes // down.dtype.itemsize
    assert step_bytes(plan, down) >= down.nbytes + (5 + 4 + 2 + 1) * entries * 4
    plan.close()


@pytest.mark.parametrize(
    "extra, words",
    [
        ("parameters: {rank: 100}\n", ["rank 100", "320 x 64", "at most 64", "tensor model.embed_tokens.weight"]),
        ("parameters: {rank_fraction: 1.5}\n", ["rank_fraction", "(0, 1]"]),
        ("parameters: {rank: 0}\n", ["rank must be at least 1"]),
    ],
)
def test_impossible_ranks_are_clear_errors_before_any_work(tiny, tmp_path, extra, words):
    for method in ("tsv", "cart"):
        with pytest.raises(ComposerError) as error:
            compose_text(recipe(tiny, method, extra), tmp_path / "out", ExecutionOptions())
        assert all(word in str(error.value) for word in words), str(error.value)
        assert not (tmp_path / "out").exists()


def test_other_impossible_settings_are_clear_errors(tiny, tmp_path):
    cases = [
        ("iso_cts", "parameters: {common_space_fraction: -0.1}\n", "common_space_fraction must lie in [0, 1]"),
        ("pcb", "parameters: {density: 2}\n", "density must lie in [0, 1]"),
    ]
    for method, extra, words in cases:
        with pytest.raises(ComposerError, match=words.replace("[", r"\[").replace("(", r"\(")):
            compose_text(recipe(tiny, method, extra), tmp_path / "out", ExecutionOptions())
    with pytest.raises(ComposerError, match="lines"):  # CART without a base has no task vector to scale
        compose_text(
            recipe(tiny, "cart", "lines: {alpha: 0.5, beta: 1}\n", base=False), tmp_path / "out", ExecutionOptions()
        )
    assert not (tmp_path / "out").exists()


def test_an_explicit_rank_set_per_tensor_runs(tiny, tmp_path):
    """rank set only where the matrices allow it (k and v projections are 32 x 64 here)."""
    extra = "parameters:\n  rank:\n    - filter: proj\n      value: 16\n    - value: 40\n"
    compose_text(recipe(tiny, "tsv", extra), tmp_path / "out", ExecutionOptions())
    assert torch.isfinite(load_state(tmp_path / "out")["model.layers.1.self_attn.k_proj.weight"]).all()


def test_an_svd_that_fails_to_converge_is_taken_again(monkeypatch):
    """LAPACK's gesdd can fail on an ill-conditioned matrix: float64 next, then the Gram matrix's eigenvectors."""
    from composer.methods import svd as module

    matrix = decaying_matrix(60, 40)
    expected = torch.linalg.svd(matrix, full_matrices=False)
    real = torch.linalg.svd
    for failing in ({torch.float32}, {torch.float32, torch.float64}):

        def flaky(work, *arguments, failing=failing, **options):
            if work.dtype in failing:
                raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
            return real(work, *arguments, **options)

        monkeypatch.setattr(module.torch.linalg, "svd", flaky)
        u, s, vh = module.exact_svd(matrix)
        assert s.dtype == torch.float32
        torch.testing.assert_close(s, expected.S, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((u * s) @ vh, matrix, rtol=1e-4, atol=1e-5)
        for wide in (False, True):
            gu, gs, gvh = module.gram_svd(matrix.double().T if wide else matrix.double())
            torch.testing.assert_close(((gu * gs) @ gvh).float(), matrix.T if wide else matrix, rtol=1e-4, atol=1e-5)
