"""PCB-merging, parameter competition balancing (Du, Lee, Li, Jiang, Guo, Zhang, Zhong and Zhang, "Parameter
Competition Balancing for Model Merging", NeurIPS 2024, arXiv:2410.02396)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from composer.memory import empty
from composer.methods.chunks import ELEMENTWISE_CHUNK
from composer.methods.order_statistics import window_mask_
from composer.methods.registry import Parameter, registered
from composer.methods.subspace import LAMBDA
from composer.methods.svd import working_dtype


def pcb(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, densities: Sequence[float], lambda_: float = 1.0
) -> torch.Tensor:
    """With task vectors tau_i = x_i - base (i = 1..n), each over the tensor's D entries:

        beta_intra_i = Softmax(n * Norm(tau_i * tau_i))              importance within the task
        beta_inter_i = sum_j Softmax(Norm(tau_i * tau_j))            agreement with the other tasks
        beta_i = beta_intra_i * beta_inter_i
        m_i = the top int(density_i * D) entries of beta_i           (drop the rest)
        y = base + lambda * sum_i m_i beta_i tau_i / sum_i m_i beta_i     (0 where every task dropped the entry)

    Norm is min-max normalisation to [0, 1] over the entries (0 everywhere for a constant), Softmax is over the
    entries, products are entrywise. An entry's weight grows with how large it is within its own task and
    with how well it agrees in sign and size with the other tasks; the kept entries are averaged with those
    weights. Ties at the drop threshold are broken by position (lower index kept first).

    The paper flattens the whole model into one vector; composer merges a tensor at a time, so the
    normalisations, softmaxes and drop run over each tensor (as TIES's trimming does here). Every softmax is
    scaled by D (divided by its mean, not its sum): that factor is common to every task at every entry, so the
    weights' ratios, and the result, are unchanged, while the numbers stay near 1. With one model at density 1
    the merge returns that model.

    The work runs over flat chunks; beyond them it holds one float32 buffer per model (its beta) and one more.
    """
    count = len(tensors)
    if len(densities) != count:
        raise ValueError(f"{count} models but {len(densities)} densities")
    dtype = working_dtype(base.dtype)
    flat_base = base.reshape(-1)
    flats = [tensor.reshape(-1) for tensor in tensors]
    total = flat_base.numel()
    pieces = [(start, min(start + ELEMENTWISE_CHUNK, total)) for start in range(0, total, ELEMENTWISE_CHUNK)]
    pairs = [(i, j) for i in range(count) for j in range(i, count)]

    def deltas(start: int, stop: int) -> list[torch.Tensor]:
        piece = flat_base[start:stop].to(dtype)
        return [flat[start:stop].to(dtype) - piece for flat in flats]

    # pass 1: the range of every product tau_i * tau_j (i <= j) for Norm
    low = {pair: float("inf") for pair in pairs}
    high = {pair: float("-inf") for pair in pairs}
    for start, stop in pieces:
        taus = deltas(start, stop)
        for i, j in pairs:
            product = taus[i] * taus[j]
            low[i, j] = min(low[i, j], float(product.min()))
            high[i, j] = max(high[i, j], float(product.max()))

    def normalized(taus: list[torch.Tensor], i: int, j: int) -> torch.Tensor:
        pair = (min(i, j), max(i, j))
        spread = high[pair] - low[pair]
        product = taus[i] * taus[j]
        if not spread > 0:
            return product.zero_()
        return product.sub_(low[pair]).div_(spread)

    # pass 2: the softmaxes' means (exp(a (x - 1)) keeps every exponent <= 0): the intra-balancing softmax of
    # each task (a = n) and the inter-balancing one of each pair (a = 1, the pair (i, i) included)
    sums = {pair: 0.0 for pair in pairs} | {i: 0.0 for i in range(count)}
    for start, stop in pieces:
        taus = deltas(start, stop)
        for i, j in pairs:
            product = normalized(taus, i, j).sub_(1)
            if i == j:
                sums[i] += float(torch.exp(product * count).sum(dtype=torch.float64))
            sums[i, j] += float(product.exp_().sum(dtype=torch.float64))
    means = {key: value / max(total, 1) for key, value in sums.items()}

    # pass 3: beta_i for every entry, then the drop
    betas = [empty((total,), dtype, base.device) for _ in range(count)]
    for start, stop in pieces:
        taus = deltas(start, stop)
        for i in range(count):
            inter = torch.zeros_like(taus[i])
            for j in range(count):
                pair = (min(i, j), max(i, j))
                inter += normalized(taus, i, j).sub_(1).exp_().div_(means[pair])
            intra = normalized(taus, i, i).sub_(1).mul_(count).exp_().div_(means[i])
            betas[i][start:stop] = intra.mul_(inter)
    spare = empty((total,), dtype, base.device)
    for beta, density in zip(betas, densities):
        window_mask_(spare.copy_(beta), 0, int(density * total), descending=True)
        beta.mul_(spare)
    del spare

    # pass 4: the weighted mean of the kept entries
    out = empty((total,), base.dtype, base.device)
    for start, stop in pieces:
        taus = deltas(start, stop)
        numerator = torch.zeros_like(taus[0])
        denominator = torch.zeros_like(taus[0])
        for tau, beta in zip(taus, betas):
            numerator.addcmul_(beta[start:stop], tau)
            denominator += beta[start:stop]
        merged = torch.where(denominator > 0, numerator / denominator.clamp(min=torch.finfo(dtype).tiny), 0)
        out[start:stop] = torch.add(flat_base[start:stop].to(dtype), merged, alpha=lambda_)
    return out.view(base.shape)


def _check(params: dict) -> str | None:
    for i, density in enumerate(params["density"]):
        if not 0 <= density <= 1:
            return f"density must lie in [0, 1] (the share of each task vector's entries kept), got {density} for model {i + 1} besides the base"
    return None


@registered(
    "pcb",
    (LAMBDA, Parameter("density", default=0.1, per_model=True)),
    needs_base=True,
    description="PCB-merging: weigh task-vector entries by importance within and agreement across tasks, drop, average (Du et al. 2024)",
    check=_check,
    float32_work=True,
    # a beta per model and a mask (float32, whole tensors), the chunks' work (measured on a 3000 x 1000 tensor
    # with two models: 6.4 buffers beside the inputs and result, chunks included), and the inputs in the compute
    # dtype
    temporaries=lambda count, params: count + 1 + 3 + count + 1,
)
def apply_pcb(tensors, base, params):
    return pcb(tensors, base, params["density"], params["lambda"])
