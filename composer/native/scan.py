"""One pass over a tensor's bytes as they are written: a checksum for the resume journal and the count of
NaN and infinite entries (composer.native.checksum, at memory speed, beside the writes)."""

from __future__ import annotations

import torch

from composer.native.checksum import scan_bytes

# bytes per entry and the mask of its exponent bits (all set: NaN or infinity), by floating-point dtype
EXPONENTS = {
    torch.bfloat16: (2, 0x7F80),
    torch.float16: (2, 0x7C00),
    torch.float32: (4, 0x7F800000),
    torch.float64: (8, 0x7FF0000000000000),
}


def scan(data: memoryview, dtype: torch.dtype) -> tuple[int, int, int]:
    """(s1, s2, entries that are NaN or infinite) of a tensor's bytes."""
    return scan_bytes(data, *EXPONENTS.get(dtype, (0, 0)))


def holds_nonfinite(tensor: torch.Tensor) -> bool:
    """Whether a CPU tensor has NaN or infinite entries."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return scan(memoryview(data).cast("B"), tensor.dtype)[2] > 0
