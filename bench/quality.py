"""The quality table of merge methods on real fine-tunes (issue 20): SmolLM2-135M-Instruct and its code and pt
fine-tunes of bench/finetunes.py (built there first when not cached), each method merged with its documented
defaults by `compose` in a child process (--memory-budget 1GB, the CLI's default), then scored.

Columns: bits per byte on each fine-tune's held-out text (`heldout.txt`: files never trained on), their mean, on
general English (/work/shared/eval/en.txt when present), the merge's wall time and the child's peak RSS.

    python bench/quality.py [--only tsv,iso_c] [--results FILE] [--svd-errors] [--fresh]

Results are kept per row in a JSON file (default $COMPOSER_CACHE/quality/results.json, keyed by the row's
recipe), so a run that stops resumes where it was; --fresh scores everything again.

A row is a `Row`: its label, method, per-model parameters (code first, then pt) and top-level parameters, and
`top_level` recipe keys. A calibration-based method adds its text there (`calibration_text: FILE`), and one that
merges adapters gives `references` (the models' references, e.g. BASE+ADAPTER), so RegMean or KnOTS rows are one
more entry in ROWS.
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # as the CLI sets it: spinning OpenMP threads slow scoring on busy cores

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(Path(__file__).resolve().parent))  # finetunes.py, compare.py

from compare import run_child  # noqa: E402
from finetunes import BENCH_SETTINGS, SHARED_EVAL, bench_corpora, bits_per_byte, finetune  # noqa: E402

MEMORY_BUDGET = "1GB"
DOMAINS = ("code", "pt")


@dataclass(frozen=True)
class Row:
    """One merge of the table. `per_model`: parameter -> (code value, pt value); `parameters`: the top-level
    ones; `top_level`: other recipe keys (calibration_text, lines, ...); `references(folders)`: the models'
    references in domain order when they are not the fine-tunes' folders (adapters on the base, say)."""

    label: str
    method: str
    per_model: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    top_level: dict = field(default_factory=dict)
    base: bool = True
    references: Callable[[dict], list[str]] | None = None

    def recipe(self, folders: dict[str, Path]) -> str:
        import yaml

        references = self.references(folders) if self.references else [str(folders[name]) for name in DOMAINS]
        models = []
        for i, reference in enumerate(references):
            own = {key: values[i] for key, values in self.per_model.items()}
            models.append({"model": reference} | ({"parameters": own} if own else {}))
        document = {"merge_method": self.method} | ({"base_model": str(folders["base"])} if self.base else {})
        document["models"] = models
        if self.parameters:
            document["parameters"] = dict(self.parameters)
        document |= dict(self.top_level) | {"dtype": "float32"}
        return yaml.safe_dump(document, sort_keys=False)


HALF = {"weight": (0.5, 0.5)}
ONE = {"weight": (1.0, 1.0)}
ROWS = [
    # mergekit's methods: weight has no default, so the table gives the average (0.5 each) and, for task
    # arithmetic, also the plain sum (1 each), which the new methods' defaults merge; density's default is 1
    # (nothing dropped), so TIES and DARE-TIES also get the 0.5 that mergekit's examples use
    Row("task_arithmetic, weights 0.5", "task_arithmetic", HALF),
    Row("task_arithmetic, weights 1 (the sum)", "task_arithmetic", ONE),
    Row("ties, weights 1 (density 1)", "ties", ONE),
    Row("ties, weights 1, density 0.5", "ties", {**ONE, "density": (0.5, 0.5)}),
    Row("dare_ties, weights 0.5, density 0.5", "dare_ties", {**HALF, "density": (0.5, 0.5)}),
    Row("model_stock", "model_stock"),
    # the new methods, each with its documented defaults
    Row("tsv (lambda 1, rank r/2)", "tsv"),
    Row("iso_c (lambda 1)", "iso_c"),
    Row("iso_cts (lambda 1, common 0.8)", "iso_cts"),
    Row("cart (lambda 1, rank 8%)", "cart"),
    Row("pcb (lambda 1, density 0.1)", "pcb"),
    # the methods whose default merges a sum of task vectors (lambda 1), at half of it: the scale at which task
    # arithmetic's average is compared
    Row("tsv, lambda 0.5", "tsv", parameters={"lambda": 0.5}),
    Row("iso_c, lambda 0.5", "iso_c", parameters={"lambda": 0.5}),
    Row("iso_cts, lambda 0.5", "iso_cts", parameters={"lambda": 0.5}),
]


def fine_tune_folders() -> dict[str, Path]:
    from composer.bundled import smollm2_dir

    base, corpora = smollm2_dir(), bench_corpora()
    return {"base": Path(base)} | {name: finetune(base, corpora[name], BENCH_SETTINGS[name]) for name in DOMAINS}


def texts_of(folders: dict[str, Path]) -> dict[str, str]:
    texts = {f"{name} held-out": (folders[name] / "heldout.txt").read_text(encoding="utf-8") for name in DOMAINS}
    if (SHARED_EVAL / "en.txt").is_file():
        texts["en.txt"] = (SHARED_EVAL / "en.txt").read_text(encoding="utf-8")
    return texts


def row_key(recipe: str, texts: dict[str, str]) -> str:
    digest = hashlib.sha256(recipe.encode())
    for name, text in sorted(texts.items()):
        digest.update(f"\0{name}\0{text}".encode())
    return digest.hexdigest()[:16]


