"""`compose trace` on a real model: SmolLM2-135M-Instruct (the bundled copy), three short real fine-tunes of it
(AdamW steps on Python source from the standard library, each on other files: `a`, `b` and the sibling `sib`) and
two random initialisations of its shape (`other`, `other2`). Each case builds a SUSPECT from them (composer,
mergekit 0.1.5 where `--mergekit` names its `mergekit-yaml`, continued fine-tuning, a tokenizer transplant, GGUF
quantisation), strips its card, traces it back with `compose trace --verify` in a child process against
a, b, sib, base and other, and checks the result against the truth.

    nice -n 10 python bench/trace_real.py [--steps 30] [--lr 1e-4] [--work /tmp/trace-real]
        [--mergekit /path/to/mergekit-yaml] [--only linear,slerp,...]

Prints one row per case: passed or what failed, parents named, verdicts with p-values, recovered weights, t or
slices against the truth, the recomposed model's worst relative error, seconds and the trace's peak RSS."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# bench/ holds scripts named like packages (tokensurgery.py): the repository's own packages come first
sys.path[:] = [str(REPO)] + [entry for entry in sys.path if Path(entry or ".").resolve() != REPO / "bench"]
TEXTS = {"a": ["json/decoder.py", "textwrap.py"], "b": ["argparse.py"], "sib": ["pathlib.py", "shutil.py"]}
TUNING_TEXT = ["csv.py"]  # the continued fine-tuning after a merge
CANDIDATES = ("a", "b", "sib", "base", "other")
# the child's own peak (VmHWM): ru_maxrss survives exec, so a child of this process, which has fine-tuned models with
# transformers, reported the bench's 2.9 GB instead of the trace's own peak
CHILD = """
import sys
from composer.cli import main
sys.argv = ["compose", *sys.argv[1:]]
try:
    main()
finally:
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    print("PEAK_RSS_KB", peak, file=sys.stderr)
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


def random_init(base: Path, out: Path, seed: int) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (out / "model.safetensors").exists():
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)).save_pretrained(out)
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def strip_card(out: Path) -> None:
    for name in ("README.md", "composer-recipe.yml", "mergekit_config.yml", "mergekit_moe_config.yml"):
        (out / name).unlink(missing_ok=True)


def compose(recipe: str, out: Path) -> None:
    from composer.compose import compose_moe_text, compose_text
    from composer.execute import ExecutionOptions

    if not out.exists():
        make = compose_moe_text if recipe.startswith("base_model") and "experts:" in recipe else compose_text
        make(recipe, out, ExecutionOptions(progress=False))
    strip_card(out)


def mergekit(recipe: str, out: Path, program: Path, moe: bool = False) -> None:
    if not out.exists():
        config = out.with_suffix(".yml")
        config.write_text(recipe)
        command = [str(program.with_name("mergekit-moe") if moe else program), str(config), str(out), "--quiet"]
        options = (
            ["--i-understand-this-is-not-useful-without-training"] if moe else ["--lazy-unpickle", "--random-seed", "3"]
        )
        run_program(command + options)
    strip_card(out)


def run_program(command: list[str]) -> None:
    """Run one of mergekit's programs; its error output ends the bench if it fails."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")


def transplant(model: Path, donor: Path, out: Path) -> None:
    from composer.execute import ExecutionOptions
    from composer.transplant import TransplantOptions, run_transplant

    if not out.exists():
        run_transplant(str(model), str(donor), out, TransplantOptions(), ExecutionOptions(progress=False))
    strip_card(out)


def tokensurgeon(model: Path, donor: Path, out: Path, program: Path) -> None:
    """`model` with `donor`'s tokenizer, by mergekit's `mergekit-tokensurgeon` (embeddings of the new tokens
    approximated from the old ones, its default: orthogonal matching pursuit)."""
    if not out.exists():
        run_program([str(program.with_name("mergekit-tokensurgeon")), str(model), str(donor), str(out)])
    strip_card(out)


def donor_model(out: Path) -> Path:
    """A tiny model with a byte-level BPE tokenizer of its own (2000 tokens): the donor of a transplant."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import BYTE_LEVEL_SPECIAL, byte_level_tokenizer, tiny_model_with_tokenizer

    if not (out / "config.json").exists():
        tiny_model_with_tokenizer(out, byte_level_tokenizer(2000), BYTE_LEVEL_SPECIAL, seed=5)
    return out


