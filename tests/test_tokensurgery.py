"""Tokenizer surgery on toy data and tiny models: the estimators against references written from their
definitions, bit-for-bit copies of shared rows, the identity transplant, ties, padding and bad input.

The tiny models get real tokenizers trained here in a second: a byte-level BPE (GPT-2 style) and a
SentencePiece-style BPE with byte fallback, on the same small English and Portuguese corpus.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (
    BYTE_LEVEL_SPECIAL,
    SENTENCEPIECE_SPECIAL,
    TOKENIZER_CORPUS,
    byte_level_tokenizer,
    load_state,
    logits_of,
    save_tokenizer,
    sentencepiece_tokenizer,
    tiny_model_with_tokenizer,
)
from tokensurgery import EstimatorSettings, Match, Transplant, Vocabulary, align, estimate_rows
from tokensurgery.estimators import combine, compose_subwords, fit_linear_map, nearest_neighbours, sparse_code
from tokensurgery.pieces import Pieces
from tokensurgery.vocabulary import byte_level_alphabet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folders: a tied byte-level model, an untied one, a SentencePiece-style donor model, and a tokenizer-only donor."""
    root = tmp_path_factory.mktemp("tokensurgery")
    byte_level, sentencepiece = byte_level_tokenizer(300), sentencepiece_tokenizer(420)
    folders = {
        "model": tiny_model_with_tokenizer(root / "model", byte_level, BYTE_LEVEL_SPECIAL, seed=1),
        "untied": tiny_model_with_tokenizer(root / "untied", byte_level, BYTE_LEVEL_SPECIAL, seed=2, tied=False),
        "donor": tiny_model_with_tokenizer(root / "donor", sentencepiece, SENTENCEPIECE_SPECIAL, seed=3),
    }
    folders["donor_tokenizer"] = root / "donor_tokenizer"
    save_tokenizer(sentencepiece, folders["donor_tokenizer"], **SENTENCEPIECE_SPECIAL)
    return folders


def _transplant(model: Path, donor: Path, out: Path, **options):
    from composer.execute import ExecutionOptions
    from composer.transplant import TransplantOptions, run_transplant

    report, summary = run_transplant(
        str(model), str(donor), out, TransplantOptions(**options), ExecutionOptions(progress=False)
    )
    return summary


# --- the byte-level alphabet --------------------------------------------------------------------


def test_byte_level_alphabet_is_the_one_tokenizers_uses():
    from tokenizers import pre_tokenizers

    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
    assert (alphabet["Ġ"], alphabet["Ċ"], alphabet["A"]) == (0x20, 0x0A, 0x41)
    assert bytes(alphabet[c] for c in "Ã§Ã£o").decode() == "ção"


# --- estimators against references --------------------------------------------------------------


def test_omp_recovers_a_planted_sparse_combination():
    generator = torch.Generator().manual_seed(0)
    anchors = torch.randn(300, 128, generator=generator)
    picked = torch.stack([torch.randperm(300, generator=generator)[:3] for _ in range(20)])
    weights = torch.rand(20, 3, generator=generator) + 0.5
    targets = torch.einsum("nk,nkd->nd", weights, anchors[picked])
    for candidates in (None, 64):
        found, coefficients = sparse_code(
            targets, anchors, k=3, candidates=candidates, screen_dims=None if candidates is None else 128
        )
        for row in range(20):
            recovered = dict(zip(found[row].tolist(), coefficients[row].tolist()))
            planted = dict(zip(picked[row].tolist(), weights[row].tolist()))
            assert set(recovered) == set(planted)
            assert all(abs(recovered[key] - value) < 1e-4 for key, value in planted.items())
        assert torch.allclose(combine(anchors, found, coefficients), targets, atol=1e-4)


def test_nearest_neighbours_match_brute_force():
    generator = torch.Generator().manual_seed(1)
    anchors, targets = torch.randn(300, 32, generator=generator), torch.randn(25, 32, generator=generator)
    similarity = torch.nn.functional.normalize(targets, dim=1) @ torch.nn.functional.normalize(anchors, dim=1).T
    expected_similarity, expected = similarity.topk(5, dim=1)
    found, weights = nearest_neighbours(targets, anchors, k=5, temperature=0.1, candidates=None)
    assert torch.equal(found, expected)
    assert torch.allclose(weights, torch.softmax(expected_similarity / 0.1, dim=1))
    screened, _ = nearest_neighbours(targets, anchors, k=5, temperature=0.1, candidates=300, screen_dims=32)
    assert torch.equal(screened.sort(dim=1).values, expected.sort(dim=1).values)


