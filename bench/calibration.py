"""RegMean and RegMean++ on the real code and pt fine-tunes of SmolLM2-135M-Instruct (bench/finetunes.py): bits per
byte of each merge on each domain's held-out text (and /work/shared/eval/en.txt when present), beside the parents and
the plain average of the two fine-tunes (the fallback RegMean uses for every tensor that is not a linear layer's
weight), with the time and peak memory of each merge.

Each merge runs as its own `compose` process (`--memory-budget`, default 1GB), timed, with its peak resident memory.
The calibration text is the first `--tokens` tokens of each fine-tune's own training split (bench/tune.py's
`calibration_text`), never its held-out files.

    python bench/calibration.py [--tokens 2048] [--memory-budget 1GB] [--methods regmean regmean_plusplus]

Rows are printed as a markdown table (bench/RESULTS.md, "RegMean and RegMean++ on the domain fine-tunes").
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(Path(__file__).resolve().parent))  # finetunes.py and tune.py

RECIPE = """merge_method: {method}
models:
  - model: {code}
  - model: {pt}
{extra}"""


def merge(method: str, folders: dict[str, Path], work: Path, budget: str, extra: str = "") -> tuple[Path, float, float]:
    """(output folder, seconds, peak resident bytes) of one `compose` run of `method` on the two fine-tunes."""
    recipe = work / f"{method}.yml"
    recipe.write_text(RECIPE.format(method=method, code=folders["code"], pt=folders["pt"], extra=extra))
    out = work / method
    command = [sys.executable, "-m", "composer.cli", str(recipe), str(out), "--memory-budget", budget, "--no-progress"]
    command = ["nice", "-n", "10", *command] if os.nice(0) < 10 else command
    began = time.monotonic()
    child = subprocess.Popen(command, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the largest child's so far
    seconds = time.monotonic() - began
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"compose {method} failed ({child.returncode})")
    return out, seconds, usage.ru_maxrss * 1024


def knots_svd(size: int = 2048, adapters: int = 3, rank: int = 16) -> None:
    """KnOTS's SVD from the adapters' factors against torch.linalg.svd of the whole [size, adapters * size] matrix
    (float64 both): time and the largest relative error of the singular values and of the reconstruction."""
    import torch

    from composer.methods.knots import factored_svd

    generator = torch.Generator().manual_seed(0)
    lefts = [torch.randn(size, rank, generator=generator) / rank**0.5 for _ in range(adapters)]
    rights = [torch.randn(rank, size, generator=generator) / size**0.5 for _ in range(adapters)]
    began = time.perf_counter()
    u, s, vh = factored_svd(lefts, rights)
    factored = time.perf_counter() - began
    dense = torch.cat([left.double() @ right.double() for left, right in zip(lefts, rights)], dim=1)
    began = time.perf_counter()
    exact = torch.linalg.svdvals(dense)
    exact_seconds = time.perf_counter() - began
    values = ((s - exact[: s.numel()]).abs().max() / exact[0]).item()
    rebuilt = ((dense - (u * s) @ vh).abs().max() / dense.abs().max()).item()
    print(
        f"knots SVD of {adapters} rank-{rank} updates of [{size}, {size}]: from the factors {factored:.3f} s, "
        f"torch.linalg.svdvals of the whole matrix {exact_seconds:.2f} s; singular values within {values:.1e} of the "
        f"exact ones (relative to the largest), reconstruction within {rebuilt:.1e}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens of each domain's training text")
    parser.add_argument("--memory-budget", default="1GB")
    parser.add_argument("--methods", nargs="+", default=["linear", "regmean", "regmean_plusplus"])
    parser.add_argument("--wait", type=float, default=0, help="minutes to wait for the fine-tunes")
    parser.add_argument("--skip-parents", action="store_true", help="score only the merges")
    parser.add_argument("--knots-svd", action="store_true", help="only time KnOTS's factored SVD against the exact one")
    options = parser.parse_args()
    if options.knots_svd:
        knots_svd()
        return

    from finetunes import SHARED_EVAL, bits_per_byte
    from tune import calibration_text, fine_tunes

    from composer.bundled import smollm2_dir

    folders = fine_tunes(options.wait)
    texts = {
        f"{name} held-out": (folder / "heldout.txt").read_text(encoding="utf-8") for name, folder in folders.items()
    }
    if (SHARED_EVAL / "en.txt").is_file():
        texts["en.txt"] = (SHARED_EVAL / "en.txt").read_text(encoding="utf-8")
    header = (
        "| model | " + " | ".join(f"bits/byte, {name}" for name in texts) + " | mean held-out | merge s | peak RSS GB |"
    )
    rows = []

    def row(label: str, folder: Path, seconds: str = "-", peak: str = "-") -> None:
        scores = bits_per_byte(folder, texts)
        held = [scores[name] for name in texts if name.endswith("held-out")]
        line = (
            f"| {label} | "
            + " | ".join(f"{scores[name]:.4f}" for name in texts)
            + f" | {sum(held) / len(held):.4f} | {seconds} | {peak} |"
        )
        rows.append(line)
        print(line, flush=True)

    print(header + "\n|---|" + "---|" * (len(texts) + 3), flush=True)
    if not options.skip_parents:
        row("SmolLM2-135M-Instruct (base)", smollm2_dir())
        for name, folder in folders.items():
            row(f"{name} fine-tune", folder)
    with tempfile.TemporaryDirectory(prefix="composer-calibration-bench-") as scratch:
        work = Path(scratch)
        calibration = work / "calibration.txt"
        calibration.write_text(calibration_text("code", options.tokens) + calibration_text("pt", options.tokens))
        for method in options.methods:
            if method == "linear":
                extra = "parameters: {weight: 1.0}\n"
            else:
                extra = f"calibration_text: {calibration}\n"
            out, seconds, peak = merge(method, folders, work, options.memory_budget, extra)
            label = "average (linear, the fallback)" if method == "linear" else f"{method} (defaults)"
            row(label, out, f"{seconds:.1f}", f"{peak / 1e9:.2f}")
    print(
        f"\ncalibration: {options.tokens} tokens of each domain's training text; --memory-budget {options.memory_budget}"
    )


if __name__ == "__main__":
    main()
