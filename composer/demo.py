"""The demo: a SOLAR-style depth upscale of the real SmolLM2-135M-Instruct, compared with its source."""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

DEMO_RECIPE = """\
# SOLAR-style depth upscaling: two overlapping copies of the layer stack, 30 -> 44 layers.
name: {name}
merge_method: passthrough
slices:
  - sources:
      - model: {model}
        layer_range: [0, 22]
  - sources:
      - model: {model}
        layer_range: [8, 30]
dtype: float32
"""
PROMPT = "What is the capital of France?"


DEMO_NAME = "SmolLM2-135M-Instruct upscaled to 44 layers"


def is_demo_output(folder: Path) -> bool:
    """Whether `folder` holds an earlier demo's output (its recipe is the demo's), which the demo may replace."""
    try:
        recipe = (folder / "composer-recipe.yml").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return f"name: {DEMO_NAME}\n" in recipe


def run_demo(out: Path, force: bool, echo: Callable[[str], None] = print) -> None:
    """`force`: replace any of composer's outputs at `out`; an earlier demo output is replaced without it."""
    from composer.bundled import smollm2_dir
    from composer.compose import compose_text
    from composer.evaluate import greedy_generate, load_model, score_text
    from composer.execute import ExecutionOptions
    from composer.execute.output_folder import check_output_free

    check_output_free(out, force or is_demo_output(out))
    started = time.perf_counter()
    echo("1/3 converting SmolLM2-135M-Instruct from its GGUF wheel to safetensors (cached after the first run)")
    source = smollm2_dir()
    echo(f"    source model: {source}")
    echo("2/3 upscaling 30 -> 44 layers with slices [0,22] + [8,30]")
    recipe = DEMO_RECIPE.format(model=source, name=DEMO_NAME)
    report = compose_text(recipe, out, ExecutionOptions(force=force or is_demo_output(out), progress=None))
    echo(f"    wrote {report.tensors} tensors ({report.bytes_written / 1e6:.0f} MB) to {out} in {report.seconds:.1f} s")
    echo("3/3 evaluating both on a bundled text")
    text = resources.files("composer").joinpath("data/demo.txt").read_text()
    rows = []
    for label, path in (("source (30 layers)", source), ("upscaled (44 layers)", out)):
        model, tokenizer = load_model(str(path))
        score = score_text(model, tokenizer, text)
        answer = greedy_generate(model, tokenizer, PROMPT)
        rows.append((label, model.config.num_hidden_layers, score, answer))
    echo("")
    echo(f"{'model':<22} {'layers':>6} {'perplexity':>11} {'bits/byte':>10}")
    for label, layers, score, _ in rows:
        echo(f"{label:<22} {layers:>6} {score.perplexity:>11.2f} {score.bits_per_byte:>10.3f}")
    echo("")
    echo(f"greedy answers to: {PROMPT!r}")
    for label, _, _, answer in rows:
        echo(f"  {label}: {answer!r}")
    echo("")
    echo(
        "An upscaled model is a starting point for continued pre-training (as in SOLAR 10.7B); before it, perplexity rises."
    )
    echo(f"done in {time.perf_counter() - started:.0f} s; the upscaled model, its card and recipe are in {out}")
