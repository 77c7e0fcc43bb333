"""Tokenizer surgery on real tokenizers and models: SmolLM2 (byte-level BPE), Gemma 3 (SentencePiece with
byte fallback) and all-MiniLM-L6-v2 (WordPiece), and a real Gemma 3 -> SmolLM2 transplant."""

from __future__ import annotations

import json

import pytest
import torch

from tokensurgery import Match, Vocabulary, align

pytestmark = pytest.mark.real_model

ENGLISH = (
    "The small town sits at the bend of a slow brown river, where the old stone bridge still carries farm trucks "
    "and school buses across the water every morning. Most of the people who live there have known each other since childhood."
)
PORTUGUESE = (
    "A pequena cidade fica à beira de um rio largo e tranquilo, onde os pescadores saem de barco todas as manhãs antes "
    "do nascer do sol. No centro da cidade há uma praça com uma igreja antiga, algumas árvores grandes e um café."
)


@pytest.fixture(scope="module")
def vocabularies(smollm2_dir):
    from composer.bundled import gemma3_dir
    from composer.packages import minilm_dir

    return {
        "smollm2": Vocabulary.from_folder(smollm2_dir),
        "gemma3": Vocabulary.from_folder(gemma3_dir()),
        "minilm": Vocabulary.from_folder(minilm_dir()),
    }


@pytest.fixture(scope="module")
def gemma_into_smollm2(vocabularies):
    return align(vocabularies["smollm2"], vocabularies["gemma3"])


def _copied_from(alignment, token: str) -> str | None:
    token_id = alignment.target.id_of(token)
    source = alignment.source_ids[token_id]
    return alignment.model.tokens[source] if source >= 0 else None


def test_each_convention_is_decoded_to_the_text_it_stands_for(vocabularies):
    smollm2, gemma3, minilm = vocabularies["smollm2"], vocabularies["gemma3"], vocabularies["minilm"]
    surface = lambda vocabulary, token: vocabulary.surfaces[vocabulary.id_of(token)]  # noqa: E731
    assert surface(smollm2, "Ã§Ã£o") == "ção".encode()
    assert surface(smollm2, "ĠhelloĠworld".split("Ġworld")[0]) == b" hello"
    assert surface(smollm2, "Ċ") == b"\n"
    assert surface(gemma3, "▁também") == " também".encode()
    assert surface(gemma3, "<0x41>") == b"A"
    assert surface(gemma3, "Ċ") == "Ċ".encode()  # a literal letter in a SentencePiece vocabulary, not a newline
    assert surface(minilm, "##ing") == b"ing"
    assert surface(minilm, "hello") == b" hello"
    assert surface(minilm, ".") == b"."


def test_accented_byte_level_tokens_match_their_sentencepiece_counterparts(gemma_into_smollm2):
    assert _copied_from(gemma_into_smollm2, "ção") == "Ã§Ã£o"
    assert _copied_from(gemma_into_smollm2, "▁é") == "ĠÃ©"
    assert _copied_from(gemma_into_smollm2, "▁hello") == "Ġhello"
    assert _copied_from(gemma_into_smollm2, "\n") == "Ċ"
    assert _copied_from(gemma_into_smollm2, "<0xC3>") == "Ã"  # a lone byte, which only byte fallback writes


def test_byte_level_spellings_in_a_sentencepiece_vocabulary_are_not_decoded(gemma_into_smollm2):
    """Tokens spelled the same in both vocabularies but standing for different text (Gemma's letter `Ċ`,
    SmolLM2's newline `Ċ`) are never copied onto each other."""
    model, target = gemma_into_smollm2.model, gemma_into_smollm2.target
    false_friends = [
        token_id
        for token_id, token in enumerate(target.tokens)
        if token
        and (same := model.id_of(token)) is not None
        and model.surfaces[same] != target.surfaces[token_id]
        and target.surfaces[token_id] is not None
    ]
    assert len(false_friends) > 20
    assert all(
        gemma_into_smollm2.source_ids[token_id] != model.id_of(target.tokens[token_id]) for token_id in false_friends
    )
    assert _copied_from(gemma_into_smollm2, "Ċ") is None


def test_twins_whitespace_runs_and_control_tokens(gemma_into_smollm2):
    kinds = gemma_into_smollm2.kinds
    target = gemma_into_smollm2.target
    assert kinds[target.id_of("<0x2E>")] == Match.TWIN and _copied_from(gemma_into_smollm2, ".") == "."
    assert kinds[target.id_of("\n\n")] == Match.SPLIT  # SmolLM2 writes "\n\nThe" as Ċ Ċ The
    assert _copied_from(gemma_into_smollm2, "<bos>") == "<|endoftext|>"
    assert _copied_from(gemma_into_smollm2, "<end_of_turn>") == "<|im_end|>"
    assert _copied_from(gemma_into_smollm2, "<start_of_turn>") == "<|im_start|>"
    assert kinds[target.id_of("<unused0>")] == Match.CONTROL


def test_wordpiece_alignment(vocabularies):
    alignment = align(vocabularies["smollm2"], vocabularies["minilm"])
    assert _copied_from(alignment, "##ing") == "ing"
    assert _copied_from(alignment, "hello") == "Ġhello"
    assert _copied_from(alignment, "[SEP]") == "<|im_end|>"  # eos's stand-in


def test_real_transplant_gemma3_tokenizer_into_smollm2(smollm2_dir, tmp_path):
    from safetensors import safe_open

    from composer.bundled import gemma3_dir
    from composer.evaluate import load_model, score_text
    from composer.execute import ExecutionOptions
    from composer.transplant import TransplantOptions, run_transplant

    out = tmp_path / "smollm2-gemma3"
    _, summary = run_transplant(
        str(smollm2_dir), str(gemma3_dir()), out, TransplantOptions(), ExecutionOptions(progress=False)
    )
    assert summary.alignment["exact"] + summary.alignment["normalised"] > 45000
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 262144 and config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 1, 0)
    with (
        safe_open(str(out / "model.safetensors"), "pt") as rebuilt,
        safe_open(str(smollm2_dir / "model.safetensors"), "pt") as source,
    ):
        new, old = rebuilt.get_tensor("model.embed_tokens.weight"), source.get_tensor("model.embed_tokens.weight")
        assert torch.equal(
            rebuilt.get_tensor("model.layers.3.mlp.up_proj.weight"),
            source.get_tensor("model.layers.3.mlp.up_proj.weight"),
        )
    vocabulary = Vocabulary.from_folder(out)
    for gemma_token, smollm2_id in (("▁hello", 33662), ("ção", 32446), ("\n", 198)):
        assert torch.equal(new[vocabulary.id_of(gemma_token)], old[smollm2_id])
    model, tokenizer = load_model(str(out))
    english, portuguese = score_text(model, tokenizer, ENGLISH), score_text(model, tokenizer, PORTUGUESE)
    assert english.bits_per_byte < 1.1
    assert portuguese.bits_per_byte < 2.9
