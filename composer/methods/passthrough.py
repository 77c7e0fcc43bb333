"""Passthrough: copy a tensor unchanged, optionally scaled (layer stacking)."""

from __future__ import annotations

import torch

from composer.methods.registry import Parameter, registered


def passthrough(tensor: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    if scale is None or scale == 1:
        return tensor
    return tensor * scale


@registered(
    "passthrough",
    (Parameter("scale", per_model=True),),
    max_models=1,
    blends=False,
    description="copy one model's tensors (layer stacking), optionally scaled",
    light=True,
    copies=True,
)
def apply_passthrough(tensors, base, params):
    return passthrough(tensors[0], params["scale"][0])
