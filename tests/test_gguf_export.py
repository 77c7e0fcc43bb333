"""GGUF export: the file llama.cpp loads (through llama-cpp-python) computes what transformers computes.

Tiny models of each family composer writes, built with transformers and given a real tokenizer, are exported and
run in llama.cpp on the same token ids: the last position's top token agrees and the logits agree within the
type's rounding. The real SmolLM2 and Gemma 3 are checked the same way, their tokenizers and chat template too.
llama-cpp-python is installed by scripts/setup.sh (built from source: PyPI has no wheel for this platform); the
llama.cpp tests skip only where it is absent, and fail on CI, which must have it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from composer.errors import ComposerError
from composer.export import export_gguf, gguf_beside
from helpers import (
    BYTE_LEVEL_SPECIAL,
    SENTENCEPIECE_SPECIAL,
    byte_level_tokenizer,
    compose_in_process,
    load_state,
    sentencepiece_tokenizer,
    tiny_model_with_tokenizer,
)

PROMPT = "The small town sits at the bend of a slow river, and the old bridge carries 42 trucks."
# largest difference of any logit, relative to the largest logit's size: f16 and bf16 round each weight to 11 and 8
# bits; q8_0 rounds weights to 8 bits a block of 32 and llama.cpp also rounds the activations so (measured: SmolLM2
# 0.003 in f16, 0.045 in q8_0; Gemma 3 0.001 and 0.030)
TOLERANCE = {"f16": 0.01, "bf16": 0.05, "q8_0": 0.1}
# share of positions whose top token agrees: quantised, a few positions whose two best tokens nearly tie may swap
# (measured in q8_0: SmolLM2 20 of 22, Gemma 3 22 of 23)
TOP1_SHARE = {"f16": 1.0, "bf16": 1.0, "q8_0": 0.8}


def llama_cpp_or_skip():
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python is missing on CI; scripts/setup.sh installs it")
        pytest.skip("llama-cpp-python is not installed (bash scripts/setup.sh installs it)")
    return llama_cpp


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `ids`."""
    llama_cpp = llama_cpp_or_skip()
    model = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, len(ids)), logits_all=True, verbose=False, n_threads=2)
    try:
        model.eval(ids)
        return np.array(model.scores[: len(ids)], dtype=np.float32)
    finally:
        model.close()


def transformers_logits(folder: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def assert_logits_agree(expected: np.ndarray, found: np.ndarray, tolerance: float, top1_share: float = 1.0) -> None:
    assert found.shape == expected.shape
    assert np.isfinite(found).all()
    scale = np.abs(expected).max()
    worst = np.abs(found - expected).max() / scale
    assert worst < tolerance, f"largest logit difference {worst:.4f} of the logits' scale, tolerance {tolerance}"
    same_top = (found.argmax(-1) == expected.argmax(-1)).mean()
    assert same_top >= top1_share, f"top-1 token agrees at {same_top:.0%} of positions"
    assert found[-1].argmax() == expected[-1].argmax()


# ---- tiny models of every family ----------------------------------------------------------------------------------

MOE = dict(num_experts_per_tok=2)
FAMILIES = {
    "llama": ("byte_level", {}),
    "mistral": ("byte_level", {}),
    "qwen2": ("byte_level", {}),
    "qwen3": ("byte_level", {}),
    "gemma2": ("sentencepiece", dict(query_pre_attn_scalar=16, layers=3)),
    "gemma3_text": ("sentencepiece", dict(query_pre_attn_scalar=16, layers=7, sliding_window=8)),
    "mixtral": ("byte_level", dict(num_local_experts=4, **MOE)),
    "qwen2_moe": (
        "byte_level",
        dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64, **MOE),
    ),
    "qwen3_moe": ("byte_level", dict(num_experts=4, moe_intermediate_size=32, norm_topk_prob=True, **MOE)),
}


