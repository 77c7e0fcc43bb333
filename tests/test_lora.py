"""LoRA: `BASE+ADAPTER` references merge a PEFT adapter as tensors are read, and `compose extract-lora` writes
one that approximates a fine-tune. PEFT itself is the reference for both: its merge_and_unload for the
merged weights, PeftModel.from_pretrained for the extracted adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_sources import hub_cache  # noqa: F401  (a fixture: a fake, offline Hugging Face cache)

from composer.compose import compose_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.extract_lora import extract_lora, low_rank_factors
from composer.sources import open_source
from helpers import load_state, logits_of, save_tiny_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

IDS = torch.arange(1, 17).unsqueeze(0)


def passthrough(reference: str, out: Path) -> Path:
    compose_text(f"merge_method: passthrough\nmodels:\n  - model: {reference}\n", out, ExecutionOptions(progress=False))
    return out


def peft_model(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter)
    ).eval()


def train_free_adapter(base: Path, out: Path, safe: bool = True, **settings) -> Path:
    """A PEFT adapter with every factor random (init_lora_weights=False) and modules_to_save copies perturbed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
        LoraConfig(init_lora_weights=False, **settings),
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".modules_to_save." in name or "lora_B" in name and name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(str(out), safe_serialization=safe)
    return out


LLAMA_ADAPTER = dict(
    r=4,
    lora_alpha=8,
    use_rslora=True,
    target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
    rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 6},
    alpha_pattern={"down_proj": 3},
    modules_to_save=["lm_head"],
)
GPT2_ADAPTER = dict(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_bias=True)


@pytest.mark.parametrize(
    "model_type, settings, safe",
    [("llama", LLAMA_ADAPTER, True), ("gpt2", GPT2_ADAPTER, False)],
    ids=["llama-rslora-patterns-embedding-modules_to_save", "gpt2-conv1d-lora_bias-bin"],
)
def test_base_plus_adapter_equals_peft_merge(tmp_path, model_type, settings, safe):
    base = save_tiny_model(tmp_path / "base", model_type, layers=2, tie_word_embeddings=False)
    adapter = train_free_adapter(base, tmp_path / "adapter", safe, **settings)
    assert (adapter / ("adapter_model.safetensors" if safe else "adapter_model.bin")).is_file()
    out = passthrough(f"{base}+{adapter}", tmp_path / "out")

    model = peft_model(base, adapter)
    with torch.no_grad():
        adapted_logits = model(IDS).logits
    expected = model.merge_and_unload().state_dict()
    merged, original = load_state(out), load_state(base)
    assert set(merged) == set(original)
    changed = [name for name in merged if not torch.equal(original[name], expected[name])]
    assert len(changed) >= 4  # the adapter really changes the model
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=2e-6, msg=name)
    torch.testing.assert_close(logits_of(out, IDS), adapted_logits, rtol=0, atol=5e-5)
    card = (out / "README.md").read_text()
    assert f"{base}+{adapter}" in card


def test_reference_forms(tmp_path):
    plus_named = save_tiny_model(tmp_path / "tiny+base", "llama", layers=1)
    adapter = train_free_adapter(plus_named, tmp_path / "a+dapter", r=2, lora_alpha=2, target_modules=["q_proj"])
    second = train_free_adapter(plus_named, tmp_path / "second", r=2, lora_alpha=4, target_modules=["v_proj"])

    assert open_source(str(plus_named)).reference == str(plus_named)  # an existing path is never split
    source = open_source(f"{plus_named}+{adapter}")
    assert (source.base.folder, source.folder) == (plus_named, adapter)
    stacked = open_source(f"{plus_named}+{adapter}+{second}")
    assert stacked.folder == second and stacked.base.folder == adapter
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(stacked.read(name), source.read(name))
    assert not torch.equal(source.read(name), open_source(str(plus_named)).read(name))
    relative = open_source("tiny+base+a+dapter", relative_to=tmp_path)
    assert relative.folder == adapter
    assert set(source.input_paths().values()) == {plus_named, adapter}

    with pytest.raises(ComposerError, match="Adapter 'missing' .* does not exist"):
        open_source(f"{plus_named}+missing")
    with pytest.raises(ComposerError, match="no part of it before a '\\+' is a model"):
        open_source(str(tmp_path / "nothing+here"))


