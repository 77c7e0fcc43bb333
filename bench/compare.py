"""composer against mergekit on the same recipes, side by side in one run, with the I/O floor.

    python bench/compare.py --models /tmp/synth [--recipes linear,ties] [--repeat 3]
    MERGEKIT_PYTHONPATH=/path/to/mergekit/src:/path/to/its/deps python bench/compare.py --models /tmp/synth

Models come from bench/synthetic.py (made when missing: a base and three fine-tunes). Each recipe is
run by composer and, when mergekit is importable (from MERGEKIT_PYTHONPATH or the environment), by
mergekit, one after the other, in fresh processes; wall time and peak resident memory are those of
the whole process. "composer writing" is the time composer itself reports for the work after planning
(reading, merging, writing: what the I/O floor bounds); the wall time adds Python's start, imports (torch
alone takes 1-3 s) and planning. Neither tool waits for the disk at the end (`compose --fsync` would), so
neither does the floor. Prints one markdown table. Machines are noisy: compare figures of one run only;
with --repeat N each tool runs N times, in turn, and its fastest run is shown.

Two protocols. `--protocol warm` (the default) is the above: composer's cache of transformers' answers is
kept (a tiny first run fills it), so every composer run is a repeat of a config it has seen. `--protocol user`
measures what a user meets running a new recipe once: for each recipe, `--rounds` rounds (3), each tool
once a round in turn (the order alternating between rounds), and before each composer run its cached
transformers answers are dropped (composer runs with a cache folder of the bench's own,
OUTPUTS/composer-cache, whose compiled kernels are kept: a machine builds them once), so that every run is
the first run of a config; `sync` before every run, and the I/O floor taken in every round. It prints the
median and the spread (lowest-highest) of each tool's wall time and of the rounds' speed-ups
(mergekit's wall time over composer's in the same round), and of composer's writing time over that
round's floor.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from io_floor import io_floor  # noqa: E402

TASK = "    parameters: {{weight: {weight}, density: {density}}}\n"


def _models_block(models: list[str], weights: list[float], density: float | None) -> str:
    lines = "models:\n"
    for model, weight in zip(models, weights):
        lines += f"  - model: {model}\n"
        lines += (
            TASK.format(weight=weight, density=density)
            if density is not None
            else f"    parameters: {{weight: {weight}}}\n"
        )
    return lines


def recipes(root: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (recipe text, the model folders it reads)."""
    base, tuned = str(root / "base"), [str(root / f"model-{i}") for i in (1, 2, 3)]
    weights = [0.4, 0.3, 0.3]
    task = "merge_method: {method}\nbase_model: " + base + "\n" + "{models}dtype: bfloat16\n"
    found = {
        "linear, 3 models": (f"merge_method: linear\n{_models_block(tuned, weights, None)}dtype: bfloat16\n", tuned),
        "task_arithmetic, base + 3": (
            task.format(method="task_arithmetic", models=_models_block(tuned, weights, None)),
            [base] + tuned,
        ),
    }
    for method in ("ties", "dare_ties", "breadcrumbs", "della"):
        found[f"{method}, density 0.5"] = (
            task.format(method=method, models=_models_block(tuned, weights, 0.5)) + "random_seed: 1\n",
            [base] + tuned,
        )
    found["sce, select_topk 0.5"] = (
        f"merge_method: sce\nbase_model: {base}\nmodels:\n"
        + "".join(f"  - model: {m}\n" for m in tuned)
        + "parameters: {select_topk: 0.5}\ndtype: bfloat16\n",
        [base] + tuned,
    )
    found["slerp, 2 models"] = (
        f"merge_method: slerp\nbase_model: {tuned[0]}\nmodels:\n  - model: {tuned[0]}\n  - model: {tuned[1]}\nparameters: {{t: 0.4}}\ndtype: bfloat16\n",
        tuned[:2],
    )
    found["model_stock"] = (
        f"merge_method: model_stock\nbase_model: {base}\nmodels:\n"
        + "".join(f"  - model: {m}\n" for m in tuned)
        + "dtype: bfloat16\n",
        [base] + tuned,
    )
    for method, parameters in SUBSPACE_METHODS.items():
        found[f"{method} (composer only)"] = (
            f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
            + "".join(f"  - model: {m}\n" for m in tuned)
            + f"parameters: {parameters}\ndtype: bfloat16\n",
            [base] + tuned,
        )
    layers = _layer_count(root / "base")
    half = layers // 2
    found[f"passthrough upscale {layers} -> {layers + half}"] = (
        f"merge_method: passthrough\nslices:\n  - sources: [{{model: {base}, layer_range: [0, {layers - half // 2}]}}]\n"
        f"  - sources: [{{model: {base}, layer_range: [{half // 2}, {layers}]}}]\ndtype: bfloat16\n",
        [base],
    )
    found["MoE, 3 experts, hidden gates"] = (moe_recipe(base, tuned), [base] + tuned)
    tiny = [str(root / "tiny" / "base"), str(root / "tiny" / "model-1")]
    found["tiny model merge (startup)"] = (
        f"merge_method: linear\n{_models_block(tiny, [0.5, 0.5], None)}dtype: bfloat16\n",
        tiny,
    )
    return found


