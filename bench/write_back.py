"""Does starting write-back early (sync_file_range on each tensor as it is written) even out merges that start on a
busy disk? Runs `compose` back to back with no `sync` between runs, so each run starts while the kernel is still
writing back the one before, in blocks of one mode (COMPOSER_WRITE_BACK=1: early write-back, =0: the page cache
as usual), the blocks alternating; prints each run's wall time and, per mode, the median and spread of the runs
after each block's first (those that start on a disk the same mode left busy).

    python bench/write_back.py [--models DIR] [--recipe linear] [--blocks 4] [--runs 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from compare import recipes  # noqa: E402


def dirty_megabytes() -> float:
    """Dirty plus under-writeback page cache, MB (Linux /proc/meminfo)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return sum(int(fields[key].split()[0]) for key in ("Dirty", "Writeback")) / 1024
    except (OSError, KeyError, ValueError):
        return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "composer-bench-models")
    parser.add_argument("--recipe", default="linear", help="name prefix of a bench/compare.py recipe")
    parser.add_argument("--blocks", type=int, default=4, help="blocks of runs, alternating the mode")
    parser.add_argument("--runs", type=int, default=4, help="back-to-back runs in a block")
    arguments = parser.parse_args()
    name, (text, _) = next((n, r) for n, r in recipes(arguments.models).items() if n.startswith(arguments.recipe))
    work = arguments.models / "outputs"
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "write-back-recipe.yml"
    recipe.write_text(text)
    walls: dict[str, list[float]] = {"0": [], "1": []}
    print(f"{name}: {arguments.blocks} blocks of {arguments.runs} back-to-back runs, modes alternating", flush=True)
    for block in range(arguments.blocks):
        mode = "1" if block % 2 else "0"
        os.sync()  # each block starts from a quiet disk; its runs then follow each other with no sync
        for run in range(arguments.runs):
            out = work / f"write-back-out-{run % 2}"  # the run before's output stays, as a user's would
            dirty = dirty_megabytes()
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "composer.cli", str(recipe), str(out), "--force", "--no-progress"],
                check=True,
                capture_output=True,
                env=dict(os.environ, COMPOSER_WRITE_BACK=mode),
            )
            wall = time.perf_counter() - started
            if run:
                walls[mode].append(wall)
            print(
                f"block {block + 1} write-back {'on ' if mode == '1' else 'off'} run {run + 1}: {wall:.1f} s "
                f"(dirty at start {dirty:.0f} MB, load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    for mode, label in (("0", "off"), ("1", "on")):
        runs = walls[mode]
        if runs:
            print(
                f"write-back {label}: median {statistics.median(runs):.1f} s, {min(runs):.1f}-{max(runs):.1f} s "
                f"over {len(runs)} runs that started on a busy disk"
            )


if __name__ == "__main__":
    main()
