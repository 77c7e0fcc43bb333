"""The task-arithmetic family: merges of task vectors tau_i = x_i - base,

    y = base + lambda * merge(tau_1 .. tau_n).

Where each part sits:
- `methods`: task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della and
  della_linear, each a function with its formula and its registration; `select_calculate_erase`: SCE,
  likewise.
- `reference`: the specification, whole tensors at a time in mergekit's order of operations
  (`reference_generalized_task_arithmetic`).
- `chunked`: the default path, the reference's bits in cache-sized chunks (`generalized_task_arithmetic`);
  `native`: its one way into the bf16 C kernels.
- `settings` (the checked options of a merge), `steps` (task vectors, sign election), `sparsify`
  (the masks), `draws` (DARE's and DELLA's random stream), `bitmask`, `magnitude_sum` (exact L1 sums).
"""

from composer.methods.task_arithmetic.chunked import generalized_task_arithmetic
from composer.methods.task_arithmetic.methods import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    task_arithmetic,
    ties,
)
from composer.methods.task_arithmetic.reference import reference_generalized_task_arithmetic
from composer.methods.task_arithmetic.select_calculate_erase import population_variance, reference_sce, sce
from composer.methods.task_arithmetic.steps import elect_signs_, task_vectors

__all__ = [
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "elect_signs_",
    "generalized_task_arithmetic",
    "population_variance",
    "reference_generalized_task_arithmetic",
    "reference_sce",
    "sce",
    "task_arithmetic",
    "task_vectors",
    "ties",
]
