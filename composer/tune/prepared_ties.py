"""TIES merges of a trial with the work that does not depend on the tuned numbers done once per tensor.

TIES keeps, of each task vector, its k = max(1, int(density n)) entries of largest magnitude, ties at the threshold
kept lowest position first. In bfloat16 a magnitude is one of 32768 bit patterns, so a count of each pattern (a
`MagnitudeTable`, made once per tensor and parent with the kernels' one pass) gives for any density the threshold's
pattern and how many of the entries equal to it are kept; where that splits the tie, one scan that stops at the last
kept one finds where it ends (kernels.c's nth_delta_pattern_bf16). The merge is then the kernels' fused pass with
each parent's range of kept patterns, once on each side of those ends, with no mask: the method's selection (which
otherwise counts every parent's magnitudes again each trial and masks every tensor whose tie it splits with a dozen
torch passes) in one pass over the parents. The result is `ties`' own, bit for bit (tests/test_tune.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from composer.methods.task_arithmetic.settings import task_merge
from composer.native import bf16
from composer.plan import PlannedTensor
from composer.plan.lines import LINES_SCALE

TOP_PATTERN = 0x7FFF  # the largest magnitude bit pattern


@dataclass(frozen=True)
class MagnitudeTable:
    """The bit patterns of a task vector's bf16 magnitudes, largest first, and how many magnitudes are at least each."""

    patterns: torch.Tensor  # int64, descending
    at_least: torch.Tensor  # int64, ascending

    @classmethod
    def of(cls, model: torch.Tensor, base: torch.Tensor) -> MagnitudeTable:
        counts = bf16.delta_pattern_counts([(0, base.numel())], model.reshape(-1), base.reshape(-1))[0]
        present = counts.nonzero().view(-1).flip(0)
        return cls(present, counts[present].cumsum(0))

    @property
    def nbytes(self) -> int:
        return (self.patterns.numel() + self.at_least.numel()) * 8

    def threshold(self, k: int) -> tuple[int, int, int]:
        """For the k largest magnitudes: (the bit pattern of the k-th, how many of the entries with that pattern are
        among the k, how many entries have it)."""
        index = int(torch.searchsorted(self.at_least, k))
        above = int(self.at_least[index - 1]) if index else 0
        return int(self.patterns[index]), k - above, int(self.at_least[index]) - above


def is_prepared_ties(planned: PlannedTensor, inputs: list[torch.Tensor]) -> bool:
    """Whether `planned` is a plain TIES merge (no rescale, no LiNeS or vocabulary step around it) of bf16 tensors the
    kernels can take."""
    operation = planned.operation
    arguments = operation.arguments
    return (
        operation.label == "ties"
        and not arguments.get("rescale")
        and LINES_SCALE not in arguments
        and "vocabulary" not in arguments
        and operation.compute_dtype == torch.bfloat16
        and len(inputs) >= 2
        and inputs[-1].numel() > 0
        and all(tensor.shape == inputs[-1].shape for tensor in inputs)
        and bf16.usable_for_merge(inputs[-1], inputs[:-1])
    )


def prepared_ties(planned: PlannedTensor, inputs: list[torch.Tensor], tables: list[MagnitudeTable]) -> torch.Tensor:
    """The output of `planned` (see `is_prepared_ties`) on `inputs` (the other models, then the base), `tables` the
    magnitude table of each other model's task vector."""
    arguments = planned.operation.arguments
    models, base = [tensor.reshape(-1) for tensor in inputs[:-1]], inputs[-1].reshape(-1)
    merge = task_merge(
        models,
        base,
        arguments["weight"],
        sparsification="magnitude",
        consensus=True,
        densities=arguments["density"],
        normalize=arguments["normalize"],
        lambda_=arguments["lambda"],
    )
    n = base.numel()
    lows, ends = [], []  # each model's lowest kept pattern, and the position after its last kept tie entry
    for i, (model, table) in enumerate(zip(models, tables)):
        if merge.sparsity(i) is None:
            lows.append(0)
            ends.append(n)
            continue
        pattern, kept, tied = table.threshold(max(1, int(merge.densities[i] * n)))
        lows.append(pattern)
        ends.append(n if kept == tied else bf16.nth_delta_pattern(model, base, pattern, kept) + 1)
    settings = bf16.TaskArithmeticSettings(
        weights=torch.tensor(list(merge.weights), dtype=base.dtype).tolist(),  # rounded as the method rounds them
        scales=[None] * len(models),
        consensus=True,
        normalize=merge.normalize,
        divisor=1.0,
        lambda_=merge.lambda_,
    )
    out = torch.empty(n, dtype=base.dtype)
    cuts = sorted({0, n, *ends})
    for start, stop in zip(cuts, cuts[1:]):
        # before a model's end its tie pattern is kept, from there on only the patterns above it
        keeps = [(bf16.KEEP_PATTERNS, low if stop <= end else low + 1, TOP_PATTERN) for low, end in zip(lows, ends)]
        bf16.task_arithmetic_(start, stop, base, models, keeps, settings, out)
    return out.view(inputs[-1].shape)