def test_subword_composition_is_the_mean_of_the_pieces():
    rows = torch.randn(10, 4)
    pieces = Pieces.from_lists([[1, 2, 3], [4], [], [5, 5]])
    composed = compose_subwords(rows, pieces)
    assert torch.allclose(composed[0], rows[[1, 2, 3]].mean(dim=0))
    assert torch.equal(composed[1], rows[4])
    assert torch.equal(composed[2], torch.zeros(4))
    assert torch.allclose(composed[3], rows[5])


def test_linear_map_recovers_an_affine_map_and_recolours_to_the_true_spread():
    generator = torch.Generator().manual_seed(2)
    donor = torch.randn(2000, 12, generator=generator)
    weight, bias = torch.randn(12, 8, generator=generator), torch.randn(8, generator=generator)
    model = donor @ weight + bias
    exact = fit_linear_map(donor, model, ridge=1e-9, recolour=False)
    assert torch.allclose(exact(donor), model, atol=1e-3)
    noisy = model + 2.0 * torch.randn(
        model.shape, generator=generator
    )  # ridge predictions are then less spread than the truth
    recoloured = fit_linear_map(donor, noisy, ridge=1e-3)(donor)
    centred = recoloured - recoloured.mean(dim=0)
    truth = noisy - noisy.mean(dim=0)
    assert torch.allclose(centred.T @ centred / len(centred), truth.T @ truth / len(truth), atol=1e-2, rtol=1e-3)


# --- rows: copies, identity, estimators ---------------------------------------------------------


def test_shared_rows_are_copied_bit_for_bit_and_a_self_transplant_is_the_identity(tiny):
    model_vocabulary = Vocabulary.from_folder(tiny["model"])
    donor_vocabulary = Vocabulary.from_folder(tiny["donor"])
    rows = load_state(tiny["model"])["model.embed_tokens.weight"]
    donor_rows = load_state(tiny["donor"])["model.embed_tokens.weight"]

    itself = align(model_vocabulary, model_vocabulary)
    assert itself.is_identity()
    assert torch.equal(estimate_rows(rows, itself).rows, rows)

    alignment = align(model_vocabulary, donor_vocabulary)
    copied = alignment.copied
    assert len(copied) > 100 and len(alignment.ids_of(Match.NEW)) > 50
    for estimator in ("mapped", "subword", "omp", "knn"):
        rebuilt = estimate_rows(rows, alignment, donor_rows, EstimatorSettings(estimator, k=4)).rows
        assert rebuilt.shape == (len(donor_vocabulary), rows.shape[1])
        assert torch.equal(rebuilt[copied], rows[alignment.source_ids[copied]])
        assert torch.isfinite(rebuilt).all()


def test_alignment_of_the_tiny_tokenizers(tiny):
    model, donor = Vocabulary.from_folder(tiny["model"]), Vocabulary.from_folder(tiny["donor"])
    alignment = align(model, donor)
    pairs = {donor.tokens[i]: model.tokens[alignment.source_ids[i]] for i in alignment.copied}
    assert any(d.startswith("▁") and len(d) > 2 and m == "Ġ" + d[1:] for d, m in pairs.items())  # `▁the` is `Ġthe`
    accented = [(d, m) for d, m in pairs.items() if not d.isascii() and not d.startswith("<")]
    assert accented and all(
        d.replace("▁", " ").encode() == bytes(byte_level_alphabet()[c] for c in m) for d, m in accented
    )
    assert pairs["<0xC3>"] == "Ã"  # a lone byte: the byte-level token for it
    assert pairs["<eos>"] == "<|im_end|>"
    # the donor puts <bos> before every text; the model's tokenizer adds none and saw its documents after <|endoftext|>
    assert pairs["<bos>"] == "<|endoftext|>"
    assert alignment.kinds[donor.id_of("<0x61>")] == Match.TWIN  # "a" is written `a`, never <0x61>
    assert pairs["a"] == "a"
    assert alignment.kinds[donor.id_of("<pad>")] == Match.TWIN  # the model's pad is its eos, which <eos> already takes


# --- composer: plans, outputs, errors ------------------------------------------------------------


def test_transplant_of_a_model_into_its_own_tokenizer_is_the_identity(tiny, tmp_path):
    _transplant(tiny["model"], tiny["model"], tmp_path / "out")
    assert {name: tensor.tolist() for name, tensor in load_state(tmp_path / "out").items()} == {
        name: tensor.tolist() for name, tensor in load_state(tiny["model"]).items()
    }
    assert torch.equal(logits_of(tmp_path / "out"), logits_of(tiny["model"]))


