"""What `compose tune` leaves beside the model: tune-report.json, a README section and tune.png (the objective of each
trial, and the best so far)."""

from __future__ import annotations

import math
from pathlib import Path

from composer.evaluate import TextScore
from composer.tune.ranges import number_text
from composer.tune.run import TuneResult
from composer.tune.texts import NamedText

OBJECTIVE = "mean bits per byte over the --text files"
STOPPED = {"trials": "all trials run", "minutes": "stopped by --minutes", "interrupted": "stopped by Ctrl-C"}


def _bits(scores: list[TextScore], texts: list[NamedText]) -> dict[str, float | None]:
    return {
        text.name: (score.bits_per_byte if math.isfinite(score.bits_per_byte) else None)
        for text, score in zip(texts, scores)
    }


def build_report(
    result: TuneResult,
    optimizer: str,
    texts: list[NamedText],
    heldout: list[NamedText],
    scored: dict[str, tuple[list[TextScore], list[TextScore]]],
) -> dict:
    """`scored`: label ("start", "tuned", "parent NAME") -> (scores on the --text files, on the --heldout files)."""
    best = result.best
    return {
        "recipe": result.recipe_name,
        "optimizer": optimizer,
        "objective": OBJECTIVE,
        "trials": len(result.trials),
        "stopped": result.stopped,
        "seconds": round(result.seconds, 2),
        "cpu_seconds": round(result.cpu_seconds, 2),
        "parameters": [
            {"key": mark.key, "line": mark.line, "range": [mark.low, mark.high], "start": mark.start, "tuned": value}
            for mark, value in zip(result.ranges, best.values)
        ],
        "history": [
            {
                "trial": number,
                "objective": trial.objective if math.isfinite(trial.objective) else None,
                "values": trial.values,
                **({"problem": trial.problem} if trial.problem else {}),
            }
            for number, trial in enumerate(result.trials)
        ],
        "scores": {
            label: {"text": _bits(on_text, texts), "heldout": _bits(on_heldout, heldout)}
            for label, (on_text, on_heldout) in scored.items()
        },
    }


def readme_section(report: dict) -> str:
    files = [(name, "text") for name in next(iter(report["scores"].values()))["text"]]
    files += [(name, "heldout") for name in next(iter(report["scores"].values()))["heldout"]]
    header = "| model | " + " | ".join(f"{Path(name).name} ({kind})" for name, kind in files) + " |"
    rows = [header, "|---" * (len(files) + 1) + "|"]
    for label, scores in report["scores"].items():
        cells = [scores[kind][name] for name, kind in files]
        rows.append(f"| {label} | " + " | ".join("-" if value is None else f"{value:.4f}" for value in cells) + " |")
    parameters = "\n".join(
        f"- `{item['key']}` (line {item['line']}): {number_text(item['start'])} -> {number_text(item['tuned'])} "
        f"in [{number_text(item['range'][0])}, {number_text(item['range'][1])}]"
        for item in report["parameters"]
    )
    return (
        f"\n## Tuning\n\nTuned with `compose tune` ({report['optimizer']}, {report['trials']} trials, {STOPPED[report['stopped']]}, "
        f"{report['seconds']:.0f} s) on the {OBJECTIVE}. Bits per byte on each file (lower is better; held-out files "
        f"were not used to tune):\n\n" + "\n".join(rows) + f"\n\nTuned numbers:\n\n{parameters}\n\n"
        "`tuned-recipe.yml` is the tuned recipe; `tune-report.json` has every trial; `tune.png` plots them.\n"
    )


def draw_trials(report: dict, path: Path) -> None:
    """The objective of each trial (dots) and the best so far (line) against the trial number."""
    from PIL import Image, ImageDraw

    values = [item["objective"] for item in report["history"]]
    finite = [value for value in values if value is not None]
    width, height, left, top, bottom, right = 640, 400, 70, 30, 40, 20
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    count = max(len(values) - 1, 1)

    def point(index: int, value: float) -> tuple[float, float]:
        return (
            left + (width - left - right) * index / count,
            top + (height - top - bottom) * (high - value) / (high - low),
        )

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((left, 8), f"{OBJECTIVE} per trial (dots), best so far (line)", fill="black")
    for value in (low, high):
        draw.text((4, point(0, value)[1] - 6), f"{value:.4f}", fill="black")
    draw.text((left, height - bottom + 6), "trial 0", fill="black")
    draw.text((width - right - 50, height - bottom + 6), f"trial {len(values) - 1}", fill="black")
    best, line = math.inf, []
    for index, value in enumerate(values):
        if value is None:
            continue
        x, y = point(index, value)
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(70, 110, 200))
        best = min(best, value)
        line.append(point(index, best))
    if len(line) > 1:
        draw.line(line, fill=(200, 60, 40), width=2)
    image.save(path)
