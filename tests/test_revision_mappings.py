"""`revision:` inside a model reference written as a mapping (`base_model: {model: X, revision: R}`) is the hub
revision, as beside `model:` in a models entry (issue 19); before, it was silently dropped. The run at that revision
is in test_check.py, against a stand-in hub."""

from __future__ import annotations

import pytest

from composer.errors import ComposerError
from composer.moe.schema import parse_moe_config
from composer.recipe import parse_recipe


def test_a_revision_in_every_mapping_spelling_is_kept():
    recipe = parse_recipe(
        """merge_method: ties
base_model: {model: org/base, revision: v1}
tokenizer_source: {model: org/tokens, revision: t1}
models:
  - model: {model: org/a, revision: a1}
  - model: {model: {path: org/b}, revision: b1}
  - model: org/c
    revision: c1
  - model: {model: {path: org/d, revision: d1}}
  - model: org/e
"""
    )
    assert recipe.base_model == "org/base@v1" and recipe.tokenizer_source == "org/tokens@t1"
    assert [entry.model for entry in recipe.models] == ["org/a@a1", "org/b@b1", "org/c@c1", "org/d@d1", "org/e"]
    sliced = parse_recipe(
        """merge_method: slerp
slices:
  - base_model: {model: org/a, revision: s1}
    sources:
      - model: {model: org/a, revision: s1}
        layer_range: [0, 2]
      - model: {model: org/b, revision: 7}
        layer_range: [0, 2]
parameters: {t: 0.5}
tokenizer: {source: {model: org/b, revision: 7}}
"""
    )
    assert sliced.slices[0].base_model == "org/a@s1"
    assert [source.model for source in sliced.slices[0].sources] == ["org/a@s1", "org/b@7"]
    assert sliced.tokenizer.source == "org/b@7"


def test_a_revision_in_a_stage_and_in_an_moe_recipe_is_kept():
    staged = parse_recipe(
        """stages:
  - name: first
    merge_method: linear
    models:
      - model: {model: org/a, revision: a1}
      - model: org/b
  - name: second
    merge_method: linear
    models:
      - model: first
      - model: {model: org/c, revision: c1}
"""
    )
    assert staged.input_models() == ["org/a@a1", "org/b", "org/c@c1"]
    moe = parse_moe_config(
        """base_model: {model: org/base, revision: v1}
gate_mode: random
experts:
  - source_model: {model: org/a, revision: a1}
  - source_model: org/b
""",
        "m.yml",
    )
    assert moe.base_model == "org/base@v1"
    assert [expert.source_model for expert in moe.experts] == ["org/a@a1", "org/b"]


def test_a_revision_in_a_mapping_is_refused_where_it_cannot_hold(tmp_path):
    (tmp_path / "here").mkdir()
    with pytest.raises(
        ComposerError, match=r"r\.yml, line 3: 'base_model\.revision' is given, but the model 'org/x@dev'"
    ):
        parse_recipe(
            "merge_method: linear\nbase_model:\n  {model: org/x@dev, revision: main}\nmodels:\n  - model: org/y\n",
            "r.yml",
        )
    local = "merge_method: linear\nmodels:\n  - model:\n      model: here\n      revision: main\n  - model: org/y\n"
    with pytest.raises(
        ComposerError, match=r"line 5: 'models\[0\]\.model\.revision' is set, but the model 'here' is a local path"
    ):
        parse_recipe(local, "r.yml", tmp_path)
    with pytest.raises(ComposerError, match=r"'tokenizer_source\.revision' must be a branch, tag or commit"):
        parse_recipe(
            "merge_method: linear\nmodels:\n  - model: org/y\ntokenizer_source: {model: org/y, revision: [1]}\n"
        )


def test_revision_beside_an_experts_source_model_is_its_hub_revision():
    head = "base_model: org/base\nexperts:\n"
    config = parse_moe_config(head + "  - source_model: org/a\n    revision: v2\n    positive_prompts: [x]\n")
    assert config.experts[0].source_model == "org/a@v2"
    for expert, fault in (
        ("  - source_model: org/a@v1\n    revision: v2\n", "already names a revision"),
        ("  - source_model: ./a\n    revision: v2\n", "local path"),
    ):
        with pytest.raises(ComposerError, match=fault):
            parse_moe_config(head + expert + "    positive_prompts: [x]\n")
