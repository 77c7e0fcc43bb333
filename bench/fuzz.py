"""Fuzz the parsers of files from strangers for longer than CI does, and count what happened.

    python bench/fuzz.py --examples 20000                  # every target
    python bench/fuzz.py --examples 5000 --target gguf --seed 7

Runs the properties of tests/fuzz_properties.py (any input ends in a correct result or one ComposerError,
within a time limit) with random inputs, and prints per target how many inputs it tried, how many were
accepted, and how many refusals of each kind it saw. A property that fails stops the run with the smallest
failing input hypothesis finds.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, given, seed, settings

from fuzz_properties import PROPERTIES


def run(target: str, examples: int, random_seed: int | None) -> tuple[Counter, float]:
    strategy, check = PROPERTIES[target]
    seen: Counter = Counter()

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy())
    def fuzz(value):
        seen[check(value)] += 1

    if random_seed is not None:
        fuzz = seed(random_seed)(fuzz)
    started = time.perf_counter()
    fuzz()
    return seen, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20000, help="inputs to try for each target")
    parser.add_argument(
        "--target", choices=sorted(PROPERTIES), action="append", help="only these targets (default: all)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for a reproducible run")
    parser.add_argument("--kinds", type=int, default=12, help="refusal kinds to list for each target")
    arguments = parser.parse_args()
    for target in arguments.target or list(PROPERTIES):
        seen, seconds = run(target, arguments.examples, arguments.seed)
        tried = sum(seen.values())
        refused = tried - seen["ok"]
        print(
            f"{target}: {tried} inputs in {seconds:.1f} s ({seconds / max(tried, 1) * 1000:.1f} ms each): "
            f"{seen['ok']} accepted, {refused} refused with a ComposerError, 0 other exceptions"
        )
        kinds = [(kind, count) for kind, count in seen.most_common() if kind != "ok"]
        for kind, count in kinds[: arguments.kinds]:
            print(f"  {count:>7}  {kind}")
        if len(kinds) > arguments.kinds:
            print(
                f"  {sum(count for _, count in kinds[arguments.kinds :]):>7}  ({len(kinds) - arguments.kinds} other kinds)"
            )


if __name__ == "__main__":
    main()
