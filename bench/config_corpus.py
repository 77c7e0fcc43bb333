"""Real-world mergekit config shapes through composer and mergekit 0.1.5, side by side (issue 19).

Each shape is a config as model cards, blogs and repos write them (written afresh here, model ids replaced by
tiny local stand-ins of the same architecture). The script builds the tiny models, runs every config through
`compose` (this checkout) and through mergekit (its own virtual environment: mergekit is never a dependency
of composer), and prints one markdown table: which tool ran each config, and whether the outputs agree
(identical bits, within rounding, random methods alike in their statistics, or different).

    python bench/config_corpus.py --mergekit-python /tmp/mkvenv/bin/python [--only NAME ...] [--work DIR]
        [--composer-root OTHER_CHECKOUT] [--skip-mergekit]

The configs are the files of tests/data/mergekit_configs (tests/corpus_models.py describes them and builds the
models); tests/test_config_corpus.py plans every one of them in composer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from corpus_models import build_models, corpus  # noqa: E402  (tests/ is put on the path above)

# ---- running the tools ---------------------------------------------------------------------------------------

RUNNER = r"""
import json, sys, traceback, io, contextlib, logging, os
jobs_file, tool, results_file = sys.argv[1:4]
jobs = json.loads(open(jobs_file).read())
results = {}
for job in jobs:
    stderr = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stderr(stderr):
            if tool == "mergekit":
                import click
                if job["kind"] == "moe":
                    from mergekit.scripts.moe import main
                    args = [job["config"], job["out"], "--i-understand-this-is-not-useful-without-training"]
                elif job["kind"] == "multi":
                    from mergekit.scripts.multimerge import main
                    args = [job["config"], "--intermediate-dir", job["out"] + "-stages", "--out-path", job["out"]]
                elif job["kind"].startswith("multi:"):  # every document named: the final one lands among the stages
                    from mergekit.scripts.multimerge import main
                    args = [job["config"], "--intermediate-dir", job["out"] + "-stages"]
                else:
                    from mergekit.scripts.run_yaml import main
                    args = [job["config"], job["out"], "--lora-merge-cache", job["out"] + "-lora"]
                try:
                    main.main(args=args, standalone_mode=False)
                except SystemExit as exit:
                    code = exit.code or 0
                if job["kind"].startswith("multi:") and code == 0:
                    os.rename(os.path.join(job["out"] + "-stages", job["kind"].split(":")[1]), job["out"])
            else:
                from composer import cli
                sys.argv = ["compose", "run", job["config"], job["out"], "--no-progress", "--seed", "0"]
                try:
                    cli.main()
                except SystemExit as exit:
                    code = exit.code or 0
    except BaseException as error:
        code = 1
        stderr.write("".join(traceback.format_exception_only(type(error), error)))
    ok = code == 0 and any(name.endswith(".safetensors") for name in os.listdir(job["out"])) if os.path.isdir(job["out"]) else False
    results[job["name"]] = {"ok": ok, "message": stderr.getvalue()[-1500:]}
    print(job["name"], "ok" if ok else "FAILED", file=sys.__stderr__, flush=True)
json.dump(results, open(results_file, "w"), indent=1)
"""


def run_tool(python: str, tool: str, jobs: list[dict], work: Path, composer_root: Path | None = None) -> dict:
    """Run `jobs` with `tool` ("mergekit", or a composer checkout at `composer_root`) in one process of `python`."""
    jobs_file, results_file, runner = work / f"{tool}-jobs.json", work / f"{tool}-results.json", work / "runner.py"
    earlier = json.loads(results_file.read_text()) if results_file.exists() else {}  # (of other shapes: kept)
    jobs_file.write_text(json.dumps(jobs))
    runner.write_text(RUNNER)
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    if composer_root is not None:
        environment["PYTHONPATH"] = str(composer_root)
    subprocess.run(
        [python, str(runner), str(jobs_file), "mergekit" if composer_root is None else "composer", str(results_file)],
        env=environment,
        cwd=work,
        check=False,
    )
    results = earlier | json.loads(results_file.read_text())
    results_file.write_text(json.dumps(results, indent=1))
    return results


# ---- comparing outputs ---------------------------------------------------------------------------------------


def loaded_state(folder: Path) -> dict:
    """The model's tensors as transformers holds them in memory (one layout whichever the files use)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def compare(kind: str, ours: Path, theirs: Path, moe: bool = False) -> str:
    import torch
    from safetensors.torch import load_file

    def state(folder: Path) -> dict:
        tensors = {}
        for path in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(str(path)))
        return tensors

    a, b = (loaded_state(ours), loaded_state(theirs)) if moe else (state(ours), state(theirs))
    if moe:  # the routers' rows: composer's own rule by default (docs/moe.md), so compared apart
        gates = sorted(name for name in a if name.endswith("gate.weight") and name in b and "gate_proj" not in name)
        same = [name for name in gates if a[name].shape == b[name].shape and torch.equal(a[name], b[name])]
        rest = compare_states(
            kind, {n: t for n, t in a.items() if n not in gates}, {n: t for n, t in b.items() if n not in gates}
        )
        return f"{rest}; routers: {len(same)}/{len(gates)} identical"
    return compare_states(kind, a, b)


