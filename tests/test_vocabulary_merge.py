"""Merging models whose vocabularies differ (`tokenizer_source`, `tokenizer:`): tiny models with real trained
tokenizers, some with added tokens of their own, others with a different tokenizer altogether."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import (
    BYTE_LEVEL_SPECIAL,
    SENTENCEPIECE_SPECIAL,
    byte_level_tokenizer,
    load_state,
    logits_of,
    save_fine_tune,
    sentencepiece_tokenizer,
    tiny_model_with_tokenizer,
)

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _with_added_tokens(base: Path, folder: Path, tokens: list[tuple[str, bool]], seed: int) -> Path:
    """A fine-tune of `base` that added `tokens` ((content, special)) to its tokenizer, with fresh rows for them."""
    from safetensors.torch import save_file
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    save_fine_tune(base, folder, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    for content, special in tokens:
        tokenizer.add_tokens([AddedToken(content, special=special, normalized=False)], special_tokens=special)
    tokenizer.save_pretrained(str(folder))
    state = load_state(folder)
    generator = torch.Generator().manual_seed(100 + seed)
    for name in (EMBED, HEAD):
        if name in state:
            extra = torch.randn((len(tokens), state[name].shape[1]), generator=generator) * 0.5
            state[name] = torch.cat([state[name], extra])
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = len(tokenizer)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocabulary-merge")
    base = tiny_model_with_tokenizer(root / "base", byte_level_tokenizer(300), BYTE_LEVEL_SPECIAL, seed=1, tied=False)
    return {
        "base": base,
        "tools": _with_added_tokens(base, root / "tools", [("<tool_call>", True), ("</tool_call>", True)], seed=2),
        "think": _with_added_tokens(
            base, root / "think", [("<think>", True), ("</tool_call>", True), ("ação", False)], seed=3
        ),
        "plain": save_fine_tune(base, root / "plain", seed=4),
        "sentencepiece": tiny_model_with_tokenizer(
            root / "sentencepiece", sentencepiece_tokenizer(420), SENTENCEPIECE_SPECIAL, seed=5, tied=False
        ),
    }


def _merge(tmp_path: Path, text: str, name: str = "out") -> Path:
    from composer.compose import compose_text
    from composer.execute import ExecutionOptions

    out = tmp_path / name
    compose_text(text, out, ExecutionOptions(progress=False))
    return out


def _linear(*models: Path, extra: str = "", weight: float = 0.5) -> str:
    """A linear merge of `models` with equal weights; `extra`: more top-level keys."""
    listed = "".join(f"  - model: {model}\n" for model in models)
    return f"merge_method: linear\nmodels:\n{listed}parameters: {{weight: {weight}}}\n{extra}"


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def test_union_merge_keeps_each_models_rows_for_its_own_tokens(models, tmp_path):
    out = _merge(tmp_path, _linear(models["tools"], models["think"], extra="tokenizer_source: union\ndtype: float32\n"))
    tools, think, merged = load_state(models["tools"]), load_state(models["think"]), load_state(out)
    vocab, tools_vocab, think_vocab = _vocab(out), _vocab(models["tools"]), _vocab(models["think"])
    assert len(vocab) == 300 + 4  # the base's 300, <tool_call>, </tool_call>, <think>, ação
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 304
    for name in (EMBED, HEAD):
        assert merged[name].shape == (304, 64)
        for token in ("<tool_call>",):
            assert torch.equal(merged[name][vocab[token]], tools[name][tools_vocab[token]])
        for token in ("<think>", "ação"):
            assert torch.equal(merged[name][vocab[token]], think[name][think_vocab[token]])
        # a token both added (at different ids) is blended from both rows; shared tokens are blended as usual
        both = vocab["</tool_call>"]
        expected = 0.5 * tools[name][tools_vocab["</tool_call>"]] + 0.5 * think[name][think_vocab["</tool_call>"]]
        torch.testing.assert_close(merged[name][both], expected)
        torch.testing.assert_close(merged[name][:300], 0.5 * tools[name][:300] + 0.5 * think[name][:300])
    # the output tokenizer splits the added tokens as their models did, and the model runs
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.encode("<think>x</tool_call>", add_special_tokens=False)[0] == vocab["<think>"]
    assert torch.isfinite(logits_of(out, torch.tensor([[vocab["<tool_call>"], 5, vocab["<think>"]]]))).all()


def test_task_arithmetic_over_a_union_keeps_an_added_tokens_row(models, tmp_path):
    """The base lacks <tool_call>: its stand-in is the row of the one model that has it, so that model's task vector
    there is zero for nobody else and the merged row is its own."""
    out = _merge(
        tmp_path,
        f"""
