"""`compose trace` on a real model: SmolLM2-135M-Instruct (the bundled copy), three short real fine-tunes of it
(AdamW steps on Python source from the standard library, each on other files) and a random initialisation of its
shape, merged by composer four ways (linear, SLERP, TIES, depth upscale); each merge has its card stripped and is
traced back with `compose trace --verify` in a child process.

    nice -n 10 python bench/trace_real.py [--steps 30] [--lr 1e-4] [--work /tmp/trace-real]

Prints one row per case: parents named, verdicts with p-values, recovered weights or t against the truth, slice
boundaries, the recomposed model's worst relative error, seconds and the trace's peak RSS."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

TEXTS = {"a": ["json/decoder.py", "textwrap.py"], "b": ["argparse.py"], "sib": ["pathlib.py", "shutil.py"]}
CHILD = """
import resource, sys
from composer.cli import main
sys.argv = ["compose", *sys.argv[1:]]
try:
    main()
finally:
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def fine_tune(base: Path, out: Path, files: list[str], steps: int, seed: int, lr: float) -> Path:
    """`steps` AdamW steps (learning rate `lr`, 128-token windows) on the standard library's `files`, saved in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "model.safetensors").exists():
        return out
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    library = Path(shutil.__file__).parent
    text = "\n".join((library / name).read_text() for name in files)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        start = int(torch.randint(0, len(ids) - 129, ()))
        window = ids[start : start + 128].unsqueeze(0)
        loss = model(window, labels=window).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def random_init(base: Path, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (out / "model.safetensors").exists():
        torch.manual_seed(123)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)).save_pretrained(out)
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def compose(recipe: str, out: Path) -> None:
    from composer.compose import compose_text
    from composer.execute import ExecutionOptions

    if not out.exists():
        compose_text(recipe, out, ExecutionOptions(progress=False))
    for name in ("README.md", "composer-recipe.yml"):  # strip the card and the recipe
        (out / name).unlink(missing_ok=True)


def trace(suspect: Path, candidates: dict[str, Path], base: Path | None, work: Path) -> tuple[dict, float, int]:
    report = work / f"{suspect.name}.trace.json"
    arguments = [str(suspect), "--candidates", *map(str, candidates.values()), "--json", str(report), "--verify"]
    if base is not None:
        arguments += ["--base", str(base)]
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "trace", *arguments], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"compose trace {suspect.name} failed:\n{done.stderr[-3000:]}")
    peak = int(next(line.split()[1] for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KB")))
    return json.loads(report.read_text()), seconds, peak


def summary(case: str, data: dict, names: dict[str, str], truth: str) -> dict:
    import yaml

    verdicts = {names[c["model"]]: f"{c['verdict']} (p={c['p_value']:.1e})" for c in data["candidates"]}
    parents = sorted(names[c["model"]] for c in data["candidates"] if c["verdict"] == "parent")
    recipe = yaml.safe_load(data["recipe"].split("\n", 1)[1])
    if case == "upscale":
        found = [[s["layer_range"] for s in piece["sources"]] for piece in recipe["slices"]]
    elif "t" in recipe.get("parameters", {}):
        found = f"t={recipe['parameters']['t']}"
    else:  # nearly parallel fine-tunes: composer's slerp is linear interpolation there, and is recovered as such
        found = {names.get(m["model"], m["model"]): m.get("parameters", {}) for m in recipe.get("models", [])}
    errors = [value for value in data["verification"].values() if value is not None]
    return {
        "case": case,
        "method": data["method"],
        "parents": parents,
        "verdicts": verdicts,
        "recovered": found,
        "truth": truth,
        "worst_relative_error": max(errors) if errors else None,
    }


def main() -> None:
    from composer.bundled import smollm2_dir

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--work", type=Path, default=Path("/tmp/trace-real"))
    options = parser.parse_args()
    work = options.work
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    base = smollm2_dir()
    started = time.perf_counter()
    models = {
        name: fine_tune(base, work / name, files, options.steps, seed, options.lr)
        for seed, (name, files) in enumerate(TEXTS.items())
    }
    models["other"] = random_init(base, work / "other")
    print(f"fine-tunes and the random initialisation: {time.perf_counter() - started:.0f} s", flush=True)
    a, b = models["a"], models["b"]
    linear = (
        f"merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.3}}}}\n"
        f"  - {{model: {b}, parameters: {{weight: 0.7}}}}\ndtype: bfloat16\n"
    )
    slerp = f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{t: 0.4}}\ndtype: bfloat16\n"
    ties = (
        f"merge_method: ties\nbase_model: {base}\nmodels:\n  - {{model: {a}, parameters: {{weight: 1.0, density: 0.5}}}}\n"
        f"  - {{model: {b}, parameters: {{weight: 1.0, density: 0.5}}}}\ndtype: bfloat16\n"
    )
    upscale = (
        f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 20]}}\n"
        f"  - sources:\n      - {{model: {a}, layer_range: [10, 30]}}\ndtype: bfloat16\n"
    )
    cases = {
        "linear": (linear, None, "a 0.3, b 0.7"),
        "slerp": (slerp, None, "t=0.4"),
        "ties": (ties, base, "density 0.5, weights equal"),
        "upscale": (upscale, None, "[0, 20] + [10, 30] of a"),
    }
    names = {str(path): name for name, path in models.items()} | {str(base): "base"}
    rows = []
    for case, (recipe, trace_base, truth) in cases.items():
        suspect = work / f"merge-{case}"
        compose(recipe, suspect)
        data, seconds, peak = trace(suspect, models, trace_base, work)
        row = summary(case, data, names, truth) | {"seconds": round(seconds, 1), "peak_rss_mb": round(peak / 1024)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| case | parents named | verdicts (p) | recovered | truth | recompose worst rel. error | s | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        verdicts = "; ".join(f"{name}: {verdict}" for name, verdict in row["verdicts"].items())
        print(
            f"| {row['case']} | {', '.join(row['parents'])} | {verdicts} | {row['recovered']} | {row['truth']} | "
            f"{row['worst_relative_error']:.2e} | {row['seconds']} | {row['peak_rss_mb']} |"
        )


if __name__ == "__main__":
    main()
