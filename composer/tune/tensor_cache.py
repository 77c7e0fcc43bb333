"""Parents' tensors kept between trials, up to a byte budget.

Every trial reads the same tensors in the same order, a cyclic scan, under which least-recently-used eviction keeps
nothing useful when the tensors are more than the budget (each is evicted just before it is asked for again). So a
full cache does not make room by evicting tensors the last pass used: it keeps what it holds (a fixed share of the
tensors hits on every trial) and reads the rest each time. Only tensors no pass has asked for since the one before
last (those of another plan, after a slice search changed the layers) are dropped, oldest first."""

from __future__ import annotations

from collections import OrderedDict

import torch

from composer.plan import Plan, TensorRef


class TensorCache:
    def __init__(self, budget: int):
        self.budget = budget
        self.held: OrderedDict[TensorRef, tuple[torch.Tensor, int]] = (
            OrderedDict()
        )  # ref -> (tensor, pass that last used it)
        self.resident = 0
        self.hits = self.reads = 0
        self.passes = 0

    def new_pass(self) -> None:
        self.passes += 1

    def shrink_to(self, budget: int) -> None:
        """A new budget (the memory a scoring pass leaves); tensors beyond it are dropped, oldest first."""
        self.budget = max(budget, 0)
        while self.resident > self.budget:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, (dropped, _) = self.held.popitem(last=False)
        self.resident -= dropped.numel() * dropped.element_size()

    def get(self, plan: Plan, ref: TensorRef) -> torch.Tensor:
        entry = self.held.get(ref)
        if entry is not None:
            self.held[ref] = (entry[0], self.passes)
            self.held.move_to_end(ref)
            self.hits += 1
            return entry[0]
        tensor = plan.sources[ref.model].read(ref.name)
        self.reads += 1
        size = tensor.numel() * tensor.element_size()
        while self.resident + size > self.budget and self.held and next(iter(self.held.values()))[1] < self.passes - 1:
            self._drop_oldest()  # stale: unused by this pass and the one before
        if self.resident + size <= self.budget:
            self.held[ref] = (tensor, self.passes)
            self.resident += size
        return tensor
