"""What gathering units from the nodes' own disks costs: the same merge on a local Ray instance with two worker slots,
writing into OUT's partial folder (shared storage) and with --ray-local-disk (OUT hidden from the workers by the test
hook, so every unit is written to a scratch folder and gathered by the driver through the object store, 16 MB at a time).

    python bench/ray_local_disk.py [--models /tmp/composer-bench-models] [--methods passthrough] [--repeat 2]

The runs alternate (shared, local disk) `--repeat` times; every output's shards must have the bytes of a run in this
process. One disk and one machine: the gathered bytes are written twice (scratch, then OUT) and moved between processes
of one machine, so this is the overhead of the copy, not of a network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path

from ray_cluster import ray_options, recipe, run, shard_digests, start_ray

from composer.execute import ExecutionOptions
from composer.execute.cluster import HIDDEN_HOOK


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("/tmp/composer-bench-models"))
    parser.add_argument("--methods", default="passthrough")
    parser.add_argument("--out", type=Path, default=Path("/tmp/composer-ray-local-bench"))
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/composer-ray-scratch"))
    parser.add_argument("--shard-size", type=float, default=0.4, help="GB per output shard (so there are units)")
    parser.add_argument("--repeat", type=int, default=2)
    arguments = parser.parse_args()
    import ray

    layers = json.loads((arguments.models / "base" / "config.json").read_text())["num_hidden_layers"]
    budget, shard = int(1e9), int(arguments.shard_size * 1e9)
    shared = ray_options(budget, shard)
    local = ExecutionOptions(**(vars(shared) | {"ray_local_disk": str(arguments.scratch)}))
    out = arguments.out
    out.mkdir(parents=True, exist_ok=True)
    print("| method | OUT | wall s | units | GB written | GB gathered | same bytes |")
    print("|---|---|---|---|---|---|---|")
    start_ray(2, arguments.models, out, shared)
    try:
        for method in arguments.methods.split(","):
            text = recipe(method, arguments.models, layers)
            reference = None
            times: dict[str, list[float]] = {"shared": [], "local disk": []}
            for _ in range(arguments.repeat):
                for kind, options in (("shared", shared), ("local disk", local)):
                    if kind == "local disk":
                        os.environ[HIDDEN_HOOK] = str(out)
                    try:
                        seconds, report = run(text, out / method, options, arguments.models)
                    finally:
                        os.environ.pop(HIDDEN_HOOK, None)
                    found = shard_digests(out / method)
                    reference = reference or found
                    shutil.rmtree(out / method)
                    times[kind].append(seconds)
                    gathered = sum(node.gathered for node in report.nodes) / 1e9
                    print(
                        f"| {method} | {kind} | {seconds:.1f} | {len(report.units)} | {report.bytes_written / 1e9:.2f} | "
                        f"{gathered:.2f} | {found == reference} |"
                    )
            ratio = statistics.median(times["local disk"]) / statistics.median(times["shared"])
            print(f"| {method} | local disk / shared, medians | **{ratio:.2f}** | | | | |")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
