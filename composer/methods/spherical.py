"""Interpolation on the hypersphere: NuSLERP (two models), Multi-SLERP and the Karcher mean (any number).
(SLERP from a base model to one other model is `composer.methods.slerp`.)

Each function takes whole tensors and returns a new tensor; inputs are never modified. The
arithmetic follows mergekit's order of operations step by step, so in float32 the results agree
with mergekit's to the bit (a different order would round differently in the last place).
"""

from __future__ import annotations

import torch

from composer.errors import ComposerError
from composer.methods.chunks import each_chunk, in_chunks
from composer.methods.linear import weights_cancel
from composer.methods.registry import Parameter, registered

NUSLERP_EPS = 1e-8  # |sin(theta)| below this (cos(theta)^2 within eps^2 of 1): the pair is colinear, lerp
_NORM_FLOOR = 1e-7  # norms are clamped to this before dividing, so an all-zero vector has direction 0


def nuslerp_t(weights: list[float]) -> float:
    """The interpolation factor of NuSLERP: w_1 / (w_0 + w_1), or 0.5 when the weights cancel (|sum| < 1e-6)."""
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def nuslerp(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None = None,
    row_wise: bool = False,
    flatten: bool = True,
) -> torch.Tensor:
    """SLERP of two tensors with t = w_1 / (w_0 + w_1); with a base, SLERP of the task vectors x_i - base,
    added back to the base.

    `flatten` (default): each tensor is one vector. Otherwise every vector along the last axis is
    interpolated on its own (each row of a matrix), or, with `row_wise`, every vector along the first
    axis (each column). Where two vectors are colinear (sin(theta) = 0) the result is linear
    interpolation.
    """
    if len(tensors) != 2:
        raise ValueError(f"nuslerp takes exactly two tensors besides the base, got {len(tensors)}")
    t = nuslerp_t(weights)
    first, second = tensors
    if flatten:
        return _slerp_flat(first, second, t, base)
    if base is None:
        return slerp_vectors(first, second, t, row_wise, flatten)
    return base + slerp_vectors(first - base, second - base, t, row_wise, flatten)


@registered(
    "nuslerp",
    (
        Parameter("weight", required=True, per_model=True),
        Parameter("nuslerp_row_wise", default=False, kind="bool"),
        Parameter("nuslerp_flatten", default=True, kind="bool"),
    ),
    optional_base=True,
    min_models=2,
    max_models=2,
    description="spherical interpolation of two models (or of their task vectors from an optional base), t = w_1 / (w_0 + w_1)",
    # whole vectors (the default): the two task vectors and the directions' product; per row: six
    temporaries=lambda count, params: 3 if params.get("nuslerp_flatten", True) else 6,
)
def apply_nuslerp(tensors, base, params):
    return nuslerp(tensors, params["weight"], base, params["nuslerp_row_wise"], params["nuslerp_flatten"])


def _slerp_flat(first: torch.Tensor, second: torch.Tensor, t: float, base: torch.Tensor | None) -> torch.Tensor:
    """`slerp_vectors` of the whole tensors as single vectors (+ base), holding the two vectors, one
    product buffer and the result: the directions' product is built a chunk at a time into the buffer and
    summed whole (the same sum, so the same bits), and the blend is elementwise (`in_chunks`)."""
    v0, v1 = (first, second) if base is None else (first - base, second - base)
    norm0 = torch.linalg.vector_norm(v0.reshape(-1), dim=-1, keepdim=True).clamp(min=_NORM_FLOOR)
    norm1 = torch.linalg.vector_norm(v1.reshape(-1), dim=-1, keepdim=True).clamp(min=_NORM_FLOOR)
    product = v0.reshape(-1) / norm0  # the first direction, then times the second in place
    each_chunk(lambda p, b: p.mul_(b / norm1), product, v1)
    cosine = product.sum(dim=-1, keepdim=True).clamp(-1, 1)
    del product
    colinear = (1 - cosine.square()) <= NUSLERP_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cosine))  # a colinear pair gets a harmless angle; lerp replaces it
    weight0, weight1, divisor = torch.sin((1 - t) * theta), torch.sin(t * theta), torch.sin(theta)
    lerp = bool(colinear.any())

    def blend(flats: list[torch.Tensor]) -> torch.Tensor:
        a, b = flats[0], flats[1]
        result = (weight0 * a + weight1 * b) / divisor
        if lerp:
            result = torch.where(colinear, (1 - t) * a + t * b, result)
        return result if base is None else flats[2] + result

    return in_chunks(blend, [v0, v1] if base is None else [v0, v1, base])