def test_tokenizer_comes_from_the_adapter_when_it_has_one(tmp_path):
    base = save_tiny_model(tmp_path / "base", "llama", layers=1)
    (base / "tokenizer.json").write_text('{"from": "base"}')
    adapter = train_free_adapter(base, tmp_path / "adapter", r=2, lora_alpha=2, target_modules=["q_proj"])
    written = tmp_path / "written"
    written.mkdir()
    open_source(f"{base}+{adapter}").save_tokenizer(written)
    assert json.loads((written / "tokenizer.json").read_text()) == {"from": "base"}
    (adapter / "tokenizer.json").write_text('{"from": "adapter"}')
    open_source(f"{base}+{adapter}").save_tokenizer(written)
    assert json.loads((written / "tokenizer.json").read_text()) == {"from": "adapter"}


def edit_config(adapter: Path, **changes) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | changes))


def rename_module(adapter: Path, old: str, new: str) -> None:
    state = load_file(str(adapter / "adapter_model.safetensors"))
    save_file(
        {name.replace(old, new): tensor for name, tensor in state.items()}, str(adapter / "adapter_model.safetensors")
    )


def test_unmergeable_adapters_are_refused_when_opened(tmp_path):
    base = save_tiny_model(tmp_path / "base", "llama", layers=1)
    original = train_free_adapter(base, tmp_path / "original", r=2, lora_alpha=2, target_modules=["q_proj", "k_proj"])
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def broken(name: str) -> Path:
        copy = tmp_path / name
        shutil.copytree(original, copy)
        return copy

    cases = []
    dora = broken("dora")
    edit_config(dora, use_dora=True)
    cases.append((dora, r"adapter_config.json uses DoRA"))
    ia3 = broken("ia3")
    edit_config(ia3, peft_type="IA3")
    cases.append((ia3, r"peft_type is IA3"))
    absent = broken("absent")
    rename_module(absent, "q_proj", "x_proj")
    cases.append(
        (
            absent,
            r"adapter_model.safetensors: adapter tensor '.*x_proj.lora_A.weight' changes 'model.layers.0.self_attn.x_proj.weight', which base",
        )
    )
    rank = broken("rank")
    edit_config(rank, rank_pattern={"k_proj": 3})
    cases.append(
        (
            rank,
            r"adapter tensor '.*k_proj.lora_A.weight' and '.*k_proj.lora_B.weight' have shapes \[2, 64\] and \[32, 2\], but adapter_config.json gives module '.*k_proj' rank 3",
        )
    )
    shape = broken("shape")
    state = load_file(str(shape / "adapter_model.safetensors"))
    state[q_a] = torch.zeros(2, 48)
    save_file(state, str(shape / "adapter_model.safetensors"))
    cases.append(
        (
            shape,
            r"make a \[64, 48\] update, but 'model.layers.0.self_attn.q_proj.weight' in the base has shape \[64, 64\]",
        )
    )
    lonely = broken("lonely")
    state = load_file(str(lonely / "adapter_model.safetensors"))
    del state[q_a.replace("lora_A", "lora_B")]
    save_file(state, str(lonely / "adapter_model.safetensors"))
    cases.append((lonely, r"has no matching lora_B tensor"))

    for adapter, message in cases:
        with pytest.raises(ComposerError, match=message):
            open_source(f"{base}+{adapter}")
    with pytest.raises(ComposerError, match="uses DoRA"):  # through a recipe: refused before any output exists
        passthrough(f"{base}+{dora}", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- extract-lora -------------------------------------------------------------------------------------


def plant_low_rank(
    state: dict[str, torch.Tensor], names: list[str], rank: int, seed: int = 1, transposed: bool = False
) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        rows, columns = state[name].shape
        state[name] = state[name] + 0.05 * torch.randn(rows, rank, generator=generator) @ torch.randn(
            rank, columns, generator=generator
        )


def fine_tune_of(base: Path, out: Path, names_of=lambda state: [], embeddings: bool = False, rank: int = 4) -> Path:
    """A copy of `base` whose weights (those `names_of(state)` picks) gained planted rank-`rank` deltas."""
    shutil.copytree(base, out)
    state = load_state(base)
    plant_low_rank(state, names_of(state), rank)
    if embeddings:
        state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] + 0.1
    (out / "model.safetensors").unlink()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def layer_matrices(state: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, tensor in state.items() if tensor.ndim == 2 and (".layers." in name or ".h." in name)]


