"""The fused C kernels (composer.native) give the bits of the torch path they replace: every method of
the task-arithmetic family in bf16, with signed zeros, infinities, NaNs and ties at the thresholds,
over chunks that split the ties; and the exact magnitude sums equal a sum in rationals."""

from __future__ import annotations

import math
from fractions import Fraction
from unittest import mock

import pytest
import torch

from composer import native
from composer.methods.task_arithmetic import chunked as chunked_module
from composer.methods.task_arithmetic import generalized_task_arithmetic, reference_generalized_task_arithmetic
from composer.methods.task_arithmetic.magnitude_sum import MagnitudeSum
from composer.native import bf16 as native_bf16

needs_kernels = pytest.mark.skipif(native.library() is None, reason="no C compiler here")

METHODS = {
    "task_arithmetic": dict(),
    "ties": dict(sparsification="magnitude", consensus=True, normalize=True),
    "dare_linear": dict(sparsification="random", rescale=True),
    "dare_ties": dict(sparsification="random", consensus=True, rescale=True),
    "breadcrumbs_ties": dict(sparsification="magnitude_outliers", consensus=True, gammas=[0.02, 0.05, 0.3, 0.1]),
    "della": dict(sparsification="della_magprune", consensus=True, normalize=True, rescale=True),
}
VARIANTS = {
    "defaults": dict(),
    "normalized, lambda": dict(normalize=True, lambda_=0.8),
    "magnitude rescaled": dict(rescale=True),
}


def canonical(tensor: torch.Tensor) -> torch.Tensor:
    """The bit patterns, every NaN as one (the kernels promise NaN, not torch's NaN payload)."""
    bits = tensor.view(torch.int16 if tensor.element_size() == 2 else torch.int32).clone()
    bits[torch.isnan(tensor)] = 0x7FC0
    return bits


