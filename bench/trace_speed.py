"""The cost of `compose trace` against reading its files once (issue 17: "a trace of a 3x1.7 GB case costs at most
about twice the time of reading the files once").

    python bench/synthetic.py /tmp/synth-trace --count 2
    compose run linear.yml /tmp/synth-trace/merge-linear      # model-1 0.35 + model-2 0.65, bf16; card removed
    nice python bench/trace_speed.py /tmp/synth-trace/merge-linear /tmp/synth-trace/model-1 /tmp/synth-trace/model-2

Each round reads every weight file once (pread into one buffer, warm page cache: bench/io_floor.py), then runs
`compose trace SUSPECT --candidates ...` in a child process (wall time, peak RSS); rounds alternate so a loaded
machine weighs on both alike. Prints each round and the best of each.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from io_floor import read_seconds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else [folder]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("suspect", type=Path)
    parser.add_argument("candidates", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--extra", default="", help="more arguments for compose trace, space-separated")
    options = parser.parse_args()
    files = [path for model in (options.suspect, *options.candidates) for path in weight_files(model)]
    read_seconds(files)  # warm the page cache
    command = [sys.executable, "-m", "composer.cli", "trace", str(options.suspect), "--candidates"]
    command += [str(c) for c in options.candidates] + options.extra.split()
    rounds = []
    for number in range(options.rounds):
        reading, total = read_seconds(files)
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        tracing = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        row = {
            "round": number,
            "read_s": round(reading, 2),
            "trace_s": round(tracing, 1),
            "ratio": round(tracing / reading, 2),
        }
        rounds.append(row | {"children_peak_rss_mb": round(peak)})
        print(json.dumps(rounds[-1]), flush=True)
    best_read = min(r["read_s"] for r in rounds)
    best_trace = min(r["trace_s"] for r in rounds)
    print(
        f"{total / 1e9:.2f} GB in {len(files)} files: read once {best_read:.2f} s (best), trace {best_trace:.1f} s (best), "
        f"ratio {best_trace / best_read:.1f}"
    )


if __name__ == "__main__":
    main()