def gguf(model: Path, out: Path, kind: str) -> None:
    """`model` as llama.cpp's converter writes a llama model, its matrices quantised to `kind`."""
    sys.path.insert(0, str(REPO / "tests"))
    from transformers import AutoConfig

    from helpers import load_state, write_tiny_llama_gguf

    if not out.exists():
        write_tiny_llama_gguf(out, load_state(model), AutoConfig.from_pretrained(model), kind)


def trace(suspect: Path, candidates: list[Path], base: Path | None, work: Path) -> tuple[dict, float, int]:
    report = work / f"{suspect.name}.trace.json"
    arguments = [str(suspect), "--candidates", *map(str, candidates), "--json", str(report), "--verify"]
    if base is not None:
        arguments += ["--base", str(base)]
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "trace", *arguments], capture_output=True, text=True, check=False, cwd=REPO
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"compose trace {suspect.name} failed:\n{done.stderr[-3000:]}")
    peak = int(next(line.split()[1] for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KB")))
    return json.loads(report.read_text()), seconds, peak


@dataclass
class Case:
    make: str  # composer | mergekit | mergekit-moe | mergekit-tokensurgeon | tuned | transplant | Q8_0 | Q4_0 | model
    recipe: str = ""  # the recipe, or for the others the model it starts from
    parents: tuple[str, ...] = ()
    truth: str = ""
    weights: dict[str, float] = field(default_factory=dict)  # each layer's expected weight (linear), or shares (TIES)
    t: float | None = None
    slices: list | None = None  # expected layer ranges of a passthrough
    method: str | None = None
    base: bool = False  # trace with --base base
    exact: bool = True  # a merge without post-training: the recipe must recompose it within bf16 rounding


def recipes(m: dict[str, Path]) -> dict[str, Case]:
    a, b, base = m["a"], m["b"], m["base"]
    on_base = f"base_model: {base}\n"

    def two(make: str, merge: str, first: str, second: str, parents: tuple[str, ...], truth: str, **checks) -> Case:
        """A merge of a and b with their `parameters:` (on the base where it is a parent)."""
        recipe = (
            f"merge_method: {merge}\n{on_base if 'base' in parents else ''}models:\n"
            f"  - {{model: {a}, parameters: {first}}}\n  - {{model: {b}, parameters: {second}}}\ndtype: bfloat16\n"
        )
        return Case(make, recipe, parents, truth, **checks)

    def slerp(make: str, t: float) -> Case:
        recipe = (
            f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{t: {t}}}\n"
        )
        return Case(make, recipe + "dtype: bfloat16\n", ("a", "b"), f"t={t}", t=t)

    def upscale(make: str, model: str, first: int, second: int) -> Case:
        recipe = (
            f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {m[model]}, layer_range: [0, {first}]}}\n"
            f"  - sources:\n      - {{model: {m[model]}, layer_range: [{second}, 30]}}\ndtype: bfloat16\n"
        )
        truth = f"[0, {first}] + [{second}, 30] of {model}"
        return Case(make, recipe, (model,), truth, slices=[[0, first], [second, 30]])

    moe = f"base_model: {base}\ngate_mode: random\nexperts_per_token: 1\nexperts:\n  - source_model: {a}\n"
    moe += f"  - source_model: {b}\n"
    parents, merged = ("a", "b", "base"), "linear a 0.3 b 0.7"
    equal, shares = {"a": 0.5, "b": 0.5}, {"a": 0.7 / 1.2, "b": 0.5 / 1.2}
    return {
        "linear": two("composer", "linear", "{weight: 0.3}", "{weight: 0.7}", ("a", "b"), "a 0.3, b 0.7",
                      weights={"a": 0.3, "b": 0.7}),
        "slerp": slerp("composer", 0.4),
        "ties": two("composer", "ties", "{weight: 1.0, density: 0.5}", "{weight: 1.0, density: 0.5}", parents,
                    "density 0.5, weights equal", weights=equal, method="ties", base=True),
        "upscale": upscale("composer", "a", 20, 10),
        "mk-linear": two("mergekit", "linear", "{weight: 0.45}", "{weight: 0.55}", ("a", "b"), "a 0.45, b 0.55",
                         weights={"a": 0.45, "b": 0.55}),
        "mk-slerp": slerp("mergekit", 0.65),
        "mk-ties": two("mergekit", "ties", "{weight: 0.7, density: 0.6}", "{weight: 0.5, density: 0.6}", parents,
                       "weights 0.7/0.5 (shares 0.583/0.417), density 0.6", weights=shares, method="ties"),
        "mk-dare": two("mergekit", "dare_ties", "{weight: 0.5, density: 0.5}", "{weight: 0.5, density: 0.5}", parents,
                       "dare_ties, weights 0.5, density 0.5", method="dare_ties", exact=False),
        "mk-upscale": upscale("mergekit", "b", 22, 7),
        "moe": Case("composer", moe, parents, "experts a, b on base", method="moe", exact=False),
        "mk-moe": Case("mergekit-moe", moe, parents, "experts a, b on base", method="moe", exact=False),
        "tuned": Case("tuned", "linear", ("a", "b"), f"{merged}, then fine-tuned", exact=False),
        "transplant": Case("transplant", "linear", ("a", "b"), f"{merged}, with another tokenizer", exact=False),
        "mk-transplant": Case("mergekit-tokensurgeon", "linear", ("a", "b"), f"{merged}, mergekit-tokensurgeon",
                              exact=False),
        "q8": Case("Q8_0", "linear", ("a", "b"), f"{merged}, as a Q8_0 GGUF", exact=False),
        "q4": Case("Q4_0", "linear", ("a", "b"), f"{merged}, as a Q4_0 GGUF", exact=False),
        "negative": Case("model", "other2", (), "another random initialisation", exact=False),
    }  # fmt: skip


