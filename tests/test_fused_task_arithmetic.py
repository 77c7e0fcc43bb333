"""The chunked (fused) task-arithmetic path gives the same bits as the whole-tensor reference path,
for every method of the family, in float32 and bfloat16, with many ties at the thresholds, over
several chunks (small chunk sizes are patched in so that small tensors span many of them and the
sampled brackets of the order statistics are used)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from composer.methods import sparsify as sparsify_module
from composer.methods import task_arithmetic as task_arithmetic_module
from composer.methods.task_arithmetic import generalized_task_arithmetic, reference_generalized_task_arithmetic

DENSITIES = [0.5, 0.7, 0.3]
METHODS = {
    "task_arithmetic": dict(),
    "ties": dict(sparsification="magnitude", consensus=True, normalize=True),
    "dare_linear": dict(sparsification="random", rescale=True),
    "dare_ties": dict(sparsification="random", consensus=True, rescale=True),
    "breadcrumbs": dict(sparsification="magnitude_outliers", gammas=[0.02, 0.05, 0.3]),
    "breadcrumbs_ties": dict(sparsification="magnitude_outliers", consensus=True, gammas=[0.02, 0.05, 0.3]),
    "della": dict(sparsification="della_magprune", consensus=True, normalize=True, rescale=True, epsilons=[0.1, 0.2, 0.05]),
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
        mock.patch.object(task_arithmetic_module, "_FUSED_CHUNK", 4096),
        mock.patch.object(sparsify_module, "_L1_PIECE", 1024),
        mock.patch.object(sparsify_module, "_EXACT_LIMIT", 2048),
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
    assert generalized_task_arithmetic([empty], empty, [1.0], sparsification="magnitude", densities=[0.5]).shape == (0, 4)
