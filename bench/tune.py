"""Bench of `compose tune` against issue 18's targets, on the real SmolLM2-135M-Instruct fine-tunes of
bench/finetunes.py (code and pt; built there first, or waited for with --wait; or given with --code and --pt).

1. A TIES recipe (weights and densities of both fine-tunes) tuned by CMA-ES on --tokens tokens (4096: half from each
   domain's training text), against (a) the default (weights 0.5/0.5, density 0.5) and (b) the best point, on the same
   calibration text, of an 11-point grid over one shared weight (density 0.5): mean held-out bits per byte of the
   two domains.
2. Time per trial, wall and CPU: a tune trial (layer-streamed, nothing written) against a faithful re-creation of
   mergekit-evolve's trial (the merge written to a temporary folder by compose, then loaded and scored by
   composer.evaluate, as lm-eval would load and score it), on the same models and text; the evaluation is timed with
   `compose eval`'s windows (overlapping by half) and with tune's (sharing one token), so both ratios are shown.
3. Wall and CPU time of the 50 trials, and the peak RSS of the `compose tune` process against its --memory-budget.

The machine these run on is shared: the load average is printed, and CPU seconds (all threads) beside wall time.

    python bench/tune.py [--trials 50] [--tokens 4096] [--memory-budget 2GB] [--wait 30] [--code DIR --pt DIR]
                         [--mergekit PYTHONPATH]

With --mergekit, the write-then-evaluate trial is also timed with the merge written by mergekit's own run_merge,
as mergekit-evolve's serial strategy writes it (timed after mergekit's import, which evolve pays once), beside
composer's write.
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # as the CLI sets it: spinning OpenMP threads slow this process's trials on busy cores

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(
    str(Path(__file__).resolve().parent)
)  # finetunes.py; after the root, whose tokensurgery package a bench file shares a name with

RECIPE = """merge_method: {method}
base_model: {base}
models:
  - model: {code}
    parameters: {{weight: {code_weight}, density: {code_density}}}
  - model: {pt}
    parameters: {{weight: {pt_weight}, density: {pt_density}}}
dtype: bfloat16
"""
# TIES tunes weights and densities; task arithmetic (where density is accepted and unused) the weights
TUNED = {
    "code_weight": "{tune: [0, 1], start: 0.5}",
    "code_density": "{tune: [0.1, 1], start: 0.5}",
    "pt_weight": "{tune: [0, 1], start: 0.5}",
    "pt_density": "{tune: [0.1, 1], start: 0.5}",
}
SHARED = {"code_weight": "&w {tune: [0, 1], start: 0.5}", "code_density": 0.5, "pt_weight": "*w", "pt_density": 0.5}


def fine_tunes(wait_minutes: float) -> dict[str, Path]:
    """The cached code and pt fine-tunes, polled for every two minutes up to `wait_minutes` while another process
    builds them."""
    from finetunes import BENCH_SETTINGS, bench_corpora, entry_path, is_complete

    from composer.bundled import smollm2_dir

    base, corpora = smollm2_dir(), bench_corpora()
    entries = {name: entry_path(base, corpora[name], settings) for name, settings in BENCH_SETTINGS.items()}
    deadline = time.monotonic() + wait_minutes * 60
    while not all(map(is_complete, entries.values())):
        if time.monotonic() > deadline:
            missing = [name for name, entry in entries.items() if not is_complete(entry)]
            raise SystemExit(f"fine-tunes {missing} are not cached yet; build them with `python bench/finetunes.py`")
        print("waiting for the fine-tunes ...", flush=True)
        time.sleep(120)
    return entries


def calibration_text(name: str, tokens: int) -> str:
    """The first `tokens` tokens (about) of the fine-tune's own training split, whole lines."""
    from finetunes import BENCH_SETTINGS, bench_corpora, split_documents
    from transformers import AutoTokenizer

    from composer.bundled import smollm2_dir

    training, _ = split_documents(
        bench_corpora()[name], BENCH_SETTINGS[name].heldout_fraction, BENCH_SETTINGS[name].name
    )
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    pieces, count = [], 0
    for document in training:
        pieces.append(document.text if document.text.endswith("\n") else document.text + "\n")
        count += len(tokenizer(pieces[-1])["input_ids"])
        if count >= tokens:
            break
    cut = tokenizer.decode(tokenizer("".join(pieces))["input_ids"][:tokens])
    return cut[: cut.rfind("\n") + 1] or cut