@pytest.fixture(scope="module")
def tokenizers():
    return {"byte_level": byte_level_tokenizer(400), "sentencepiece": sentencepiece_tokenizer(400)}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tokenizers):
    """One tiny model a family, with the tokenizer its family uses (built on first use)."""
    root = tmp_path_factory.mktemp("gguf-tiny")
    built: dict[str, Path] = {}

    def model(model_type: str) -> Path:
        if model_type not in built:
            kind, overrides = FAMILIES[model_type]
            overrides = dict(overrides)
            layers = overrides.pop("layers", 2)
            special = BYTE_LEVEL_SPECIAL if kind == "byte_level" else SENTENCEPIECE_SPECIAL
            built[model_type] = folder = tiny_model_with_tokenizer(
                root / model_type,
                tokenizers[kind],
                special,
                seed=3,
                tied=None,
                model_type=model_type,
                layers=layers,
                **overrides,
            )
            if "experts" in str(overrides):
                decisive_routers(folder)
        return built[model_type]

    return model


def decisive_routers(folder: Path) -> None:
    """Random routers score some tokens' experts nearly alike, and f16 rounding then flips which ones run: routers
    20 times larger choose clearly, so the comparison tests the export and not a coin toss."""
    from safetensors.torch import save_file

    state = load_state(folder)
    for name in state:
        if name.endswith(("block_sparse_moe.gate.weight", "mlp.gate.weight")):
            state[name] = state[name] * 20
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def prompt_ids(folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))(PROMPT)["input_ids"]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_family_runs_in_llama_cpp_as_in_transformers(model_type, tiny_models, tmp_path):
    llama_cpp_or_skip()
    folder = tiny_models(model_type)
    ids = prompt_ids(folder)
    expected = transformers_logits(folder, ids)
    export_gguf(str(folder), tmp_path / "model.gguf", "f16")
    assert_logits_agree(expected, llama_logits(tmp_path / "model.gguf", ids), TOLERANCE["f16"])


@pytest.mark.parametrize("gguf_type", ["bf16", "q8_0"])
def test_bf16_and_q8_0_run_within_their_rounding(gguf_type, tiny_models, tmp_path):
    llama_cpp_or_skip()
    folder = tiny_models("llama")
    ids = prompt_ids(folder)
    export_gguf(str(folder), tmp_path / "model.gguf", gguf_type)
    assert_logits_agree(
        transformers_logits(folder, ids),
        llama_logits(tmp_path / "model.gguf", ids),
        TOLERANCE[gguf_type],
        TOP1_SHARE[gguf_type],
    )


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_llama_cpp_tokenizes_text_as_transformers_does(model_type, tiny_models, tmp_path):
    """Byte-level BPE (merges) and SentencePiece-style BPE (scores), special tokens and BOS included."""
    llama_cpp = llama_cpp_or_skip()
    from transformers import AutoTokenizer

    folder = tiny_models(model_type)
    export_gguf(str(folder), tmp_path / "model.gguf", "f16")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = llama_cpp.Llama(model_path=str(tmp_path / "model.gguf"), vocab_only=True, verbose=False)
    try:
        for text in (
            PROMPT,
            "Ele também disse que a ponte velha seria reformada.\n\ndef main():\n    return 42\n",
            "ß∑ 😀",
        ):
            assert model.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"], text
    finally:
        model.close()


def test_fused_experts_are_written_as_per_expert_ones_are(tiny_models, tmp_path):
    """transformers' fused `experts.gate_up_proj` / `experts.down_proj` layout gives the same GGUF tensors."""
    import gguf
    from safetensors.torch import save_file

    folder = tiny_models("mixtral")
    fused = tmp_path / "fused"
    shutil.copytree(folder, fused, ignore=shutil.ignore_patterns("*.safetensors"))
    state, merged = load_state(folder), {}
    experts = 4
    for name, tensor in state.items():
        if ".experts." not in name:
            merged[name] = tensor
        elif name.endswith(".experts.0.w1.weight"):
            prefix = name.removesuffix("0.w1.weight").replace("block_sparse_moe", "mlp")
            stem = name.removesuffix("0.w1.weight")
            gate = [state[f"{stem}{e}.w1.weight"] for e in range(experts)]
            up = [state[f"{stem}{e}.w3.weight"] for e in range(experts)]
            merged[prefix + "gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
            merged[prefix + "down_proj"] = torch.stack([state[f"{stem}{e}.w2.weight"] for e in range(experts)])
    merged = {name.replace("block_sparse_moe.gate", "mlp.gate"): tensor for name, tensor in merged.items()}
    save_file(merged, str(fused / "model.safetensors"), metadata={"format": "pt"})
    export_gguf(str(folder), tmp_path / "split.gguf", "f16")
    export_gguf(str(fused), tmp_path / "fused.gguf", "f16")
    written = {
        path: {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(str(tmp_path / path)).tensors}
        for path in ("split.gguf", "fused.gguf")
    }
    assert written["split.gguf"] == written["fused.gguf"]
    assert "blk.0.ffn_gate_exps.weight" in written["split.gguf"]


def test_metadata_carries_the_tokenizer_chat_template_and_recipe(tiny_models, tmp_path):
    from composer.sources.gguf_format import read_gguf_header

    folder = tmp_path / "merged"
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {tiny_models('llama')}\n    parameters:\n      weight: 1.0\n"
    )
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    from composer.compose import compose_file
    from composer.execute import ExecutionOptions

    compose_file(recipe, folder, ExecutionOptions())
    config_path = folder / "tokenizer_config.json"
    import json

    settings = json.loads(config_path.read_text())
    settings["chat_template"] = template
    config_path.write_text(json.dumps(settings))
    export_gguf(str(folder), tmp_path / "merged.gguf", "q8_0")
    metadata = read_gguf_header(tmp_path / "merged.gguf").metadata
    assert metadata["general.architecture"] == "llama"
    assert metadata["tokenizer.ggml.model"] == "gpt2" and metadata["tokenizer.ggml.pre"] == "gpt-2"
    assert metadata["tokenizer.chat_template"] == template
    assert metadata["general.quantized_by"] == "composer"
    assert "merge_method: linear" in metadata["composer.recipe"]
    assert metadata["llama.block_count"] == 2


