"""`--png`: a heat map of SUSPECT's layers (rows) against each candidate's layers (columns, one block a candidate)."""

from __future__ import annotations

from pathlib import Path

from composer.trace.run import TraceReport

CELL = 14
GAP = 8
MARGIN = 40


def _color(value: float) -> tuple[int, int, int]:
    value = max(0.0, min(1.0, value))
    return (int(255 - 225 * value), int(255 - 160 * value), int(255 - 60 * value))


def draw_heat_map(report: TraceReport, path: Path) -> None:
    from PIL import Image, ImageDraw

    blocks = [(reference, report.matches[reference].similarity) for reference in report.matches]
    rows = len(report.suspect_layers)
    width = MARGIN + sum(similarity.shape[1] * CELL + GAP for _, similarity in blocks) + GAP
    height = MARGIN + rows * CELL + 2 * GAP + 12 * len(blocks)
    image = Image.new("RGB", (max(width, 200), height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), "SUSPECT layer (rows) x candidate layer (columns)", fill="black")
    for row in range(0, rows, max(1, rows // 10)):
        draw.text((4, MARGIN + row * CELL), str(report.suspect_layers[row]), fill="black")
    left = MARGIN
    for number, (_, similarity) in enumerate(blocks, start=1):
        draw.text((left, MARGIN - 14), f"#{number}", fill="black")
        for row in range(similarity.shape[0]):
            for column in range(similarity.shape[1]):
                x, y = left + column * CELL, MARGIN + row * CELL
                draw.rectangle([x, y, x + CELL - 1, y + CELL - 1], fill=_color(float(similarity[row, column])))
        left += similarity.shape[1] * CELL + GAP
    for number, (reference, _) in enumerate(blocks, start=1):
        draw.text((4, MARGIN + rows * CELL + GAP + 12 * (number - 1)), f"#{number}: {reference}", fill="black")
    image.save(str(path))
