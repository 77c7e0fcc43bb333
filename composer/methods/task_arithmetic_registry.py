"""Registry entries for the task-arithmetic family (task_arithmetic, ties, dare_*, breadcrumbs*,
della*, sce): parameters and defaults as mergekit has them, plan-time checks, and adapters from the
registry's `apply(tensors, base, params)` to `composer.methods.task_arithmetic`.

Kept free of torch so that reading the registry stays cheap; the adapters import lazily.
The random methods read `params["seed"]` (an int the planner supplies per output tensor; 0 when
absent): it seeds a generator that gives each model a 64-bit key, and the masks are a counter-based
stream of those keys and each entry's position, computed on the tensors' device, so a merge is the
same from run to run and on every device, and does not depend on the order tensors are computed in.
"""

from __future__ import annotations

from composer.methods.registry import MergeMethod, Parameter

# name: (sparsification, sign election, normalize default, rescale default)
_GENERALIZED = {
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_ties": ("random", True, False, True),
    "dare_linear": ("random", False, False, True),
    "breadcrumbs": ("magnitude_outliers", False, False, False),
    "breadcrumbs_ties": ("magnitude_outliers", True, False, False),
    "della": ("della_magprune", True, True, True),
    "della_linear": ("della_magprune", False, False, True),
}

_DESCRIPTIONS = {
    "task_arithmetic": "base + lambda * sum of weighted task vectors (Ilharco et al. 2022)",
    "ties": "trim task vectors by magnitude, elect signs, average the agreeing entries (Yadav et al. 2023)",
    "dare_ties": "drop task-vector entries at random and rescale (DARE), then TIES sign election",
    "dare_linear": "drop task-vector entries at random and rescale, weighted sum (Yu et al. 2023)",
    "breadcrumbs": "drop the largest (gamma) and smallest task-vector entries, weighted sum (Davari & Belilovsky 2023)",
    "breadcrumbs_ties": "breadcrumbs' sparsification, then TIES sign election",
    "della": "drop entries at random, the smaller the likelier, rescale, TIES sign election (Deep et al. 2024)",
    "della_linear": "DELLA's magnitude-ranked random drop, then a weighted sum",
    "sce": "select entries of high variance across models, weight models by task-vector size, erase minority signs (FuseChat)",
}


def _ordinal(i: int) -> str:
    n = i + 1
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _check_generalized(name: str, sparsification: str | None):
    def check(params: dict) -> str | None:
        if sparsification is None:
            return None  # density and rescale are accepted (as in mergekit) but unused
        for i, density in enumerate(params["density"]):
            if not 0 < density <= 1:
                return (
                    f"density must be in (0, 1] (the fraction of each task vector kept), "
                    f"got {density} for the {_ordinal(i)} model besides the base"
                )
        if sparsification == "magnitude_outliers":
            for i, gamma in enumerate(params["gamma"]):
                if not 0 <= gamma <= 1:
                    return (
                        f"gamma must be in [0, 1] (the fraction of largest entries dropped), "
                        f"got {gamma} for the {_ordinal(i)} model besides the base"
                    )
        if sparsification == "della_magprune":
            for i, (density, epsilon) in enumerate(zip(params["density"], params["epsilon"])):
                if epsilon < 0:
                    return f"epsilon must be >= 0, got {epsilon} for the {_ordinal(i)} model besides the base"
                if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
                    return (
                        f"density - epsilon and density + epsilon must lie strictly between 0 and 1 (they bound the keep "
                        f"probabilities), got density {density} and epsilon {epsilon} for the {_ordinal(i)} model besides the base"
                    )
        return None

    return check


def _apply_generalized(sparsification: str | None, consensus: bool):
    def apply(tensors, base, params):
        from composer.methods.draws import make_generator
        from composer.methods.task_arithmetic import generalized_task_arithmetic

        generator = None
        if sparsification in ("random", "della_magprune"):
            generator = make_generator(params.get("seed", 0) or 0)  # on the CPU: the same masks on every device
        return generalized_task_arithmetic(
            tensors,
            base,
            params["weight"],
            sparsification=sparsification,
            consensus=consensus,
            densities=params["density"],
            gammas=params.get("gamma"),
            epsilons=params.get("epsilon"),
            normalize=params["normalize"],
            rescale=params["rescale"],
            lambda_=params["lambda"],
            generator=generator,
        )

    return apply


def _generalized(name: str) -> MergeMethod:
    sparsification, consensus, normalize, rescale = _GENERALIZED[name]
    parameters = [
        Parameter("weight", required=True, per_model=True),
        Parameter("density", default=1.0, per_model=True),
        Parameter("normalize", default=normalize, kind="bool"),
        Parameter("rescale", default=rescale, kind="bool"),
        Parameter("lambda", default=1.0),
        Parameter("int8_mask", default=False, kind="bool"),
    ]
    if sparsification == "magnitude_outliers":
        parameters.append(Parameter("gamma", default=0.01, per_model=True))
    if sparsification == "della_magprune":
        parameters.append(Parameter("epsilon", default=0.15, per_model=True))
    return MergeMethod(
        name=name,
        apply=_apply_generalized(sparsification, consensus),
        parameters=tuple(parameters),
        needs_base=True,
        description=_DESCRIPTIONS[name],
        check=_check_generalized(name, sparsification),
        random=sparsification in ("random", "della_magprune"),
        light=sparsification is None and not consensus,
    )


def _apply_sce(tensors, base, params):
    from composer.methods.task_arithmetic import sce

    return sce(tensors, base, params["select_topk"])


def _check_sce(params: dict) -> str | None:
    if not 0 < params["select_topk"] <= 1:
        return f"select_topk must be in (0, 1] (the fraction of entries selected by variance), got {params['select_topk']}"
    return None


TASK_ARITHMETIC_METHODS: tuple[MergeMethod, ...] = (
    *(_generalized(name) for name in _GENERALIZED),
    MergeMethod(
        name="sce",
        apply=_apply_sce,
        parameters=(Parameter("select_topk", default=1.0), Parameter("int8_mask", default=False, kind="bool")),
        needs_base=True,
        description=_DESCRIPTIONS["sce"],
        check=_check_sce,
    ),
)
