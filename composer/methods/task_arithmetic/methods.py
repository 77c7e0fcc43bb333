"""The generalized members of the task-arithmetic family: task arithmetic, TIES, DARE, breadcrumbs and
DELLA. Each merges the task vectors tau_i = x_i - base as

    y = base + lambda * merge(w_1 s_1(tau_1), .., w_n s_n(tau_n))

where s_i sparsifies a task vector (drops entries, by magnitude or at random, and with `rescale` scales
the rest back to its L1 norm) and `merge` sums the weighted vectors, after a TIES sign election for the
"_ties" members and DELLA (see `reference_generalized_task_arithmetic` for every step).

Each function below is a merge method under its own name: `member` registers it, reading its parameters
and their defaults from the function's signature. The random members read `params["seed"]` (an int the
planner supplies per output tensor; 0 when absent): it seeds a generator that gives each model a 64-bit
key, and the masks are a counter-based stream of those keys and each entry's position, computed on the
tensors' device, so a merge is the same from run to run and on every device, and does not depend on the
order tensors are computed in.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from composer.methods.registry import MergeMethod, Parameter, register
from composer.methods.task_arithmetic.chunked import generalized_task_arithmetic
from composer.methods.task_arithmetic.draws import make_generator


def _ordinal(i: int) -> str:
    n = i + 1
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _sparsity_check(signature) -> Callable[[dict], str | None]:
    """The plan-time check of a member with this signature: why its per-model density (and gamma,
    epsilon where it takes them) cannot work, or None (always None without densities: they are
    accepted but unused, as in mergekit)."""

    def check(params: dict) -> str | None:
        if "densities" not in signature:
            return None
        for i, density in enumerate(params["density"]):
            if not 0 < density <= 1:
                return (
                    f"density must be in (0, 1] (the fraction of each task vector kept), "
                    f"got {density} for the {_ordinal(i)} model besides the base"
                )
        if "gammas" in signature:
            for i, gamma in enumerate(params["gamma"]):
                if not 0 <= gamma <= 1:
                    return (
                        f"gamma must be in [0, 1] (the fraction of largest entries dropped), "
                        f"got {gamma} for the {_ordinal(i)} model besides the base"
                    )
        if "epsilons" in signature:
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


# the functions' keyword arguments by the parameter each is set from
_KEYWORDS = {
    "densities": "density",
    "gammas": "gamma",
    "epsilons": "epsilon",
    "normalize": "normalize",
    "rescale": "rescale",
    "lambda_": "lambda",
}


def member(description: str):
    """Register the decorated function `name(tensors, base, weights, ...)` as the merge method `name`.

    Every member takes the per-model `weight` and `density`, `normalize`, `rescale`, `lambda` and
    `int8_mask` (accepted and unused, as in mergekit; so are density and rescale where the function
    has no such argument); with a `gammas` argument also a per-model `gamma`, with `epsilons` a
    per-model `epsilon`; with a `generator` argument it is random (seeded per tensor). Defaults are
    those of the function's signature (False where it has none). A function with `densities` has them
    (and its gammas and epsilons) checked at plan time."""

    def register_member(function):
        signature = inspect.signature(function).parameters

        def default(name: str):
            return signature[name].default if name in signature else False

        parameters = [
            Parameter("weight", required=True, per_model=True),
            Parameter("density", default=1.0, per_model=True),
            Parameter("normalize", default=default("normalize"), kind="bool"),
            Parameter("rescale", default=default("rescale"), kind="bool"),
            Parameter("lambda", default=1.0),
            Parameter("int8_mask", default=False, kind="bool"),
        ]
        if "gammas" in signature:
            parameters.append(Parameter("gamma", default=0.01, per_model=True))
        if "epsilons" in signature:
            parameters.append(Parameter("epsilon", default=0.15, per_model=True))
        random = "generator" in signature

        def apply(tensors, base, params):
            options = {keyword: params[name] for keyword, name in _KEYWORDS.items() if keyword in signature}
            if random:
                options["generator"] = make_generator(
                    params.get("seed", 0) or 0
                )  # on the CPU: the same masks on every device
            return function(tensors, base, params["weight"], **options)

        register(
            MergeMethod(
                name=function.__name__,
                apply=apply,
                parameters=tuple(parameters),
                needs_base=True,
                description=description,
                check=_sparsity_check(signature),
                random=random,
                light="densities" not in signature,
            )
        )
        return function

    return register_member


@member("base + lambda * sum of weighted task vectors (Ilharco et al. 2022)")
def task_arithmetic(tensors, base, weights, *, normalize=False, lambda_=1.0):
    """Ilharco et al. 2022, arXiv:2212.04089: base + lambda * sum_i w_i tau_i (/ sum_i w_i)."""
    return generalized_task_arithmetic(tensors, base, weights, normalize=normalize, lambda_=lambda_)


@member("trim task vectors by magnitude, elect signs, average the agreeing entries (Yadav et al. 2023)")
def ties(tensors, base, weights, densities=None, *, normalize=True, rescale=False, lambda_=1.0):
    """Yadav et al. 2023, arXiv:2306.01708: trim by magnitude (keep the int(density n) largest |tau_i|),
    elect signs, disjoint mean."""
    return generalized_task_arithmetic(
        tensors,
        base,
        weights,
        sparsification="magnitude",
        consensus=True,
        densities=densities,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
    )


@member("drop task-vector entries at random and rescale (DARE), then TIES sign election")
def dare_ties(tensors, base, weights, densities=None, *, normalize=False, rescale=True, lambda_=1.0, generator=None):
    """DARE's random drop, then TIES's sign election."""
    return generalized_task_arithmetic(
        tensors,
        base,
        weights,
        sparsification="random",
        consensus=True,
        densities=densities,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        generator=generator,
    )


@member("drop task-vector entries at random and rescale, weighted sum (Yu et al. 2023)")
def dare_linear(tensors, base, weights, densities=None, *, normalize=False, rescale=True, lambda_=1.0, generator=None):
    """Yu et al. 2023, arXiv:2311.03099: random drop (keep with probability density), rescale, sum."""
    return generalized_task_arithmetic(
        tensors,
        base,
        weights,
        sparsification="random",
        densities=densities,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        generator=generator,
    )


@member("drop the largest (gamma) and smallest task-vector entries, weighted sum (Davari & Belilovsky 2023)")
def breadcrumbs(tensors, base, weights, densities=None, gammas=None, *, normalize=False, rescale=False, lambda_=1.0):
    """Davari & Belilovsky 2023, arXiv:2312.06795: drop the int(gamma n) largest |tau_i| and the smallest,
    keeping int(density n) entries."""
    return generalized_task_arithmetic(
        tensors,
        base,
        weights,
        sparsification="magnitude_outliers",
        densities=densities,
        gammas=gammas,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
    )


@member("breadcrumbs' sparsification, then TIES sign election")
def breadcrumbs_ties(
    tensors, base, weights, densities=None, gammas=None, *, normalize=False, rescale=False, lambda_=1.0
):
    """Breadcrumbs' sparsification, then TIES's sign election."""
    return generalized_task_arithmetic(
        tensors,
        base,
        weights,
        sparsification="magnitude_outliers",
        consensus=True,
        densities=densities,
        gammas=gammas,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
    )


@member("drop entries at random, the smaller the likelier, rescale, TIES sign election (Deep et al. 2024)")
def della(
    tensors, base, weights, densities=None, epsilons=None, *, normalize=True, rescale=True, lambda_=1.0, generator=None
):
    """Deep et al. 2024, arXiv:2406.11617: magnitude-ranked random drop (MagPrune: within each row, the
    entry of magnitude rank r of m is kept with probability density - epsilon + 2 epsilon r / (m - 1)),
    then sign election."""
    return generalized_task_arithmetic(
        tensors,
        base,
        weights,
        sparsification="della_magprune",
        consensus=True,
        densities=densities,
        epsilons=epsilons,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        generator=generator,
    )


@member("DELLA's magnitude-ranked random drop, then a weighted sum")
def della_linear(
    tensors, base, weights, densities=None, epsilons=None, *, normalize=False, rescale=True, lambda_=1.0, generator=None
):
    """DELLA's MagPrune, then a weighted sum (no sign election)."""
    return generalized_task_arithmetic(
        tensors,
        base,
        weights,
        sparsification="della_magprune",
        densities=densities,
        epsilons=epsilons,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        generator=generator,
    )