def slerp_vectors(v0: torch.Tensor, v1: torch.Tensor, t: float, row_wise: bool, flatten: bool) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    direction0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=_NORM_FLOOR)
    direction1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=_NORM_FLOOR)
    cosine = direction0.mul_(direction1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    del direction0, direction1
    colinear = (1 - cosine.square()) <= NUSLERP_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cosine))  # colinear entries get a harmless angle; lerp replaces them
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    if bool(colinear.any()):
        result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def multislerp(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere (Goddard 2025, "Multi-SLERP").

    With x_i the tensors (minus the base, when there is one) as flat vectors and w_i the weights
    (divided by their sum when `normalize_weights`):
        u_i = x_i / (|x_i| + eps)                 the directions
        m   = sum_i w_i u_i / |sum_i w_i u_i|     their weighted mean, projected onto the sphere
        v   = sum_i w_i (u_i - <u_i, m> m)        the weighted mean of the tangent vectors at m
        y   = (cos|v| m + sin|v| / |v| v) * sum_i w_i |x_i|     (|v| taken + eps)
    (+ base). v vanishes in exact arithmetic, so y is the normalised weighted mean of the directions
    scaled by the weighted mean of the norms; it is computed as written to round as mergekit does.
    When the weighted directions cancel (|sum_i w_i u_i| < eps), two tensors give the weighted sum
    w_0 x_0 + w_1 x_1 (+ base); more tensors are an error.
    """
    if len(tensors) != len(weights):
        raise ValueError(f"multislerp: {len(tensors)} tensors but {len(weights)} weights")
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(tensors)  # our own copy: everything below may work in place on it
    if base is not None:
        stacked -= base
    flat = stacked.view(len(tensors), -1)
    w = torch.tensor(weights, dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    w_column = w.view(-1, 1)
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat.div_(norms + eps)  # flat (and `stacked`) now hold the directions
    mean = (units * w_column).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2:
            first = tensors[0] if base is None else tensors[0] - base
            second = tensors[1] if base is None else tensors[1] - base
            result = first * w[0] + second * w[1]
            return result if base is None else result + base
        raise ComposerError(
            "multislerp: the weighted directions of the tensors cancel (for example a tensor and its negation "
            "with equal weights), so their mean has no direction; change the weights"
        )
    mean /= mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangents = units.sub_(dots * mean)
    tangent = tangents.mul_(w_column).sum(0)
    del stacked, flat, units, tangents
    tangent_norm = torch.linalg.vector_norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * w).sum()).view(tensors[0].shape)
    return result if base is None else result + base


def _check_multislerp(params):
    if params["normalize_weights"] and len(params["weight"]) > 1 and weights_cancel(params["weight"]):
        return f"the weights {params['weight']} sum to zero, so they cannot be normalised (set normalize_weights: false or change a weight)"
    return None


@registered(
    "multislerp",
    (
        Parameter("weight", required=True, per_model=True),
        Parameter("normalize_weights", default=True, kind="bool"),
        Parameter("eps", default=1e-8),
    ),
    optional_base=True,
    description="weighted spherical mean of any number of models (or of their task vectors from an optional base)",
    check=_check_multislerp,
    temporaries=lambda count, params: 2 * count + 2,
)
def apply_multislerp(tensors, base, params):
    return multislerp(tensors, params["weight"], base, params["normalize_weights"], params["eps"])


def karcher(tensors: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The Karcher (Riemannian / Frechet) mean of the tensors' directions on the unit sphere, with equal
    weights, scaled by the mean of their norms.

    Tensors with norm <= tol have no direction and are left out of the mean (their norm 0 still
    counts in the scale). Start: the normalised arithmetic mean of the unit vectors u_i. Each step
    moves the estimate m along the mean of the log maps,
        v = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m),   cos(theta_i) = <m, u_i>,
        m <- cos|v| m + sin|v| v / |v|   (then renormalised),
    skipping inputs within tol of m, for at most `max_iter` steps or until |v| < tol.

    Memory: the elementwise updates go a chunk at a time, with chunk-sized temporaries; the dot products
    and norms are taken over the whole tensors, so the bits are those of updating whole tensors.
    """
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    norm_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(tensor.to(norm_dtype)) for tensor in tensors]
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    valid_alphas = [alphas[i] for i in valid]
    alpha_sum = sum(valid_alphas)
    weights = [alpha / alpha_sum for alpha in valid_alphas]

    directions = [(tensors[i] / norms[i]).to(tensors[i].dtype) for i in valid]  # norms above tol: not zero

    mean = torch.zeros_like(directions[0])
    for weight, unit in zip(weights, directions):
        each_chunk(lambda m, u, weight=weight: m.add_(weight * u), mean, unit)
    mean_norm = torch.linalg.vector_norm(mean.to(norm_dtype))
    if mean_norm.item() < tol:
        mean = directions[0].clone()
    else:
        each_chunk(lambda m: m.copy_((m / mean_norm).to(m.dtype)), mean)

    for _ in range(int(max_iter)):
        tangent = torch.zeros_like(mean)
        for weight, unit in zip(weights, directions):
            cosine = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(cosine)
            if theta.item() < tol:
                continue
            factor = weight * (theta / torch.sin(theta))
            each_chunk(
                lambda t, u, m, factor=factor, cosine=cosine: t.add_(factor * (u - cosine * m)), tangent, unit, mean
            )
        tangent_norm = torch.linalg.vector_norm(tangent.to(norm_dtype))
        if tangent_norm.item() < tol:
            break
        along, across = torch.cos(tangent_norm), torch.sin(tangent_norm)
        each_chunk(
            lambda m, t, along=along, across=across, norm=tangent_norm: m.copy_(
                (along * m + across * (t / norm)).to(m.dtype)
            ),
            mean,
            tangent,
        )
        del tangent
        unit_norm = torch.linalg.vector_norm(mean.to(norm_dtype))
        if unit_norm.item() > tol:
            each_chunk(lambda m, unit_norm=unit_norm: m.copy_((m / unit_norm).to(m.dtype)), mean)

    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
    return scale * mean


def _check_karcher(params):
    if params["max_iter"] != int(params["max_iter"]) or params["max_iter"] < 0:
        return f"'max_iter' must be a whole number of iterations (0 or more), not {params['max_iter']}"
    return None


@registered(
    "karcher",
    (Parameter("max_iter", default=10), Parameter("tol", default=1e-5)),
    description="Karcher (Riemannian) mean of the models' directions on the sphere, scaled by their mean norm",
    check=_check_karcher,
    temporaries=lambda count, params: count + 3,  # the unit vectors, the mean, the step, a widened copy for a norm
)
def apply_karcher(tensors, base, params):
    return karcher(tensors, params["max_iter"], params["tol"])
