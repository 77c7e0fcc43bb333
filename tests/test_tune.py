"""compose tune: tune ranges in recipes, the layer-streamed score (equal to the written model's), a tune that moves
a weight toward the parent the text favours, the tuned recipe and report in OUT, and the bad inputs."""

from __future__ import annotations

import os

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # as the CLI sets it: spinning OpenMP threads slow tiny models on busy cores

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import (
    BYTE_LEVEL_SPECIAL,
    ENGLISH_TEXT,
    byte_level_tokenizer,
    compose_in_process,
    save_fine_tune,
    save_tiny_model,
    save_tokenizer,
)

TEXT = ENGLISH_TEXT.read_text()


def tiny_family(root: Path, model_type: str) -> tuple[Path, Path, Path]:
    """A base with a tokenizer (a context of 64 tokens, so texts span several scoring windows) and two fine-tunes."""
    base = save_tiny_model(root / f"{model_type}-base", model_type, layers=3, max_position_embeddings=64)
    save_tokenizer(byte_level_tokenizer(300), base, **BYTE_LEVEL_SPECIAL)
    return (
        base,
        save_fine_tune(base, root / f"{model_type}-a", seed=1, scale=0.05),
        save_fine_tune(base, root / f"{model_type}-b", seed=2, scale=0.05),
    )


