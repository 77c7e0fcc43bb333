"""The chunked (fused) task-arithmetic path gives the same bits as the whole-tensor reference path,
for every method of the family, in float32 and bfloat16, with many ties at the thresholds, over
several chunks (small chunk sizes are patched in so that small tensors span many of them and the
sampled brackets of the order statistics are used); and the random stream of DARE and DELLA
(splitmix64, drawn by position: the same in pieces as whole, statistically sound)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from composer.methods import order_statistics
from composer.methods.task_arithmetic import chunked as chunked_module
from composer.methods.task_arithmetic import draws as draws_module
from composer.methods.task_arithmetic import generalized_task_arithmetic, reference_generalized_task_arithmetic
from composer.methods.task_arithmetic import select_calculate_erase as sce_module
from composer.methods.task_arithmetic import sparsify as sparsify_module

DENSITIES = [0.5, 0.7, 0.3]
METHODS = {
    "task_arithmetic": dict(),
    "ties": dict(sparsification="magnitude", consensus=True, normalize=True),
    "dare_linear": dict(sparsification="random", rescale=True),
    "dare_ties": dict(sparsification="random", consensus=True, rescale=True),
    "breadcrumbs": dict(sparsification="magnitude_outliers", gammas=[0.02, 0.05, 0.3]),
    "breadcrumbs_ties": dict(sparsification="magnitude_outliers", consensus=True, gammas=[0.02, 0.05, 0.3]),
    "della": dict(
        sparsification="della_magprune", consensus=True, normalize=True, rescale=True, epsilons=[0.1, 0.2, 0.05]
    ),
    "della_linear": dict(sparsification="della_magprune", rescale=True, epsilons=[0.1, 0.2, 0.05]),
}
OPTIONS = {
    "defaults": dict(),
    "flipped": dict(toggle=True, lambda_=1.3),  # rescale and normalize inverted, lambda != 1
}


def inputs(shape, dtype, tied: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    if tied:  # integer-valued deltas: thousands of equal magnitudes at every threshold
        base = torch.randint(-20, 20, shape, generator=generator).to(dtype)
        models = [base + torch.randint(-4, 5, shape, generator=generator).to(dtype) for _ in range(3)]
    else:
        base = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
        models = [(base.float() + torch.randn(shape, generator=generator) * 0.003).to(dtype) for _ in range(3)]
    return models, base


def both(models, base, method: str, option: str, weights=(0.6, -0.3, 0.5)):
    arguments = dict(METHODS[method], **{k: v for k, v in OPTIONS[option].items() if k != "toggle"})
    if "sparsification" in arguments:
        arguments["densities"] = DENSITIES
    if OPTIONS[option].get("toggle"):
        arguments["rescale"] = not arguments.get("rescale", False)
        arguments["normalize"] = not arguments.get("normalize", False)
    return (
        reference_generalized_task_arithmetic(models, base, list(weights), generator=11, **arguments),
        generalized_task_arithmetic(models, base, list(weights), generator=11, **arguments),
    )


def small_chunks():
    """Chunks of 4096 elements, L1 pieces of 1024, order statistics bracketed above 2048 elements."""
    return (
        mock.patch.object(chunked_module, "CHUNK", 4096),
        mock.patch.object(sparsify_module, "L1_PIECE", 1024),
        mock.patch.object(order_statistics, "EXACT_LIMIT", 2048),
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, tied", [((300,), False), ((257, 93), False), ((130, 200), True)])
def test_fused_path_equals_reference_bit_for_bit(method, option, dtype, shape, tied):
    models, base = inputs(shape, dtype, tied)
    chunk, piece, limit = small_chunks()
    with chunk, piece, limit:
        reference, fused = both(models, base, method, option)
    assert fused.dtype == reference.dtype == dtype and fused.shape == reference.shape
    assert torch.equal(fused, reference)
    # signed zeros too
    assert torch.equal(torch.signbit(fused), torch.signbit(reference))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "dare_ties"])
@pytest.mark.parametrize("tied", [False, True])
def test_fused_path_in_float16(method, tied):
    """16-bit magnitudes take their thresholds from counts of bit patterns; float16 as well as bf16."""
    models, base = inputs((130, 200), torch.float16, tied)
    chunk, piece, limit = small_chunks()
    with chunk, piece, limit:
        reference, fused = both(models, base, method, "defaults")
    assert torch.equal(fused, reference) and torch.equal(torch.signbit(fused), torch.signbit(reference))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties", "della"])
def test_fused_path_at_real_chunk_sizes(method):
    """Over 1 << 20 elements (two chunks, bracketed order statistics, several L1 pieces), bf16."""
    models, base = inputs((1100, 1000), torch.bfloat16, tied=False, seed=3)
    reference, fused = both(models, base, method, "defaults")
    assert torch.equal(fused, reference)


def test_inputs_are_left_alone_and_other_dtypes_are_converted():
    models, base = inputs((64, 40), torch.float32, tied=True)
    copies = [m.clone() for m in models]
    models[1] = models[1].to(torch.bfloat16)  # computed in the base's dtype, as the reference does
    reference, fused = both(models, base, "ties", "defaults")
    assert torch.equal(fused, reference)
    assert torch.equal(models[0], copies[0]) and torch.equal(models[2], copies[2])


def test_density_one_and_empty_tensors():
    models, base = inputs((50, 7), torch.bfloat16, tied=True)
    for method in ("ties", "dare_ties", "della", "breadcrumbs"):
        arguments = dict(METHODS[method], densities=[1.0, 1.0, 1.0])
        assert torch.equal(
            generalized_task_arithmetic(models, base, [1, 1, 1], generator=1, **arguments),
            reference_generalized_task_arithmetic(models, base, [1, 1, 1], generator=1, **arguments),
        )
    empty = torch.empty(0, 4)
    assert generalized_task_arithmetic([empty], empty, [1.0], sparsification="magnitude", densities=[0.5]).shape == (
        0,
        4,
    )


# --- the random stream of DARE and DELLA ------------------------------------------------------------


def _splitmix64(key: int, index: int) -> int:
    """Word `index` of the splitmix64 stream of `key` (Steele, Lea & Flood 2014), in Python integers."""
    word = (key + (index + 1) * 0x9E3779B97F4A7C15) % (1 << 64)
    word = ((word ^ (word >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    word = ((word ^ (word >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return word ^ (word >> 31)


@pytest.mark.parametrize("key", [0, 1, -1, 0x7FFF_FFFF_FFFF_FFFF, -(1 << 63), 123456789123])
def test_random_words_are_splitmix64(key):
    words = draws_module.random_words(key, 1000, 50)
    assert [int(word) % (1 << 64) for word in words] == [_splitmix64(key % (1 << 64), 1000 + i) for i in range(50)]
    assert _splitmix64(0, 0) == 0xE220A8397B1DCDAF  # the published first output of seed 0


def test_random_levels_drawn_in_pieces_equal_drawn_whole():
    whole = draws_module.random_levels((37, 29), key=99)
    flat = whole.reshape(-1)
    cuts = [0, 1, 2, 7, 8, 100, 101, 555, flat.numel()]
    pieces = [draws_module.random_levels(stop - start, 99, offset=start) for start, stop in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(pieces), flat)
    assert torch.equal(draws_module.random_levels((37, 29), key=99), whole)  # reproducible


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_random_levels_are_the_same_on_cuda():
    assert torch.equal(
        draws_module.random_levels(100_003, -5, "cuda", offset=3).cpu(),
        draws_module.random_levels(100_003, -5, offset=3),
    )


def test_random_masks_are_statistically_sound():
    """On 10^7 draws: the keep share is the density to within 4 sigma, and masks are uncorrelated
    between neighbouring positions (same word and next word), between models (keys drawn one
    after the other from one generator) and between seeds."""
    n, density = 10_000_000, 0.3
    generator = torch.Generator().manual_seed(5)
    keys = [draws_module.stream_key(generator) for _ in range(2)] + [draws_module.stream_key(6)]
    threshold = draws_module.level_of(density)
    masks = [draws_module.random_levels(n, key) < threshold for key in keys]
    p = (threshold + 32768) / 65536
    sigma = (p * (1 - p) / n) ** 0.5
    limit = 4 / n**0.5  # 4 sigma of the correlation of independent draws

    def correlation(a, b):  # of two boolean masks (the phi coefficient)
        both, count_a, count_b, total = int(torch.count_nonzero(a & b)), int(a.sum()), int(b.sum()), a.numel()
        return (both * total - count_a * count_b) / (count_a * (total - count_a) * count_b * (total - count_b)) ** 0.5

    for mask in masks:
        assert abs(int(mask.sum()) / n - p) < 4 * sigma
        for lag in (1, 2, 3, 4, 5, 8):
            assert abs(correlation(mask[:-lag], mask[lag:])) < limit
    assert abs(correlation(masks[0], masks[1])) < limit
    assert abs(correlation(masks[0], masks[2])) < limit
    assert len(set(keys)) == 3


def test_radix_row_order_is_torchs_stable_sort():
    """DELLA's row ranks on a CPU come from numpy's radix argsort; it must be the permutation of
    torch's stable sort, ties (many, in bf16) ranked by position."""
    from composer.methods.task_arithmetic.sparsify import stable_row_order

    generator = torch.Generator().manual_seed(3)
    delta = (torch.randn(64, 300, generator=generator) * 0.01).to(torch.bfloat16)
    delta[5] = 0  # a row of equal magnitudes
    keys = delta.abs().view(torch.int16)
    assert torch.equal(stable_row_order(keys), torch.sort(keys, dim=1, stable=True).indices)


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_row_ranks_in_threads_scatter_as_one_sort(threads):
    """Blocks of rows sorted and scattered in threads (any count, rows not a multiple of it) give the
    scatter of the whole tensor's stable row order."""
    from composer.methods.task_arithmetic.sparsify import scatter_by_row_rank_, stable_row_order

    generator = torch.Generator().manual_seed(4)
    keys = (torch.randn(101, 77, generator=generator) * 0.01).to(torch.bfloat16).abs().view(torch.int16)
    by_rank = torch.rand(101, 77, generator=generator) < 0.5
    expected = torch.empty(101, 77, dtype=torch.bool).scatter_(1, stable_row_order(keys), by_rank)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(scatter_by_row_rank_(torch.empty(101, 77, dtype=torch.bool), keys, by_rank), expected)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("shape, tied", [((300,), False), ((257, 93), False), ((130, 200), True)])
def test_sce_in_chunks_equals_its_reference_bit_for_bit(dtype, select_topk, shape, tied):
    from composer.methods.task_arithmetic import reference_sce, sce

    models, base = inputs(shape, dtype, tied)
    models[2].view(-1)[: base.numel() // 3] = models[0].view(-1)[: base.numel() // 3]  # ties and zero variances
    chunk, piece, limit = small_chunks()
    with chunk, piece, limit, mock.patch.object(sce_module, "VARIANCE_CHUNK", 1000):
        reference, fused = reference_sce(models, base, select_topk), sce(models, base, select_topk)
    assert fused.dtype == reference.dtype == dtype
    assert torch.equal(fused, reference) and torch.equal(torch.signbit(fused), torch.signbit(reference))
