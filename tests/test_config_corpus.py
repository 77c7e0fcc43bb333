"""Real-world mergekit config shapes (issue 19). The corpus of tests/data/mergekit_configs (configs as model cards,
blogs and repos write them, on tiny stand-ins: tests/corpus_models.py) must plan in composer, or be refused with the
message its file names, which says how to fix it. Spellings that configs in the wild use are run beside the plain
spelling they mean: the two outputs must be the same bits. Also the keys mergekit reads and never uses (warned
about by name, then ignored as mergekit ignores them), and `chat_template` as mergekit reads it.
bench/config_corpus.py runs the corpus through mergekit 0.1.5 too (bench/RESULTS.md has the table)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from composer.compose import compose_text, plan_from_file
from composer.errors import ComposerError, ComposerWarning
from composer.execute import ExecutionOptions
from composer.recipe import parse_recipe
from corpus_models import build_models, corpus
from helpers import load_state, save_fine_tune, save_tiny_model

LINEAR = "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n  - model: {b}\n    parameters: {{weight: 0.3}}\n"
TIES = (
    "merge_method: ties\nbase_model: {base}\nmodels:\n"
    "  - model: {a}\n    parameters: {{density: 0.5, weight: 0.6}}\n"
    "  - model: {b}\n    parameters: {{density: 0.7, weight: 0.4}}\n"
)
TIES_PLAIN = TIES + "parameters:\n  normalize: false\n  rescale: true\ndtype: float32\n"
SLERP = "merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n"

# (a shape as configs in the wild write it, the plain spelling it means)
SAME_AS = {
    "quoted numbers and booleans": (
        "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: '0.7'}}\n"
        "  - model: {b}\n    parameters: {{weight: \"0.3\"}}\nparameters:\n  normalize: \"true\"\ndtype: float32\n",
        LINEAR + "parameters:\n  normalize: true\ndtype: float32\n",
    ),
    "booleans as quoted words": (
        TIES + "parameters:\n  normalize: 'False'\n  rescale: \"yes\"\ndtype: float32\n",
        TIES_PLAIN,
    ),
    "booleans as YAML 1.1 words": (TIES + "parameters:\n  normalize: no\n  rescale: on\ndtype: float32\n", TIES_PLAIN),
    "booleans as numbers": (TIES + "parameters:\n  normalize: 0\n  rescale: 1\ndtype: float32\n", TIES_PLAIN),
    "numbers without digits before the point or with an exponent": (
        "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: .5}}\n"
        "  - model: {b}\n    parameters: {{weight: 5e-1}}\nparameters:\n  lambda: +1.\ndtype: float32\n",
        "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
        "  - model: {b}\n    parameters: {{weight: 0.5}}\nparameters:\n  lambda: 1.0\ndtype: float32\n",
    ),
    "a gradient of quoted numbers": (
        "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: ['0.1', '0.5', '0.9']}}\n"
        "  - model: {b}\n    parameters: {{weight: 0.5}}\ndtype: float32\n",
        "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: [0.1, 0.5, 0.9]}}\n"
        "  - model: {b}\n    parameters: {{weight: 0.5}}\ndtype: float32\n",
    ),
    "quoted layer ranges": (
        "merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {a}, layer_range: ['0', '1']}}\n"
        "  - sources:\n      - {{model: {b}, layer_range: ['1', '2']}}\ndtype: float32\n",
        "merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 1]}}\n"
        "  - sources:\n      - {{model: {b}, layer_range: [1, 2]}}\ndtype: float32\n",
    ),
    "anchors, aliases and a merge key": (
        "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: &w\n      weight: 0.5\n"
        "  - model: {b}\n    parameters: *w\n  - model: {base}\n    parameters:\n      <<: *w\ndtype: float32\n",
        "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
        "  - model: {b}\n    parameters: {{weight: 0.5}}\n  - model: {base}\n    parameters: {{weight: 0.5}}\ndtype: float32\n",
    ),
    "flow style throughout": (
        "{{merge_method: ties, base_model: {base}, models: [{{model: {a}, parameters: {{density: 0.5, weight: 0.6}}}}, "
        "{{model: {b}, parameters: {{density: 0.7, weight: 0.4}}}}], parameters: {{normalize: false, rescale: true}}, "
        "dtype: float32}}\n",
        TIES_PLAIN,
    ),
    "every key and value quoted": (
        '"merge_method": "linear"\n"models":\n  - "model": "{a}"\n    "parameters": {{"weight": "0.7"}}\n'
        '  - "model": "{b}"\n    "parameters": {{"weight": "0.3"}}\n"dtype": "float32"\n',
        LINEAR + "dtype: float32\n",
    ),
    "nulls for keys not used": (
        "merge_method: linear\nbase_model: null\ntokenizer_source: null\nchat_template: null\nparameters: null\n"
        + LINEAR.removeprefix("merge_method: linear\n")
        + "dtype: float32\n",
        LINEAR + "dtype: float32\n",
    ),
    "empty parameters": (
        SLERP.replace("  - model: {a}\n", "  - model: {a}\n    parameters: {{}}\n").replace(
            "  - model: {b}\n", "  - model: {b}\n    parameters:\n"
        )
        + "parameters:\n  t: 0.3\ndtype: float32\n",
        SLERP + "parameters:\n  t: 0.3\ndtype: float32\n",
    ),
    "document markers: a leading '---', a closing '...' and an empty last document": (
        "---\n# from a model card\n" + LINEAR + "dtype: float32\n...\n---\n",
        LINEAR + "dtype: float32\n",
    ),
    "a key written twice with the same value": (
        LINEAR + "dtype: float32\nparameters:\n  normalize: true\ndtype: float32\n",
        LINEAR + "parameters:\n  normalize: true\ndtype: float32\n",
    ),
    "folders with a trailing slash": (  # the base listed as a model without the slash is the base still
        TIES_PLAIN.replace("base_model: {base}", "base_model: {base}/")
        .replace("models:\n", "models:\n  - model: {base}\n")
        .replace("model: {a}", "model: {a}/"),
        TIES_PLAIN,
    ),
    "dtype with torch's prefix": (LINEAR + "dtype: torch.bfloat16\n", LINEAR + "dtype: bfloat16\n"),
    # a base_model that the method has no use for is one more model of a `models:` merge, as in mergekit
    "karcher with a base_model": (
        "merge_method: karcher\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\ndtype: float32\n",
        "merge_method: karcher\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {base}\ndtype: float32\n",
    ),
    "linear with a base_model and a top-level weight": (
        "merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n"
        "parameters:\n  weight: 0.5\ndtype: float32\n",
        "merge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {base}\n"
        "parameters:\n  weight: 0.5\ndtype: float32\n",
    ),
    "linear with a base_model that has no weight": (
        "merge_method: linear\nbase_model: {base}\n"
        + LINEAR.removeprefix("merge_method: linear\n")
        + "dtype: float32\n",
        LINEAR + "dtype: float32\n",
    ),
    # keys mergekit reads and never uses: warned about by name, then ignored
    "a slice's residual_weight": (
        "merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 2]}}\n"
        "    residual_weight: 0.5\ndtype: float32\n",
        "merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 2]}}\ndtype: float32\n",
    ),
    "embed_slerp": (
        SLERP + "parameters:\n  t: 0.4\n  embed_slerp: true\ndtype: float32\n",
        SLERP + "parameters:\n  t: 0.4\ndtype: float32\n",
    ),
    "merge parameters beside 'parameters:' instead of under it": (
        TIES_PLAIN + "normalize: true\nrescale: false\nint8_mask: true\n",
        TIES_PLAIN,
    ),
    "merge parameters beside a model's or a source's 'parameters:'": (
        "merge_method: ties\nbase_model: {base}\nslices:\n  - sources:\n"
        "      - {{model: {base}, layer_range: [0, 2]}}\n"
        "      - {{model: {a}, layer_range: [0, 2], parameters: {{weight: 0.6}}, density: 0.5}}\n"
        "      - {{model: {b}, layer_range: [0, 2], parameters: {{weight: 0.4}}, density: 0.5}}\n"
        "    t: 0.5\ndtype: float32\n",
        "merge_method: ties\nbase_model: {base}\nslices:\n  - sources:\n"
        "      - {{model: {base}, layer_range: [0, 2]}}\n"
        "      - {{model: {a}, layer_range: [0, 2], parameters: {{weight: 0.6}}}}\n"
        "      - {{model: {b}, layer_range: [0, 2], parameters: {{weight: 0.4}}}}\ndtype: float32\n",
    ),
    "a per-tensor parameter set per model": (
        TIES_PLAIN.replace("weight: 0.6}}", "weight: 0.6, lambda: 1.5}}"),
        TIES_PLAIN,
    ),
    "mergekit's command-line options in the config": (
        LINEAR + "dtype: float32\nlazy_unpickle: true\nallow_crimes: true\nout_shard_size: 1B\n",
        LINEAR + "dtype: float32\n",
    ),
    "layer_range in a 'models' entry": (
        LINEAR.replace("    parameters: {{weight: 0.7}}", "    layer_range: [0, 2]\n    parameters: {{weight: 0.7}}")
        + "dtype: float32\n",
        LINEAR + "dtype: float32\n",
    ),
}
WARNED = {  # shape -> the keys its warnings must name
    "a slice's residual_weight": ["'slices[0].residual_weight'"],
    "a key written twice with the same value": ["key 'dtype' appears twice with the same value"],
    "embed_slerp": ["'embed_slerp'"],
    "merge parameters beside 'parameters:' instead of under it": ["'normalize'", "'rescale'", "'int8_mask'"],
    "layer_range in a 'models' entry": ["'models[0].layer_range'"],
    "merge parameters beside a model's or a source's 'parameters:'": [
        "'slices[0].sources[1].density'",
        "'slices[0].t'",
        "belongs under the 'parameters:' beside it",
    ],
    "a per-tensor parameter set per model": ["'models[0].parameters.lambda'", "has no effect there"],
    "mergekit's command-line options in the config": ["'lazy_unpickle'", "'allow_crimes'", "(--out-shard-size)"],
    "linear with a base_model that has no weight": ["'base_model'", "no 'weight' of its own, so it is left out"],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("config-corpus")
    base = save_tiny_model(root / "base", layers=2, seed=3)
    return {
        "root": root,
        "base": base,
        "a": save_fine_tune(base, root / "a", seed=1),
        "b": save_fine_tune(base, root / "b", seed=2, density=0.6),
    }


CORPUS = corpus()


@pytest.fixture(scope="module")
def corpus_models(tmp_path_factory) -> dict[str, str]:
    return build_models(tmp_path_factory.mktemp("corpus-models"))


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_corpus_config_plans_or_is_refused_saying_how(corpus_models, tmp_path: Path, name: str):
    config = CORPUS[name]
    path = tmp_path / f"{name}.yml"
    path.write_text(config.text(corpus_models))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ComposerWarning)
        if config.refused:
            with pytest.raises(ComposerError, match=re.escape(config.refused)):
                plan_from_file(path)
            return
        _, plan = plan_from_file(path)
    plan.close()
    assert plan.tensors


def _compose(tiny: dict[str, Path], text: str, name: str) -> dict[str, torch.Tensor]:
    out = tiny["root"] / "out" / name
    if not out.exists():
        compose_text(text.format(**tiny), out, ExecutionOptions(progress=False))
    return load_state(out)


@pytest.mark.parametrize("shape", sorted(SAME_AS))
def test_a_shape_from_the_wild_merges_as_its_plain_spelling(tiny, shape: str):
    wild, plain = SAME_AS[shape]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = _compose(tiny, wild, shape.replace(" ", "-").replace("'", "").replace(":", "").replace(",", ""))
    messages = " ".join(str(warning.message) for warning in caught if issubclass(warning.category, ComposerWarning))
    for key in WARNED.get(shape, []):
        assert key in messages, messages
    expected = _compose(tiny, plain, f"plain-{abs(hash(plain))}")
    assert merged.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(merged[name], expected[name])]
    assert not different, f"{shape}: {different[:3]} differ from the plain spelling"


def test_misplaced_parameters_say_where_they_belong():
    with pytest.warns(ComposerWarning, match=r"r.yml, line 3: 'normalize' has no effect there .* under 'parameters:'"):
        recipe = parse_recipe("merge_method: ties\nmodels: [{model: x}]\nnormalize: false\n", "r.yml")
    assert recipe.parameters is None


def test_typos_are_still_refused():
    """A misspelt key is no known key of mergekit's: mergekit would run something other than the file says."""
    for typo in ("normalise: true", "densty: 0.5", "out_dytpe: bfloat16"):
        with pytest.raises(ComposerError, match="unknown key"):
            parse_recipe(f"merge_method: ties\nmodels: [{{model: x}}]\n{typo}\n", "r.yml")