# ---- the command line, atomic output and errors before any work ---------------------------------------------------


def compose_with_gguf(monkeypatch, out: Path, recipe_text: str, gguf_type: str) -> Path:
    """`compose RECIPE OUT --gguf TYPE` on a recipe written beside OUT; OUT."""
    recipe = out.with_name(out.name + ".yml")
    recipe.write_text(recipe_text)
    assert compose_in_process(monkeypatch, recipe, out, "--gguf", gguf_type, "--no-progress") == 0
    return out


def test_compose_recipe_with_gguf_writes_the_folder_and_out_gguf(tiny_models, tmp_path, monkeypatch):
    out = compose_with_gguf(
        monkeypatch,
        tmp_path / "deeper",
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {tiny_models('llama')}\n        layer_range: [0, 2]\n"
        f"  - sources:\n      - model: {tiny_models('llama')}\n        layer_range: [1, 2]\n",
        "q8_0",
    )
    assert (out / "model.safetensors").is_file()
    from composer.sources.gguf_format import read_gguf_header

    header = read_gguf_header(gguf_beside(out))
    assert header.metadata["llama.block_count"] == 3 and "blk.2.attn_q.weight" in header.tensors
    # the same again is refused without --force, and replaces composer's own file with it
    assert compose_in_process(monkeypatch, "export", out, gguf_beside(out), "--no-progress") == 2
    assert compose_in_process(monkeypatch, "export", out, gguf_beside(out), "--force", "--no-progress") == 0


def test_a_composed_moe_runs_in_llama_cpp_as_in_transformers(tiny_models, tokenizers, tmp_path, monkeypatch):
    """compose's own MoE output (Mixtral, from two dense experts; top-2 of 2, so rounding flips no choice) through
    --gguf into llama.cpp."""
    llama_cpp_or_skip()
    dense = tiny_models("llama")
    other = tiny_model_with_tokenizer(
        tmp_path / "other", tokenizers["byte_level"], BYTE_LEVEL_SPECIAL, seed=4, tied=None, layers=2
    )
    out = compose_with_gguf(
        monkeypatch,
        tmp_path / "moe",
        f"base_model: {dense}\ngate_mode: random\nexperts_per_token: 2\ndtype: float32\nexperts:\n"
        f"  - source_model: {dense}\n    positive_prompts: [code]\n  - source_model: {other}\n    positive_prompts: [story]\n",
        "f16",
    )
    ids = prompt_ids(out)
    assert_logits_agree(transformers_logits(out, ids), llama_logits(gguf_beside(out), ids), TOLERANCE["f16"])


def test_unsupported_quantisation_is_refused_before_any_work(tiny_models, tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {tiny_models('llama')}\n    parameters:\n      weight: 1.0\n"
    )
    assert compose_in_process(monkeypatch, recipe, tmp_path / "out", "--gguf", "q4_k") == 2
    assert "GGUF type 'q4_k' is not one composer writes" in capsys.readouterr().err
    assert compose_in_process(monkeypatch, "export", tiny_models("llama"), tmp_path / "x.gguf", "--type", "Q4_K_M") == 2
    assert "llama-quantize" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["recipe.yml"]


