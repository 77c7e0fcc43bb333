"""Does composer give mergekit's weights? Runs every config of tests/test_mergekit_parity.py through both
tools on tiny random models and prints one markdown table: the largest absolute difference over all
output tensors, and whether the outputs are bit-identical.

    MERGEKIT_PYTHONPATH=/path/to/mergekit/src:/path/to/its/deps python bench/mergekit_parity.py [--family llama|qwen3]

mergekit is never a dependency of composer: it is taken from MERGEKIT_PYTHONPATH or the environment.
Random methods (DARE, DELLA) draw different masks in the two tools, so they are never identical; the
test compares their statistics instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [entry for entry in os.environ.get("MERGEKIT_PYTHONPATH", "").split(os.pathsep) if entry]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--family", default="llama", choices=("llama", "qwen3"), help="tiny random model family (default llama)"
    )
    arguments = parser.parse_args()
    try:
        import mergekit.merge  # noqa: F401
    except ImportError as error:
        print(
            f"mergekit is not importable ({error}); set MERGEKIT_PYTHONPATH to its unpacked source and requirements",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from test_mergekit_parity import (
        DETERMINISTIC,
        KNOWN_GAPS,
        MERGEKIT_FAILS,
        RANDOM,
        make_models,
        max_difference,
        run_composer,
        run_mergekit,
    )

    print(f"| config ({arguments.family}) | kind | max abs difference | identical | known gap |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="mergekit-parity-") as scratch:
        root = Path(scratch)
        models = make_models(root / "models", arguments.family)
        for kind, cases in (("deterministic", DETERMINISTIC), ("random", RANDOM)):
            for case in sorted(cases):
                if (arguments.family, case) in MERGEKIT_FAILS:
                    print(f"| {case} | {kind} | mergekit fails | - | |")
                    continue
                config = cases[case].format(**models)
                ours, theirs = (
                    run_composer(config, root / case / "composer"),
                    run_mergekit(config, root / case / "mergekit"),
                )
                if ours.keys() != theirs.keys():
                    print(f"| {case} | {kind} | different tensor names | no | |")
                    continue
                identical = all(torch.equal(ours[name], tensor) for name, tensor in theirs.items())
                print(
                    f"| {case} | {kind} | {max_difference(ours, theirs):.3g} | {'yes' if identical else 'no'} | {KNOWN_GAPS.get(case, '')} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
