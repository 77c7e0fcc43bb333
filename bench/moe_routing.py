"""Routing shares of SmolLM2-135M-Instruct x2 (code expert, story expert, top-1) on held-out prompts, per gate mode.

    .venv/bin/python bench/moe_routing.py [--write] [MODE/POOLING ...]   e.g. hidden/last

Builds the plan of recipes/smollm2-moe-code-story.yml for each gate setting, takes the router rows the plan
would write, and routes the held-out prompts of tests/data/moe_heldout.yml through them (both experts are the
base model, so the MoE's router inputs are the dense model's). --write also writes the default MoE and routes
through the written model with transformers, as `compose route` does.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-moe-code-story.yml"
HELD_OUT = ROOT / "tests" / "data" / "moe_heldout.yml"
VARIANTS = [
    ("hidden", "mean", "discriminant"),
    ("hidden", "mean", "average"),
    ("hidden", "last", "discriminant"),
    ("hidden", "last", "average"),
    ("cheap_embed", "mean", "discriminant"),
    ("cheap_embed", "mean", "average"),
    ("random", "mean", "discriminant"),
    ("uniform_random", "mean", "discriminant"),
]


def recipe_text(mode: str, pooling: str, rows: str) -> str:
    from composer.bundled import smollm2_dir

    text = RECIPE.read_text().replace("HuggingFaceTB/SmolLM2-135M-Instruct", str(smollm2_dir()))
    return text.replace("gate_mode: hidden", f"gate_mode: {mode}\npooling: {pooling}\ngate_rows: {rows}")


def own_expert_shares(routing) -> tuple[float, float]:
    code, story = routing.counts("code").sum(0), routing.counts("story").sum(0)
    return (code[0] / code.sum()).item(), (story[1] / story.sum()).item()


def main() -> None:
    import torch

    from composer.architecture import architecture_for
    from composer.moe.hidden import load_tokenizer
    from composer.moe.plan import build_moe_plan
    from composer.moe.prompts import read_prompt_file
    from composer.moe.schema import parse_moe_config
    from composer.route import preview_routing

    torch.set_num_threads(2)
    groups = read_prompt_file(HELD_OUT)
    print(
        f"held-out: {', '.join(f'{len(v)} {k}' for k, v in groups.items())} prompts; shares of tokens x layers routed to their own expert"
    )
    print(f"{'gate_mode':<15} {'pooling':<8} {'rows':<13} {'code':>7} {'story':>7} {'seconds':>8}")
    chosen = [argument for argument in sys.argv[1:] if not argument.startswith("--")]
    for mode, pooling, rows in VARIANTS:
        if chosen and f"{mode}/{pooling}" not in chosen:
            continue
        started = time.perf_counter()
        text = recipe_text(mode, pooling, rows)
        plan = build_moe_plan(parse_moe_config(text), text)
        base = plan.sources[plan.parents[0]]
        gates = {}
        for tensor in plan.tensors:
            if tensor.operation.label == "router gate":
                layer = int(re.search(r"layers\.(\d+)\.", tensor.name).group(1))
                gates[layer] = tensor.operation.fn([base.read(ref.name) for ref in tensor.inputs])
        config = base.config()
        routing = preview_routing(
            base,
            config,
            architecture_for(config).layer_prefix,
            load_tokenizer(base),
            gates,
            groups,
            1,
            ["code", "story"],
        )
        code, story = own_expert_shares(routing)
        print(
            f"{mode:<15} {pooling:<8} {rows:<13} {code:>7.1%} {story:>7.1%} {time.perf_counter() - started:>8.1f}",
            flush=True,
        )
    if "--write" in sys.argv:
        from composer.compose import compose_moe_text
        from composer.execute import ExecutionOptions
        from composer.route import measure_routing

        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            out = Path(folder) / "moe"
            compose_moe_text(recipe_text("hidden", "mean", "discriminant"), out, ExecutionOptions())
            written = time.perf_counter() - started
            code, story = own_expert_shares(measure_routing(out, groups))
            print(
                f"written model (hidden, mean, discriminant): code {code:.1%}, story {story:.1%}; write {written:.1f} s, route {time.perf_counter() - started - written:.1f} s"
            )


if __name__ == "__main__":
    main()
