"""Singular value decompositions for the subspace merges (TSV-M, Iso-C, Iso-CTS, CART).

- `top_singular(A, k)`: the k largest singular triplets. Exact (LAPACK through `torch.linalg.svd`) for small
  matrices or large k; otherwise a randomised subspace iteration (Halko, Martinsson and Tropp 2011, "Finding
  structure with randomness", algorithms 4.4 and 5.1), whose cost grows with k instead of with the matrix's
  smaller side. Its start matrix comes from a generator with a fixed seed, so a merge is the same from run to
  run (torch.svd_lowrank draws from the global generator, which other threads share).
- `orthonormalized(M)`: the orthogonal Procrustes step (the nearest matrix with orthonormal columns, P Q^T for
  M = P S Q^T), taken on M's numerical range.
- `numerical_rank`, `nonzero_components`: which singular values count as non-zero (`zero_level`).

Every function works in at least float32 (LAPACK has no half-precision SVD) and returns that dtype.
"""

from __future__ import annotations

import torch

RANDOMIZED_MIN_SIDE = 256  # a matrix whose smaller side is shorter than this gets the exact SVD
RANDOMIZED_MAX_SHARE = 0.25  # ... as does a request for more than this share of the smaller side (with oversampling)
OVERSAMPLING = 16  # extra sketch columns beyond k
POWER_ITERATIONS = 4  # subspace iterations: task vectors' spectra decay slowly, and each sharpens the sketch
SKETCH_SEED = 0x5B5D


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an SVD runs in: float32 for half precision, else the dtype itself."""
    return torch.promote_types(dtype, torch.float32)


def exact_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of the thin SVD, in the working dtype.

    LAPACK's divide-and-conquer SVD (gesdd, torch's CPU driver) can fail to converge on an ill-conditioned matrix
    (it did once in a merge of SmolLM2 fine-tunes, on two threads, and not on a rerun on one); the SVD is then
    taken again in float64, and failing that, from the eigendecomposition of the float64 Gram matrix of the
    smaller side (exact in exact arithmetic; in float64 its singular values of a float32 matrix are accurate
    down to about 1e-7 of the largest)."""
    work = matrix.to(working_dtype(matrix.dtype))
    try:
        return torch.linalg.svd(work, full_matrices=False)
    except torch.linalg.LinAlgError:
        pass
    try:
        u, s, vh = torch.linalg.svd(work.double(), full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = gram_svd(work.double())
    return u.to(work.dtype), s.to(work.dtype), vh.to(work.dtype)


def gram_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD from the eigendecomposition of the smaller side's Gram matrix: A^T A = V S^2 V^T, U = A V / S
    (for a wide matrix, of A^T). Directions with a zero singular value get zero vectors in U: they carry nothing."""
    tall = matrix.shape[0] >= matrix.shape[1]
    work = matrix if tall else matrix.mT
    squares, vectors = torch.linalg.eigh(work.mT @ work)
    squares, vectors = squares.flip(0), vectors.flip(1)
    values = squares.clamp(min=0).sqrt()
    scale = torch.where(values > 0, 1 / values.clamp(min=torch.finfo(values.dtype).tiny), 0)
    left = (work @ vectors) * scale
    return (left, values, vectors.mT) if tall else (vectors, values, left.mT)


def uses_randomized(shape: tuple[int, int], rank: int) -> bool:
    """Whether `top_singular` sketches (True) or decomposes exactly (False) a matrix of `shape` for `rank`."""
    side = min(shape)
    return side >= RANDOMIZED_MIN_SIDE and rank + OVERSAMPLING <= RANDOMIZED_MAX_SHARE * side


def top_singular(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `rank` largest singular triplets (U: m x k, S: k, Vh: k x n) of a 2-D tensor, largest first.
    ValueError when `rank` exceeds the smaller side."""
    rows, columns = matrix.shape
    if not 0 <= rank <= min(rows, columns):
        raise ValueError(f"rank {rank} is outside [0, {min(rows, columns)}] for a {rows} x {columns} matrix")
    if not uses_randomized((rows, columns), rank):
        u, s, vh = exact_svd(matrix)
        return u[:, :rank], s[:rank], vh[:rank]
    return randomized_svd(matrix, rank)


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    oversampling: int = OVERSAMPLING,
    iterations: int = POWER_ITERATIONS,
    seed: int = SKETCH_SEED,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomised subspace iteration: Q spans A Omega (Omega Gaussian, n x (k + oversampling)), refined by
    `iterations` rounds of Q <- orth(A orth(A^T Q)); then the exact SVD of the small Q^T A gives the triplets.
    The sketch is taken on the longer side so that Q is the larger factor."""
    work = matrix.to(working_dtype(matrix.dtype))
    transposed = work.shape[0] < work.shape[1]
    if transposed:
        work = work.mT
    columns = min(rank + oversampling, min(work.shape))
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(work.shape[1], columns, generator=generator, dtype=work.dtype).to(work.device)
    basis = torch.linalg.qr(work @ omega).Q
    for _ in range(iterations):
        basis = torch.linalg.qr(work @ torch.linalg.qr(work.mT @ basis).Q).Q
    u, s, vh = exact_svd(basis.mT @ work)
    u = basis @ u[:, :rank]
    s, vh = s[:rank], vh[:rank]
    if transposed:
        return vh.mT, s, u.mT
    return u, s, vh


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, ...]) -> int:
    """How many of the (descending) singular values of a matrix of `shape` exceed `zero_level`: below it they
    are rounding noise, and their singular vectors arbitrary."""
    if singular_values.numel() == 0:
        return 0
    return int((singular_values > zero_level(float(singular_values[0]), shape, singular_values.dtype)).sum())


def zero_level(largest: float, shape: tuple[int, ...], dtype: torch.dtype) -> float:
    """min(shape) * eps * the largest singular value: the rounding error of an SVD (equal columns come out with
    singular values of a few eps; numpy's matrix_rank takes max(shape), which would call real but small
    singular values of a tall embedding's task vector zero)."""
    return largest * min(shape) * torch.finfo(dtype).eps


def nonzero_components(
    left: torch.Tensor, values: torch.Tensor, right: torch.Tensor, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The columns of stacked singular vectors `left` and `right` (and their `values`) whose singular value is
    not zero to rounding, by `numerical_rank`'s tolerance for a matrix of `shape`: a zero singular value's vectors
    are arbitrary, and stacked with other tasks' vectors they would bend those in the Procrustes step."""
    largest = float(values.max()) if values.numel() else 0.0
    kept = values > zero_level(largest, shape, values.dtype)
    return left[:, kept], values[kept], right[:, kept]


def orthonormalized(matrix: torch.Tensor) -> torch.Tensor:
    """P Q^T for the SVD M = P S Q^T, over M's numerical range: the closest matrix to M with orthonormal columns
    (rows, if M is wide) when M has full rank. Where it has not (two equal columns, say), directions M does not
    span are left out instead of filled in arbitrarily, so equal columns u, u become u / sqrt(2) each."""
    p, s, qh = exact_svd(matrix)
    kept = numerical_rank(s, tuple(matrix.shape))
    return p[:, :kept] @ qh[:kept]