def peak_rss_of(command: list[str]) -> tuple[float, float, float]:
    """(seconds, CPU seconds, peak RSS in bytes) of a child process."""
    began = time.monotonic()
    subprocess.run(command, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.monotonic() - began, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


class Clock:
    """Wall and CPU seconds of a block (CPU: this process, all threads)."""

    def __enter__(self):
        self.wall, self.cpu = time.monotonic(), time.process_time()
        return self

    def __exit__(self, *exception):
        self.wall, self.cpu = time.monotonic() - self.wall, time.process_time() - self.cpu


# mergekit-evolve's serial trial writes each merge with mergekit's run_merge (mergekit/evo/helpers.py, merge_model)
# in a process that has already imported mergekit: only run_merge is timed
MERGEKIT_MERGE = """
import sys, time, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
config = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))
wall, cpu = time.monotonic(), time.process_time()
run_merge(config, out_path=sys.argv[2], options=MergeOptions(copy_tokenizer=True))
print("MERGE_SECONDS", time.monotonic() - wall, time.process_time() - cpu)
"""


def mergekit_merge(recipe: Path, out: Path, python_path: str) -> tuple[float, float]:
    """(wall, CPU) seconds of mergekit's run_merge of `recipe` into `out`, in a child process given `python_path`."""
    environment = dict(os.environ, PYTHONPATH=python_path + os.pathsep + str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", MERGEKIT_MERGE, str(recipe), str(out)],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"mergekit failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("MERGE_SECONDS"))
    wall, cpu = map(float, line.split()[1:])
    return wall, cpu


def load() -> str:
    return "load average " + " ".join(f"{value:.1f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens in all, half from each domain")
    parser.add_argument("--memory-budget", default="2GB")
    parser.add_argument("--wait", type=float, default=30, help="minutes to wait for the fine-tunes")
    parser.add_argument("--grid", type=int, default=11)
    parser.add_argument("--method", choices=("ties", "task_arithmetic"), default="ties")
    parser.add_argument("--heldout-bytes", type=int, help="score only this much of each held-out text (whole lines)")
    parser.add_argument("--code", type=Path, help="the code fine-tune's folder (default: bench/finetunes.py's)")
    parser.add_argument("--pt", type=Path, help="the pt fine-tune's folder (default: bench/finetunes.py's)")
    parser.add_argument(
        "--mergekit",
        metavar="PYTHONPATH",
        help="where mergekit 0.1.5 imports from: the write-then-evaluate trial then also writes with mergekit's run_merge",
    )
    options = parser.parse_args()

    from composer.bundled import smollm2_dir
    from composer.compose import compose_text
    from composer.evaluate import load_model, score_text
    from composer.execute import ExecutionOptions
    from composer.tune.ranges import find_ranges
    from composer.tune.run import Trials, TuneResult, TuneSettings
    from composer.tune.texts import NamedText, window_stride

    print(f"start: {load()}", flush=True)
    entries = {"code": options.code, "pt": options.pt} if options.code and options.pt else fine_tunes(options.wait)
    base = smollm2_dir()
    work = Path(tempfile.mkdtemp(prefix="tune-bench-"))
    paths = {
        "base": json.dumps(str(base)),
        "code": json.dumps(str(entries["code"])),
        "pt": json.dumps(str(entries["pt"])),
    }
    calibration, heldout = [], []
    for name, entry in entries.items():
        (work / f"{name}-calibration.txt").write_text(
            calibration_text(name, options.tokens // len(entries)), encoding="utf-8"
        )
        calibration.append(work / f"{name}-calibration.txt")
        text = (Path(entry) / "heldout.txt").read_text(encoding="utf-8")
        if options.heldout_bytes:
            text = text.encode("utf-8")[: options.heldout_bytes].decode("utf-8", errors="ignore")
            text = text[: text.rfind("\n") + 1] or text
        (work / f"{name}-heldout.txt").write_text(text, encoding="utf-8")
        heldout.append(work / f"{name}-heldout.txt")
    tuned = dict(TUNED) if options.method == "ties" else dict(TUNED, code_density=1, pt_density=1)
    recipe = work / "recipe.yml"
    recipe.write_text(RECIPE.format(method=options.method, **paths, **tuned))
    print(
        f"fine-tunes: {entries['code']}, {entries['pt']}\ncalibration: "
        f"{', '.join(f'{p.name} {len(p.read_bytes())} bytes' for p in calibration)}; held-out: "
        f"{', '.join(f'{p.name} {len(p.read_bytes())} bytes' for p in heldout)}",
        flush=True,
    )

    # 1 + 3: compose tune (CMA-ES), its own process, for its peak RSS
    out = work / "tuned"
    seconds, cpu, rss = peak_rss_of(
        [
            sys.executable,
            "-c",
            "import sys; from composer.cli import main; sys.argv[0] = 'compose'; main()",
            "tune",
            str(recipe),
            *[part for p in calibration for part in ("--text", str(p))],
            *[part for p in heldout for part in ("--heldout", str(p))],
            "--trials",
            str(options.trials),
            "--memory-budget",
            options.memory_budget,
            "--no-progress",
            str(out),
        ]
    )
    report = json.loads((out / "tune-report.json").read_text())
    print(f"compose tune done: {load()}", flush=True)

    def held_mean(scores: dict) -> float:
        return sum(scores["heldout"].values()) / len(scores["heldout"])

    # (b) the grid over one shared weight, chosen on the calibration text, scored on held-out; its trials timed
    texts = [NamedText(str(p), p.read_text(encoding="utf-8")) for p in calibration]
    held = [NamedText(str(p), p.read_text(encoding="utf-8")) for p in heldout]
    shared = RECIPE.format(method=options.method, **paths, **SHARED)
    ranges = find_ranges(shared, "shared.yml")
    trials = Trials(TuneResult("shared.yml", None, shared, ranges), TuneSettings(texts=texts, heldout=held))
    grid, clocks = [], []
    for step in range(options.grid):
        weight = step / (options.grid - 1)
        with Clock() as clock:
            grid.append((weight, trials.score([weight], texts)))
        clocks.append(clock)
        print(f"  grid w = {weight:.1f}: {grid[-1][1].objective:.4f} ({clock.wall:.1f} s, {clock.cpu:.1f} CPU s)")
    warm = clocks[1:]  # the first read the parents
    streamed = (sum(c.wall for c in warm) / len(warm), sum(c.cpu for c in warm) / len(warm))
    best_weight = min(grid, key=lambda point: point[1].objective)[0]
    grid_held = trials.score([best_weight], held)
    trials.scorer.release()
    print(f"grid done: {load()}", flush=True)

    # 2: mergekit-evolve's trial re-created: write the merge, load it, score it (twice; the faster counts)
    phases = {"write": [], "load": [], "eval": [], "eval (tune's windows)": []}
    concrete = shared.replace("&w {tune: [0, 1], start: 0.5}", "&w 0.5")
    (work / "concrete.yml").write_text(concrete, encoding="utf-8")
    if options.mergekit:
        phases["write (mergekit)"] = []
    for attempt in range(2):
        folder = work / f"written-{attempt}"
        with Clock() as clock:
            compose_text(concrete, folder, ExecutionOptions(progress=False))
        phases["write"].append(clock)
        if options.mergekit:
            clock = Clock()
            clock.wall, clock.cpu = mergekit_merge(
                work / "concrete.yml", work / f"mergekit-{attempt}", options.mergekit
            )
            phases["write (mergekit)"].append(clock)
        with Clock() as clock:
            model, tokenizer = load_model(str(folder))
        phases["load"].append(clock)
        with Clock() as clock:
            for text in texts:
                score_text(model, tokenizer, text.text)
        phases["eval"].append(clock)
        with Clock() as clock:
            for text in texts:
                score_text(model, tokenizer, text.text, stride=window_stride(model.config.max_position_embeddings))
        phases["eval (tune's windows)"].append(clock)
        del model
    best = {name: min(clocks, key=lambda c: c.wall) for name, clocks in phases.items()}
    print(f"write-then-evaluate done: {load()}", flush=True)

    start_held, tuned_held = held_mean(report["scores"]["start"]), held_mean(report["scores"]["tuned"])
    density = ", density 0.5" if options.method == "ties" else ""
    print()
    print(f"| {options.method} recipe | mean held-out bits/byte | {' | '.join(p.stem for p in heldout)} |")
    print("|---|---|" + "---|" * len(heldout))
    print(
        f"| (a) default: weights 0.5/0.5{density} | {start_held:.4f} | "
        + " | ".join(f"{v:.4f}" for v in report["scores"]["start"]["heldout"].values())
        + " |"
    )
    print(
        f"| (b) best of an {options.grid}-point shared-weight grid (w = {best_weight:.1f}{density}) | {grid_held.objective:.4f} | "
        + " | ".join(f"{s.bits_per_byte:.4f}" for s in grid_held.scores)
        + " |"
    )
    print(
        f"| compose tune, CMA-ES, {len(report['history'])} trials | {tuned_held:.4f} | "
        + " | ".join(f"{v:.4f}" for v in report["scores"]["tuned"]["heldout"].values())
        + " |"
    )
    for parent, scores in report["scores"].items():
        if parent.startswith("parent"):
            print(
                f"| {Path(parent.removeprefix('parent ')).name} | {held_mean(scores):.4f} | "
                + " | ".join(f"{v:.4f}" for v in scores["heldout"].values())
                + " |"
            )
    print()
    print("tuned: " + ", ".join(f"{item['key']} = {item['tuned']:.3f}" for item in report["parameters"]))
    print(
        "calibration objective: start {:.4f}, tuned {:.4f}, grid best {:.4f}".format(
            report["history"][0]["objective"],
            min(item["objective"] for item in report["history"] if item["objective"] is not None),
            min(point[1].objective for point in grid),
        )
    )
    count, search = len(report["history"]), report["seconds"]
    print(
        f"compose tune: {count} trials in {search:.0f} s ({search / count:.1f} s a trial), "
        f"{report['cpu_seconds']:.0f} CPU s ({report['cpu_seconds'] / count:.1f} a trial); "
        f"{seconds:.0f} s and {cpu:.0f} CPU s for the whole command (tokenizing, report scoring, writing the model)"
    )
    print(f"a layer-streamed trial (grid, cache warm): {streamed[0]:.1f} s, {streamed[1]:.1f} CPU s")
    print(
        "a write-then-evaluate trial: "
        + ", ".join(f"{name} {clock.wall:.1f} s / {clock.cpu:.1f} CPU s" for name, clock in best.items())
    )
    writers = {"write": "", "write (mergekit)": "written by mergekit, "}
    for writer, said in writers.items():
        if writer not in best:
            continue
        for label, evaluation in (("compose eval's windows", "eval"), ("tune's windows", "eval (tune's windows)")):
            wall, cpu = (
                sum(getattr(best[name], kind) for name in (writer, "load", evaluation)) for kind in ("wall", "cpu")
            )
            print(
                f"  {said}with {label}: {wall:.1f} s, {cpu:.1f} CPU s: "
                f"{wall / streamed[0]:.1f}x wall, {cpu / streamed[1]:.1f}x CPU"
            )
    print(f"peak RSS of compose tune: {rss / 1e9:.2f} GB with --memory-budget {options.memory_budget}")
    print(f"end: {load()}")


if __name__ == "__main__":
    main()