def test_a_family_llama_cpp_cannot_run_is_refused_before_the_merge(tmp_path, monkeypatch, capsys):
    from helpers import save_tiny_model

    gpt2 = save_tiny_model(tmp_path / "gpt2", "gpt2", layers=2)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {gpt2}\n    parameters:\n      weight: 1.0\n")
    assert compose_in_process(monkeypatch, recipe, tmp_path / "out", "--gguf", "f16") == 2
    assert "cannot write model type 'gpt2' as GGUF" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.gguf").exists()


def test_a_failed_export_leaves_no_file_and_force_replaces_only_composers_own(tiny_models, tmp_path, monkeypatch):
    from composer.export import tensors

    out = tmp_path / "model.gguf"
    original = tensors.materialise
    calls = []

    def failing(source, tensor):
        calls.append(tensor.name)
        if len(calls) == 5:
            raise ComposerError("reading failed")
        return original(source, tensor)

    monkeypatch.setattr("composer.export.materialise", failing)
    with pytest.raises(ComposerError, match="reading failed"):
        export_gguf(str(tiny_models("llama")), out, "f16")
    assert os.listdir(tmp_path) == []  # neither OUT nor the hidden partial file
    monkeypatch.undo()
    out.write_bytes(b"GGUF something else")
    with pytest.raises(ComposerError, match="already exists"):
        export_gguf(str(tiny_models("llama")), out, "f16")
    with pytest.raises(ComposerError, match="not a GGUF file composer wrote"):
        export_gguf(str(tiny_models("llama")), out, "f16", force=True)
    out.unlink()
    out.mkdir()
    with pytest.raises(ComposerError, match="is not a file"):
        export_gguf(str(tiny_models("llama")), out, "f16", force=True)


def test_a_dead_runs_partial_file_is_removed(tiny_models, tmp_path):
    leftover = tmp_path / f".model.gguf.partial-{2**22 + 1}-abcd1234"  # no process has this id
    leftover.write_bytes(b"GGUF half")
    export_gguf(str(tiny_models("llama")), tmp_path / "model.gguf", "f16")
    assert sorted(os.listdir(tmp_path)) == ["model.gguf"]


def test_an_output_that_is_the_input_is_refused(tiny_models, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_models("llama"), folder)
    export_gguf(str(folder), tmp_path / "a.gguf", "f16")
    with pytest.raises(ComposerError, match="which this run reads"):
        export_gguf(str(tmp_path / "a.gguf"), tmp_path / "a.gguf", "f16", force=True)


# ---- the real models ------------------------------------------------------------------------------------------------


def real_prompt_check(folder: Path, gguf_path: Path, gguf_type: str) -> None:
    from transformers import AutoTokenizer

    llama_cpp = llama_cpp_or_skip()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer(PROMPT)["input_ids"]
    vocab = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        assert vocab.tokenize(PROMPT.encode(), add_bos=True, special=True) == ids
    finally:
        vocab.close()
    assert_logits_agree(
        transformers_logits(folder, ids), llama_logits(gguf_path, ids), TOLERANCE[gguf_type], TOP1_SHARE[gguf_type]
    )


@pytest.mark.real_model
def test_smollm2_q8_0_runs_in_llama_cpp_as_in_transformers(smollm2_dir, tmp_path):
    llama_cpp_or_skip()
    export_gguf(str(smollm2_dir), tmp_path / "smollm2.gguf", "q8_0")
    real_prompt_check(smollm2_dir, tmp_path / "smollm2.gguf", "q8_0")
    from composer.sources.gguf_format import read_gguf_header

    assert "<|im_start|>" in read_gguf_header(tmp_path / "smollm2.gguf").metadata["tokenizer.chat_template"]


@pytest.mark.real_model
def test_gemma3_f16_runs_in_llama_cpp_as_in_transformers(tmp_path):
    llama_cpp_or_skip()
    from composer.bundled import gemma3_dir

    folder = gemma3_dir()
    export_gguf(str(folder), tmp_path / "gemma3.gguf", "f16")
    real_prompt_check(folder, tmp_path / "gemma3.gguf", "f16")