# methods mergekit lacks (issue 20's speed target: an SVD-based method within 3x of TIES's time); mergekit sits out
SUBSPACE_METHODS = {"cart": "{rank_fraction: 0.08}", "iso_c": "{lambda: 1.0}", "tsv": "{lambda: 1.0}"}


def composer_only(name: str) -> bool:
    return name.endswith("(composer only)")


TINY_ARGS = [
    "--count",
    "1",
    "--hidden",
    "64",
    "--intermediate",
    "128",
    "--layers",
    "2",
    "--vocab",
    "320",
    "--heads",
    "4",
    "--kv-heads",
    "2",
]


MOE_PROMPTS = (
    ["Write a Python function that sorts a list.", "def parse(line):", "Fix the bug in this loop."],
    [
        "Once upon a time, in a small village,",
        "Tell me a bedtime story about a dragon.",
        "The princess walked into the forest.",
    ],
    ["What is the derivative of x squared?", "Solve 3x + 5 = 20.", "Prove that the square root of two is irrational."],
)


def moe_recipe(base: str, experts: list[str]) -> str:
    """A mergekit-moe config (composer reads these as they are): hidden-state gates from prompts."""
    text = f"base_model: {base}\ngate_mode: hidden\ndtype: bfloat16\nexperts:\n"
    for expert, prompts in zip(experts, MOE_PROMPTS):
        text += f"  - source_model: {expert}\n    positive_prompts:\n" + "".join(
            f"      - {prompt!r}\n" for prompt in prompts
        )
    return text


def mergekit_command(name: str, recipe: Path, out: Path) -> list[str]:
    if name.startswith("MoE"):
        return [sys.executable, "-c", "from mergekit.scripts.moe import main; main()", str(recipe), str(out)]
    return [
        sys.executable,
        "-c",
        "from mergekit.scripts.run_yaml import main; main()",
        str(recipe),
        str(out),
        "--lazy-unpickle",
    ]


def _layer_count(folder: Path) -> int:
    import json

    return json.loads((folder / "config.json").read_text())["num_hidden_layers"]


def run_child(command: list[str], env: dict | None = None) -> tuple[float, float, int, str]:
    """Wall seconds, peak RSS in GB, exit status and the tail of the output of `command`; rusage comes from wait4.
    Dirty pages of earlier runs are flushed first, so that no run is slowed by the disk catching up on another's."""
    os.sync()
    started = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        log.seek(0)
        tail = log.read().decode(errors="replace")[-2000:]
    return wall, usage.ru_maxrss / 1e6, process.returncode, tail


def mergekit_env() -> dict | None:
    env = dict(os.environ)
    extra = os.environ.get("MERGEKIT_PYTHONPATH")
    if extra:
        env["PYTHONPATH"] = extra + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    probe = subprocess.run([sys.executable, "-c", "import mergekit.scripts.run_yaml"], env=env, capture_output=True)
    return env if probe.returncode == 0 else None


