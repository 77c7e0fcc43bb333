"""Recipe recovery, tensor by tensor: which sources each SUSPECT tensor is made of, by which method family and
with which parameters (composer.trace.fits), read in a second streaming pass that holds one SUSPECT tensor
and its sources at a time. Layers whose tensors are byte-identical copies cost no second read."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field, replace
from statistics import median

import torch

from composer.trace.fits import (
    NormalEquations,
    Sparsity,
    fit_slerp,
    rounding_steps,
    single_mover_signature,
    sparsity_signature,
)
from composer.trace.layers import CandidateMatch, Fingerprinted
from composer.trace.reading import row_count, rows_within, spread_rows
from composer.trace.vocabulary_rows import common_rows

MIN_SIMILARITY = 0.3  # a layer below this cosine is no source (independent layers score about 1/sqrt(entries))
MIN_WEIGHT = 0.02  # sources weighing less than this in a least-squares fit are dropped and the fit redone
# ... and so are those whose weight is within this many standard errors of zero: where SUSPECT is its parents'
# blend plus noise (a Q4 GGUF's rounding), nearly parallel fine-tunes share out the noise in weights of 0.03-0.1
SIGNIFICANT = 4.0
MIN_EXPLAINED = 0.05  # a source of a sparsified merge explains at least this share of the changed entries on its own
SAMPLE_ENTRIES = 1 << 18  # entries of a tensor the fits read, in SAMPLE_RUNS runs of rows spread over it (all if fewer)
SAMPLE_RUNS = 16
BLENDS = ("linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear")


@dataclass
class TensorFit:
    name: str
    method: str  # copy | scale | linear | slerp | task_arithmetic | ties | dare_ties | dare_linear | unmatched
    sources: list[str] = field(default_factory=list)  # model references, aligned with weights
    weights: list[float] = field(default_factory=list)
    relative_error: float = 1.0
    t: float | None = None
    base: str | None = None  # the model whose task vectors are taken (task arithmetic, TIES, DARE), or slerp's t=0 end
    density: float | None = None
    sparsity: Sparsity | None = None
    slerp_distinct: bool = False
    aligned_rows: int | None = (
        None  # embeddings and heads fitted through a tokenizer alignment: the shared rows compared
    )


@dataclass
class LayerFit:
    layer: int
    method: str
    sources: list[tuple[str, int, float]]  # (model, its layer, weight)
    relative_error: float
    tensors: list[TensorFit] = field(default_factory=list)


@dataclass
class Candidate:
    fingerprinted: Fingerprinted
    match: CandidateMatch

    @property
    def reference(self) -> str:
        return self.fingerprinted.model.reference


def partner(
    candidate: Candidate, suspect: Fingerprinted, name: str, suffix: str | None, layer: int | None
) -> str | None:
    """The candidate tensor that SUSPECT's tensor `name` is compared with: the same name within the layer where
    the shapes agree (the same name outside the layers), else the best-matching matrix of that shape."""
    model = candidate.fingerprinted.model
    shape = suspect.prints[name].shape
    if layer is None:
        same = name if name in model.infos else None
    else:
        same = model.layers.get(layer, {}).get(suffix) if suffix is not None else None
    if same is not None and tuple(model.infos[same].shape) == shape:
        return same
    found = candidate.match.partners.get(name, {}).get(layer) if layer is not None else None
    return found[0] if found else None


class Recovery:
    """Reads SUSPECT's tensors and their sources and fits them; `base` names the candidate whose task vectors count.

    Within `memory_budget`: the least-squares sums are gathered a block of rows at a time (a block of SUSPECT's
    tensor and of each source, in float32 and float64) over at most SAMPLE_ENTRIES entries of a tensor, read once;
    the sparsity signature (TIES, DARE), which needs element-wise masks and quantiles, reads the first block of
    them; embeddings and heads compared through a tokenizer alignment are fitted on that many of the shared tokens'
    rows."""

    def __init__(
        self, suspect: Fingerprinted, candidates: list[Candidate], base: str | None, memory_budget: int = 1 << 30
    ):
        self.suspect = suspect
        self.candidates = candidates
        self.base = base
        self.memory_budget = memory_budget

    def _block_rows(self, name: str, count: int) -> int:
        """Rows of SUSPECT's tensor and of `count` sources read at a time: stored, float32 and float64 copies of
        each within half the budget, with room for the sparsity signature's float32 work on the first block."""
        _, length = row_count(tuple(self.suspect.prints[name].shape))
        return rows_within(self.memory_budget // 2, length, copies=3 * (count + 1) + 12)

    def _blocks(self, name: str, chosen: list[tuple[Candidate, str]]):
        """(SUSPECT's block in its stored dtype, the sources' blocks in float32) on the same rows, within the budget:
        about SAMPLE_ENTRIES entries in runs of rows spread over the tensor (least squares over a few weights needs
        no more, and the fits then cost a fraction of the fingerprint pass), all rows of a smaller tensor."""
        rows, length = row_count(tuple(self.suspect.prints[name].shape))
        wanted = spread_rows(rows, max(1, SAMPLE_ENTRIES // length), SAMPLE_RUNS)
        block = self._block_rows(name, len(chosen))
        readers = [self.suspect.model.reader.blocks_at(name, wanted, block)]
        readers += [candidate.fingerprinted.model.reader.blocks_at(other, wanted, block) for candidate, other in chosen]
        for parts in zip(*readers):
            yield parts[0], [part.float() for part in parts[1:]]

    def _aligned_sample(self, name: str, chosen: list[tuple[Candidate, str]], maps: list[torch.Tensor]):
        """SUSPECT's rows (stored dtype) and its sources' rows (float32) of at most SAMPLE_ENTRIES entries of the
        tokens every alignment pairs: row i of each is the same token."""
        _, length = row_count(tuple(self.suspect.prints[name].shape))
        limit = max(1, min(SAMPLE_ENTRIES // length, self._block_rows(name, len(chosen))))
        wanted, their_rows = common_rows(maps, limit)
        y = self.suspect.model.reader.rows(name, wanted)
        sources = []
        for (candidate, other), theirs in zip(chosen, their_rows):
            order = torch.argsort(theirs)
            read = candidate.fingerprinted.model.reader.rows(other, theirs[order])
            sources.append(read[torch.argsort(order)].float())
        return y, sources

    def fit_tensor(
        self, name: str, chosen: list[tuple[Candidate, str]], maps: list[torch.Tensor] | None = None
    ) -> TensorFit:
        """`maps`, for embeddings and heads matched through tokenizer alignments: per source, the source row of
        each SUSPECT row (-1 where the token is not shared)."""
        if not chosen:
            return TensorFit(name, "unmatched")
        digest = self.suspect.prints[name].digest
        for candidate, other in chosen:
            if maps is None and candidate.fingerprinted.prints[other].digest == digest:
                return TensorFit(name, "copy", [candidate.reference], [1.0], 0.0)
        references = [candidate.reference for candidate, _ in chosen]
        dtype = self.suspect.prints[name].dtype
        if maps is None:
            blocks = self._blocks(name, chosen)
            sample = next(blocks)  # the first block of the rows read: what the sparsity signature reads
            views = NormalEquations.gather_views(itertools.chain([sample], blocks), len(chosen), dtype)
        else:
            sample = self._aligned_sample(name, chosen, maps)
            views = NormalEquations.gather_views([sample], len(chosen), dtype)
        aligned = None if maps is None else len(sample[0])
        sums, rounded = views
        fit = sums.solve()
        if rounded is not None and (rounded_fit := rounded.solve()).relative_error < fit.relative_error:
            sums, fit = rounded, rounded_fit  # the merge blended the sources rounded to SUSPECT's dtype
            sample = (sample[0], [x.to(dtype).float() for x in sample[1]])
        keep = [
            i
            for i, w in enumerate(fit.weights)
            if (abs(w) >= MIN_WEIGHT and abs(w) >= SIGNIFICANT * fit.standard_errors[i]) or references[i] == self.base
        ]
        if keep and len(keep) < len(references):
            fit = sums.solve(keep)
        else:
            keep = list(range(len(references)))
        references = [references[i] for i in keep]
        if len(references) == 1:
            scale = fit.weights[0]
            method = "copy" if abs(scale - 1) < 2e-3 else "scale"
            return TensorFit(
                name, method, references, [1.0 if method == "copy" else scale], fit.relative_error, aligned_rows=aligned
            )
        y, tensors = sample[0], [sample[1][i] for i in keep]
        sparse = self._sparse_fit(name, y, tensors, references, fit.weights)
        if sparse is not None:
            sparse.aligned_rows = aligned
            return sparse
        if self.base in references and len(references) >= 2:
            at = references.index(self.base)
            others = [r for r in references if r != self.base]
            lambdas = [w for i, w in enumerate(fit.weights) if i != at]
            if abs(sum(fit.weights) - 1) < 0.01 and abs(fit.weights[at]) >= MIN_WEIGHT:
                return TensorFit(
                    name, "task_arithmetic", others, lambdas, fit.relative_error, base=self.base, aligned_rows=aligned
                )
        if len(references) == 2:
            slerp = fit_slerp(fit)
            if slerp is not None and slerp.better_than_linear and abs(sum(fit.weights) - 1) > 1e-4:
                return TensorFit(
                    name,
                    "slerp",
                    references,
                    fit.weights,
                    fit.relative_error,
                    t=slerp.t,
                    base=references[0],
                    slerp_distinct=slerp.distinct,
                    aligned_rows=aligned,
                )
            if slerp is not None and not slerp.distinct and abs(sum(fit.weights) - 1) < 0.01:
                return TensorFit(
                    name,
                    "linear",
                    references,
                    fit.weights,
                    fit.relative_error,
                    t=slerp.t,
                    base=references[0],
                    aligned_rows=aligned,
                )
        return TensorFit(name, "linear", references, fit.weights, fit.relative_error, aligned_rows=aligned)

    def _sparse_fit(self, name, y, tensors, references, weights) -> TensorFit | None:
        """TIES or DARE, when y - base has far fewer nonzero entries than a dense merge would leave. The base is
        --base, else the source that explains SUSPECT best as a sparsified merge's base. `y` is in SUSPECT's dtype."""
        if self.base in references:
            bases = [references.index(self.base)]
        else:  # a task-arithmetic base carries weight 1 - sum(w): the most negative least-squares weight first
            bases = sorted(range(len(references)), key=lambda i: weights[i])
        best, best_share = None, -1.0
        for at in bases:  # the base whose task vectors explain most entries alone; the earlier one on a tie
            fitted = self._sparse_fit_on(name, y, tensors, references, weights, at)
            if fitted is None:
                continue
            explained = fitted.sparsity.explained
            share = sum(explained) / len(explained) if explained else 0.0
            if share > best_share + 0.01:
                best, best_share = fitted, share
        return best

    def _sparse_fit_on(self, name, y, tensors, references, weights, at) -> TensorFit | None:
        others = [i for i in range(len(references)) if i != at]
        if not others:
            return None
        base = tensors[at]
        lambdas = [weights[i] for i in others]
        signature = None
        if y.dtype.is_floating_point and y.dtype.itemsize < 4:  # where rounding blurs the support test
            signature = single_mover_signature(y, base, [tensors[i] for i in others], lambdas)
        if signature is None:
            signature = sparsity_signature(y, base, [tensors[i] for i in others], lambdas)
        if not signature.sparse:
            return None
        unused = [i for i, share in zip(others, signature.explained) if share < MIN_EXPLAINED]
        if unused and len(unused) < len(others):  # a sibling's task vector explains no entry alone: it took no part
            keep = [i for i in range(len(references)) if i not in unused]
            return self._sparse_fit_on(
                name,
                y,
                [tensors[i] for i in keep],
                [references[i] for i in keep],
                [weights[i] for i in keep],
                keep.index(at),
            )
        models = [references[i] for i in others]
        if signature.kept_magnitude < 0.5:
            density = median(signature.trim_densities) if signature.trim_densities else signature.density
            shares = ties_shares(y, base, [tensors[i] for i in others], signature)
            method, values = "ties", shares
        else:
            density = signature.density
            method = "dare_ties" if signature.sign_election > 0.9 else "dare_linear"
            values = [c * density for c in signature.coefficients]
        signature.relative_error = _sparse_error(y, base, [tensors[i] for i in others], signature)
        return TensorFit(
            name,
            method,
            models,
            values,
            signature.relative_error,
            base=references[at],
            density=density,
            sparsity=signature,
        )


def ties_shares(y, base, sources, signature: Sparsity) -> list[float]:
    """TIES's weights, normalised to sum to one (a normalised TIES merge depends only on their ratios): least
    squares over the entries where every task vector survives its trim and all agree in sign."""
    y_delta = (y.float() - base.float()).reshape(-1)
    taus = [(x.float() - base.float()).reshape(-1) for x in sources]
    if len(taus) == 1:
        return [1.0]
    mask = torch.ones_like(y_delta, dtype=torch.bool)
    for tau, density in zip(taus, signature.trim_densities):
        cut = torch.quantile(tau.abs()[:1_000_000], max(0.0, min(1.0, 1 - density)))
        mask &= tau.abs() > cut
    signs = torch.stack([torch.sign(tau[mask]) for tau in taus])
    agree = (signs == signs[0]).all(dim=0)
    if int(agree.sum()) < len(taus) * 4:
        return [1 / len(taus)] * len(taus)
    matrix = torch.stack([tau[mask][agree] for tau in taus], dim=1).double()
    # y_d (sum w) = sum w_i tau_i with sum w = 1: least squares on (tau_i - tau_last) against y_d - tau_last
    target = y_delta[mask][agree].double() - matrix[:, -1]
    design = matrix[:, :-1] - matrix[:, -1:]
    solved = torch.linalg.lstsq(design, target.unsqueeze(1)).solution.reshape(-1)
    shares = [float(v) for v in solved] + [1 - float(solved.sum())]
    if len(taus) == 2 and y.dtype.is_floating_point and y.dtype.itemsize < 4:
        picked = mask.nonzero().reshape(-1)[agree]
        shares = matched_shares(
            y.float().reshape(-1)[picked], base.float().reshape(-1)[picked], [tau[picked] for tau in taus], y.dtype
        )
    return shares


def matched_shares(y: torch.Tensor, base: torch.Tensor, taus: list[torch.Tensor], dtype: torch.dtype) -> list[float]:
    """The shares (s, 1 - s) of two task vectors under which base + s tau_1 + (1 - s) tau_2 lands within half a
    rounding step of y (bf16, fp16) at the most entries. Least squares is biased there: the task vectors are a few
    steps of the base's grid, and y is rounded on that grid, not on theirs. A grid of s, then a finer one."""
    step = rounding_steps(y, dtype)
    best = 0.5
    for width, points in ((1.0, 201), (0.01, 41)):
        grid = torch.linspace(best - width, best + width, points)
        hits = torch.zeros(points)
        for start in range(0, len(y), 1 << 14):
            part = slice(start, start + (1 << 14))
            blend = base[part] + taus[1][part] + grid[:, None] * (taus[0][part] - taus[1][part])
            hits += ((blend - y[part]).abs() <= 0.5 * step[part]).sum(dim=1)
        best = float(grid[int(torch.argmax(hits))])
    return [best, 1 - best]


def _sparse_error(y, base, sources, signature: Sparsity) -> float:
    """Relative error of y - base against its best explanation entry by entry: zero, or a sum of some models'
    task vectors times their coefficients (the masks of a sparsified merge are not recoverable, their effect is)."""
    y_delta = (y.float() - base.float()).reshape(-1)
    taus = [(x.float() - base.float()).reshape(-1) for x in sources]
    coefficients = signature.coefficients if len(signature.coefficients) == len(taus) else [1.0] * len(taus)
    best = y_delta.abs().clone()
    count = len(taus)
    if count <= 4:
        for subset in range(1, 1 << count):
            guess = sum(coefficients[i] * taus[i] for i in range(count) if subset >> i & 1)
            best = torch.minimum(best, (y_delta - guess).abs())
    norm = float(y.float().norm())
    return float(best.norm()) / norm if norm else 0.0


def layer_summary(layer: int, fits: list[TensorFit], source_layers: dict[str, int], matrices: set[str]) -> LayerFit:
    """One line for the layer: the method most of its matrices show, and each source's median weight."""
    voted = [fit for fit in fits if fit.name in matrices] or fits
    methods = Counter(fit.method for fit in voted)
    if methods.get("slerp") and methods.get(
        "linear"
    ):  # nearly parallel tensors interpolate alike: their slerp is linear
        methods["slerp"] += methods.pop("linear")
    method = methods.most_common(1)[0][0] if methods else "unmatched"
    chosen = [fit for fit in voted if fit.method == method or (method == "slerp" and fit.method == "linear")]
    weights: dict[str, list[float]] = {}
    for fit in chosen:
        for reference, weight in zip(fit.sources, fit.weights):
            weights.setdefault(reference, []).append(weight)
    sources = [
        (reference, source_layers.get(reference, layer), median(values)) for reference, values in weights.items()
    ]
    error = max((fit.relative_error for fit in fits), default=1.0)
    return LayerFit(layer, method, sources, error, fits)


def slerp_throughout(layers: list[LayerFit]) -> list[LayerFit]:
    """In a model whose layers show SLERP, a layer fitted as linear from the same two models, every one of whose
    linear tensors SLERP explains as well (nearly parallel tensors interpolate alike, so its fits carry a t), is
    a SLERP layer too: it recomposes the same within rounding, and the recipe is one SLERP, not stages."""
    slerp_sources = {tuple(s[0] for s in layer.sources) for layer in layers if layer.method == "slerp"}

    def interpolates(layer: LayerFit) -> bool:
        linear = [fit for fit in layer.tensors if fit.method == "linear"]
        return (
            layer.method == "linear"
            and tuple(s[0] for s in layer.sources) in slerp_sources
            and bool(linear)
            and all(fit.t is not None for fit in linear)
        )

    return [replace(layer, method="slerp") if interpolates(layer) else layer for layer in layers]
