"""Parents' tensors kept between trials, up to a byte budget.

A tensor is kept as the merge takes it: converted to the operation's compute dtype (a bfloat16 recipe keeps its
float32 parents in bfloat16, half their size, and no trial converts them again). Beside tensors it keeps what is
derived from them once for every trial (`derived`: TIES's magnitude tables), under the same budget.

Every trial reads the same tensors in the same order, a cyclic scan, under which least-recently-used eviction keeps
nothing useful when the tensors are more than the budget (each is evicted just before it is asked for again). So a
full cache does not make room by evicting tensors the last pass used: it keeps what it holds (a fixed share of the
tensors hits on every trial) and reads the rest each time. Only tensors no pass has asked for since the one before
last (those of another plan, after a slice search changed the layers) are dropped, oldest first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from composer.plan import Plan, TensorRef


class TensorCache:
    def __init__(self, budget: int):
        self.budget = budget
        # key -> (what is kept, its bytes, the pass that last used it); a tensor's key is (ref, the dtype it was
        # converted to or None)
        self.held: OrderedDict[tuple, tuple[object, int, int]] = OrderedDict()
        self.resident = 0
        self.hits = self.reads = 0
        self.passes = 0

    def new_pass(self) -> None:
        self.passes += 1

    def shrink_to(self, budget: int) -> None:
        """A new budget (the memory a scoring pass leaves); what is kept beyond it is dropped, oldest first."""
        self.budget = max(budget, 0)
        while self.resident > self.budget:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, (_, size, _) = self.held.popitem(last=False)
        self.resident -= size

    def _found(self, key: tuple):
        entry = self.held.get(key)
        if entry is None:
            return None
        self.held[key] = (entry[0], entry[1], self.passes)
        self.held.move_to_end(key)
        return entry[0]

    def _keep(self, key: tuple, value, size: int) -> None:
        while self.resident + size > self.budget and self.held and next(iter(self.held.values()))[2] < self.passes - 1:
            self._drop_oldest()  # stale: unused by this pass and the one before
        if self.resident + size <= self.budget:
            self.held[key] = (value, size, self.passes)
            self.resident += size

    def get(self, plan: Plan, ref: TensorRef, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `ref` of the plan's sources, converted to `dtype` (None: as stored)."""
        key = (ref, dtype)
        tensor = self._found(key)
        if tensor is not None:
            self.hits += 1
            return tensor
        tensor = plan.sources[ref.model].read(ref.name)
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        self.reads += 1
        self._keep(key, tensor, tensor.numel() * tensor.element_size())
        return tensor

    def derived(self, key: tuple, make: Callable[[], object]):
        """What `make()` makes (an object with `nbytes`), made once while it stays in the cache; `key` names it and
        everything it is made from."""
        value = self._found(("derived", *key))
        if value is None:
            value = make()
            self._keep(("derived", *key), value, value.nbytes)
        return value
