"""Singular value decompositions for the subspace merges (TSV-M, Iso-C, Iso-CTS, CART).

- `top_singular(A, k)`: the k largest singular triplets. Exact (LAPACK through `torch.linalg.svd`) for small
  matrices or large k; otherwise a randomised subspace iteration (Halko, Martinsson and Tropp 2011, "Finding
  structure with randomness", algorithms 4.4 and 5.1) with 2 power iterations and k / 4 extra columns (at
  least 32), whose cost grows with k instead of with the matrix's smaller side: its rank-k approximation's
  error is within 0.5% of the best one's on real task vectors (tests/test_new_methods.py holds it to 1%). Its
  start matrix comes from a generator with a fixed seed, so a merge is the same from run to
  run (torch.svd_lowrank draws from the global generator, which other threads share). Where the hardware
  multiplies bfloat16 natively (`sketch_dtype`), the range-finding products run in it (2.8x faster on a
  5632 x 2048 matrix, same error to 0.01%), so results differ slightly between such machines and others.
- `orthonormalized(M)`: the orthogonal Procrustes step (the nearest matrix with orthonormal columns, P Q^T for
  M = P S Q^T), taken on M's numerical range.
- `numerical_rank`, `nonzero_components`: which singular values count as non-zero (`zero_level`).

Every function works in at least float32 (LAPACK has no half-precision SVD) and returns that dtype.
"""

from __future__ import annotations

import torch

from composer.cpu import cpu_flags

RANDOMIZED_MIN_SIDE = 256  # a matrix whose smaller side is shorter than this gets the exact SVD
RANDOMIZED_MAX_SHARE = 0.25  # ... as does a request for more than this share of the smaller side (with oversampling)
OVERSAMPLING = 32  # extra sketch columns beyond k, at least
POWER_ITERATIONS = 2  # subspace iterations: task vectors' spectra decay slowly, and each sharpens the sketch
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
    down to about 1e-7 of the largest).

    A wide matrix is decomposed as its transpose: MKL's gesdd took 80 s on a 2048 x 5632 float32 matrix and
    24 s on its 5632 x 2048 transpose (2 cores)."""
    work = matrix.to(working_dtype(matrix.dtype))
    if work.shape[0] < work.shape[1]:
        u, s, vh = exact_svd(work.mT)
        return vh.mT, s, u.mT
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
    return side >= RANDOMIZED_MIN_SIDE and rank + oversampled_columns(rank) <= RANDOMIZED_MAX_SHARE * side


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
    oversampling: int | None = None,
    iterations: int = POWER_ITERATIONS,
    seed: int = SKETCH_SEED,
    products: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomised subspace iteration: Y = A Omega (Omega Gaussian, n x (k + p)), refined by `iterations` rounds
    of Y <- A span(A^T span(Y)), Q = span(span(Y)); then the SVD of the small Q^T A gives the triplets. The
    sketch is taken on the longer side so that Q is the larger factor. p is `oversampling`, by default
    `oversampled_columns`. The bases come from `orthonormal_span` (Cholesky QR, matrix products; taken twice for
    the last, whose columns must be orthonormal to rounding, as CholeskyQR2 does); the small SVD from the
    float64 Gram matrix of its k + p rows (`gram_svd`: 0.02 s against LAPACK's 0.19 s for 203 x 2048 on 2
    cores).

    The products that find the range (A Omega and the power iterations) run in `products`, by default
    `sketch_dtype`'s choice for the matrix: they only steer the basis, and the triplets come from Q^T A in the
    working dtype, so the approximation is the exact projection onto a basis found a little less precisely."""
    work = matrix.to(working_dtype(matrix.dtype))
    transposed = work.shape[0] < work.shape[1]
    if transposed:
        work = work.mT
    columns = min(rank + (oversampled_columns(rank) if oversampling is None else oversampling), min(work.shape))
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(work.shape[1], columns, generator=generator, dtype=work.dtype).to(work.device)
    if iterations == 0:
        sketch = work @ omega
    else:
        fast = products or sketch_dtype(work)
        steering = work.to(fast)
        sketch = (steering @ omega.to(fast)).to(work.dtype)
        for _ in range(iterations - 1):
            steered = (steering.mT @ orthonormal_span(sketch, fast)).to(work.dtype)
            sketch = (steering @ orthonormal_span(steered, fast)).to(work.dtype)
        steered = (steering.mT @ orthonormal_span(sketch, fast)).to(work.dtype)
        del steering
        # the last product in full: its columns lie in A's range to rounding, so a matrix of low rank comes out exact
        sketch = work @ orthonormal_span(steered)
    basis = orthonormal_span(orthonormal_span(sketch))  # Cholesky QR twice: orthonormal to rounding
    u, s, vh = gram_svd((basis.mT @ work).double())
    u = basis @ u[:, :rank].to(work.dtype)
    s, vh = s[:rank].to(work.dtype), vh[:rank].to(work.dtype)
    if transposed:
        return vh.mT, s, u.mT
    return u, s, vh


def sketch_dtype(matrix: torch.Tensor) -> torch.dtype:
    """bfloat16 for a float32 matrix on hardware that multiplies bfloat16 natively (a CPU with AVX512-BF16 or AMX,
    a GPU that supports it): there the sketch's products take a third of float32's time (bench/RESULTS.md).
    Otherwise, and for float64, the matrix's own dtype: emulated bfloat16 products are slower than float32's."""
    if matrix.dtype != torch.float32:
        return matrix.dtype
    if matrix.device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else matrix.dtype
    if matrix.device.type == "cpu" and cpu_multiplies_bfloat16():
        return torch.bfloat16
    return matrix.dtype


def cpu_multiplies_bfloat16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions, from Linux's /proc/cpuinfo (elsewhere: False)."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def oversampled_columns(rank: int) -> int:
    """The sketch's columns beyond `rank`: a quarter more, at least OVERSAMPLING (measured in
    tests/test_new_methods.py and bench/RESULTS.md: with 2 power iterations, extra columns cost less than a
    third iteration for the same error)."""
    return max(OVERSAMPLING, rank // 4)


def orthonormal_span(block: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Columns spanning `block`'s range by Cholesky QR: block L^-T for the float64 Cholesky factor L of its Gram
    matrix, orthonormal to about eps * cond(block)^2, enough for a power iteration's intermediate bases (their
    span is what counts, and the next round starts from it) at a third of Householder QR's time. A Gram matrix
    that is not positive definite (a block of lower rank than its width) takes Householder QR. The last
    product, and the result, are in `dtype` (by default the block's)."""
    dtype = dtype or block.dtype
    factor, info = torch.linalg.cholesky_ex((block.mT @ block).double())
    if info:
        return torch.linalg.qr(block).Q.to(dtype)
    identity = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    inverse = torch.linalg.solve_triangular(factor, identity, upper=False)
    return block.to(dtype) @ inverse.mT.to(dtype)


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
