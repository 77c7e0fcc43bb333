"""Truncated SVD for extract-lora: full torch.linalg.svd against torch.svd_lowrank (randomised, with power
iterations). Prints time and the relative Frobenius error of the rank-r approximation for task-vector-like
matrices (power-law spectra, and the difference of two real SmolLM2 layers), so the switch-over can be chosen."""

from __future__ import annotations

import time

import torch


def power_law(rows: int, columns: int, decay: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    k = min(rows, columns)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(columns, k, generator=generator))
    spectrum = torch.arange(1, k + 1, dtype=torch.float32) ** -decay
    return (u * spectrum) @ v.T


def relative_error(matrix: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> float:
    return (torch.linalg.matrix_norm(matrix - (u * s) @ v.T) / torch.linalg.matrix_norm(matrix)).item()


def compare(label: str, matrix: torch.Tensor, rank: int) -> None:
    started = time.perf_counter()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    full_seconds = time.perf_counter() - started
    best = relative_error(matrix, u[:, :rank], s[:rank], vh[:rank].T)
    line = f"{label:<34} r={rank:<4} full {full_seconds:6.2f}s err {best:.4f}"
    for niter in (2, 4, 6):
        started = time.perf_counter()
        u, s, v = torch.svd_lowrank(matrix, q=min(rank + 10, min(matrix.shape)), niter=niter)
        seconds = time.perf_counter() - started
        error = relative_error(matrix, u[:, :rank], s[:rank], v[:, :rank])
        line += f" | lowrank niter={niter} {seconds:5.2f}s err {error:.4f} (+{(error - best) / best * 100:.2f}%)"
    print(line, flush=True)


def main() -> None:
    torch.manual_seed(0)
    for rows, columns in ((576, 1536), (1024, 2816), (2048, 2048)):
        for decay in (0.5, 1.0):
            matrix = power_law(rows, columns, decay)
            for rank in (16, 64):
                compare(f"{rows}x{columns} power law {decay}", matrix, rank)
    from safetensors import safe_open

    from composer.bundled import smollm2_dir

    with safe_open(str(smollm2_dir() / "model.safetensors"), "pt") as handle:
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
            delta = handle.get_tensor(f"model.layers.11.{suffix}") - handle.get_tensor(f"model.layers.10.{suffix}")
            for rank in (16, 64):
                compare(f"SmolLM2 layer 11-10 {suffix.split('.')[1]}", delta, rank)


if __name__ == "__main__":
    main()
