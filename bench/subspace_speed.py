"""Compute time of the subspace and PCB merges against TIES on the shapes of the bench's synthetic models (issue 20's
speed target: an SVD-based method on the 3 x 1.7 GB models within 3x of TIES's time).

Each method's registered function (what the executor calls for one output tensor) runs on bf16 tensors of one
layer's shapes (a base and three fine-tunes, the base plus small low-rank-and-noise changes), as bench/compare.py's
recipes merge them (`dtype: bfloat16`: TIES through its C kernels, the SVD methods in float32 inside); a model's
time is a layer's times the layer count, plus the embedding and the head. Reading and writing are left out (TIES's
whole run on these models is mostly I/O: bench/RESULTS.md, runs 9-12), so this is the part of a merge the method
adds. The shapes are bench/synthetic.py's defaults (hidden 2048, intermediate 5632, 16 layers, vocabulary 32000,
32 heads and 4 key-value heads of 64: 256 x 2048 k and v), 1.67 GB a model in bf16.

OpenMP's threads wait passively, as under the `compose` command (composer/cli.py sets OMP_WAIT_POLICY before torch
loads): spinning threads on a loaded machine made the small LAPACK calls of a randomised SVD (a 203 x 203 eigh)
take 1.5 s instead of 0.02 s. --repeat takes each cell's fastest of several runs, for a machine others load; the
model's CPU seconds (the process's, all threads) beside its wall seconds vary less with that load.

    python bench/subspace_speed.py [--methods ties,tsv,iso_c,iso_cts,cart,pcb] [--threads 2] [--embedding]
                                   [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from composer.methods import METHODS  # noqa: E402

LAYER = {  # name -> (shape, per layer)
    "q_proj, o_proj": ((2048, 2048), 2),
    "k_proj, v_proj": ((256, 2048), 2),
    "gate_proj, up_proj": ((5632, 2048), 2),
    "down_proj": ((2048, 5632), 1),
}
EDGES = {"embed_tokens, lm_head": ((32000, 2048), 2)}
LAYERS = 16
MODELS = 3
PARAMETERS = {"ties": {"weight": [0.4, 0.3, 0.3], "density": [0.5] * MODELS}}  # as bench/compare.py's recipe


def inputs(shape: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator) * 0.02
    tuned = []
    for _ in range(MODELS):
        change = torch.randn(shape[0], 32, generator=generator) @ torch.randn(32, shape[1], generator=generator)
        change = change * 1e-4 + torch.randn(shape, generator=generator) * 2e-5
        tuned.append((base + change).to(torch.bfloat16))
    return base.to(torch.bfloat16), tuned


def parameters(name: str) -> dict:
    method = METHODS[name]
    params = {p.name: ([p.default] * MODELS if p.per_model else p.default) for p in method.parameters}
    return params | PARAMETERS.get(name, {}) | {"seed": 0}


def seconds(name: str, shape: tuple[int, int], repeat: int = 1) -> tuple[float, float]:
    """(wall, CPU) seconds of one tensor's merge: the fastest of `repeat` runs."""
    base, tuned = inputs(shape)
    wall = cpu = float("inf")
    for _ in range(repeat):
        began, began_cpu = time.perf_counter(), time.process_time()
        METHODS[name].apply(tuned, base, parameters(name))
        wall, cpu = min(wall, time.perf_counter() - began), min(cpu, time.process_time() - began_cpu)
    return wall, cpu


def model_seconds(times: dict[str, float]) -> float:
    """A layer's times the layer count, plus the embedding and head where timed."""
    layer = sum(times[key] * LAYER[key][1] for key in LAYER)
    return layer * LAYERS + sum(times[key] * EDGES[key][1] for key in EDGES if key in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="ties,tsv,iso_c,iso_cts,cart,pcb")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--embedding", action="store_true", help="also time the 32000 x 2048 embedding and head")
    parser.add_argument("--repeat", type=int, default=1, help="each cell's fastest of this many runs")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    shapes = LAYER | (EDGES if options.embedding else {})
    print(
        "| method | "
        + " | ".join(f"{name} {s[0]}x{s[1]}" for name, (s, _) in shapes.items())
        + " | model | model CPU |"
    )
    print("|---|" + "---|" * (len(shapes) + 2))
    for name in options.methods.split(","):
        times = {key: seconds(name, shape, options.repeat) for key, (shape, _) in shapes.items()}
        wall = model_seconds({key: value[0] for key, value in times.items()})
        cpu = model_seconds({key: value[1] for key, value in times.items()})
        cells = " | ".join(f"{times[key][0]:.2f} s" for key in shapes)
        print(f"| {name} | {cells} | {wall:.0f} s | {cpu:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
