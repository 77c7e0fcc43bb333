"""The methods' formulas fitted in reverse, one SUSPECT tensor against its source tensors (float64 sums over
the whole tensor, a chunk at a time).

- linear / task arithmetic: least squares y ~ sum_i w_i x_i (the Gram matrix of the sources, exact);
- SLERP: with two sources, y = a x_0 + b x_1 with a = sin((1-t) theta)/sin theta, b = sin(t theta)/sin theta,
  theta the sources' angle; t solves b/a = sin(t theta)/sin((1-t) theta);
- sparsified task vectors (TIES, DARE): the support of y - base against what a dense merge would leave,
  whether the entries kept are the large ones (TIES trims by magnitude, DARE drops at random), whether
  opposite-signed task vectors were elected, and DARE's rescaling factor.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

CHUNK = 1 << 20
SLERP_PARALLEL = 0.9995  # composer's slerp interpolates linearly above this cosine (composer.methods.slerp)
# Entries whose sources lie at least this many rounding steps of SUSPECT's dtype apart from each other are
# the ones the weights are fitted on (see NormalEquations); with fewer than MIN_INFORMATIVE such entries a
# tensor is fitted on all of its entries.
INFORMATIVE_GAP = 4
MIN_INFORMATIVE = 256


@dataclass
class LeastSquares:
    weights: list[float]
    relative_error: float  # over all of the tensor's entries
    gram: torch.Tensor  # float64 [n, n], over all entries (the sources' angles)
    informative: int = 0  # entries the weights were fitted on
    standard_errors: list[float] = field(default_factory=list)  # of the weights, were the residual noise per entry


def is_coarser(rounding: torch.dtype, sources: list[torch.Tensor]) -> bool:
    """Whether rounding `sources` (float32 copies) to `rounding` changes them: SUSPECT's dtype is coarser than
    float32 and some source holds values off its grid."""
    if not rounding.is_floating_point or torch.finfo(rounding).eps <= torch.finfo(torch.float32).eps:
        return False
    return any(not torch.equal(x, x.to(rounding).float()) for x in sources)


def informative_entries(stacked: torch.Tensor, rounding: torch.dtype) -> torch.Tensor:
    """Which entries (columns of `stacked`, float32 [sources, entries]) have every pair of sources at least
    INFORMATIVE_GAP rounding steps of `rounding` apart, the step taken at the largest source's magnitude."""
    pairs = itertools.combinations(range(len(stacked)), 2)  # pair by pair: a sort along the short axis is far slower
    gap = (stacked[0] - stacked[1]).abs_()
    for first, second in itertools.islice(pairs, 1, None):
        torch.minimum(gap, (stacked[first] - stacked[second]).abs_(), out=gap)
    largest = stacked[0].abs()
    for row in stacked[1:]:
        torch.maximum(largest, row.abs(), out=largest)
    return gap >= INFORMATIVE_GAP * rounding_steps(largest, rounding)


