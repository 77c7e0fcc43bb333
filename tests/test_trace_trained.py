"""`compose trace`'s negative control as the forensics issue states it: two models of one architecture trained on the
same data from different random initialisations are independent, however alike their training made them; and the
trained relatives of one of them are traced back to it, not to the other. The tiny base of tests/tiny_finetunes.py
(trained from a random initialisation on English) has a twin here, trained the same way from another seed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.finetunes import finetune
from composer.compose import compose_text
from composer.execute import ExecutionOptions
from composer.trace.run import TraceOptions, trace_models
from helpers import BYTE_LEVEL_SPECIAL, byte_level_tokenizer, tiny_model_with_tokenizer
from tiny_finetunes import SETTINGS


@pytest.fixture(scope="module")
def twin(tiny_finetunes, tmp_path_factory) -> Path:
    """The base's twin: the same architecture, tokenizer, data and training, another random initialisation."""
    root = tmp_path_factory.mktemp("twin")
    start = tiny_model_with_tokenizer(root / "random", byte_level_tokenizer(320), BYTE_LEVEL_SPECIAL, seed=1)
    corpus = tiny_finetunes.corpora["base"]
    return finetune(start, corpus, SETTINGS["base"], tiny_finetunes.cache, lambda line: None, threads=1)


def verdicts(report) -> dict[str, str]:
    return {Path(candidate.model).name: candidate.verdict for candidate in report.candidates}


def test_a_model_trained_from_another_initialisation_is_independent(tiny_finetunes, twin):
    report = trace_models(
        str(twin), [str(tiny_finetunes.base), str(tiny_finetunes.code), str(tiny_finetunes.pt)], TraceOptions()
    )
    assert all(candidate.verdict == "independent" for candidate in report.candidates), verdicts(report)
    assert all(candidate.p_value > 1e-3 for candidate in report.candidates)
    assert report.recipe == ""


def test_a_merge_of_fine_tunes_names_its_parents_and_not_the_twin(tiny_finetunes, twin, tmp_path):
    code, pt = tiny_finetunes.code, tiny_finetunes.pt
    merged = tmp_path / "merged"
    compose_text(
        f"merge_method: linear\nmodels:\n  - {{model: {code}, parameters: {{weight: 0.35}}}}\n"
        f"  - {{model: {pt}, parameters: {{weight: 0.65}}}}\ndtype: bfloat16\n",
        merged,
        ExecutionOptions(progress=False),
    )
    (merged / "README.md").unlink()  # the card names the parents; the trace must not need it
    report = trace_models(str(merged), [str(code), str(pt), str(twin)], TraceOptions())
    found = {Path(candidate.model): candidate for candidate in report.candidates}
    assert found[code].verdict == "parent" and found[pt].verdict == "parent"
    assert found[twin].verdict == "independent" and found[twin].p_value > 1e-3
    for layer in report.layers:
        weights = {Path(model): weight for model, _, weight in layer.sources}
        assert weights[code] == pytest.approx(0.35, abs=0.02) and weights[pt] == pytest.approx(0.65, abs=0.02)
