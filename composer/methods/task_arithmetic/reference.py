"""The specification of the task-arithmetic family: merges of task vectors tau_i = x_i - base,

    y = base + lambda * merge(tau_1 .. tau_n),

computed whole tensors at a time, the operations in mergekit's order (weighted deltas stacked, summed
over the model axis, divided, scaled, added to the base), so the deterministic methods give the same
float32 weights bit for bit wherever no two entries tie at a selection threshold (at a tie mergekit keeps
whichever its unstable sort puts first; here the lowest positions). The chunked path
(`composer.methods.task_arithmetic.chunked`, the default) gives this path's bits with less memory;
tests compare the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from composer.methods.task_arithmetic.settings import task_merge
from composer.methods.task_arithmetic.sparsify import sparsify_
from composer.methods.task_arithmetic.steps import elect_signs_, task_vectors


def reference_generalized_task_arithmetic(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, weights: Sequence[float], **options
) -> torch.Tensor:
    """base + lambda * merge of the task vectors of `tensors` (`options`: the fields of `settings.TaskMerge`).

    1. tau_i = x_i - base, sparsified with `sparsification` at `densities[i]` (with `rescale`, the
       kept entries are scaled to the task vector's L1 norm); `gammas` for "magnitude_outliers",
       `epsilons` for "della_magprune"; the random methods take one stream key per model, in
       order, from `generator` (`composer.methods.task_arithmetic.draws.stream_key`).
    2. d_i = w_i tau_i.
    3. consensus: per entry keep the d_i whose sign is the sign of sum_i d_i (TIES sign election);
       m = sum of the kept d_i, D = sum of the w_i kept there (1 where none).
       otherwise: m = sum_i d_i, D = sum_i w_i (1 when |D| < 1e-8).
    4. m / D when `normalize`; times `lambda_`; plus base, in the base's dtype.

    Holds k stacked deltas in the base's dtype and two tensor-sized float32 mask buffers.
    """
    merge = task_merge(tensors, base, weights, **options)
    count = len(tensors)
    deltas = task_vectors(tensors, base)
    workspace = None  # two tensor-sized float32 buffers, reused for every model's masks
    if merge.sparsification is not None:
        for i in range(count):
            if merge.densities[i] < 1 and workspace is None:
                workspace = torch.empty(2 * base.numel(), dtype=torch.float32, device=base.device)
            sparsify_(
                deltas[i],
                merge.sparsification,
                merge.densities[i],
                merge.rescale,
                merge.gammas[i],
                merge.epsilons[i],
                merge.generator,
                workspace,
            )
    weight_column = torch.tensor(list(merge.weights), dtype=deltas.dtype, device=deltas.device)
    weight_column = weight_column.reshape((count,) + (1,) * base.dim())
    deltas.mul_(weight_column)
    if merge.consensus:
        divisor = elect_signs_(deltas, merge.weights, divisor=merge.normalize, workspace=workspace)
        merged = deltas.sum(dim=0)
        if divisor is not None:
            divisor.masked_fill_(divisor == 0, 1)
    else:
        merged = deltas.sum(dim=0)
        divisor = weight_column.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    del deltas
    if merge.normalize:
        merged /= divisor
    if merge.lambda_ != 1:
        merged *= merge.lambda_
    return merged.add_(base).to(base.dtype)