@dataclass
class NormalEquations:
    """The sums least squares needs, gathered block by block: the sources' Gram matrix, their products with y, and |y|^2.

    When SUSPECT is stored in a coarser dtype than float32 (bf16, fp16), the same sums are also gathered over the
    *informative* entries only, and the weights are fitted there. Fine-tunes of one base differ by about one
    rounding step of bf16 in most entries; there SUSPECT's rounding snaps a blend to the grid point of one source
    or the other, which biases least squares towards the ends (a 0.6/0.4 blend of two real SmolLM2 fine-tunes
    read as 0.65/0.35). Entries whose sources are several steps apart carry the weights without that bias. The
    choice reads the sources only, never y, so it selects no noise. The residual is still taken over all entries."""

    gram: torch.Tensor
    cross: torch.Tensor
    squared: float = 0.0
    entries: int = 0
    informative: NormalEquations | None = None

    @classmethod
    def empty(cls, count: int) -> NormalEquations:
        return cls(torch.zeros(count, count, dtype=torch.float64), torch.zeros(count, dtype=torch.float64))

    def _add(self, rows: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """`rows`: float64 [sources + 1, entries], the sources then y; one product gives every sum. `mask`: the
        entries that count (all when None), multiplied in, which is faster than picking them out."""
        picked = rows if mask is None else rows * mask
        products = picked @ rows.T
        count = len(self.cross)
        self.gram += products[:count, :count]
        self.cross += products[:count, count]
        self.squared += float(products[count, count])
        self.entries += rows.shape[1] if mask is None else int(mask.sum())

    @classmethod
    def for_dtype(cls, count: int, rounding: torch.dtype | None) -> NormalEquations:
        """Empty sums for `count` sources; with the informative entries' sums too where `rounding` (SUSPECT's
        dtype) is coarser than float32."""
        sums = cls.empty(count)
        if rounding is not None and count >= 2 and torch.finfo(rounding).eps > torch.finfo(torch.float32).eps:
            sums.informative = cls.empty(count)
        return sums

    def add_block(self, y: torch.Tensor, sources: list[torch.Tensor], rounding: torch.dtype | None) -> None:
        """One (y block, [source blocks]) of equal shapes, CHUNK entries at a time, in float64."""
        count = len(self.cross)
        flats = [x.reshape(-1) for x in sources] + [y.reshape(-1)]
        for start in range(0, flats[-1].numel(), CHUNK):
            single = torch.stack([x[start : start + CHUNK].float() for x in flats])
            rows = single.double()
            self._add(rows)
            if self.informative is not None:
                self.informative._add(rows, informative_entries(single[:count], rounding))

    @classmethod
    def gather(cls, blocks, count: int, rounding: torch.dtype | None = None) -> NormalEquations:
        """`blocks` yields (y block, [source blocks]) of equal shapes. `rounding`: SUSPECT's dtype, where it is
        coarser than float32."""
        sums = cls.for_dtype(count, rounding)
        for y, sources in blocks:
            sums.add_block(y, sources, rounding)
        return sums

    @classmethod
    def gather_views(cls, blocks, count: int, rounding: torch.dtype) -> tuple[NormalEquations, NormalEquations | None]:
        """The sums for the sources as read and, where SUSPECT's dtype is coarser than the sources', for the sources
        rounded to it first, from one pass over `blocks`: a merge run in `dtype: bfloat16` (composer's and
        mergekit's default way) rounds its inputs before it blends them, and a fit of the rounded sources then
        explains SUSPECT exactly where a fit of the sources as read leaves the rounding as residual."""
        as_read, rounded = cls.for_dtype(count, rounding), None
        for position, (y, sources) in enumerate(blocks):
            as_read.add_block(y, sources, rounding)
            if position == 0 and is_coarser(rounding, sources):  # the first block decides for the tensor
                rounded = cls.for_dtype(count, rounding)
            if rounded is not None:
                rounded.add_block(y, [x.to(rounding).float() for x in sources], rounding)
        return as_read, rounded

    def solve(self, keep: list[int] | None = None) -> LeastSquares:
        """The fit over the sources at `keep` (all when None): weights from the informative entries where there
        are enough of them, the relative error over all entries."""
        keep = list(range(len(self.cross))) if keep is None else keep
        fitted = self
        if self.informative is not None and self.informative.entries >= MIN_INFORMATIVE * len(keep):
            fitted = self.informative
        gram, cross = fitted.gram[keep][:, keep], fitted.cross[keep]
        count = len(keep)
        ridge = 1e-13 * float(gram.diagonal().sum()) / max(count, 1)
        inverse = torch.linalg.inv(gram + ridge * torch.eye(count, dtype=torch.float64))
        weights = inverse @ cross
        gram, cross = self.gram[keep][:, keep], self.cross[keep]
        left = self.squared - 2 * float(weights @ cross) + float(weights @ gram @ weights)
        error = math.sqrt(max(left, 0.0) / self.squared) if self.squared > 0 else 0.0
        variance = max(left, 0.0) / max(self.entries - count, 1)  # the residual's, per entry
        errors = [math.sqrt(max(variance * float(inverse[i, i]), 0.0)) for i in range(count)]
        return LeastSquares([float(w) for w in weights], error, gram, fitted.entries, errors)


def slerp_coefficients(t: float, theta: float) -> tuple[float, float]:
    if theta < 1e-9:
        return 1 - t, t
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


@dataclass
class SlerpFit:
    t: float
    theta: float
    distinct: bool  # whether the angle is wide enough that slerp and linear interpolation differ measurably
    better_than_linear: bool


def fit_slerp(fit: LeastSquares) -> SlerpFit | None:
    """t for y = slerp(x_0, x_1, t), from the least-squares coefficients and the sources' exact angle."""
    a, b = fit.weights
    if a <= 0 or b <= 0:
        return None
    gram = fit.gram
    cosine = float(gram[0, 1] / math.sqrt(float(gram[0, 0] * gram[1, 1]))) if gram[0, 0] > 0 and gram[1, 1] > 0 else 1.0
    cosine = max(-1.0, min(1.0, cosine))
    if abs(cosine) > SLERP_PARALLEL:
        return SlerpFit(b / (a + b), 0.0, False, False)
    theta = math.acos(cosine)
    low, high = 0.0, 1.0
    for _ in range(60):  # b/a rises with t
        middle = (low + high) / 2
        ca, cb = slerp_coefficients(middle, theta)
        if cb / ca < b / a:
            low = middle
        else:
            high = middle
    t = (low + high) / 2
    slerp_a, slerp_b = slerp_coefficients(t, theta)
    lerp_t = b / (a + b)
    slerp_miss = abs(slerp_a - a) + abs(slerp_b - b)
    lerp_miss = abs(1 - lerp_t - a) + abs(lerp_t - b)
    gap = abs(slerp_a + slerp_b - 1)  # how far slerp's coefficients are from summing to one
    return SlerpFit(t, theta, gap > 1e-3, slerp_miss < lerp_miss)


@dataclass
class Sparsity:
    """The signature of a merge of sparsified task vectors, from y - base and the task vectors."""

    support: float  # share of entries where SUSPECT differs from the base
    dense_support: float  # the same share for the dense (linear) merge of the task vectors
    kept_magnitude: float  # mean |tau| where nothing was kept / where something was: << 1 for TIES, ~1 for DARE
    sign_election: float  # of entries with opposite-signed task vectors, the share explained by one model alone
    coefficients: list[float] = field(default_factory=list)  # y - base = c_i tau_i where model i alone is kept
    density: float = 1.0  # estimated share of each task vector kept
    trim_densities: list[float] = field(default_factory=list)  # TIES: each task vector's kept share, by magnitude
    explained: list[float] = field(default_factory=list)  # per task vector: share of changed entries it explains alone
    relative_error: float = 0.0
    from_single_movers: bool = False  # found by single_mover_signature, which returns only sparse signatures

    @property
    def sparse(self) -> bool:
        # entries equal to the base: where every task vector was dropped, far more than a dense merge's rounding leaves
        return self.from_single_movers or 1 - self.support >= 1.5 * (1 - self.dense_support) + 0.05


def _mode(values: torch.Tensor) -> float:
    """The most common value (up to rounding) of ratios: where one model alone is kept, y_d / tau is constant."""
    values = values[torch.isfinite(values) & (values.abs() < 20)][: 1 << 16]  # a mode needs no more
    if values.numel() == 0:
        return 0.0
    rounded = torch.round(values * 1000) / 1000
    unique, counts = torch.unique(rounded, return_counts=True)
    peak = float(unique[int(torch.argmax(counts))])
    near = values[(values - peak).abs() < 0.002]
    return float(near.median()) if near.numel() else peak


def sparsity_signature(
    y: torch.Tensor, base: torch.Tensor, sources: list[torch.Tensor], weights: list[float]
) -> Sparsity:
    """Equalities are taken in SUSPECT's dtype (`y.dtype`): where a merge kept nothing, SUSPECT holds the base's
    value rounded to its dtype, bit for bit."""
    dtype = y.dtype
    as_stored = base.to(dtype).float().reshape(-1)
    stored = y.float().reshape(-1)
    kept = stored != as_stored
    support = float(kept.float().mean())
    if not Sparsity(support, 1.0, 1.0, 1.0).sparse:  # too few entries equal the base for any sparsified merge
        return Sparsity(support, support, 1.0, 1.0)
    y_delta = stored - base.float().reshape(-1)
    taus = [x.float().reshape(-1) - base.float().reshape(-1) for x in sources]
    dense = base.float().reshape(-1) + sum(w * tau for w, tau in zip(weights, taus))
    dense_support = float((dense.to(dtype).float() != as_stored).float().mean())
    del dense
    if not Sparsity(support, dense_support, 1.0, 1.0).sparse:  # a dense merge leaves as many: the rest is not needed
        return Sparsity(support, dense_support, 1.0, 1.0)
    ratios = []
    for tau in taus:
        inside, outside = tau[kept].abs(), tau[~kept].abs()
        if inside.numel() and outside.numel() and float(inside.mean()) > 0:
            ratios.append(float(outside.mean()) / float(inside.mean()))
    kept_magnitude = sum(ratios) / len(ratios) if ratios else 1.0
    coefficients = []
    for tau in taus:
        usable = kept & (tau.abs() > 0)
        coefficients.append(_mode(y_delta[usable] / tau[usable]) if usable.any() else 0.0)
    count = len(taus)
    density = 1 - (1 - support) ** (1 / count) if count else 1.0
    resolution = (stored.abs() * torch.finfo(dtype).eps).clamp_min(1e-12)
    explained = []
    for coefficient, tau in zip(coefficients, taus):
        alone = (y_delta[kept] - coefficient * tau[kept]).abs() <= 1e-2 * y_delta[kept].abs() + 2 * resolution[kept]
        explained.append(float(alone.float().mean()) if alone.numel() else 0.0)
    election = 1.0
    if count >= 2:
        signs = torch.stack([torch.sign(tau) for tau in taus])
        opposed = kept & (signs.max(dim=0).values > 0) & (signs.min(dim=0).values < 0)
        if opposed.any():
            target = y_delta[opposed]
            alone = torch.zeros_like(target, dtype=torch.bool)
            for coefficient, tau in zip(coefficients, taus):
                alone |= (target - coefficient * tau[opposed]).abs() <= 1e-2 * target.abs() + 2 * resolution[opposed]
            election = float(alone.float().mean())
    trims = []
    for x, tau in zip(
        sources, taus
    ):  # TIES keeps tau's largest entries: where y is this model alone, |tau| is above the cut
        alone = kept & (stored == x.to(dtype).float().reshape(-1)) & (tau != 0)
        if alone.sum() >= 10:
            cut = float(torch.quantile(tau[alone].abs()[:1_000_000], 0.002))
            trims.append(float((tau.abs() >= cut).float().mean()))
        else:
            trims.append(density)
    return Sparsity(support, dense_support, kept_magnitude, election, coefficients, density, trims, explained)


SINGLE_MOVER_ENTRIES = 1 << 18
SINGLE_MOVERS = 200  # entries where one task vector alone moves that a source needs for the single-mover signature
SPARSE_ZEROS = 0.005  # share of such entries left at the base, where no dense merge can round to it, that is sparse


def rounding_steps(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One step of `dtype`'s grid at each entry's magnitude (2^floor(log2 |x|) * eps), from float32 `values`."""
    power = (values.abs().view(torch.int32) & 0x7F800000).view(torch.float32)
    return (power * torch.finfo(dtype).eps).clamp_min_(torch.finfo(torch.float32).tiny)


def single_mover_signature(
    y: torch.Tensor, base: torch.Tensor, sources: list[torch.Tensor], weights: list[float] | None = None
) -> Sparsity | None:
    """The sparsity signature of a merge stored in a coarse dtype (bf16, fp16) whose task vectors are a few rounding
    steps each, where rounding hides the support test of `sparsity_signature` (a dense merge leaves as many entries
    at the base as a trim does). It reads the entries where one task vector alone moves from the base (the sources
    rounded to SUSPECT's dtype, as the merge saw them): there a dense merge gives c_i tau_i, rounded; TIES gives
    tau_i above a magnitude cut and 0 below it (its disjoint mean of one delta is the delta); DARE gives c_i tau_i or
    0 at random, whatever the magnitude. A source where SUSPECT never moves took no part (coefficient 0), and its
    moves are then left out of the count of movers. Where no source is alone often enough to judge, the one with
    the smallest least-squares `weight` is left out the same way. None when the entries do not show a sparsified
    merge."""
    dtype = y.dtype
    entries = SINGLE_MOVER_ENTRIES  # of the sample (rows spread over the tensor): enough single movers at the cut for TIES's density
    as_stored = base.to(dtype).float().reshape(-1)[:entries]
    y_delta = y.float().reshape(-1)[:entries] - as_stored
    taus = [x.to(dtype).float().reshape(-1)[:entries] - as_stored for x in sources]
    moving = torch.stack([tau != 0 for tau in taus])
    if float(((y_delta == 0) & moving.any(dim=0)).float().mean()) < SPARSE_ZEROS / 10:
        return None  # SUSPECT hardly ever stays at the base where a task vector moves: no trim, no drop
    step = rounding_steps(as_stored, dtype)
    if not any(zero_can_count(tau, y_delta, step) for tau in taus):
        return None  # where SUSPECT stays at the base, a dense merge's rounding explains it: no trim, no drop
    used = list(range(len(taus)))
    found = [SingleMovers(0.0)] * len(taus)
    order = sorted(range(len(taus)), key=lambda i: -abs(weights[i]) if weights else i)
    for _ in range(
        len(taus)
    ):  # again without the sources that took no part, whose moves hide the others' single movers
        movers = moving[used].sum(dim=0)
        for i in used:
            found[i] = _single_movers(taus[i], moving[i] & (movers == 1), y_delta, step)
        if all(found[i] is None for i in used) and len(used) > 1:
            weakest = [i for i in order if i in used][-1]
            found[weakest] = SingleMovers(0.0)
            used = [i for i in used if i != weakest]
            continue
        # a source too seldom alone to judge is left out with those that took no part, if some others show a part
        now_used = [i for i in used if found[i] is not None and found[i].coefficient != 0.0]
        if now_used == used or not now_used:
            break
        for i in used:
            if found[i] is None:
                found[i] = SingleMovers(0.0)
        used = now_used
    if any(found[i] is None for i in used):
        return None
    if not used or max(found[i].zero_share for i in used) < SPARSE_ZEROS:
        return None
    coefficients = [f.coefficient for f in found]
    explained = [f.explained for f in found]
    zero_shares = [found[i].zero_share for i in used]
    top_zero_shares = [found[i].top_zero_share for i in used]
    support = float((y_delta != 0).float().mean())
    if sum(top_zero_shares) < 0.25 * sum(zero_shares):  # TIES trims the small entries, DARE any
        trims = [trim_share(taus[i], found[i].cut, found[i].kept_at_cut) for i in used]
        return Sparsity(
            support, 1.0, 0.0, 1.0, coefficients, sum(trims) / len(trims), trims, explained, from_single_movers=True
        )
    density = 1 - sum(zero_shares) / len(zero_shares)
    election = _decisive_sign_election(y_delta, [taus[i] for i in used], [coefficients[i] for i in used], step)
    return Sparsity(support, 1.0, 1.0, election, coefficients, density, [], explained, from_single_movers=True)


# _single_movers' bounds: its coefficient c must lie within SLACK_BOUND of the ratio (y - base) / tau at no fewer
# than SLACK_ENTRIES entries where |tau| >= 4 steps, and a zero counts only where |c tau| >= MIN_MARGIN steps
SLACK_BOUND = 0.51 / 4 + 1e-2
SLACK_ENTRIES = (SINGLE_MOVERS // 10) * 9 // 10
MIN_MARGIN = 1.5


def zero_can_count(tau, y_delta, step) -> bool:
    """Whether `_single_movers` could count an entry where SUSPECT stays at the base as a zero of a sparsified merge
    for this task vector, whichever single movers it is given: that needs |c tau| >= 1.5 steps there, and c, to
    pass the test of one coefficient, is within SLACK_BOUND of the ratio at SLACK_ENTRIES or more entries of
    |tau| >= 4 steps (bounded here over all such entries, a superset of any single movers'). A cheap bound that
    spares the full test for dense merges, whose zeros are task vectors of a step or two that rounding took away.
    Slightly loose margins keep float32 rounding on the safe side. Masks are applied with `where`, not by picking
    entries out: on a sample of 2^18 entries that halves the cost, and the values compared are the same."""
    at_base = y_delta == 0
    # the largest task vector, in steps, that SUSPECT left out (0: it stays at the base only where no task vector moves)
    widest = float(torch.where(at_base, tau.abs() / step, 0.0).max())
    if widest == 0:
        return False
    large = (tau.abs() >= 4 * step) & ~at_base
    if int(large.sum()) < SLACK_ENTRIES:
        return False
    ratios = torch.where(large, (y_delta / tau).abs(), -math.inf)
    bound = float(ratios.topk(SLACK_ENTRIES).values[-1]) + SLACK_BOUND + 2e-3
    return bound * widest * (1 + 1e-3) >= MIN_MARGIN


def _decisive_sign_election(y_delta, taus, coefficients, step) -> float:
    """Of the entries where two task vectors pull apart by more than rounding can blur (each c_i tau_i at least two
    steps), the share SUSPECT explains by one of them alone (within rounding): about 1 with sign election (DARE-TIES),
    about 1 - density^2 without (DARE's linear sum keeps both where neither was dropped)."""
    if len(taus) < 2:
        return 1.0
    scaled = torch.stack([c * tau for c, tau in zip(coefficients, taus)])
    large = scaled.abs() >= 2 * step
    positive = ((scaled > 0) & large).any(dim=0)
    negative = ((scaled < 0) & large).any(dim=0)
    opposed = positive & negative & (y_delta != 0)
    if int(opposed.sum()) < SINGLE_MOVERS // 10:
        return 1.0
    target, tolerance = y_delta[opposed], 0.51 * step[opposed]
    alone = torch.zeros_like(target, dtype=torch.bool)
    for row in scaled:
        alone |= (target - row[opposed]).abs() <= tolerance + 1e-2 * target.abs()
    return float(alone.float().mean())


@dataclass
class SingleMovers:
    coefficient: float  # SUSPECT's move over the task vector's where it moves; 0 where SUSPECT never moves
    zero_share: float = 0.0  # of the moves a dense merge cannot round away, the share SUSPECT leaves at the base
    top_zero_share: float = 0.0  # the same among the larger half of them
    cut: float = 0.0  # the smallest magnitude SUSPECT keeps
    kept_at_cut: float = 1.0  # the share kept of the moves of exactly that magnitude
    explained: float = 0.0  # share of the single movers that 0 or coefficient * tau explains


def _single_movers(tau, alone, y_delta, step) -> SingleMovers | None:
    if int(alone.sum()) < SINGLE_MOVERS:
        return None
    t, d, s = tau[alone], y_delta[alone], step[alone]
    big = t.abs() >= 4 * s  # moves a blend cannot round onto either end: y - base = c tau to within 1/8
    if int(big.sum()) < SINGLE_MOVERS:
        return None
    moved = d[big] != 0
    if int(moved.sum()) < SINGLE_MOVERS // 10:
        return SingleMovers(0.0)
    ratios = d[big][moved] / t[big][moved]
    coefficient = _mode(ratios)
    slack = 0.51 * s[big][moved] / t[big][moved].abs() + 1e-2
    if float(((ratios - coefficient).abs() <= slack).float().mean()) < 0.9:  # no one coefficient: not c tau or 0
        return None
    # where a dense merge cannot have rounded SUSPECT's move to zero: with a coefficient of 1, y - base is tau
    # exactly; otherwise the blend's own roundings in a bf16 computation (mergekit's) reach about a step
    margin = 1.5 if abs(coefficient - 1) < 0.01 else 3.0
    certain = (coefficient * t).abs() >= margin * s
    if int(certain.sum()) < SINGLE_MOVERS:
        return None
    zeros = d[certain] == 0
    magnitudes = t[certain].abs()
    top = magnitudes >= magnitudes.median()
    kept = d != 0
    cut = float(t[kept].abs().min())
    at_cut = t.abs() == cut
    fits_alone = (d == 0) | ((d - coefficient * t).abs() <= 0.51 * s + 1e-2 * d.abs())
    return SingleMovers(
        coefficient,
        float(zeros.float().mean()),
        float(zeros[top].float().mean()),
        cut,
        float(kept[at_cut].float().mean()),
        float(fits_alone.float().mean()),
    )


def trim_share(tau: torch.Tensor, cut: float, kept_at_cut: float) -> float:
    """The share of `tau` a magnitude trim keeps whose smallest kept magnitude is `cut`: every entry above it and, of
    the entries at it (rounded task vectors tie at a few values), the share `kept_at_cut` that the single movers
    at the cut show kept (a top-k keeps some of the tied entries, at places its sort chooses)."""
    magnitudes = tau.abs()
    return float((magnitudes > cut).float().mean()) + kept_at_cut * float((magnitudes == cut).float().mean())
