"""SLERP: spherical interpolation from the base model to one other model (Shoemake 1985)."""

from __future__ import annotations

import math

import torch

from composer.memory import empty
from composer.methods import chunks
from composer.methods.registry import Parameter, registered

SLERP_PARALLEL_THRESHOLD = 0.9995  # |cos| above this: the tensors are nearly (anti)parallel, use lerp
DOT_CHUNK = 1 << 16  # elements per step of the float64 dot products: a cache-sized copy


def _dots(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(<a, a>, <b, b>, <a, b>) over all elements, summed in float64 a cache-sized piece (`DOT_CHUNK`) at a
    time, once for all three products. The pieces are fresh copies: BLAS's dot products (MKL's on AMD
    processors among them) round differently with the inputs' address, and a tensor mapped from a file sits
    wherever its header put it, so the same values would otherwise give other bits when they come from memory."""
    a, b = a.reshape(-1), b.reshape(-1)
    aa = bb = ab = 0.0
    for start in range(0, a.numel(), DOT_CHUNK):
        x = a[start : start + DOT_CHUNK].to(torch.float64, copy=True)
        y = b[start : start + DOT_CHUNK].to(torch.float64, copy=True)
        aa += float(torch.dot(x, x))
        bb += float(torch.dot(y, y))
        ab += float(torch.dot(x, y))
    return aa, bb, ab


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from `a` (t=0) to `b` (t=1), each tensor taken as one vector.

    theta = arccos(<a, b> / (|a| |b|));  result = sin((1-t) theta)/sin(theta) a + sin(t theta)/sin(theta) b.
    The angle comes from the directions; the weights apply to the originals, so magnitudes interpolate
    too. When the tensors are nearly parallel or antiparallel (|cos theta| > 0.9995), or one has norm
    below `eps` (no direction), this is linear interpolation (1-t) a + t b instead.
    """
    if t == 0:
        return a
    if t == 1:
        return b
    squared_a, squared_b, product = _dots(a, b)
    norm_a = math.sqrt(max(squared_a, 0.0))
    norm_b = math.sqrt(max(squared_b, 0.0))
    if norm_a < eps or norm_b < eps:
        return torch.lerp(a, b, t)
    cosine = max(-1.0, min(1.0, product / (norm_a * norm_b)))
    if abs(cosine) > SLERP_PARALLEL_THRESHOLD:
        return torch.lerp(a, b, t)
    theta = math.acos(cosine)
    sin_theta = math.sin(theta)
    weight_a = math.sin((1 - t) * theta) / sin_theta
    weight_b = math.sin(t * theta) / sin_theta
    # weight_a * a + weight_b * b: two products and a sum, each rounded in the tensors' dtype (never a fused
    # multiply-add, whose use in torch depends on how a tensor is split between threads), a cache-sized
    # chunk at a time on the CPU
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    out = empty((a.numel(),), torch.promote_types(a.dtype, b.dtype), a.device)
    scaled = torch.empty(
        min(a.numel(), chunks.CACHE_CHUNK) if a.device.type == "cpu" else a.numel(), dtype=out.dtype, device=a.device
    )
    for start, end in chunks.chunk_bounds(a):
        part = torch.mul(flat_b[start:end], weight_b, out=scaled[: end - start])
        torch.mul(flat_a[start:end], weight_a, out=out[start:end]).add_(part)
    return out.view(a.shape)


@registered(
    "slerp",
    (Parameter("t", required=True),),
    needs_base=True,
    min_models=1,
    max_models=1,
    description="spherical interpolation from the base model (t=0) to the other model (t=1)",
    light=True,
)
def apply_slerp(tensors, base, params):
    return slerp(base, tensors[0], params["t"])