def merge_and_score(row: Row, folders: dict[str, Path], texts: dict[str, str], scratch: Path) -> dict:
    recipe_path = scratch / "recipe.yml"
    recipe_path.write_text(row.recipe(folders), encoding="utf-8")
    out = scratch / "out"
    command = [
        sys.executable,
        "-c",
        "import sys; from composer.cli import main; sys.argv[0] = 'compose'; main()",
        str(recipe_path),
        str(out),
        "--memory-budget",
        MEMORY_BUDGET,
        "--no-progress",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    wall, peak_gb, status, tail = run_child(command, env)
    if status != 0:
        raise SystemExit(f"{row.label}: compose failed ({status}):\n{tail}")
    try:
        scores = bits_per_byte(out, texts)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"scores": scores, "seconds": wall, "peak_gb": peak_gb}


def svd_errors(folders: dict[str, Path]) -> list[str]:
    """The randomised solver against an exact SVD on the real task vectors (code fine-tune minus base), at
    CART's default rank (8% of the smaller side) and at 16%: the rank-k approximation's error above the best
    one's, and the largest relative error of the k singular values."""
    import time

    import torch

    from composer.methods.svd import randomized_svd
    from composer.sources import open_source

    base, tuned = open_source(str(folders["base"])), open_source(str(folders["code"]))
    lines = [
        "| matrix | shape | k | error above the best rank-k | largest singular value error | randomised s | exact s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in (
        "model.layers.10.self_attn.q_proj.weight",
        "model.layers.10.mlp.down_proj.weight",
        "model.layers.20.mlp.up_proj.weight",
        "model.embed_tokens.weight",
    ):
        matrix = tuned.read(name).float() - base.read(name).float()
        began = time.perf_counter()
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        exact_seconds = time.perf_counter() - began
        for share in (0.08, 0.16):
            k = int(share * min(matrix.shape))
            began = time.perf_counter()
            ru, rs, rvh = randomized_svd(matrix, k)
            seconds = time.perf_counter() - began
            best = torch.linalg.norm(matrix - (u[:, :k] * s[:k]) @ vh[:k])
            error = torch.linalg.norm(matrix - (ru * rs) @ rvh)
            worst = float(((rs - s[:k]).abs() / s[:k]).max())
            lines.append(
                f"| {name} | {matrix.shape[0]} x {matrix.shape[1]} | {k} | {100 * float(error / best - 1):.3f}% | "
                f"{100 * worst:.2f}% | {seconds:.2f} | {exact_seconds:.2f} |"
            )
    base.close()
    tuned.close()
    return lines


def table(rows: list[tuple[str, dict]], texts: dict[str, str]) -> list[str]:
    names = list(texts)
    header = "| model | " + " | ".join(f"bits/byte, {name}" for name in names)
    header += " | mean held-out | merge s | peak RSS GB |"
    lines = [header, "|---|" + "---|" * (len(names) + 3)]
    for label, result in rows:
        scores = result["scores"]
        mean = sum(scores[f"{name} held-out"] for name in DOMAINS) / len(DOMAINS)
        timing = f"{result['seconds']:.1f} | {result['peak_gb']:.2f}" if result.get("seconds") is not None else "- | -"
        lines.append(
            f"| {label} | " + " | ".join(f"{scores[name]:.4f}" for name in names) + f" | {mean:.4f} | {timing} |"
        )
    return lines


def main(arguments: list[str] | None = None) -> None:
    import torch

    from composer.cache import cache_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated methods or labels to (re)run; the table shows every kept row")
    parser.add_argument("--results", type=Path, default=cache_dir() / "quality" / "results.json")
    parser.add_argument("--fresh", action="store_true", help="score every row again")
    parser.add_argument("--svd-errors", action="store_true", help="also measure the randomised SVD's error")
    parser.add_argument("--threads", type=int, help="torch CPU threads for scoring")
    options = parser.parse_args(arguments)
    if options.threads:
        torch.set_num_threads(options.threads)
    folders = fine_tune_folders()
    texts = texts_of(folders)
    options.results.parent.mkdir(parents=True, exist_ok=True)
    kept = {} if options.fresh or not options.results.is_file() else json.loads(options.results.read_text())
    wanted = set(options.only.split(",")) if options.only else None

    def save() -> None:
        options.results.write_text(json.dumps(kept, indent=2) + "\n")

    done = []
    for label, folder in (
        ("SmolLM2-135M-Instruct (base)", folders["base"]),
        *((f"{n} fine-tune", folders[n]) for n in DOMAINS),
    ):
        key = row_key(str(folder), texts)
        if key not in kept:
            kept[key] = {"scores": bits_per_byte(folder, texts), "seconds": None, "peak_gb": None}
            save()
        done.append((label, kept[key]))
        print(label, kept[key]["scores"], flush=True)
    for row in ROWS:
        key = row_key(row.recipe(folders), texts)
        if key not in kept or (wanted and (row.method in wanted or row.label in wanted)):
            if wanted and row.method not in wanted and row.label not in wanted and key not in kept:
                continue
            with tempfile.TemporaryDirectory(prefix="composer-quality-") as scratch:
                kept[key] = merge_and_score(row, folders, texts, Path(scratch))
            save()
        done.append((row.label, kept[key]))
        print(row.label, kept[key], flush=True)
    print()
    print("\n".join(table(done, texts)))
    print("held-out bytes: " + ", ".join(f"{name} {len(text.encode('utf-8'))}" for name, text in texts.items()))
    if options.svd_errors:
        print()
        print("\n".join(svd_errors(folders)))


if __name__ == "__main__":
    sys.exit(main())