def test_a_merge_of_nothing_into_the_base_says_how_to_fix_it(tiny):
    text = "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {base}\n    parameters: {{weight: 1.0}}\n"
    with pytest.raises(ComposerError, match="The base model is not one of them.*merge_method: passthrough"):
        compose_text(text.format(**tiny), tiny["root"] / "nothing", ExecutionOptions(progress=False))


# ---- chat_template as mergekit reads it ----------------------------------------------------------------------


def _with_template(folder: Path, template: str) -> Path:
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return folder


def test_chat_template_auto_takes_the_template_most_models_have(tiny):
    root = tiny["root"]
    chatml = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    a = _with_template(save_fine_tune(tiny["base"], root / "chat-a", seed=5), chatml)
    b = _with_template(save_fine_tune(tiny["base"], root / "chat-b", seed=6), chatml)
    text = (
        f"merge_method: ties\nbase_model: {tiny['base']}\nmodels:\n  - model: {a}\n    parameters: {{density: 0.5, weight: 0.5}}\n"
        f"  - model: {b}\n    parameters: {{density: 0.5, weight: 0.5}}\nchat_template: auto\ndtype: float32\n"
    )
    compose_text(text, root / "auto", ExecutionOptions(progress=False))  # the base, the tokenizer source, has none
    assert (root / "auto" / "chat_template.jinja").read_text() == chatml


def test_chat_template_exaone_writes_the_format_not_the_word(tiny):
    text = LINEAR.format(**tiny) + "chat_template: exaone\ndtype: float32\n"
    compose_text(text, tiny["root"] / "exaone", ExecutionOptions(progress=False))
    assert "[|endofturn|]" in (tiny["root"] / "exaone" / "chat_template.jinja").read_text()
    with pytest.raises(ComposerError, match="'gemma' is not a known template name"):
        parse_recipe(LINEAR.format(**tiny) + "chat_template: gemma\n", "r.yml")


def test_a_document_used_only_for_its_tokenizer_is_a_stage(corpus_models, tmp_path: Path):
    """mergekit-multi: the final merge names an earlier document only as `tokenizer.source`; that document is
    merged first, and the output has its (union) vocabulary."""
    text = CORPUS["multi_tokenizer_from_stage"].text(corpus_models)
    compose_text(text, tmp_path / "out", ExecutionOptions(progress=False))
    rows = load_state(Path(corpus_models["ftok"]))["model.embed_tokens.weight"].shape[0]
    assert load_state(tmp_path / "out")["model.embed_tokens.weight"].shape[0] == rows == 322
