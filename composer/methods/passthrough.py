"""Copy a tensor unchanged, optionally scaled."""

from __future__ import annotations

import torch


def passthrough(tensor: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    if scale is None or scale == 1:
        return tensor
    return tensor * scale
