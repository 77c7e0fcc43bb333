"""Milliseconds per tensor of the task-arithmetic family, fused (chunked) path beside the whole-tensor
reference path, on one 5632 x 2048 bf16 tensor (a Llama MLP weight) with a base and three fine-tunes.
The fused path is timed twice: in torch operations (`COMPOSER_NATIVE=0`) and through the C kernels
of composer.native ("C ms"; the same as torch where they cannot be built).

    python bench/method_kernels.py [--repeat 3] [--methods ties,dare_ties] [--shape 5632,2048]

The two paths run alternately in one process and the best of `--repeat` runs is printed (machines
are noisy). "temporaries" is the size of what each path allocates beyond its inputs and output,
worked out from the code rather than measured (tracemalloc does not see torch's allocations):
the reference holds k deltas, two float32 mask buffers and a float32 accumulator; the fused path
one chunk per model plus a mask per model for the random methods (one bit per entry).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from composer.methods.task_arithmetic import generalized_task_arithmetic, reference_generalized_task_arithmetic
from composer.methods.task_arithmetic.chunked import CHUNK

DENSITY = 0.5
METHODS = {
    "task_arithmetic": {},
    "ties": {"sparsification": "magnitude", "consensus": True, "normalize": True},
    "dare_linear": {"sparsification": "random", "rescale": True},
    "dare_ties": {"sparsification": "random", "consensus": True, "rescale": True},
    "breadcrumbs": {"sparsification": "magnitude_outliers"},
    "breadcrumbs_ties": {"sparsification": "magnitude_outliers", "consensus": True},
    "della": {"sparsification": "della_magprune", "consensus": True, "normalize": True, "rescale": True},
    "della_linear": {"sparsification": "della_magprune", "rescale": True},
}


def temporaries_mb(method: str, n: int, k: int, itemsize: int, fused: bool) -> float:
    arguments = METHODS[method]
    sparse = "sparsification" in arguments
    if fused:
        chunk = min(n, CHUNK)
        # deltas, magnitudes, two masks, the sum, the sign-election workspace (2), the kept weights (float32)
        size = chunk * (k * itemsize + 6 * itemsize + 4)
        if arguments.get("sparsification") in ("random", "della_magprune"):
            size += k * n / 8  # one bit mask per model
        return size / 1e6
    size = k * n * itemsize + n * 4  # stacked deltas, float32 accumulator (sum / kept weights)
    if sparse:
        size += 2 * n * 4  # the float32 mask workspace
    if arguments.get("consensus"):
        size += 2 * n * itemsize  # the sign-election workspace
    return size / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--shape", default="5632,2048")
    args = parser.parse_args()
    shape = tuple(int(size) for size in args.shape.split(","))
    generator = torch.Generator().manual_seed(0)
    base = (torch.randn(shape, generator=generator) * 0.02).bfloat16()
    models = [(base.float() + torch.randn(shape, generator=generator) * 0.002).bfloat16() for _ in range(3)]
    weights = [0.4, 0.3, 0.3]
    n = base.numel()
    print(
        f"{shape} bf16, base + {len(models)} models, density {DENSITY}, {torch.get_num_threads()} threads, best of {args.repeat}"
    )
    print(
        "| method | reference ms | fused ms | C ms | speed-up (C) | same bits | reference temporaries MB | fused temporaries MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    paths = {
        "reference": (reference_generalized_task_arithmetic, "0"),
        "fused": (generalized_task_arithmetic, "0"),
        "C": (generalized_task_arithmetic, "1"),
    }
    for method in args.methods.split(","):
        arguments = dict(METHODS[method])
        if "sparsification" in arguments:
            arguments["densities"] = [DENSITY] * len(models)
        times = {name: [] for name in paths}
        results = {}
        for _ in range(args.repeat):
            for name, (function, kernels) in paths.items():
                os.environ["COMPOSER_NATIVE"] = kernels
                started = time.perf_counter()
                results[name] = function(models, base, weights, generator=1, **arguments)
                times[name].append((time.perf_counter() - started) * 1000)
        reference, fused, compiled = (min(values) for values in times.values())
        same = torch.equal(results["reference"], results["fused"]) and torch.equal(results["fused"], results["C"])
        print(
            f"| {method} | {reference:.0f} | {fused:.0f} | {compiled:.0f} | {reference / compiled:.1f}x | {'yes' if same else 'NO'} | "
            f"{temporaries_mb(method, n, len(models), 2, False):.0f} | {temporaries_mb(method, n, len(models), 2, True):.0f} |"
        )


if __name__ == "__main__":
    main()
