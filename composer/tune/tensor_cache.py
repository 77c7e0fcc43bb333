"""Parents' tensors kept between trials, up to a byte budget, least recently used out first."""

from __future__ import annotations

from collections import OrderedDict

import torch

from composer.plan import Plan, TensorRef


class TensorCache:
    def __init__(self, budget: int):
        self.budget = budget
        self.held: OrderedDict[TensorRef, torch.Tensor] = OrderedDict()
        self.resident = 0
        self.hits = self.reads = 0

    def shrink_to(self, budget: int) -> None:
        """A new budget (the memory a scoring pass leaves); tensors beyond it are dropped, oldest first."""
        self.budget = max(budget, 0)
        while self.resident > self.budget:
            _, dropped = self.held.popitem(last=False)
            self.resident -= dropped.numel() * dropped.element_size()

    def get(self, plan: Plan, ref: TensorRef) -> torch.Tensor:
        tensor = self.held.get(ref)
        if tensor is not None:
            self.held.move_to_end(ref)
            self.hits += 1
            return tensor
        tensor = plan.sources[ref.model].read(ref.name)
        self.reads += 1
        size = tensor.numel() * tensor.element_size()
        if size <= self.budget:
            while self.resident + size > self.budget:
                _, dropped = self.held.popitem(last=False)
                self.resident -= dropped.numel() * dropped.element_size()
            self.held[ref] = tensor
            self.resident += size
        return tensor