def machine_description(mergekit: dict | None) -> str:
    """CPU, cores, memory, load and tool versions, for the results' header."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    version = "not found (set MERGEKIT_PYTHONPATH)"
    if mergekit is not None:
        probe = subprocess.run(
            [sys.executable, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
            env=mergekit,
            capture_output=True,
            text=True,
        )
        version = probe.stdout.strip() or "found (version unknown)"
    return (
        f"machine: {cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, load average {os.getloadavg()[0]:.2f}; "
        f"python {platform.python_version()}, torch {torch.__version__}; mergekit: {version}"
    )


def weights_files(folders: list[str]) -> list[Path]:
    return [path for folder in folders for path in sorted(Path(folder).glob("*.safetensors"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "composer-bench-models")
    parser.add_argument("--work", type=Path, default=None, help="where outputs go (default: beside the models)")
    parser.add_argument("--recipes", default="", help="comma-separated name prefixes to run (default: all)")
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--memory-budget", default=None, help="passed to compose as --memory-budget")
    parser.add_argument("--synthetic-args", default="", help="extra flags for bench/synthetic.py, e.g. '--layers 8'")
    parser.add_argument("--protocol", choices=("warm", "user"), default="warm", help="see above")
    parser.add_argument(
        "--repeat", type=int, default=1, help="warm: runs of each tool per recipe, in turn; the fastest is shown"
    )
    parser.add_argument("--rounds", type=int, default=3, help="user: rounds per recipe, each tool once a round")
    arguments = parser.parse_args()
    if not (arguments.models / "model-3" / "tokenizer.json").is_file():
        subprocess.run(
            [sys.executable, str(BENCH / "synthetic.py"), str(arguments.models), *arguments.synthetic_args.split()],
            check=True,
        )
    if not (arguments.models / "tiny" / "model-1" / "tokenizer.json").is_file():
        subprocess.run(
            [sys.executable, str(BENCH / "synthetic.py"), str(arguments.models / "tiny"), *TINY_ARGS], check=True
        )
    work = arguments.work or arguments.models / "outputs"
    work.mkdir(parents=True, exist_ok=True)
    env = None if arguments.no_mergekit else mergekit_env()
    chosen = [p.strip() for p in arguments.recipes.split(",") if p.strip()]
    options = ["--force", "--no-progress"] + (
        ["--memory-budget", arguments.memory_budget] if arguments.memory_budget else []
    )
    print(machine_description(env), flush=True)
    selected = {
        name: recipe
        for name, recipe in recipes(arguments.models).items()
        if not chosen or any(name.startswith(prefix) for prefix in chosen)
    }
    if arguments.protocol == "user":
        user_protocol(selected, work, options, env, max(1, arguments.rounds))
    else:
        warm_protocol(selected, work, options, env, max(1, arguments.repeat))


COMPOSE = [sys.executable, "-m", "composer.cli"]


def warm_protocol(selected: dict, work: Path, options: list[str], env: dict | None, repeat: int) -> None:
    """Each tool `repeat` times per recipe, in turn, composer's transformers answers kept; the fastest run shown."""
    rows = []
    for name, (text, inputs) in selected.items():
        recipe = work / "recipe.yml"
        recipe.write_text(text)
        out = work / "composer-out"
        if name.startswith("tiny"):
            run_child(
                COMPOSE + [str(recipe), str(out)] + options
            )  # a first run fills composer's cache of transformers' answers
        ours_runs, theirs_runs, floor = [], [], None
        for _ in range(repeat):
            ours_runs.append(run_child(COMPOSE + [str(recipe), str(out)] + options))
            if ours_runs[-1][2] != 0:
                print(f"composer failed on {name}:\n{ours_runs[-1][3]}", file=sys.stderr)
            if floor is None:
                written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
                floor = io_floor(weights_files(inputs), written, work)["floor_s"]
            shutil.rmtree(out, ignore_errors=True)
            if env is not None and not composer_only(name):
                theirs_runs.append(_mergekit_run(name, recipe, work, env))
        rows.append((name, _best(ours_runs), _best(theirs_runs) if theirs_runs else None, floor))
        _print_row(rows[-1])
    print()
    print(
        "| recipe | composer wall | composer peak RSS | mergekit wall | mergekit peak RSS | speed-up | I/O floor | composer writing | writing / floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(_table_row(row))


def _mergekit_run(name: str, recipe: Path, work: Path, env: dict) -> tuple[float, float, int, str]:
    mk_out = work / "mergekit-out"
    shutil.rmtree(mk_out, ignore_errors=True)
    run = run_child(mergekit_command(name, recipe, mk_out), env)
    if run[2] != 0:
        print(f"mergekit failed on {name}:\n{run[3]}", file=sys.stderr)
    shutil.rmtree(mk_out, ignore_errors=True)
    return run


def composer_first_run_env(work: Path) -> tuple[dict, Path]:
    """The environment for composer runs of the user protocol (a cache folder of the bench's own, its kernels
    built now) and the file of cached transformers answers to drop before each run."""
    from composer.plan.transformers_facts import FILE_NAME

    cache = work / "composer-cache"
    environment = dict(os.environ, COMPOSER_CACHE=str(cache))
    subprocess.run(
        [sys.executable, "-c", "from composer.native import library; library()"], env=environment, check=True
    )
    return environment, cache / FILE_NAME


def user_protocol(selected: dict, work: Path, options: list[str], env: dict | None, rounds: int) -> None:
    """Per recipe `rounds` rounds, each tool once a round in turn (alternating which goes first), each composer run
    a first run of its config; medians and spreads of the rounds."""
    ours_env, facts = composer_first_run_env(work)
    rows = []
    for name, (text, inputs) in selected.items():
        recipe = work / "recipe.yml"
        recipe.write_text(text)
        out = work / "composer-out"
        rounds_seen = []
        for number in range(rounds):
            ours = theirs = None
            for tool in ("composer", "mergekit") if number % 2 == 0 else ("mergekit", "composer"):
                if tool == "mergekit" and env is not None and not composer_only(name):
                    theirs = _mergekit_run(name, recipe, work, env)
                elif tool == "composer":
                    facts.unlink(missing_ok=True)  # every run the first of its config
                    ours = run_child(COMPOSE + [str(recipe), str(out)] + options, ours_env)
                    if ours[2] != 0:
                        print(f"composer failed on {name}:\n{ours[3]}", file=sys.stderr)
                    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
                    shutil.rmtree(out, ignore_errors=True)
            floor = io_floor(weights_files(inputs), written, work)["floor_s"]
            rounds_seen.append((ours, theirs, floor))
            print(
                f"{name}, round {number + 1}: composer {ours[0]:.1f} s ({ours[1]:.2f} GB)"
                + (f", mergekit {theirs[0]:.1f} s ({theirs[1]:.2f} GB)" if theirs else "")
                + f", I/O floor {floor:.1f} s, composer writing {_writing_seconds(ours[3]) or 0:.1f} s, "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        rows.append((name, rounds_seen))
    print()
    print(
        "| recipe | composer wall | mergekit wall | speed-up | composer peak RSS | mergekit peak RSS | I/O floor | composer writing / floor |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, rounds_seen in rows:
        print(_user_row(name, rounds_seen))


def _spread(values: list[float], unit: str = " s", digits: int = 1) -> str:
    """The median and, for several values, the lowest and highest: `9.9 s (8.1-12.0)`."""
    if not values:
        return "-"
    median = f"{statistics.median(values):.{digits}f}{unit}"
    return median if len(values) == 1 else f"{median} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _user_row(name: str, rounds_seen: list) -> str:
    ours = [o for o, _, _ in rounds_seen if o[2] == 0]
    theirs = [t for _, t, _ in rounds_seen if t is not None and t[2] == 0]
    ratios = [t[0] / o[0] for o, t, _ in rounds_seen if t is not None and o[2] == 0 and t[2] == 0]
    floors = [floor for _, _, floor in rounds_seen]
    writing = [
        (_writing_seconds(o[3]) or 0) / floor
        for o, _, floor in rounds_seen
        if o[2] == 0 and floor > 0.05 and _writing_seconds(o[3])
    ]
    return (
        f"| {name} | {_spread([o[0] for o in ours])} | {_spread([t[0] for t in theirs])} | {_spread(ratios, 'x')} | "
        f"{max((o[1] for o in ours), default=0):.2f} GB | "
        + (f"{max(t[1] for t in theirs):.2f} GB" if theirs else "-")
        + f" | {_spread(floors)} | {_spread(writing, '', 2)} |"
    )


def _best(runs: list[tuple[float, float, int, str]]) -> tuple[float, float, int, str]:
    """The fastest run (a failed one only when all failed)."""
    return min(runs, key=lambda run: (run[2] != 0, run[0]))


def compose_report(tail: str) -> tuple[int, float, float, float] | None:
    """(tensors, MB written, seconds, device GB) from compose's last line ("wrote N tensors (M MB) to OUT
    in X s[; at most G GB of cuda memory]"): the seconds are its reading, computing and writing."""
    import re

    found = re.findall(r"wrote (\d+) tensors \(([0-9.]+) MB\) to .* in ([0-9.]+) s(?:; at most ([0-9.]+) GB)?", tail)
    if not found:
        return None
    tensors, mb, seconds, device_gb = found[-1]
    return int(tensors), float(mb), float(seconds), float(device_gb or 0)


def _writing_seconds(tail: str) -> float | None:
    report = compose_report(tail)
    return report[2] if report else None


def _table_row(row) -> str:
    name, ours, theirs, floor = row
    mk_wall = f"{theirs[0]:.1f} s" if theirs else "-"
    mk_rss = f"{theirs[1]:.2f} GB" if theirs else "-"
    speedup = f"{theirs[0] / ours[0]:.1f}x" if theirs else "-"
    writing = _writing_seconds(ours[3])
    ratio = f"{writing / floor:.2f}" if writing and floor > 0.05 else "-"
    return (
        f"| {name} | {ours[0]:.1f} s | {ours[1]:.2f} GB | {mk_wall} | {mk_rss} | {speedup} | {floor:.1f} s | "
        f"{f'{writing:.1f} s' if writing else '-'} | {ratio} |"
    )


def _print_row(row) -> None:
    print(_table_row(row), flush=True)


if __name__ == "__main__":
    main()