def build(name: str, case: Case, models: dict[str, Path], work: Path, program: Path | None) -> Path:
    suspect = work / f"merge-{name}"
    if case.make == "composer":
        compose(case.recipe, suspect)
    elif case.make in ("mergekit", "mergekit-moe"):
        if program is None:
            raise SystemExit(f"case {name} needs --mergekit")
        mergekit(case.recipe, suspect, program, moe=case.make == "mergekit-moe")
    elif case.make == "tuned":
        fine_tune(work / f"merge-{case.recipe}", suspect, TUNING_TEXT, 5, 9, 3e-4)
    elif case.make == "transplant":
        transplant(work / f"merge-{case.recipe}", donor_model(work / "donor"), suspect)
    elif case.make == "mergekit-tokensurgeon":
        if program is None:
            raise SystemExit(f"case {name} needs --mergekit")
        tokensurgeon(work / f"merge-{case.recipe}", donor_model(work / "donor"), suspect, program)
    elif case.make in ("Q8_0", "Q4_0"):
        suspect = work / f"merge-{name}.gguf"
        gguf(work / f"merge-{case.recipe}", suspect, case.make)
    else:
        suspect = models[case.recipe]
    return suspect


def check(name: str, case: Case, data: dict, names: dict[str, str]) -> list[str]:
    """What the trace got wrong, by the judge's rules."""
    import yaml

    failed = []
    verdicts = {names[c["model"]]: c["verdict"] for c in data["candidates"]}
    for model, verdict in verdicts.items():
        expected = "parent" if model in case.parents else "independent" if model.startswith("other") else "related"
        if case.make == "model":  # a random initialisation: nothing is related to it
            expected = "independent"
        if verdict != expected:
            failed.append(f"{model} {verdict} (not {expected})")
    if case.method and data["method"] != case.method:
        failed.append(f"method {data['method']} (not {case.method})")
    for layer in data["layers"]:
        found = {names.get(s["model"], s["model"]): s["weight"] for s in layer["sources"]}
        total = sum(found.values()) or 1.0
        for model, weight in case.weights.items():
            value = found.get(model, 0.0) / (total if case.method == "ties" else 1.0)
            if abs(value - weight) > 0.02:
                failed.append(f"layer {layer['layer']} {model} weight {value:.3f} (not {weight})")
                break
        if case.t is not None and abs(layer.get("t", -1) - case.t) > 0.03:
            failed.append(f"layer {layer['layer']} t {layer.get('t')} (not {case.t})")
    if case.slices is not None:
        recipe = yaml.safe_load(data["recipe"].split("\n", 1)[1])
        found = [s["layer_range"] for piece in recipe.get("slices", []) for s in piece["sources"]]
        if found != case.slices:
            failed.append(f"slices {found} (not {case.slices})")
    errors = [value for value in data.get("verification", {}).values() if value is not None]
    if case.exact and (not errors or max(errors) > 1e-2):
        failed.append(f"recomposed worst relative error {max(errors) if errors else None}")
    return failed


