"""What this CPU can do (from Linux's /proc/cpuinfo; elsewhere nothing is known), and float32 linear layers through
oneDNN where the default BLAS leaves the CPU's AVX-512 unused.

torch's float32 `linear` on the CPU goes to MKL, which on AMD processors takes its AVX2 kernels even where the CPU
has AVX-512; oneDNN, which torch bundles, picks its kernels by instruction set alone. On a 2-core AMD EPYC with
AVX-512, a 4096 x 576 by 576 x 1536 product ran at 141 GFLOPS through MKL and 201 through oneDNN: the same float32
arithmetic with the sums in another order (3e-7 relative to float64, MKL's 2e-7). Scoring text (`compose eval`,
`compose tune`'s trials) spends most of its time in these products."""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from pathlib import Path

import torch


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's vendor and feature flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text(errors="replace").split())
    except OSError:
        return frozenset()


def onednn_linears_are_faster() -> bool:
    """Whether float32 linear layers run faster through oneDNN here: an AMD CPU with AVX-512 (measured above).
    COMPOSER_ONEDNN=0 turns it off (to compare)."""
    flags = cpu_flags()
    return (
        os.environ.get("COMPOSER_ONEDNN") != "0"
        and "AuthenticAMD" in flags
        and "avx512f" in flags
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


@contextmanager
def linears_through_onednn():
    """Inside the block, every `torch.nn.Linear` on float32 CPU tensors that needs no gradient runs through
    oneDNN, where that is faster (`onednn_linears_are_faster`); elsewhere, and for anything else, nothing changes.
    One process-wide switch: the block is for commands that score text, not for library code running beside them."""
    if not onednn_linears_are_faster():
        yield
        return
    original = torch.nn.Linear.forward

    def forward(layer: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
        weight = layer.weight
        if (
            input.device.type != "cpu"
            or input.dtype != torch.float32
            or weight.dtype != torch.float32
            or (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad))
        ):
            return original(layer, input)
        return torch.ops.mkldnn._linear_pointwise(input, weight, layer.bias, "none", [], "")

    torch.nn.Linear.forward = forward
    try:
        yield
    finally:
        torch.nn.Linear.forward = original