def trained_on(base: Path, folder: Path, text: str, steps: int = 15) -> Path:
    """A real (if tiny) fine-tune: `base` trained for a few steps on `text`, so that text favours it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(str(base))(text, return_tensors="pt")["input_ids"][0]
    rows = torch.stack([ids[start : start + 64] for start in range(0, len(ids) - 64, 32)])
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(rows, labels=rows).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tuned_parents(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tune")
    base, other, _ = tiny_family(root, "llama")
    (root / "tune.txt").write_text(TEXT[:1500])
    (root / "heldout.txt").write_text(TEXT[1500:3000])
    return {"root": root, "base": base, "other": other, "trained": trained_on(base, root / "trained", TEXT[:3000])}


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_layer_streamed_bits_per_byte_equal_the_written_models(tmp_path: Path, model_type: str):
    from composer.compose import compose_text
    from composer.evaluate import load_model, score_text
    from composer.execute import ExecutionOptions
    from composer.tune.run import Trials, TuneResult, TuneSettings
    from composer.tune.texts import NamedText, window_stride

    base, a, b = tiny_family(tmp_path, model_type)
    recipe = (
        f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7, density: 0.5}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.4, density: 0.6}}\ndtype: bfloat16\n"
    )
    compose_text(recipe, tmp_path / "out", ExecutionOptions(progress=False))
    model, tokenizer = load_model(str(tmp_path / "out"))
    texts = [NamedText("one", TEXT[:700]), NamedText("two", TEXT[700:1000])]
    # tune's windows share one token (each token is run once); score_text gives the same with that stride
    stride = window_stride(model.config.max_position_embeddings)
    written = [score_text(model, tokenizer, text.text, stride=stride) for text in texts]
    trials = Trials(TuneResult("recipe", None, recipe, []), TuneSettings(texts=texts, heldout=[]))
    streamed = trials.score_text(recipe, texts)
    assert [score.tokens for score in streamed] == [score.tokens for score in written]
    assert written[0].tokens > 64  # several windows
    for ours, theirs in zip(streamed, written):
        assert abs(ours.bits_per_byte - theirs.bits_per_byte) < 1e-4
    cache = trials.scorer.cache
    reads = cache.reads
    again = trials.score_text(recipe, texts)  # the second trial reads its parents' tensors from the cache
    assert cache.reads == reads and cache.hits > 0 and again[0].bits_per_byte == streamed[0].bits_per_byte
    # kept as the merge takes them: in the recipe's dtype, converted once
    assert {value.dtype for key, (value, _, _) in cache.held.items() if key[0] != "derived"} == {torch.bfloat16}


@pytest.mark.parametrize("shape", [(3, 1000), (70_000,), (1,)])
def test_prepared_ties_is_the_methods_merge_bit_for_bit(shape):
    """TIES from magnitude tables made once (what a tune trial runs) against the method itself, on task vectors with
    many ties (few distinct values), at densities that split a tie, keep it whole, or keep everything."""
    from composer.methods import get_method
    from composer.native import library
    from composer.plan import Operation, PlannedTensor
    from composer.tune.prepared_ties import MagnitudeTable, is_prepared_ties, prepared_ties

    if library() is None:
        pytest.skip("no C compiler for the kernels")
    method = get_method("ties")
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=generator).to(torch.bfloat16)
    models = [
        (base.float() + torch.randint(-4, 5, shape, generator=generator) * 2.0**-7).to(torch.bfloat16),
        (base.float() + torch.randn(shape, generator=generator) * 0.01).to(torch.bfloat16),
    ]
    tables = [MagnitudeTable.of(model, base) for model in models]
    for weights, densities, normalize in [
        ([0.7, 0.4], [0.5, 0.3], True),
        ([1.0, 0.2], [0.111, 1.0], False),
        ([0.3, 0.9], [0.9999, 0.05], True),
    ]:
        params = {"weight": weights, "density": densities, "normalize": normalize, "rescale": False, "lambda": 0.8}
        params["int8_mask"] = False
        operation = Operation(label="ties", fn=lambda x, p=params: method.apply(x[:-1], x[-1], p), arguments=params)
        operation = dataclasses.replace(operation, compute_dtype=torch.bfloat16)
        planned = PlannedTensor("w", shape, torch.bfloat16, (), operation)
        inputs = [*models, base]
        assert is_prepared_ties(planned, inputs)
        ours, theirs = prepared_ties(planned, inputs, tables), operation.fn(inputs)
        assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16)), (weights, densities)


def test_a_tune_moves_the_weight_toward_the_parent_the_text_favours(tuned_parents, monkeypatch, capsys):
    from composer.evaluate import load_model, score_text
    from composer.tune.texts import window_stride

    root = tuned_parents["root"]
    recipe = root / "linear.yml"
    recipe.write_text(
        f"merge_method: linear  # the comment stays\nmodels:\n  - model: {tuned_parents['other']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {tuned_parents['trained']}\n    parameters:\n      weight: {{tune: [0, 1], start: 0.1}}\ndtype: float32\n"
    )
    out = root / "tuned"
    code = compose_in_process(
        monkeypatch,
        "tune",
        recipe,
        "--text",
        root / "tune.txt",
        "--heldout",
        root / "heldout.txt",
        "--trials",
        6,
        "--optimizer",
        "random",
        "--no-progress",
        out,
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "tune-report.json").read_text())
    (parameter,) = report["parameters"]
    assert parameter["key"] == "models[1].parameters.weight" and parameter["start"] == 0.1 and parameter["tuned"] > 0.3
    scores = report["scores"]
    tune_file, heldout_file = str(root / "tune.txt"), str(root / "heldout.txt")
    assert scores["tuned"]["text"][tune_file] < scores["start"]["text"][tune_file]
    assert scores["tuned"]["heldout"][heldout_file] < scores["start"]["heldout"][heldout_file]
    assert set(scores) == {"start", "tuned", f"parent {tuned_parents['other']}", f"parent {tuned_parents['trained']}"}
    assert len(report["history"]) == 6 and report["stopped"] == "trials"
    assert "## Tuning" in (out / "README.md").read_text() and (out / "tune.png").read_bytes()[:4] == b"\x89PNG"
    tuned = (out / "tuned-recipe.yml").read_text()
    assert "tune:" not in tuned and "# the comment stays" in tuned
    # the tuned recipe runs with compose, and its model scores what the report says
    assert compose_in_process(monkeypatch, tuned and out / "tuned-recipe.yml", root / "again") == 0
    model, tokenizer = load_model(str(root / "again"))
    for path, reported in [
        (tune_file, scores["tuned"]["text"][tune_file]),
        (heldout_file, scores["tuned"]["heldout"][heldout_file]),
    ]:
        written = score_text(model, tokenizer, Path(path).read_text(), stride=window_stride(64))
        assert abs(written.bits_per_byte - reported) < 1e-4


def test_cma_es_tunes_a_gradient_of_ranges(tuned_parents, monkeypatch, capsys):
    pytest.importorskip("cma")
    root = tuned_parents["root"]
    recipe = root / "gradient.yml"
    recipe.write_text(
        f"merge_method: slerp\nbase_model: {tuned_parents['other']}\nmodels:\n  - model: {tuned_parents['other']}\n"
        f"  - model: {tuned_parents['trained']}\nparameters:\n  t: [{{tune: [0, 1]}}, {{tune: [0, 1]}}]\n"
    )
    code = compose_in_process(
        monkeypatch, "tune", recipe, "--text", root / "tune.txt", "--trials", 6, "--no-progress", root / "cma"
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((root / "cma" / "tune-report.json").read_text())
    assert report["optimizer"] == "cma" and len(report["parameters"]) == 2
    assert report["history"][0]["objective"] > min(item["objective"] for item in report["history"])


def test_ranges_become_numbers_in_the_recipe_text_as_written():
    from composer.tune.ranges import find_ranges, mark_everything, with_values

    text = (
        "merge_method: linear  # kept\nmodels:\n  - model: a\n    parameters:\n      weight: &w {tune: [-1, 1]}\n"
        "  - model: b\n    parameters:\n      weight:\n        tune: [0, 2]\n  - model: c\n    parameters: {weight: *w}\n"
    )
    ranges = find_ranges(text, "r.yml")
    assert [(mark.key, mark.line, mark.start) for mark in ranges] == [
        ("models[0].parameters.weight", 5, 0.0),
        ("models[1].parameters.weight", 8, 1.0),
    ]
    concrete = with_values(text, ranges, [0.25, 1.5])
    assert "# kept" in concrete and "&w 0.25" in concrete and "tune" not in concrete
    from composer.recipe import parse_recipe

    recipe = parse_recipe(concrete)
    assert [entry.parameters["weight"] for entry in recipe.models] == [0.25, 1.5, 0.25]
    marked = mark_everything(
        "merge_method: ties\nparameters: {density: 0.9, normalize: true}\nmodels:\n  - model: a\n    parameters: {weight: [0.2, 1]}\n",
        "r",
    )
    assert [(mark.key, mark.low, mark.high, mark.start) for mark in find_ranges(marked, "r")] == [
        ("parameters.density", 0.45, 1, 0.9),
        ("models[0].parameters.weight[0]", -0.05, 0.45, 0.2),
        ("models[0].parameters.weight[1]", 0.5, 1.5, 1),
    ]


@pytest.mark.parametrize(
    "recipe_body, options, message",
    [
        (
            "parameters:\n  t: {tune: [-0.5, 1]}\n",
            [],
            "line 7: recipe key 'parameters.t': the range [-0.5, 1] leaves the domain of 't', which takes numbers from 0 to 1",
        ),
        (
            "parameters:\n  t: 0.5\n",
            [],
            "has nothing to tune: write a range in place of a number to tune it, e.g. `weight: {tune: [0, 1]}`",
        ),
        ("parameters:\n  t: {tune: [0, 1]}\n", ["--minutes", "0"], "--minutes 0: give a positive number of minutes"),
        (
            "parameters:\n  t: {tune: [0, 1]}\ndtype: {tune: [0, 1]}\n",
            [],
            "a tune range at 'dtype' stands where composer has no number to tune",
        ),
        ("parameters:\n  t: {tune: [0, 1]}\n", ["--text", "EMPTY"], "is empty; there is nothing to score"),
        ("parameters:\n  t: {tune: [0, 1]}\n", ["--text", "SHORT"], "is 1 token(s) long for the tokenizer"),
        (
            "parameters:\n  t: {tune: [0, 1]}\n",
            ["--memory-budget", "20KB"],
            "more than --memory-budget 0.00 GB; give a larger --memory-budget",
        ),
    ],
)
def test_bad_input_is_one_paragraph(tuned_parents, monkeypatch, capsys, recipe_body, options, message):
    root = tuned_parents["root"]
    recipe = root / "bad.yml"
    recipe.write_text(
        f"merge_method: slerp\nbase_model: {tuned_parents['base']}\nmodels:\n  - model: {tuned_parents['base']}\n"
        f"  - model: {tuned_parents['other']}\n{recipe_body}"
    )
    (root / "empty.txt").write_text(" \n")
    (root / "short.txt").write_text("a")
    options = [{"EMPTY": root / "empty.txt", "SHORT": root / "short.txt"}.get(option, option) for option in options]
    texts = [] if "--text" in options else ["--text", root / "tune.txt"]
    code = compose_in_process(
        monkeypatch,
        "tune",
        recipe,
        *texts,
        *options,
        "--optimizer",
        "random",
        "--trials",
        2,
        "--no-progress",
        root / "bad-out",
    )
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("error: ") and "Traceback" not in error
    assert message in " ".join(error.split())
    assert not (root / "bad-out").exists()


def test_compose_refuses_a_recipe_with_ranges_and_points_to_tune(tuned_parents, monkeypatch, capsys):
    root = tuned_parents["root"]
    recipe = root / "untuned.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {tuned_parents['base']}\n    parameters:\n      weight: {{tune: [0, 1]}}\n"
    )
    assert compose_in_process(monkeypatch, recipe, root / "untuned-out") == 2
    assert (
        "line 5: 'models[0].parameters.weight' is a tune range, not a number; run the recipe with `compose tune`"
        in " ".join(capsys.readouterr().err.split())
    )


def test_cma_missing_names_the_package(tuned_parents, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "cma", None)  # as if it were not installed
    root = tuned_parents["root"]
    recipe = root / "cma-missing.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {tuned_parents['base']}\n    parameters: {{weight: {{tune: [0, 1]}}}}\n"
        f"  - model: {tuned_parents['other']}\n    parameters: {{weight: 1}}\n"
    )
    code = compose_in_process(
        monkeypatch, "tune", recipe, "--text", root / "tune.txt", "--no-progress", root / "no-cma"
    )
    assert code == 2 and "pip install 'cma>=3.3'" in " ".join(capsys.readouterr().err.split())


# --- --optimizer gradient -----------------------------------------------------------------------------------------


def _method_params(label: str, **given) -> dict:
    from composer.methods import get_method

    method = get_method(label)
    params = {
        parameter.name: ([parameter.default] * 2 if parameter.per_model else parameter.default)
        for parameter in method.parameters
    }
    params.update(given)
    if method.random:
        params["seed"] = 7
    return params


@pytest.mark.parametrize(
    "label, given",
    [
        ("linear", {"weight": [0.7, 0.4]}),
        ("task_arithmetic", {"weight": [0.7, -0.4], "lambda": 1.3}),
        ("ties", {"weight": [0.7, 0.4], "density": [0.5, 0.6]}),
        ("ties", {"weight": [0.7, 0.4], "density": [0.5, 0.6], "rescale": True, "normalize": False, "lambda": 0.8}),
        ("dare_ties", {"weight": [0.7, 0.4], "density": [0.5, 0.6]}),
        ("dare_linear", {"weight": [0.7, 0.4], "density": [0.5, 0.6]}),
        ("breadcrumbs_ties", {"weight": [0.7, 0.4], "density": [0.6, 0.7], "gamma": [0.05, 0.1]}),
        ("della", {"weight": [0.7, 0.4], "density": [0.5, 0.6], "epsilon": [0.1, 0.1]}),
        ("slerp", {"t": 0.3}),
        ("passthrough", {"scale": [0.6]}),
    ],
)
def test_differentiable_merges_equal_the_methods_at_a_point(label, given):
    from composer.methods import get_method
    from composer.plan.lines import LINES_SCALE, scaled_by_depth
    from composer.plan.model import Operation
    from composer.tune.differentiable import merge

    generator = torch.Generator().manual_seed(3)
    base = torch.randn(24, 40, generator=generator)
    others = [base + 0.1 * torch.randn(24, 40, generator=generator) for _ in range(2)]
    method = get_method(label)
    count = 1 if label in ("slerp", "passthrough") else 2
    params = _method_params(label, **given)
    inputs = others[:count] + ([base] if method.needs_base else [])
    expected = method.apply(others[:count], base if method.needs_base else None, params)
    assert torch.allclose(merge(label, inputs, params, params), expected, atol=1e-5)
    if method.needs_base:  # and with a LiNeS scale, against the plan's own wrapper
        operation = scaled_by_depth(
            Operation(label=label, fn=lambda tensors: method.apply(tensors[:count], tensors[-1], params)), 0.4
        )
        scaled = dict(params, **{LINES_SCALE: 0.4})
        assert torch.allclose(merge(label, inputs, scaled, scaled), operation.fn(inputs), atol=1e-5)


def _descent(tmp_path: Path, recipe: str, texts):
    from composer.tune.gradient import GradientDescent
    from composer.tune.ranges import find_ranges
    from composer.tune.run import Trials, TuneResult, TuneSettings, plan_text

    ranges = find_ranges(recipe, "r.yml")
    trials = Trials(TuneResult("r.yml", tmp_path, recipe, ranges), TuneSettings(texts=texts, heldout=[]))
    start = [mark.start for mark in ranges]
    return (
        trials,
        start,
        GradientDescent(trials.scorer, recipe, ranges, lambda text: plan_text(text, tmp_path, "r.yml"), "r.yml", start),
    )


@pytest.mark.parametrize(
    "model_type, body",
    [
        (
            "llama",
            (
                "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: {{tune: [0, 1], start: 0.6}}}}\n"
                "  - model: {b}\n    parameters: {{weight: [{{tune: [0, 1], start: 0.2}}, 0.5]}}\nparameters: {{lambda: {{tune: [0.5, 2], start: 1.2}}}}\n"
                "lines: {{alpha: {{tune: [0, 1], start: 0.4}}, beta: 1}}\n"
            ),
        ),
        (
            "qwen3",
            "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {a}\nparameters:\n  t: [{{tune: [0, 1], start: 0.3}}, {{tune: [0, 1], start: 0.6}}]\n",
        ),
    ],
)
def test_the_gradient_matches_a_finite_difference_of_the_streamed_objective(tmp_path: Path, model_type: str, body: str):
    from composer.tune.texts import NamedText

    base, a, b = tiny_family(tmp_path, model_type)
    texts = [NamedText("one", TEXT[:300]), NamedText("two", TEXT[300:500])]
    trials, start, descent = _descent(tmp_path, body.format(base=base, a=a, b=b) + "dtype: float32\n", texts)
    try:
        evaluated = descent.evaluator.run(start, texts)
    finally:
        descent.close()
    assert evaluated.objective == pytest.approx(trials.score(start, texts).objective, abs=1e-6)  # the same forward pass
    step = 1e-3
    for k, gradient in enumerate(evaluated.gradient):
        up, down = list(start), list(start)
        up[k] += step
        down[k] -= step
        difference = (trials.score(up, texts).objective - trials.score(down, texts).objective) / (2 * step)
        assert gradient == pytest.approx(difference, rel=0.02, abs=2e-3), k


def test_a_gradient_tune_lowers_bits_per_byte(tuned_parents, monkeypatch, capsys):
    root = tuned_parents["root"]
    recipe = root / "ties-gradient.yml"
    recipe.write_text(
        f"merge_method: ties\nbase_model: {tuned_parents['base']}\nmodels:\n  - model: {tuned_parents['other']}\n"
        f"    parameters: {{weight: {{tune: [0, 1], start: 0.5}}, density: 0.5}}\n  - model: {tuned_parents['trained']}\n"
        f"    parameters: {{weight: {{tune: [0, 1], start: 0.1}}, density: 0.5}}\nparameters: {{normalize: false}}\ndtype: float32\n"
    )
    code = compose_in_process(
        monkeypatch,
        "tune",
        recipe,
        "--text",
        root / "tune.txt",
        "--optimizer",
        "gradient",
        "--trials",
        4,
        "--no-progress",
        root / "gradient-out",
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((root / "gradient-out" / "tune-report.json").read_text())
    assert report["optimizer"] == "gradient" and len(report["history"]) == 4
    objectives = [item["objective"] for item in report["history"]]
    assert (
        objectives[-1] < objectives[0] and report["parameters"][1]["tuned"] > 0.1
    )  # toward the parent the text favours
    tune_file = str(root / "tune.txt")
    assert report["scores"]["tuned"]["text"][tune_file] < report["scores"]["start"]["text"][tune_file]


@pytest.mark.parametrize(
    "mark, message",
    [
        (
            "density: {tune: [0.2, 0.9]}",
            "recipe key 'models[0].parameters.density' tunes 'density', which chooses what is kept, and the merge is not differentiable",
        ),
        ("density: 0.5", "use --optimizer cma"),
    ],
)
def test_gradient_refuses_what_the_merge_is_not_differentiable_in(tuned_parents, monkeypatch, capsys, mark, message):
    root = tuned_parents["root"]
    recipe = root / "not-differentiable.yml"
    weight = "{tune: [0, 1]}" if "tune" not in mark else 0.5
    recipe.write_text(
        f"merge_method: ties\nbase_model: {tuned_parents['base']}\nmodels:\n  - model: {tuned_parents['other']}\n"
        f"    parameters: {{weight: {weight}, {mark}}}\n"
    )
    if "tune" not in mark:  # a tuned weight of a method composer has no differentiable form of
        recipe.write_text(
            f"merge_method: nuslerp\nmodels:\n  - model: {tuned_parents['base']}\n    parameters: {{weight: {{tune: [0.1, 1]}}}}\n"
            f"  - model: {tuned_parents['other']}\n    parameters: {{weight: 0.5}}\n"
        )
    code = compose_in_process(
        monkeypatch,
        "tune",
        recipe,
        "--text",
        root / "tune.txt",
        "--optimizer",
        "gradient",
        "--trials",
        2,
        "--no-progress",
        root / "refused",
    )
    error = " ".join(capsys.readouterr().err.split())
    assert code == 2 and error.startswith("error: ") and message in error and "Traceback" not in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_tune_device_is_checked_like_the_other_commands(tuned_parents, monkeypatch, capsys):
    root = tuned_parents["root"]
    recipe = root / "device.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {tuned_parents['base']}\n    parameters: {{weight: {{tune: [0, 1]}}}}\n"
    )
    for device, message in [
        ("cuda", "--device cuda was asked for, but torch"),
        ("tpu", "--device 'tpu' is not a device composer can use"),
    ]:
        code = compose_in_process(
            monkeypatch,
            "tune",
            recipe,
            "--text",
            root / "tune.txt",
            "--device",
            device,
            "--no-progress",
            root / "device-out",
        )
        assert code == 2 and message in " ".join(capsys.readouterr().err.split())


# --- LiNeS --------------------------------------------------------------------------------------------------------


def test_lines_scales_each_layers_task_vector_by_depth(tmp_path: Path, monkeypatch, capsys):
    from helpers import load_state

    base = save_tiny_model(tmp_path / "base", "llama", layers=3, tie_word_embeddings=False)
    a, b = (
        save_fine_tune(base, tmp_path / "a", seed=1, scale=0.05),
        save_fine_tune(base, tmp_path / "b", seed=2, scale=0.05),
    )
    recipe = tmp_path / "lines.yml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.4}}\nlines: {{alpha: 0.2, beta: 1.1}}\ndtype: float32\n"
    )
    assert compose_in_process(monkeypatch, recipe, tmp_path / "out") == 0, capsys.readouterr().err
    written, x0, x1, x2 = (load_state(folder) for folder in (tmp_path / "out", base, a, b))
    alpha, beta, count = 0.2, 1.1, 3
    for name, tensor in written.items():
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            scale = alpha + (beta - alpha) * layer / (count - 1)
        else:
            scale = alpha if "embed_tokens" in name else beta
        expected = x0[name] + scale * (0.7 * (x1[name] - x0[name]) + 0.4 * (x2[name] - x0[name]))
        assert torch.allclose(tensor, expected, atol=1e-6), name
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\nlines: {{alpha: 0.2, beta: 1}}\n"
    )
    assert compose_in_process(monkeypatch, recipe, tmp_path / "no-base") == 2
    assert "LiNeS scales the merge's task vector" in " ".join(capsys.readouterr().err.split())


def test_linear_layers_through_onednn_compute_what_torch_does_and_only_where_they_may():
    """Scoring (compose eval, tune's trials) runs float32 CPU linear layers through oneDNN where MKL would leave
    AVX-512 unused (AMD): the same products to float32 rounding, with and without bias, any leading dimensions; a
    layer that needs a gradient, or is not float32, keeps torch's own; the switch is undone after the block."""
    import composer.cpu as cpu

    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        pytest.skip("this torch has no oneDNN linear")
    torch.manual_seed(0)
    original = torch.nn.Linear.forward
    layers = [torch.nn.Linear(48, 40), torch.nn.Linear(48, 40, bias=False)]
    inputs = [torch.randn(7, 48), torch.randn(2, 5, 48)]
    with torch.no_grad():
        expected = [[layer(x) for x in inputs] for layer in layers]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu, "onednn_linears_are_faster", lambda: True)
        with torch.no_grad(), cpu.linears_through_onednn():
            assert torch.nn.Linear.forward is not original
            for layer, wanted in zip(layers, expected):
                for x, y in zip(inputs, wanted):
                    got = layer(x)
                    assert got.shape == y.shape and torch.allclose(got, y, rtol=1e-5, atol=1e-6)
        with cpu.linears_through_onednn():
            x = inputs[0].requires_grad_()
            layers[0](x).sum().backward()  # torch's own: oneDNN's op has no gradient
            assert x.grad is not None
            half = torch.nn.Linear(48, 40).bfloat16()
            assert half(inputs[0].detach().bfloat16()).dtype == torch.bfloat16
    assert torch.nn.Linear.forward is original
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPOSER_ONEDNN", "0")  # turned off: torch's own everywhere
        assert not cpu.onednn_linears_are_faster()
        with cpu.linears_through_onednn():
            assert torch.nn.Linear.forward is original