merge_method: task_arithmetic
base_model: {models['base']}
models:
  - model: {models['tools']}
    parameters: {{weight: 0.7}}
  - model: {models['plain']}
    parameters: {{weight: 0.7}}
tokenizer: {{source: union}}
dtype: float32
""",
    )
    merged, tools, base, plain = (
        load_state(out),
        load_state(models["tools"]),
        load_state(models["base"]),
        load_state(models["plain"]),
    )
    vocab, tools_vocab = _vocab(out), _vocab(models["tools"])
    assert len(vocab) == 302
    for token in ("<tool_call>", "</tool_call>"):
        torch.testing.assert_close(merged[EMBED][vocab[token]], tools[EMBED][tools_vocab[token]], rtol=0, atol=1e-6)
    expected = base[EMBED] + 0.7 * (tools[EMBED][:300] - base[EMBED]) + 0.7 * (plain[EMBED] - base[EMBED])
    torch.testing.assert_close(merged[EMBED][:300], expected)


def test_same_vocabularies_with_tokenizer_source_base_change_nothing(models, tmp_path):
    recipe = f"""
merge_method: slerp
base_model: {models['base']}
models:
  - model: {models['base']}
  - model: {models['plain']}
parameters: {{t: 0.3}}
dtype: float32
"""
    plain = _merge(tmp_path, recipe, "plain-out")
    with_key = _merge(tmp_path, recipe + "tokenizer_source: base\n", "with-key")
    # the tensors' bytes (the headers differ only in the provenance record, whose recipe digest differs)
    plain_state, keyed_state = load_state(plain), load_state(with_key)
    assert plain_state.keys() == keyed_state.keys()
    assert all(torch.equal(plain_state[name], keyed_state[name]) for name in plain_state)


def test_tokens_settings_force_zero_and_padding(models, tmp_path):
    out = _merge(
        tmp_path,
        _linear(models["tools"], models["plain"], weight=1.0)
        + f"""tokenizer:
  source: union
  pad_to_multiple_of: 64
  tokens:
    </tool_call>:
      source: {{kind: zero}}
      force: true
    <|im_start|>:
      source: {{kind: model_token, model: {models['tools']}, token: "<|im_end|>"}}
      force: true
    <brand_new>: {{}}
""",
    )
    merged, tools = load_state(out), load_state(models["tools"])
    vocab, tools_vocab = _vocab(out), _vocab(models["tools"])
    assert len(vocab) == 303 and merged[EMBED].shape[0] == 320
    assert torch.equal(merged[EMBED][vocab["</tool_call>"]], torch.zeros(64))  # forced to zero for both
    im_end = tools[EMBED][tools_vocab["<|im_end|>"]]
    torch.testing.assert_close(merged[EMBED][vocab["<|im_start|>"]], im_end)  # forced: both take tools' <|im_end|> row
    new = merged[EMBED][vocab["<brand_new>"]]
    assert torch.isfinite(new).all() and new.abs().sum() > 0  # estimated in each model's space, not zero
    padding = merged[EMBED][303:]
    torch.testing.assert_close(padding, merged[EMBED][:303].mean(dim=0).expand_as(padding), rtol=1e-5, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 320
    assert logits_of(out).shape[-1] == 320


def test_a_token_setting_naming_a_model_without_the_token_is_refused(models, tmp_path):
    from composer.errors import ComposerError

    with pytest.raises(ComposerError, match=r"tokenizer.tokens.<think>.source.*has no token"):
        _merge(
            tmp_path,
            _linear(models["tools"], models["think"])
            + f"""tokenizer:
  source: union
  tokens:
    <think>: {{source: {models['tools']}}}