def test_transplant_writes_a_loadable_model_in_the_donor_vocabulary(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = _transplant(tiny["model"], tiny["donor"], tmp_path / "out", pad_to_multiple_of=64)
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    donor_tokenizer = AutoTokenizer.from_pretrained(str(tiny["donor"]))
    assert config["vocab_size"] == -(-len(donor_tokenizer) // 64) * 64
    assert (config["bos_token_id"], config["eos_token_id"]) == (
        donor_tokenizer.bos_token_id,
        donor_tokenizer.eos_token_id,
    )
    assert config["tie_word_embeddings"] is True
    state = load_state(out)
    assert "lm_head.weight" not in state  # tied stays tied
    assert summary.rows["model.embed_tokens.weight"]["mapped"] == summary.alignment["new"]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = AutoTokenizer.from_pretrained(str(out))("A cidade fica à beira do rio.", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
    assert "tokenizer-transplant" in (out / "README.md").read_text()


def test_untied_head_is_rebuilt_from_its_own_rows(tiny, tmp_path):
    _transplant(tiny["untied"], tiny["donor_tokenizer"], tmp_path / "out")
    source, out = load_state(tiny["untied"]), load_state(tmp_path / "out")
    alignment = align(Vocabulary.from_folder(tiny["untied"]), Vocabulary.from_folder(tiny["donor_tokenizer"]))
    copied = alignment.copied
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(out[name][copied], source[name][alignment.source_ids[copied]])
    assert not torch.equal(out["model.embed_tokens.weight"], out["lm_head.weight"])


def test_a_donor_without_a_tokenizer_is_refused_before_any_work(tiny, tmp_path):
    from composer.errors import ComposerError

    bare = tmp_path / "bare"
    bare.mkdir()
    for path in tiny["donor"].iterdir():
        if path.suffix in (".safetensors",) or path.name == "config.json":
            shutil.copy(path, bare / path.name)
    with pytest.raises(ComposerError, match="has no tokenizer"):
        _transplant(tiny["model"], bare, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_embeddings_smaller_than_the_tokenizer_are_refused_before_any_work(tiny, tmp_path):
    from composer.errors import ComposerError

    short = tiny_model_with_tokenizer(
        tmp_path / "short", byte_level_tokenizer(300), BYTE_LEVEL_SPECIAL, seed=4, rows=250
    )
    with pytest.raises(
        ComposerError, match=r"has 250 rows, but the model's tokenizer has 300 tokens.*--pad-to-multiple-of"
    ):
        _transplant(short, tiny["donor"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unknown_estimator_is_refused(tiny, tmp_path):
    from composer.errors import ComposerError

    with pytest.raises(ComposerError, match="Unknown estimator 'best'"):
        _transplant(tiny["model"], tiny["donor"], tmp_path / "out", estimator="best")


def test_cli_transplant_report(tiny, tmp_path):
    import subprocess
    import sys

    compose = Path(sys.executable).with_name("compose")
    text = tmp_path / "pt.txt"
    text.write_text(TOKENIZER_CORPUS[1])
    result = subprocess.run(
        [
            str(compose),
            "transplant",
            str(tiny["model"]),
            "--tokenizer",
            str(tiny["donor"]),
            str(tmp_path / "out"),
            "--estimator",
            "subword",
            "--report",
            "--text",
            str(text),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "matched after normalising" in result.stdout and "subword" in result.stdout
    assert str(text) in result.stdout  # the bits-per-byte line
    again = subprocess.run(
        [str(compose), "transplant", str(tiny["model"]), "--tokenizer", str(tmp_path), str(tmp_path / "again")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 2 and "has no tokenizer" in " ".join(again.stderr.split())
    assert "Traceback" not in again.stderr


def test_pieces_and_alignment_arrays_are_consistent(tiny):
    transplant = Transplant.between(Vocabulary.from_folder(tiny["model"]), Vocabulary.from_folder(tiny["donor"]))
    alignment = transplant.alignment
    assert len(transplant.pieces) == len(alignment.target)
    new = alignment.ids_of(Match.NEW)
    assert (transplant.pieces.counts[new] > 0).all()
    assert (transplant.pieces.counts[alignment.copied] == 0).all()
    assert np.all(alignment.source_ids[alignment.ids_of(Match.TWIN, Match.CONTROL, Match.NEW)] == -1)
