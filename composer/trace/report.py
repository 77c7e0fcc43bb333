"""The trace as a person reads it (per-layer table, verdicts) and as JSON (the schema in docs/trace.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from composer.trace.run import TraceReport


def _round(value: float | None, places: int = 6) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{places}g}")


def report_json(report: TraceReport) -> dict:
    return {
        "suspect": report.suspect,
        "tokenizer": [
            {
                "model": t.model,
                "verdict": t.verdict,
                "shared_vocab": _round(t.shared_vocab, 4),
                "same_ids": t.same_ids,
                "same_merges": t.same_merges,
                "same_special_tokens": t.same_special_tokens,
                "same_chat_template": t.same_chat_template,
                "same_normalizer": t.same_normalizer,
                "same_pre_tokenizer": t.same_pre_tokenizer,
                **({"note": t.note} if t.note else {}),
            }
            for t in report.tokenizers
        ],
        "candidates": [
            {
                "model": c.model,
                "verdict": c.verdict,
                "p_value": _round(c.p_value, 4),
                "contribution": _round(c.contribution, 4),
                "statistic": _round(c.test.statistic, 4),
                "null_mean": _round(c.test.null_mean, 4),
                "null_std": _round(c.test.null_std, 4),
                **({"note": c.note} if c.note else {}),
            }
            for c in report.candidates
        ],
        "layers": [
            {
                "layer": layer.layer,
                "sources": [{"model": m, "layer": j, "weight": _round(w, 4)} for m, j, w in layer.sources],
                "method": layer.method,
                "relative_error": _round(layer.relative_error, 4),
                **({"t": _round(layer_t(layer), 4)} if layer_t(layer) is not None else {}),
                **(
                    {"density": _round(_median_density(layer), 4)}
                    if layer.method in ("ties", "dare_ties", "dare_linear")
                    else {}
                ),
            }
            for layer in report.layers
        ],
        "recipe": report.recipe,
        "provenance": report.provenance.as_json(),
        "outer": [
            {
                "tensor": fit.name,
                "method": fit.method,
                "sources": [{"model": m, "weight": _round(w, 4)} for m, w in zip(fit.sources, fit.weights)],
                "relative_error": _round(fit.relative_error, 4),
                **({"aligned_rows": fit.aligned_rows} if fit.aligned_rows is not None else {}),
            }
            for fit in report.outer
        ],
        "method": report.method,
        "alpha": report.alpha,
        "notes": report.notes,
        **(
            {"verification": {name: _round(error, 4) for name, error in report.verification.items()}}
            if report.verification is not None
            else {}
        ),
    }


def write_json(report: TraceReport, path: Path) -> None:
    path.write_text(json.dumps(report_json(report), indent=2) + "\n")


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    return values[len(values) // 2] if values else None


def _median_t(layer) -> float | None:
    return _median([fit.t for fit in layer.tensors if fit.t is not None])


def layer_t(layer) -> float | None:
    """SLERP's t; for a linear interpolation of two sources (weights summing to one) the second one's weight, which
    is the t of a SLERP between nearly parallel tensors (fine-tunes of one base), where SLERP is that interpolation."""
    if layer.method == "slerp":
        return _median_t(layer)
    if layer.method == "linear" and len(layer.sources) == 2:
        first, second = layer.sources[0][2], layer.sources[1][2]
        if first > 0 and second > 0 and abs(first + second - 1) <= 0.01:
            return second / (first + second)
    return None


def _median_density(layer) -> float | None:
    return _median([fit.density for fit in layer.tensors if fit.density is not None])


def _short(reference: str, width: int = 28) -> str:
    return reference if len(reference) <= width else "..." + reference[-(width - 3) :]


def format_report(report: TraceReport) -> str:
    lines = [f"SUSPECT: {report.suspect}", ""]
    if report.tokenizers:
        lines.append("tokenizer")
        lines += [f"  {comparison.line()}" for comparison in report.tokenizers]
        lines.append("")
    lines.append(f"{'layer':>5}  {'method':<16} {'rel. error':>10}  sources (model:layer weight)")
    for layer in report.layers:
        sources = ", ".join(f"{_short(m)}:{j} {w:.3f}" for m, j, w in layer.sources) or "-"
        extra = ""
        if layer_t(layer) is not None:
            extra = f"  t={layer_t(layer):.3f}"
        elif layer.method in ("ties", "dare_ties", "dare_linear") and _median_density(layer) is not None:
            extra = f"  density={_median_density(layer):.3f}"
        lines.append(f"{layer.layer:>5}  {layer.method:<16} {layer.relative_error:>10.4f}  {sources}{extra}")
    for fit in report.outer:
        sources = ", ".join(f"{_short(m)} {w:.3f}" for m, w in zip(fit.sources, fit.weights)) or "-"
        aligned = (
            f"  (through the tokenizer alignment: {fit.aligned_rows} shared tokens' rows)"
            if fit.aligned_rows is not None
            else ""
        )
        lines.append(f"{'':>5}  {fit.method:<16} {fit.relative_error:>10.4f}  {fit.name}: {sources}{aligned}")
    lines.append("")
    lines.append(f"verdicts (permutation test over matched rows; independent unless p < {report.alpha:g})")
    for candidate in report.candidates:
        note = f"  ({candidate.note})" if candidate.note else ""
        lines.append(
            f"  {candidate.verdict:<12} {candidate.model}  p={candidate.p_value:.2e}  contribution={candidate.contribution:.3f}{note}"
        )
    lines += [f"note: {note}" for note in report.notes]
    lines += ["", *report.provenance.lines()]
    if report.verification is not None:
        finite = [e for e in report.verification.values() if math.isfinite(e)]
        missing = len(report.verification) - len(finite)
        worst = max(report.verification.items(), key=lambda item: item[1] if math.isfinite(item[1]) else -1.0)
        lines.append("")
        lines.append(
            f"--verify: the recovered recipe rebuilds {len(finite)} of {len(report.verification)} tensors; "
            f"relative error mean {sum(finite) / max(len(finite), 1):.2e}, worst {worst[1]:.2e} ({worst[0]})"
            + (f"; {missing} missing or of another shape" if missing else "")
        )
    lines += ["", "recovered recipe:", report.recipe.rstrip()]
    return "\n".join(lines)