@pytest.mark.parametrize("model_type, tie", [("llama", False), ("llama", True), ("gpt2", False)])
def test_extracted_adapter_reproduces_planted_fine_tune(tmp_path, model_type, tie):
    base = save_tiny_model(tmp_path / "base", model_type, layers=2, tie_word_embeddings=tie)
    with_embeddings = model_type == "llama"
    finetune = fine_tune_of(base, tmp_path / "finetune", layer_matrices, embeddings=with_embeddings)
    report = extract_lora(str(finetune), str(base), tmp_path / "adapter", 4, embeddings=with_embeddings, progress=False)

    assert report.worst[1] < 1e-5
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4 and config["fan_in_fan_out"] == (model_type == "gpt2")
    assert config["modules_to_save"] == (["model.embed_tokens"] if with_embeddings else None)
    with torch.no_grad():
        adapted = peft_model(base, tmp_path / "adapter")(IDS).logits
    expected = logits_of(finetune, IDS)
    assert (logits_of(base, IDS) - expected).abs().max() > 0.1
    torch.testing.assert_close(adapted, expected, rtol=0, atol=2e-5)
    composed = passthrough(f"{base}+{tmp_path / 'adapter'}", tmp_path / "composed")  # and back through compose
    torch.testing.assert_close(logits_of(composed, IDS), expected, rtol=0, atol=2e-5)


