"""OUT of `compose tune`: the best recipe's model (written by the usual executor), the tuned recipe, the report."""

from __future__ import annotations

import json
from pathlib import Path

from composer.compose import compose_text
from composer.execute import ExecutionOptions
from composer.recipe import parse_recipe
from composer.tune.portable import with_absolute_models
from composer.tune.report import build_report, draw_trials, readme_section
from composer.tune.run import Trials, TuneResult, TuneSettings


def parent_recipe(reference: str) -> str:
    return f"merge_method: passthrough\nmodels:\n  - model: {json.dumps(reference)}\n"


def score_everything(result: TuneResult, trials: Trials, settings: TuneSettings) -> dict:
    """(scores on --text, on --heldout) of the start recipe, the tuned one and each parent."""
    start, best = result.trials[0], result.best
    texts, heldout = settings.texts, settings.heldout

    def held(text: str) -> list:
        return trials.score_text(text, heldout) if heldout else []

    scored = {
        "start": (start.scores, held(result.text_for(start))),
        "tuned": (best.scores, held(result.text_for(best))),
    }
    for reference in parse_recipe(result.text_for(start), result.recipe_name, result.recipe_dir).input_models():
        text = parent_recipe(reference)
        scored[f"parent {reference}"] = (trials.score_text(text, texts), held(text))
    return scored


def write_output(result: TuneResult, trials: Trials, settings: TuneSettings, out: Path, force: bool) -> dict:
    scored = score_everything(result, trials, settings)
    report = build_report(result, settings.optimizer, settings.texts, settings.heldout, scored)
    best_text = result.text_for(result.best)
    trials.scorer.release()  # the executor's budget is its own: the parents' cache and the scored model are not held beside it
    options = ExecutionOptions(
        memory_budget=settings.memory_budget,
        force=force,
        progress=settings.progress,
        device=settings.device,
        ray=settings.ray,
        whole_process=settings.whole_process,
    )
    compose_text(best_text, out, options, result.recipe_dir)
    header = f"# tuned by compose tune from {result.recipe_name} ({len(result.trials)} trials, {report['objective']})\n"
    (out / "tuned-recipe.yml").write_text(
        header + with_absolute_models(best_text, result.recipe_dir, result.recipe_name).rstrip("\n") + "\n"
    )
    (out / "tune-report.json").write_text(json.dumps(report, indent=2) + "\n")
    draw_trials(report, out / "tune.png")
    with open(out / "README.md", "a", encoding="utf-8") as card:
        card.write(readme_section(report))
    return report