def awkward_inputs(tied: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (96, 130)
    if tied:  # integer deltas: thousands of equal magnitudes at each threshold
        base = torch.randint(-20, 20, shape, generator=generator).to(torch.bfloat16)
        models = [base + torch.randint(-4, 5, shape, generator=generator).to(torch.bfloat16) for _ in range(4)]
    else:
        scales = torch.exp2(torch.randint(-30, 2, (4, *shape), generator=generator).float())
        base = torch.randn(shape, generator=generator).to(torch.bfloat16)
        models = [
            (base.float() + torch.randn(shape, generator=generator) * scales[i]).to(torch.bfloat16) for i in range(4)
        ]
    flat_base = base.view(-1)
    flat_base[:40] = 0.0
    flat_base[20:40] = -0.0
    models[0].view(-1)[:60] = -0.0  # signed zeros on both sides
    models[1].view(-1)[:30] = flat_base[:30]  # zero deltas
    models[2].view(-1)[500] = float("inf")
    models[3].view(-1)[700] = float("nan")
    models[1].view(-1)[900] = -float("inf")
    return models, base


def finite(models: list[torch.Tensor]) -> list[torch.Tensor]:
    """The models with their infinities and NaNs replaced (for methods whose every entry a NaN would reach)."""
    return [torch.nan_to_num(model, nan=0.5, posinf=2.0, neginf=-2.0) for model in models]


@needs_kernels
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("threads", [1, 3])
def test_kernels_give_the_torch_paths_bits(method, variant, tied, threads, monkeypatch):
    models, base = awkward_inputs(tied)
    arguments = dict(METHODS[method], **VARIANTS[variant])
    if "sparsification" in arguments:
        arguments["densities"] = [0.5, 0.7, 0.3, 0.9]
    weights = [0.6, -0.3, 0.5, 0.25]
    # with threads > 1, ranges above 1000 entries are split between threads (at multiples of 256)
    with (
        mock.patch.object(chunked_module, "CHUNK", 4096),
        mock.patch.object(native_bf16, "MIN_PART", 1000),
        mock.patch.object(native_bf16, "thread_count", lambda: threads),
    ):
        fused = generalized_task_arithmetic(models, base, weights, generator=11, **arguments)
        monkeypatch.setenv("COMPOSER_NATIVE", "0")
        chunked = generalized_task_arithmetic(models, base, weights, generator=11, **arguments)
    reference = reference_generalized_task_arithmetic(models, base, weights, generator=11, **arguments)
    assert torch.equal(canonical(chunked), canonical(reference))
    assert torch.equal(canonical(fused), canonical(chunked))


@needs_kernels
def test_the_kernels_are_used_for_bf16_on_a_cpu(monkeypatch):
    models, base = awkward_inputs(False)
    calls = []
    library = native.library()
    with mock.patch.object(native, "library", lambda: calls.append(1) or library):
        generalized_task_arithmetic(models, base, [0.5] * 4, sparsification="random", densities=[0.5] * 4, rescale=True)
    assert calls


def exact_magnitude_sum(values: torch.Tensor) -> float:
    magnitudes = values.float().abs()
    if torch.isnan(magnitudes).any():
        return math.nan
    if torch.isinf(magnitudes).any():
        return math.inf
    return float(sum(Fraction(value) for value in magnitudes.tolist()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["spread", "narrow", "subnormal", "infinity", "nan"])
@pytest.mark.parametrize("kernels", ["1", "0"])
def test_magnitude_sums_are_exact(dtype, case, kernels, monkeypatch):
    monkeypatch.setenv("COMPOSER_NATIVE", kernels)
    generator = torch.Generator().manual_seed(3)
    lowest = -40 if dtype == torch.bfloat16 else -20
    values = (
        torch.randn(5000, generator=generator)
        * torch.exp2(torch.randint(lowest, 12, (5000,), generator=generator).float())
    ).to(dtype)
    if case == "narrow":  # exponents spanning 23 (the most summed in 32-bit lanes), largest significands included
        significands = torch.randint(128, 256, (5000,), generator=generator).float() / 128
        values = (significands * torch.exp2(torch.randint(-11, 13, (5000,), generator=generator).float())).to(dtype)
        values[1::2] *= -1
        values[30], values[31] = 255 / 128 * 2.0**12, 2.0**-11
    values[:10], values[10:20] = 0.0, -0.0
    if case == "subnormal":
        values[::3] = torch.finfo(dtype).smallest_normal / 8
    elif case == "infinity":
        values[5] = -float("inf")
    elif case == "nan":
        values[7] = float("nan")
    total = MagnitudeSum(dtype)
    for start in range(0, values.numel(), 700):
        total.add(values[start : start + 700])
    got, want = float(total.value()), exact_magnitude_sum(values)
    assert got == want or (math.isnan(got) and math.isnan(want))


def test_magnitude_sums_of_a_long_tensor_do_not_overflow():
    values = torch.full((1 << 20,), 3.0e38, dtype=torch.bfloat16)
    total = float(MagnitudeSum(torch.bfloat16).add(values).add(values).value())
    assert total == float(Fraction(float(values[0])) * (1 << 21))


@needs_kernels
@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("threads", [1, 3])
def test_model_stock_blend_gives_the_torch_paths_bits(count, threads, monkeypatch):
    from composer.methods.model_stock import model_stock

    models, base = awkward_inputs(False)
    models = finite(models * 2)[:count]  # a finite ratio
    with (
        mock.patch.object(native_bf16, "MIN_PART", 1000),
        mock.patch.object(native_bf16, "thread_count", lambda: threads),
    ):
        fused = model_stock(models, base)
    monkeypatch.setenv("COMPOSER_NATIVE", "0")
    assert not torch.isnan(fused).any()
    assert torch.equal(fused, model_stock(models, base))


@needs_kernels
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("threads", [1, 3])
def test_sce_gives_the_torch_paths_bits(select_topk, tied, threads, monkeypatch):
    from composer.methods.task_arithmetic import reference_sce, sce

    models, base = awkward_inputs(tied)
    models = finite(models)  # finite model weights
    with (
        mock.patch.object(chunked_module, "CHUNK", 4096),
        mock.patch.object(native_bf16, "MIN_PART", 1000),
        mock.patch.object(native_bf16, "thread_count", lambda: threads),
    ):
        fused = sce(models, base, select_topk)
        monkeypatch.setenv("COMPOSER_NATIVE", "0")
        chunked = sce(models, base, select_topk)
    assert torch.equal(canonical(chunked), canonical(reference_sce(models, base, select_topk)))
    assert torch.equal(canonical(fused), canonical(chunked))


def dare_inputs(case: str, dtype: torch.dtype):
    """A base and three models of an odd shape (1961 entries: the last block of 256, and the last byte of the
    keep bits, partly filled) whose deltas take each of DARE's summing paths (`case`)."""
    generator = torch.Generator().manual_seed(5)
    shape = (37, 53)
    base = torch.randn(shape, generator=generator)
    if case == "subnormal":  # deltas of a few bf16 subnormals: sign sums at and around zero
        base = torch.zeros(shape)
        units = torch.randint(-3, 4, (3, *shape), generator=generator).float()
        return [(units[i] * 2.0**-133).to(dtype) for i in range(3)], base.to(dtype)
    if case == "narrow":  # exponents spanning at most 16 in a block: summed in 32-bit lanes
        spans = torch.randint(-16, 1, (3, *shape), generator=generator)
    elif case == "word edge":  # largest significands over spans of 16 (block 0: its sum just below 2^32 units) and 17
        exponents = torch.randint(-17, 1, (3, *shape), generator=generator)
        exponents.view(3, -1)[:, :256].clamp_(min=-16)
        exponents.view(3, -1)[:, :512:2] = 0
        exponents.view(3, -1)[:, 1:512:64] = torch.tensor([-16, -17]).repeat_interleave(4)
        signs = torch.randint(0, 2, (3, *shape), generator=generator).float() * 2 - 1
        models = signs * (255 / 128) * torch.exp2(exponents.float())  # deltas from a zero base
        return [models[i].to(dtype) for i in range(3)], torch.zeros(shape, dtype=dtype)
    else:  # "spread" and "unbounded": spans above 37, summed value by value
        spans = torch.randint(-60, 2, (3, *shape), generator=generator)
    deltas = torch.randn((3, *shape), generator=generator) * torch.exp2(spans.float()) * 2.0**-6
    models = [(base + deltas[i]).to(dtype) for i in range(3)]
    if case == "unbounded":
        for i, position in enumerate((4, 400, 1960)):
            models[i].view(-1)[position : position + 40 : 3] = float("inf") if i != 1 else float("nan")
        models[2].view(-1)[1000:1100:7] = -float("inf")
    return models, base.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", ["narrow", "word edge", "spread", "unbounded", "subnormal"])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("consensus", [False, True])
def test_dare_gives_the_torch_paths_bits_on_odd_sizes(dtype, case, rescale, consensus, monkeypatch):
    """DARE's pass 1 (keep bits and rescale factor: kernels.c's dare_select_bf16) and pass 2 (task_arithmetic_bf16)
    against the torch path, and that against the reference; float32 has no kernels, so there the torch path is
    checked against the reference alone."""
    models, base = dare_inputs(case, dtype)
    arguments = dict(
        sparsification="random", consensus=consensus, rescale=rescale, densities=[0.5, 0.3, 0.8], normalize=consensus
    )
    weights = [0.6, -0.3, 0.5]
    merge = chunked_module.task_merge(models, base, weights, generator=7, **arguments)
    flat = [model.reshape(-1) for model in models]

    def pass_one() -> list:
        inputs = chunked_module.ChunkedInputs(base, flat, chunked_module.cpu_chunks(base.numel()))
        generator = chunked_module.task_merge(models, base, weights, generator=7, **arguments).generator
        return [chunked_module.select(inputs, i, merge.sparsity(i), generator) for i in range(3)]

    with mock.patch.object(chunked_module, "CHUNK", 512), mock.patch.object(native_bf16, "MIN_PART", 600):
        native_pass, fused = pass_one(), generalized_task_arithmetic(models, base, weights, generator=7, **arguments)
        monkeypatch.setenv("COMPOSER_NATIVE", "0")
        torch_pass, chunked = pass_one(), generalized_task_arithmetic(models, base, weights, generator=7, **arguments)
    reference = reference_generalized_task_arithmetic(models, base, weights, generator=7, **arguments)
    assert torch.equal(canonical(chunked), canonical(reference))
    assert torch.equal(canonical(fused), canonical(chunked))
    for (native_keep, native_scale), (torch_keep, torch_scale) in zip(native_pass, torch_pass):
        assert torch.equal(native_keep.to_bool(), torch_keep.to_bool())
        assert native_scale == torch_scale or (math.isnan(native_scale) and math.isnan(torch_scale))
    if case == "subnormal" and dtype == torch.bfloat16:
        assert (fused == 0).any() and (fused < 0).any() and (fused > 0).any()