def compare_states(kind: str, a: dict, b: dict) -> str:
    import torch

    if a.keys() != b.keys():
        only_ours, only_theirs = sorted(a.keys() - b.keys())[:3], sorted(b.keys() - a.keys())[:3]
        return f"names differ: only composer {only_ours}, only mergekit {only_theirs}"
    shapes = [name for name in a if a[name].shape != b[name].shape]
    if shapes:
        return f"shapes differ: {shapes[0]} {tuple(a[shapes[0]].shape)} vs {tuple(b[shapes[0]].shape)}"
    dtypes = {(str(a[n].dtype), str(b[n].dtype)) for n in a if a[n].dtype != b[n].dtype}
    if dtypes:
        return f"dtypes differ: {sorted(dtypes)[:2]}"
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    if not differing:
        return "identical"
    worst = max(float((a[n].double() - b[n].double()).abs().max()) for n in differing)
    if kind == "random":
        return f"random: {len(differing)}/{len(a)} tensors differ (max {worst:.2g}), as draws do"
    close = all(
        torch.allclose(
            a[n].double(),
            b[n].double(),
            rtol=4e-7 if a[n].dtype == torch.float32 else 1e-2,
            atol=1e-8 if a[n].dtype == torch.float32 else 1e-3,
        )
        for n in differing
    )
    share = sum(int((a[n] != b[n]).sum()) for n in differing) / sum(a[n].numel() for n in a)
    label = "rounding" if close else "few entries (keep-threshold ties)" if share < 1e-2 else "DIFFERENT"
    return f"{label}: {len(differing)}/{len(a)} tensors differ, max {worst:.3g} ({differing[0]})"


def config_facts(folder: Path) -> tuple:
    config = json.loads((folder / "config.json").read_text())
    vocab = None
    if (folder / "tokenizer.json").exists():
        vocab = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]) + len(
            json.loads((folder / "tokenizer.json").read_text()).get("added_tokens", [])
        )
    template = None
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text().strip()
    elif (folder / "tokenizer_config.json").exists():
        template = (
            json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template") or ""
        ).strip() or None
    markers = {"<|im_start|>": "chatml", "[|endofturn|]": "exaone", "<|start_header_id|>": "llama3"}
    kind = None if template is None else next((name for mark, name in markers.items() if mark in template), "other")
    return config.get("architectures"), config.get("num_hidden_layers"), config.get("vocab_size"), vocab, kind


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-python", default="/tmp/mkvenv/bin/python")
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for models and outputs (default: a temporary one)"
    )
    parser.add_argument("--only", nargs="*", default=None, help="these corpus files only (names without .yml)")
    parser.add_argument(
        "--skip-mergekit", action="store_true", help="reuse mergekit's results of an earlier run in --work"
    )
    parser.add_argument(
        "--composer-root", type=Path, default=ROOT, help="the composer checkout to run (default: this one)"
    )
    arguments = parser.parse_args()
    work = arguments.work or Path(tempfile.mkdtemp(prefix="config-corpus-"))
    work.mkdir(parents=True, exist_ok=True)
    models = build_models(work / "models")
    configs = corpus()
    names = arguments.only or sorted(configs)
    ours = "composer" if arguments.composer_root.resolve() == ROOT else f"composer-{arguments.composer_root.name}"
    tools = {ours: "composer"} | ({} if arguments.skip_mergekit else {"mergekit": "mergekit"})
    jobs = {tool: [] for tool in tools}
    for name in names:
        config = work / "configs" / f"{name}.yml"
        config.parent.mkdir(exist_ok=True)
        config.write_text(configs[name].text(models))
        for tool in tools:
            out = work / tool / name
            subprocess.run(["rm", "-rf", str(out), str(out) + "-stages", str(out) + "-lora"], check=True)
            out.parent.mkdir(exist_ok=True)
            jobs[tool].append({"name": name, "kind": configs[name].kind, "config": str(config), "out": str(out)})
    results = {ours: run_tool(sys.executable, ours, jobs[ours], work, arguments.composer_root)}
    if arguments.skip_mergekit:
        results["mergekit"] = json.loads((work / "mergekit-results.json").read_text())
    else:
        results["mergekit"] = run_tool(arguments.mergekit_python, "mergekit", jobs["mergekit"], work)
    rows, counts, agreeing = [], {ours: 0, "mergekit": 0}, 0
    for name in names:
        ran = {tool: results[tool].get(name, {}).get("ok", False) for tool in counts}
        for tool in counts:
            counts[tool] += ran[tool]
        if all(ran.values()):
            verdict = compare(
                configs[name].compare, work / ours / name, work / "mergekit" / name, configs[name].kind == "moe"
            )
            facts = [config_facts(work / tool / name) for tool in counts]
            if facts[0] != facts[1]:
                verdict += f"; config/tokenizer differ: {facts[0]} vs {facts[1]}"
            agreeing += not any(word in verdict for word in ("DIFFERENT", "differ:", "names differ"))
        else:
            failed = [tool for tool in counts if not ran[tool]]
            verdict = "; ".join(
                f"{tool}: {' '.join(results[tool].get(name, {}).get('message', '').split())[-300:]}" for tool in failed
            )
        rows.append(f"| {name} | {'ran' if ran[ours] else 'no'} | {'ran' if ran['mergekit'] else 'no'} | {verdict} |")
    print(f"| shape | {ours} | mergekit 0.1.5 | outputs |\n|---|---|---|---|")
    print("\n".join(rows))
    both = sum(1 for name in names if all(results[tool].get(name, {}).get("ok") for tool in counts))
    print(
        f"\n{ours} ran {counts[ours]} of {len(names)}; mergekit ran {counts['mergekit']} of {len(names)}; "
        f"where both ran ({both}), {agreeing} outputs agree (no row with 'DIFFERENT' or 'differ:')"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
