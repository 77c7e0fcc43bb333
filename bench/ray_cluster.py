"""A merge in one process against the same merge on a local Ray instance with one and with two worker slots.

    python bench/ray_cluster.py [--models /tmp/composer-bench-models] [--methods ties,passthrough] [--out DIR]

The models are bench/synthetic.py's (base, model-1, model-2). For each method the script runs the merge in this
process, then on a Ray instance started here with `num_cpus` 1, then `--repeat` times in turn in this process and on
an instance with `num_cpus` 2 (the shared machine's load drifts, so each two-worker run is compared with the
one-process run just before it). Each instance first runs one small merge, so that its workers have imported torch
and composer, as on a cluster that is already up. Every output's shards must have the bytes of the first run. The inputs are read once before each run, so every run finds them in
the page cache. It prints one line per run (wall time, the cluster's join-and-check time, units, bytes) and, per
Ray run, each unit's bytes and time, as Markdown for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI and the workers set it, before torch loads

from composer.compose import compose_text  # noqa: E402
from composer.execute import ExecutionOptions  # noqa: E402

CHUNK = 64 << 20


def recipe(method: str, models: Path, layers: int) -> str:
    if method == "passthrough":  # SOLAR-style: the first layers and the last ones, overlapping
        cut = layers // 4
        return f"""merge_method: passthrough
slices:
  - sources: [{{model: {models / 'base'}, layer_range: [0, {layers - cut}]}}]
  - sources: [{{model: {models / 'base'}, layer_range: [{cut}, {layers}]}}]
dtype: bfloat16
"""
    parents = "\n".join(
        f"  - model: {models / name}\n    parameters: {{weight: 0.5, density: 0.5}}" for name in ("model-1", "model-2")
    )
    return f"merge_method: {method}\nbase_model: {models / 'base'}\nmodels:\n{parents}\ndtype: bfloat16\n"


def read_once(folder: Path) -> None:
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as handle:
            while handle.read(CHUNK):
                pass


def shard_digests(folder: Path) -> dict[str, str]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while piece := handle.read(CHUNK):
                digest.update(piece)
        found[path.name] = digest.hexdigest()
    return found


def run(text: str, out: Path, options: ExecutionOptions, models: Path) -> tuple[float, object]:
    shutil.rmtree(out, ignore_errors=True)
    for name in ("base", "model-1", "model-2"):
        read_once(models / name)
    started = time.perf_counter()
    report = compose_text(text, out, options)
    return time.perf_counter() - started, report


def describe_units(report) -> list[str]:
    lines = ["| unit | node | tensors | MB written | MB read | s | MB/s written |", "|---|---|---|---|---|---|---|"]
    for unit in sorted(report.units, key=lambda unit: unit.number):
        lines.append(
            f"| {unit.number} | {unit.node} | {unit.tensors} | {unit.bytes_written / 1e6:.0f} | "
            f"{unit.bytes_read / 1e6:.0f} | {unit.seconds:.1f} | {unit.bytes_written / 1e6 / max(unit.seconds, 1e-9):.0f} |"
        )
    return lines


def ray_options(budget: int, shard: int) -> ExecutionOptions:
    return ExecutionOptions(memory_budget=budget, whole_process=True, shard_size=shard, progress=False, ray="local")


def start_ray(workers: int, models: Path, out: Path, options: ExecutionOptions) -> float:
    """A local Ray instance with `workers` CPUs, its workers warmed up by one small merge; the seconds it took to start."""
    import ray

    began = time.perf_counter()
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter() - began
    warm = f"merge_method: passthrough\nslices:\n  - sources: [{{model: {models / 'base'}, layer_range: [0, 1]}}]\n"
    compose_text(warm, out / "warm-up", options)  # the workers import torch and composer
    shutil.rmtree(out / "warm-up")
    return started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("/tmp/composer-bench-models"))
    parser.add_argument("--methods", default="ties,passthrough")
    parser.add_argument("--out", type=Path, default=Path("/tmp/composer-ray-bench"))
    parser.add_argument("--memory-budget", type=float, default=1.0, help="GB, for the process and for each worker")
    parser.add_argument("--shard-size", type=float, default=0.4, help="GB per output shard (so there are units)")
    parser.add_argument("--repeat", type=int, default=3, help="pairs of one-process and two-worker runs, in turn")
    arguments = parser.parse_args()
    import json
    import statistics

    import ray

    layers = json.loads((arguments.models / "base" / "config.json").read_text())["num_hidden_layers"]
    budget, shard = int(arguments.memory_budget * 1e9), int(arguments.shard_size * 1e9)
    local = ExecutionOptions(memory_budget=budget, whole_process=True, shard_size=shard, progress=False)
    on_ray = ray_options(budget, shard)
    out = arguments.out
    out.mkdir(parents=True, exist_ok=True)
    rows, details = [], []

    def timed(method: str, text: str, options: ExecutionOptions, reference: dict | None) -> tuple[float, object, bool]:
        folder = out / method
        seconds, report = run(text, folder, options, arguments.models)
        same = reference is None or shard_digests(folder) == reference
        shutil.rmtree(folder)
        return seconds, report, same

    for method in arguments.methods.split(","):
        text = recipe(method, arguments.models, layers)
        seconds, report = run(text, out / method, local, arguments.models)
        reference = shard_digests(out / method)
        shutil.rmtree(out / method)
        written = report.bytes_written / 1e9
        rows.append(f"| {method} | one process (reference) | {seconds:.1f} | | | {written:.2f} | |")
        started = start_ray(1, arguments.models, out, on_ray)
        ray_seconds, report, same = timed(method, text, on_ray, reference)
        ray.shutdown()
        rows.append(
            f"| {method} | Ray, 1 worker | {ray_seconds:.1f} | {report.cluster_seconds:.1f} | {len(report.units)} | "
            f"{written:.2f} | {ray_seconds / seconds:.2f} against the reference |{'' if same else ' BYTES DIFFER'}"
        )
        details += [f"\n{method}, Ray with 1 worker (instance started in {started:.1f} s):", ""]
        details += describe_units(report)
        started = start_ray(2, arguments.models, out, on_ray)
        pairs = []
        for _ in range(arguments.repeat):
            one, _, _ = timed(method, text, local, None)
            two, report, same = timed(method, text, on_ray, reference)
            pairs.append((one, two))
            rows.append(
                f"| {method} | one process, then Ray with 2 workers | {one:.1f}, {two:.1f} | {report.cluster_seconds:.1f} | "
                f"{len(report.units)} | {written:.2f} | {two / one:.2f} |{'' if same else ' BYTES DIFFER'}"
            )
        ray.shutdown()
        ratio = statistics.median(two for _, two in pairs) / statistics.median(one for one, _ in pairs)
        rows.append(f"| {method} | medians of the pairs | | | | | **{ratio:.2f}** |")
        details += [f"\n{method}, Ray with 2 workers, the last run (instance started in {started:.1f} s):", ""]
        details += describe_units(report)
    print("| method | run | wall s | join + checks s | units | GB written | Ray / one process |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n".join(details))


if __name__ == "__main__":
    main()