def recovered(data: dict, names: dict[str, str]) -> str:
    import yaml

    if not data["recipe"]:
        return "no recipe"
    recipe = yaml.safe_load(data["recipe"].split("\n", 1)[1]) or {}
    if data["method"] == "passthrough":
        return str([s["layer_range"] for piece in recipe["slices"] for s in piece["sources"]])
    if data["method"] == "moe":
        return "experts " + ", ".join(names.get(e["source_model"], "?") for e in recipe.get("experts", []))
    layer = data["layers"][len(data["layers"]) // 2]
    text = ", ".join(f"{names.get(s['model'], s['model'])} {s['weight']}" for s in layer["sources"])
    for key in ("t", "density"):
        if key in layer:
            text += f", {key} {layer[key]}"
    return f"{data['method']}: {text} (layer {layer['layer']})"


def main() -> None:
    from composer.bundled import smollm2_dir

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--work", type=Path, default=Path("/tmp/trace-real"))
    parser.add_argument("--mergekit", type=Path, default=None, help="mergekit-yaml (mergekit-moe beside it)")
    parser.add_argument("--only", default="", help="comma-separated case names")
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
    models["other"] = random_init(base, work / "other", 123)
    models["other2"] = random_init(base, work / "other2", 321)
    models["base"] = base
    print(f"fine-tunes and the random initialisations: {time.perf_counter() - started:.0f} s", flush=True)
    cases = recipes(models)
    wanted = [name for name in options.only.split(",") if name] or list(cases)
    if options.mergekit is None:
        wanted = [name for name in wanted if not cases[name].make.startswith("mergekit")]
    names = {str(path): name for name, path in models.items()}
    rows = []
    for name in wanted:
        case = cases[name]
        suspect = build(name, case, models, work, options.mergekit)
        data, seconds, peak = trace(suspect, [models[c] for c in CANDIDATES], base if case.base else None, work)
        errors = [value for value in data.get("verification", {}).values() if value is not None]
        row = {
            "case": name,
            "failed": check(name, case, data, names),
            "verdicts": {names[c["model"]]: f"{c['verdict']} ({c['p_value']:.0e})" for c in data["candidates"]},
            "recovered": recovered(data, names),
            "truth": case.truth,
            "worst_relative_error": max(errors) if errors else None,
            "seconds": round(seconds, 1),
            "peak_rss_mb": round(peak / 1024),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| case | result | verdicts (p) | recovered | truth | recompose worst rel. error | s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        verdicts = "; ".join(f"{name}: {verdict}" for name, verdict in row["verdicts"].items())
        result = "pass" if not row["failed"] else "FAIL: " + "; ".join(row["failed"][:3])
        error = f"{row['worst_relative_error']:.1e}" if row["worst_relative_error"] is not None else "-"
        print(
            f"| {row['case']} | {result} | {verdicts} | {row['recovered']} | {row['truth']} | {error} | "
            f"{row['seconds']} | {row['peak_rss_mb']} |"
        )


if __name__ == "__main__":
    main()