def test_an_extraction_that_died_resumes_to_the_same_adapter_and_report(tmp_path, monkeypatch):
    """extract-lora runs through the executor: a run that dies leaves its finished factors (kept here as a killed
    run's would be), and the next run factors only the rest, writes the same bytes and reports the same errors."""
    import functools

    import composer.extract_lora as extraction

    base = save_tiny_model(tmp_path / "base", "llama", layers=2)
    finetune = fine_tune_of(base, tmp_path / "finetune", layer_matrices)
    whole = extract_lora(str(finetune), str(base), tmp_path / "whole", 2, progress=False)
    factored = []

    def counted(delta, rank):
        if len(factored) == 6 and dying:
            raise OSError("killed")
        factored.append(delta.shape)
        return low_rank_factors(delta, rank)

    monkeypatch.setattr(extraction, "low_rank_factors", counted)
    with monkeypatch.context() as patch:
        dying = True
        patch.setattr(extraction, "ExecutionOptions", functools.partial(ExecutionOptions, keep_partial=True))
        with pytest.raises(OSError, match="killed"):
            extract_lora(str(finetune), str(base), tmp_path / "adapter", 2, progress=False)
    assert not (tmp_path / "adapter").exists() and list(tmp_path.glob(".adapter.partial-*"))
    factored.clear()
    dying = False
    resumed = extract_lora(str(finetune), str(base), tmp_path / "adapter", 2, progress=False)
    assert 0 < len(factored) < len(whole.errors)
    assert resumed.errors == whole.errors and list(resumed.errors) == list(whole.errors)
    assert sorted(path.name for path in (tmp_path / "adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    for path in (tmp_path / "whole").iterdir():
        assert path.read_bytes() == (tmp_path / "adapter" / path.name).read_bytes()
    assert not list(tmp_path.glob(".adapter.partial-*"))


def test_lower_rank_reports_larger_error(tmp_path):
    base = save_tiny_model(tmp_path / "base", "llama", layers=1)
    finetune = fine_tune_of(base, tmp_path / "finetune", layer_matrices)
    exact = extract_lora(str(finetune), str(base), tmp_path / "rank4", 4, progress=False)
    rough = extract_lora(str(finetune), str(base), tmp_path / "rank2", 2, progress=False)
    assert exact.worst[1] < 1e-5 < 0.1 < rough.mean_error <= rough.worst[1] < 1
    assert len(rough.errors) == 7 and rough.worst[0] in rough.errors


def test_low_rank_factors_are_the_truncated_svd():
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(300, 200, generator=generator)
    singular = torch.linalg.svdvals(delta)
    for rank in (5, 150):  # a randomised sketch, then a full SVD
        a, b, error = low_rank_factors(delta, rank)
        assert a.shape == (rank, 200) and b.shape == (300, rank)
        best = (singular[rank:].square().sum() / singular.square().sum()).sqrt().item()  # Eckart-Young
        assert best * (1 - 1e-5) <= error <= best * 1.01
        assert error == pytest.approx(
            (torch.linalg.matrix_norm(delta - b @ a) / torch.linalg.matrix_norm(delta)).item(), rel=1e-4
        )
        torch.testing.assert_close(a.norm(dim=1), b.norm(dim=0))  # sqrt(S) on each side


def test_extract_lora_cli(tmp_path):
    from typer.testing import CliRunner

    from composer.cli import app

    base = save_tiny_model(tmp_path / "base", "llama", layers=2)
    finetune = fine_tune_of(base, tmp_path / "finetune", layer_matrices)
    out = tmp_path / "adapter"
    runner = CliRunner()

    def run(*args, finetune=finetune, out=out):
        result = runner.invoke(app, ["extract-lora", str(finetune), "--base", str(base), str(out), *map(str, args)])
        return result.exit_code, " ".join(result.output.split())  # messages are wrapped at 100 columns

    code, said = run("--rank", 4, "--modules", "q_proj,v_proj", "--no-progress")
    assert code == 0, said
    assert "relative Frobenius error: mean 0.0000, worst 0.0000 (model.layers." in said
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as handle:
        assert len(list(handle.keys())) == 2 * 2 * 2  # two layers, two modules, A and B

    code, said = run("--rank", 4)
    assert code == 2 and "already exists" in said
    assert run("--rank", 2, "--force")[0] == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2

    assert run("--rank", 40, "--force") == (
        2,
        "error: --rank 40 is larger than tensor 'model.layers.0.self_attn.k_proj.weight' allows (shape [32, 64]: at most rank 32); choose a rank of at most 32.",
    )
    assert run("--rank", 0, "--force")[0] == 2
    code, said = run("--rank", 2, "--force", "--modules", "qkv")
    assert (
        code == 2
        and "'qkv' matches no linear layer weight; the layers have down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
        in said
    )

    wider = save_tiny_model(tmp_path / "wider", "llama", layers=2, intermediate_size=96)
    code, said = run("--rank", 2, finetune=wider, out=tmp_path / "x")
    assert code == 2 and "Tensor 'model.layers.0.mlp.down_proj.weight' has shape [64, 96] in" in said
    code, said = run("--rank", 2, finetune=save_tiny_model(tmp_path / "gpt2", "gpt2", layers=2), out=tmp_path / "x")
    assert code == 2 and "different architectures" in said
    code, said = run("--rank", 2, out=base / "adapter")
    assert code == 2 and "which this run reads" in said
    assert not (tmp_path / "x").exists() and not (base / "adapter").exists()


@pytest.mark.real_model
def test_smollm2_extract_and_compose_round_trip(tmp_path, smollm2_dir):
    planted = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.7.mlp.down_proj.weight",
        "model.layers.29.self_attn.v_proj.weight",
    ]
    finetune = tmp_path / "finetune"
    finetune.mkdir()
    for path in smollm2_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy(path, finetune / path.name)
    state = load_file(str(smollm2_dir / "model.safetensors"))
    plant_low_rank(state, planted, rank=2)
    save_file(state, str(finetune / "model.safetensors"), metadata={"format": "pt"})
    del state

    report = extract_lora(
        str(finetune),
        str(smollm2_dir),
        tmp_path / "adapter",
        2,
        modules=["q_proj", "v_proj", "down_proj"],
        progress=False,
    )
    assert len(report.errors) == 90 and report.worst[1] < 1e-4
    ids = torch.tensor([[1, 504, 3458, 314, 260, 2503, 30, 378, 3797, 7658, 28, 11387]])
    model = peft_model(smollm2_dir, tmp_path / "adapter")
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            original = model(ids).logits
        plain = model.unload()  # the base model again, into which the fine-tune's weights are loaded
        plain.load_state_dict(load_file(str(finetune / "model.safetensors")), strict=False)
        expected = plain(ids).logits
    assert (original - expected).abs().max() > 0.05
    torch.testing.assert_close(adapted, expected, rtol=0, atol=1e-3)

    composed = passthrough(f"{smollm2_dir}+{tmp_path / 'adapter'}", tmp_path / "composed")
    with (
        safe_open(str(composed / "model.safetensors"), "pt") as merged,
        safe_open(str(finetune / "model.safetensors"), "pt") as wanted,
    ):
        for name in planted + ["model.layers.3.self_attn.q_proj.weight"]:
            torch.testing.assert_close(merged.get_tensor(name), wanted.get_tensor(name), rtol=0, atol=1e-5)
    assert (composed / "tokenizer.json").is_file()


def test_hub_base_and_hub_adapter(tmp_path, hub_cache):  # noqa: F811  (the fixture imported above)
    from test_sources import COMMIT_DEV, COMMIT_MAIN, _cache_model

    base = save_tiny_model(tmp_path / "base", "llama", layers=1)
    adapter = train_free_adapter(base, tmp_path / "adapter", r=2, lora_alpha=2, target_modules=["o_proj"])
    _cache_model(hub_cache, "tiny-org/tiny-llama", COMMIT_MAIN, "main", base)
    _cache_model(hub_cache, "tiny-org/tiny-lora", COMMIT_DEV, "main", adapter)
    name = "model.layers.0.self_attn.o_proj.weight"
    local = open_source(f"{base}+{adapter}").read(name)
    assert not torch.equal(local, open_source(str(base)).read(name))
    assert torch.equal(open_source(f"{base}+tiny-org/tiny-lora").read(name), local)
    assert torch.equal(open_source("tiny-org/tiny-llama+tiny-org/tiny-lora").read(name), local)
    with pytest.raises(ComposerError, match="tiny-org/no-lora"):
        open_source(f"{base}+tiny-org/no-lora")
