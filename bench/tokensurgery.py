"""Tokenizer transplant quality and speed on real models.

SmolLM2-135M-Instruct is given the tokenizer of Gemma 3 270M (SentencePiece, 262144 tokens; its weights
give the donor embeddings) and of all-MiniLM-L6-v2 (WordPiece, 30522 tokens), with each estimator. Each
row: bits per byte on the English and Portuguese evaluation texts (each model scored with its own
tokenizer, so different tokenizers compare fairly) and the wall time of `compose transplant`.

    .venv/bin/python bench/tokensurgery.py [--estimators mapped,subword,omp,knn] [--donors gemma3,minilm] [--reference]

--reference also runs the field's reference tool (mergekit-tokensurgeon, subword method) on the Gemma 3
pair when mergekit imports (PYTHONPATH=/tmp/mk/src); without it, the figures issue 5 published for that
tool are printed, marked as such.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# this script shares its name with the package it measures: keep its own folder off the import path
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

EVAL = Path(os.environ.get("COMPOSER_EVAL_TEXTS", Path(__file__).resolve().parents[2] / "shared" / "eval"))
# measured by issue 5 with the reference tool on SmolLM2 <- Gemma 3 (2 CPU cores); not measured here
PUBLISHED_REFERENCE = [
    ("reference, kNN interpolation (best)", 0.816, 3.288, "16 min"),
    ("reference, subword", 0.829, 3.208, "1.5 min"),
    ("reference, OMP k=8", None, None, "~55 min (not finished)"),
]


def bits_per_byte(model_path: Path, texts: dict[str, str]) -> dict[str, float]:
    from composer.evaluate import load_model, score_text

    model, tokenizer = load_model(str(model_path))
    return {name: score_text(model, tokenizer, text).bits_per_byte for name, text in texts.items()}


def transplant(model: Path, donor: Path, estimator: str, out: Path) -> tuple[float, dict]:
    from composer.execute import ExecutionOptions
    from composer.transplant import TransplantOptions, run_transplant

    start = time.perf_counter()
    _, summary = run_transplant(
        str(model),
        str(donor),
        out,
        TransplantOptions(estimator=estimator),
        ExecutionOptions(force=True, progress=False),
    )
    return time.perf_counter() - start, summary.alignment


def reference_subword(model: Path, donor: Path, out: Path) -> float | None:
    """Wall time of mergekit-tokensurgeon (subword), or None when mergekit cannot run here."""
    try:
        importlib.import_module("mergekit.scripts.tokensurgeon")
    except Exception:
        return None
    start = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "mergekit.scripts.tokensurgeon",
        str(model),
        str(donor),
        str(out),
        "--approximation-method",
        "subword",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"reference tool failed: {result.stderr.strip().splitlines()[-1:]}")
        return None
    return time.perf_counter() - start


def row(label: str, english: float | None, portuguese: float | None, seconds: str, extra: str = "") -> str:
    show = lambda value: f"{value:>8.3f}" if value is not None else f"{'-':>8}"  # noqa: E731
    return f"{label:<44} {show(english)} {show(portuguese)} {seconds:>12}  {extra}"


def main() -> None:
    import torch

    from composer.bundled import gemma3_dir, smollm2_dir
    from composer.packages import minilm_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--estimators", default="mapped,subword,omp,knn")
    parser.add_argument("--donors", default="gemma3,minilm")
    parser.add_argument(
        "--reference", action="store_true", help="also run mergekit-tokensurgeon (subword) on the Gemma 3 pair"
    )
    arguments = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("COMPOSER_THREADS", "2")))
    texts = {name: (EVAL / f"{name}.txt").read_text() for name in ("en", "pt")}
    model = smollm2_dir()
    donors = {"gemma3": gemma3_dir, "minilm": minilm_dir}
    print(
        f"SmolLM2-135M-Instruct with another tokenizer; bits per byte on {EVAL}/en.txt and pt.txt; {torch.get_num_threads()} threads"
    )
    print(f"{'':<44} {'en':>8} {'pt':>8} {'time':>12}")
    own = bits_per_byte(model, texts)
    print(row("SmolLM2 with its own tokenizer", own["en"], own["pt"], "-"))
    with tempfile.TemporaryDirectory(prefix="bench-tokensurgery-") as scratch:
        out = Path(scratch) / "out"
        for donor_name in arguments.donors.split(","):
            donor = donors[donor_name]()
            for estimator in arguments.estimators.split(","):
                seconds, counts = transplant(model, donor, estimator, out)
                scores = bits_per_byte(out, texts)
                copied = counts["exact"] + counts["normalised"] + counts["special"]
                print(
                    row(
                        f"{donor_name} tokenizer, {estimator}",
                        scores["en"],
                        scores["pt"],
                        f"{seconds:.0f} s",
                        f"{copied} copied, {counts['new']} new",
                    ),
                    flush=True,
                )
                shutil.rmtree(out)
        seconds = reference_subword(model, gemma3_dir(), out) if arguments.reference else None
        if seconds is not None:
            scores = bits_per_byte(out, texts)
            print(row("reference (mergekit), subword, measured", scores["en"], scores["pt"], f"{seconds:.0f} s"))
        else:
            for label, english, portuguese, when in PUBLISHED_REFERENCE:
                print(row(label + " [issue 5]", english, portuguese, when))


if __name__ == "__main__":
    main()
