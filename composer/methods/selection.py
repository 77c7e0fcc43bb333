"""Methods that decide element by element how much of each model to take: NearSwap, Arcee Fusion, and
RAM / RAM+ (Reinforced Agent Merging).

Each function returns a new tensor and never modifies its inputs. The arithmetic follows mergekit's
order of operations, so float32 results agree with mergekit's to the bit (Arcee Fusion: see there).
"""

from __future__ import annotations

import torch

from composer.methods import chunks
from composer.methods.chunks import flat_chunks, in_chunks
from composer.methods.order_statistics import counted_value, pattern_counts
from composer.methods.registry import Parameter, registered

NEARSWAP_FLOOR = 1e-6  # |base - other| is clamped to this before dividing
FUSION_EPS = 1e-8  # added to both softmaxes before the KL divergence


# --- NearSwap -------------------------------------------------------------------------------------


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """y = w * other + (1 - w) * base,  w = clamp(t / max(|base - other|, 1e-6), 0, 1), element by element.

    Where the two models are within t of each other the other model's value is taken outright (w = 1);
    further apart, w = t / |base - other| falls off with the distance, so large differences keep mostly
    the base. t <= 0 gives the base. Elementwise: run a chunk at a time (`in_chunks`).
    """
    return in_chunks(lambda flats: _nearswap(*flats, t), [base, other])


def _nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    distance = torch.sub(base, other).abs_().clamp_(min=NEARSWAP_FLOOR)
    weight = (t / distance).clamp_(min=0, max=1)  # t / x is reciprocal(x) * t in torch; kept for bitwise agreement
    del distance
    return (weight * other).add_((1 - weight).mul_(base))


@registered(
    "nearswap",
    (Parameter("t", required=True),),
    needs_base=True,
    max_models=1,
    description="take the other model's value where it is within t of the base, less of it the further it is",
    light=True,
)
def apply_nearswap(tensors, base, params):
    return nearswap(base, tensors[0], params["t"])


# --- Arcee Fusion ---------------------------------------------------------------------------------


def arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Take the other model's value only where its change is an outlier of importance, else keep the base.

        importance = |other - base| * KL(softmax(other) + 1e-8 || softmax(base) + 1e-8)
    with softmax and KL along the last axis (one KL per row, broadcast over the row); the threshold is
    median + 1.5 * (Q3 - Q1) of all importances of the tensor, the quantiles being order statistics
    at floor(q (n - 1)). y = base + (other - base) * [importance >= threshold].

    mergekit estimates the quantiles from a random sample of 10^6 elements when a tensor has more;
    here they are exact (the same values whenever n <= 10^6), so the result is deterministic.

    A large matrix on the CPU is taken a block of rows at a time (the softmaxes and KL stay within rows,
    the rest is elementwise), bit for bit the whole tensor's result, holding only the importances whole.
    """
    if base.dim() >= 2 and base.device.type == "cpu" and base.numel() > chunks.ROW_BLOCK:
        importance = chunks.by_row_blocks(lambda blocks: _importance(*blocks), [base, other])
        threshold = _outlier_threshold(importance)
        return in_chunks(lambda flats: _fused(flats[0], flats[1], flats[2] >= threshold), [base, other, importance])
    importance = _importance(base, other)
    keep = importance >= _outlier_threshold(importance)
    del importance
    return _fused(base, other, keep)


@registered(
    "arcee_fusion",
    (),
    needs_base=True,
    max_models=1,
    description="take the other model's value only where its change is an outlier of importance (|change| x KL)",
    temporaries=lambda count, params: 1,  # a large tensor on a CPU: its importances (the rest goes a block at a time)
)
def apply_arcee_fusion(tensors, base, params):
    return arcee_fusion(base, tensors[0])


def _importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """|other - base| * KL(softmax(other) + eps || softmax(base) + eps), the KL taken along the last axis."""
    p = torch.softmax(other, dim=-1).add_(FUSION_EPS)
    q = torch.softmax(base, dim=-1).add_(FUSION_EPS)
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    del p, q
    return (other - base).abs_().mul_(kl)


def _outlier_threshold(importance: torch.Tensor) -> torch.Tensor:
    q1, median, q3 = quartiles(importance.reshape(-1))
    return median + 1.5 * (q3 - q1)


def _fused(base: torch.Tensor, other: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    delta = other - base
    return base + delta.mul_(keep.to(delta.dtype))


def quartiles(values: torch.Tensor) -> list[torch.Tensor]:
    """The sorted values at positions floor(k (n - 1) / 4), k = 1, 2, 3, as 0-dim tensors of `values`' dtype."""
    positions = [k * (values.numel() - 1) // 4 for k in (1, 2, 3)]
    counted = _counted_order_statistics(values, positions) if values.dtype in (torch.float16, torch.bfloat16) else None
    if counted is not None:
        return counted
    if values.device.type == "cpu":
        exact = torch.float32 if values.dtype in (torch.float16, torch.bfloat16) else values.dtype
        array = values.detach().to(exact, copy=True).numpy()
        array.partition(positions)  # in place: the copy above is the only one, and no index array
        return [torch.tensor(array[position], dtype=values.dtype) for position in positions]
    return [torch.kthvalue(values, position + 1).values for position in positions]


def _counted_order_statistics(values: torch.Tensor, positions: list[int]) -> list[torch.Tensor] | None:
    """The order statistics of non-negative 16-bit floats from a count of their bit patterns, a chunk at a
    time (they order as their patterns do): no sorted or widened copy. None when a value is negative
    (its pattern orders the other way; the caller sorts then)."""
    counts = None
    for (flat,) in flat_chunks([values.reshape(-1)]):
        if bool((flat.view(torch.int16) < 0).any()):
            return None
        part = pattern_counts(flat)
        counts = part if counts is None else counts.add_(part)
    if counts is None:  # no values: no order statistics to count
        return None
    cumulative = counts.cumsum(0)
    return [counted_value(cumulative, position, values.dtype)[1] for position in positions]


# --- RAM and RAM+ ---------------------------------------------------------------------------------


def ram(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float = 1e-5) -> torch.Tensor:
    """Reinforced Agent Merging (arXiv:2601.13572): task vectors d_i = x_i - base, an entry counting as
    changed where |d_i| > epsilon. Where exactly one model changed an entry its change is kept whole;
    where c > 1 models changed it, their changes are averaged over those c (not over all models):

        y = base + sum_i [|d_i| > eps] d_i / max(c, 1),   c = #{i : |d_i| > eps}
    """
    if not tensors:
        return base
    return in_chunks(lambda flats: _merged_chunk(flats, epsilon, None), [base, *tensors])


@registered(
    "ram",
    (Parameter("epsilon", default=1e-5),),
    needs_base=True,
    description="Reinforced Agent Merging: keep unique task-vector entries whole, average shared ones over their contributors",
    light=True,
)
def apply_ram(tensors, base, params):
    return ram(tensors, base, params["epsilon"])


def ramplus_tl(
    tensors: list[torch.Tensor], base: torch.Tensor, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5
) -> torch.Tensor:
    """RAM+ with tensor-local rescaling: like `ram`, but each model's unique changes (entries only it
    changed) are multiplied by lambda_i = 1 + r * clamp(rho_i, 0, alpha), where rho_i is the number of
    its changed entries shared with other models divided by the number of its unique ones (the latter
    floored at epsilon), counted within this tensor. The default caps lambda_i at 1 + 0.1 * 0.2 = 1.02.
    """
    if not tensors:
        return base
    # the counts come from a first pass, chunk by chunk (whole numbers: the same sums as over the whole tensor)
    shared_counts = unique_counts = 0
    for flats in flat_chunks([base, *tensors]):
        _, changed, counts = _task_vectors(flats[1:], flats[0], epsilon)
        shared_counts = shared_counts + (changed & (counts > 1)).sum(dim=1)
        unique_counts = unique_counts + (changed & (counts == 1)).sum(dim=1)
    rho = shared_counts / unique_counts.clamp(min=epsilon)
    lambdas = 1 + r * rho.clamp(min=0, max=alpha)
    return in_chunks(lambda flats: _merged_chunk(flats, epsilon, lambdas), [base, *tensors])


@registered(
    "ramplus_tl",
    (Parameter("r", default=0.1), Parameter("alpha", default=0.2), Parameter("epsilon", default=1e-5)),
    needs_base=True,
    description="RAM+ (tensor-local): RAM with each model's unique entries scaled up by its overlap ratio",
)
def apply_ramplus_tl(tensors, base, params):
    return ramplus_tl(tensors, base, params["r"], params["alpha"], params["epsilon"])


def _merged_chunk(flats: list[torch.Tensor], epsilon: float, lambdas) -> torch.Tensor:
    """RAM (RAM+ with `lambdas`) of one flat chunk: flats[0] from the base, the rest from the models."""
    return _combine(*_task_vectors(flats[1:], flats[0], epsilon), flats[0], lambdas)


def _task_vectors(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float):
    """(d, changed, counts): d[i] = x_i - base flattened, changed = |d| > epsilon, counts = changed models per entry (1, n)."""
    flat_base = base.reshape(-1)
    deltas = torch.empty(
        (len(tensors), flat_base.numel()), dtype=torch.promote_types(base.dtype, tensors[0].dtype), device=base.device
    )
    changed = torch.empty(deltas.shape, dtype=torch.bool, device=base.device)
    for i, tensor in enumerate(tensors):
        torch.sub(tensor.reshape(-1), flat_base, out=deltas[i])
        torch.gt(deltas[i].abs(), epsilon, out=changed[i])
    counts = changed.sum(
        dim=0, keepdim=True, dtype=torch.uint8 if len(tensors) < 256 else torch.int32
    )  # small: one byte an entry
    return deltas, changed, counts


def _combine(deltas, changed, counts, base, lambdas) -> torch.Tensor:
    """base + sum_i (changed_i d_i * [c == 1] * lambda_i + changed_i d_i * [c > 1] / max(c, 1)).

    The two masks are disjoint and c = 1 where the first applies, so each term is (changed_i d_i) / max(c, 1),
    times lambda_i on the unique entries. The terms are summed over the models in order, accumulating in
    at least float32 as a sum over a stacked dimension does (so half-precision inputs round as mergekit's do;
    float32 lambdas promote RAM+ terms to float32, as there)."""
    divisor = counts.clamp(min=1)[0].to(
        deltas.dtype
    )  # small whole numbers: exact in any float dtype, so x / c rounds alike
    result_dtype = deltas.dtype if lambdas is None else torch.promote_types(deltas.dtype, lambdas.dtype)
    unique = (counts == 1)[0] if lambdas is not None else None
    total = None
    for i in range(deltas.shape[0]):
        term = deltas[i].mul_(changed[i]).div_(divisor)  # rows of `deltas` are ours to overwrite
        if lambdas is not None:
            scaled = term.to(result_dtype) * lambdas[i].to(result_dtype)
            term = torch.where(unique, scaled, term)
        if total is None:
            total = term.to(torch.promote_types(term.dtype, torch.float32))
        else:
            total += term
    return base + total.to(result_dtype).reshape(base.shape)