""",
        )
    assert not (tmp_path / "out").exists()


def test_different_vocabularies_without_tokenizer_keys_are_refused_with_a_hint(models, tmp_path):
    from composer.errors import ComposerError

    with pytest.raises(ComposerError, match="tokenizer_source: union"):
        _merge(tmp_path, _linear(models["tools"], models["think"]))


def test_merge_across_tokenizer_families_speaks_the_chosen_vocabulary(models, tmp_path):
    """A SentencePiece model merged into the byte-level base's vocabulary: tokens of the same text keep its rows,
    the others take the base's (its stand-in), and the output loads and runs."""
    out = _merge(
        tmp_path,
        f"""
merge_method: linear
base_model: {models['base']}
models:
  - model: {models['base']}
    parameters: {{weight: 0.5}}
  - model: {models['sentencepiece']}
    parameters: {{weight: 0.5}}
tokenizer_source: base
dtype: float32
""",
    )
    from tokensurgery import Vocabulary, align

    merged, base, other = load_state(out), load_state(models["base"]), load_state(models["sentencepiece"])
    alignment = align(Vocabulary.from_folder(models["sentencepiece"]), Vocabulary.from_folder(models["base"]))
    shared = torch.from_numpy(alignment.copied)
    assert len(shared) > 50
    expected = base[EMBED].clone()
    expected[shared] = (
        0.5 * base[EMBED][shared] + 0.5 * other[EMBED][torch.from_numpy(alignment.source_ids[alignment.copied])]
    )
    torch.testing.assert_close(merged[EMBED], expected)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 300
    assert _vocab(out) == _vocab(models["base"])
    assert torch.isfinite(logits_of(out)).all()


def test_compose_plan_shows_the_vocabulary(models, tmp_path):
    import subprocess
    import sys

    (tmp_path / "recipe.yml").write_text(
        _linear(models["tools"], models["plain"], extra=f"base_model: {models['base']}\ntokenizer_source: union\n")
    )
    result = subprocess.run(
        [sys.executable, "-m", "composer.cli", "plan", "recipe.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "union of the models' tokenizer, 302 tokens (2 added to the base's 300)" in result.stdout
    assert "lacks 2 of them" in result.stdout


def test_a_stage_with_a_union_vocabulary_feeds_the_next_stage(models, tmp_path):
    out = _merge(
        tmp_path,
        f"""
stages:
  - name: both
    merge_method: linear
    models:
      - model: {models['tools']}
      - model: {models['think']}
    parameters: {{weight: 0.5}}
    tokenizer_source: union
    dtype: float32
  - name: final
    merge_method: slerp
    base_model: both
    models:
      - model: both
      - model: {models['plain']}
    parameters: {{t: 0.0}}
    tokenizer_source: base
    dtype: float32
""",
    )
    one_stage = _merge(
        tmp_path,
        _linear(models["tools"], models["think"], extra="tokenizer_source: union\ndtype: float32\n"),
        "one-stage",
    )
    assert _vocab(out) == _vocab(one_stage)
    merged, single = load_state(out), load_state(one_stage)
    assert torch.equal(merged[EMBED], single[EMBED]) and torch.equal(merged[HEAD], single[HEAD])


def test_a_model_whose_embedding_is_shorter_than_its_tokenizer_is_refused(models, tmp_path):
    from composer.errors import ComposerError

    short = tiny_model_with_tokenizer(
        tmp_path / "short", byte_level_tokenizer(300), BYTE_LEVEL_SPECIAL, seed=6, rows=250, tied=False
    )
    with pytest.raises(
        ComposerError,
        match=r"tensor 'model.embed_tokens.weight' has 250 rows, but the model's tokenizer has 300 tokens",
    ):
        _merge(tmp_path, _linear(models["base"], short, extra="tokenizer_source: union\n"))
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_source_when_no_model_has_a_tokenizer_is_refused_by_name(tmp_path):
    """Once a KeyError: a passthrough of two models without tokenizer files, told to take one's tokenizer."""
    from composer.compose import compose_text
    from composer.errors import ComposerError
    from composer.execute import ExecutionOptions
    from helpers import save_tiny_model

    first, second = (
        save_tiny_model(tmp_path / name, layers=2, seed=number) for number, name in enumerate(("first", "second"))
    )
    text = (
        f"merge_method: passthrough\nslices:\n  - sources: [{{model: {first}, layer_range: [0, 2]}}]\n"
        f"  - sources: [{{model: {second}, layer_range: [0, 2]}}]\ntokenizer_source: {second}\n"
    )
    with pytest.raises(
        ComposerError, match=r"line 5: recipe key 'tokenizer_source'.*no model of this merge has tokenizer files"
    ):
        compose_text(text, tmp_path / "out", ExecutionOptions(progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "second"]
