"""Block-scaled FP8 inputs (DeepSeek-V3 style, issue 19): each weight is dequantised as it is read, its scales are
not written, and the output config has no quantization_config. Checked against a dequantisation written here with
numpy (each block's factor spread over the block with np.kron), not with composer's own code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from composer.compose import compose_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from helpers import load_state, save_tiny_model

BLOCK = (
    48,
    40,
)  # not dividing the tiny model's 64 and 128: the edge blocks are partial, as they can be in real checkpoints
FP8_MAX = 448.0  # the largest float8_e4m3fn value


def quantise(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` as float8_e4m3fn and one float32 factor a block (its largest magnitude over 448), as DeepSeek's
    quantiser makes them."""
    rows, columns = weight.shape
    block_rows, block_columns = block
    scale = torch.empty((-(-rows // block_rows), -(-columns // block_columns)))
    quantised = torch.empty(weight.shape, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            part = weight[i * block_rows : (i + 1) * block_rows, j * block_columns : (j + 1) * block_columns].float()
            scale[i, j] = part.abs().max().clamp(min=1e-12) / FP8_MAX
            quantised[i * block_rows : (i + 1) * block_rows, j * block_columns : (j + 1) * block_columns] = (
                part / scale[i, j]
            ).to(torch.float8_e4m3fn)
    return quantised, scale


def reference_dequantised(quantised: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, columns = quantised.shape
    factors = np.kron(scale.numpy(), np.ones(block, dtype=np.float32))[:rows, :columns]
    return torch.from_numpy(quantised.float().numpy() * factors)


def is_quantised(name: str) -> bool:
    return name.endswith("_proj.weight") and ".layers." in name


def write_fp8_model(plain: Path, folder: Path, drop_scale: str | None = None, config_change=None) -> dict:
    """`plain` re-saved as a block-scaled FP8 checkpoint: every projection FP8 with its `weight_scale_inv`, the rest
    bf16; returns the reference dequantisation of each FP8 weight."""
    shutil.copytree(plain, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    state, expected = {}, {}
    for name, tensor in load_state(plain).items():
        if is_quantised(name):
            quantised, scale = quantise(tensor, BLOCK)
            state[name], expected[name] = quantised, reference_dequantised(quantised, scale, BLOCK)
            if name + "_scale_inv" != drop_scale:
                state[name + "_scale_inv"] = scale
        else:
            state[name] = tensor.to(torch.bfloat16)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
    }
    if config_change:
        config_change(config)
    (folder / "config.json").write_text(json.dumps(config))
    return expected


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fp8")
    plain = save_tiny_model(root / "plain", layers=2, seed=3)
    expected = write_fp8_model(plain, root / "fp8")
    return {"plain": plain, "fp8": root / "fp8", "expected": expected, "root": root}


def passthrough(model: Path, dtype: str | None) -> str:
    return (
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {model}\n        layer_range: [0, 2]\n"
        + (f"dtype: {dtype}\n" if dtype else "")
    )


@pytest.mark.parametrize("dtype", ["float32", "float16", None])
def test_fp8_weights_are_dequantised_into_the_recipes_dtype(models, tmp_path: Path, dtype):
    out = tmp_path / "out"
    compose_text(passthrough(models["fp8"], dtype), out, ExecutionOptions())
    written = load_state(out)
    wanted = {"float32": torch.float32, "float16": torch.float16, None: torch.bfloat16}[dtype]
    assert not [name for name in written if name.endswith("_scale_inv")]
    for name, reference in models["expected"].items():
        # dequantised in the checkpoint's declared dtype (bf16, as DeepSeek's own conversion writes), then the recipe's
        assert written[name].dtype == wanted, name
        assert torch.equal(written[name], reference.to(torch.bfloat16).to(wanted)), name
    assert len(models["expected"]) == 14  # 7 projections a layer, 2 layers
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == str(wanted).removeprefix("torch.")


def test_a_dequantised_fp8_model_loads_in_transformers_and_is_close_to_its_original(models, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    compose_text(passthrough(models["fp8"], "float32"), out, ExecutionOptions())
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    original = load_state(models["plain"])
    for name, tensor in model.state_dict().items():
        if is_quantised(name):  # FP8 keeps 3 mantissa bits: within a block's step of the original
            assert torch.allclose(tensor, original[name], rtol=0.07, atol=1e-3), name


def test_an_fp8_model_merges_with_a_plain_one(models, tmp_path: Path):
    out = tmp_path / "out"
    text = f"""merge_method: linear
models:
  - model: {models["fp8"]}
    parameters: {{weight: 0.5}}
  - model: {models["plain"]}
    parameters: {{weight: 0.5}}
dtype: float32
"""
    compose_text(text, out, ExecutionOptions())
    written, plain = load_state(out), load_state(models["plain"])
    name = "model.layers.1.mlp.down_proj.weight"
    expected = 0.5 * models["expected"][name].to(torch.bfloat16).float() + 0.5 * plain[name]
    assert torch.allclose(written[name], expected, atol=1e-6)


def test_an_fp8_weight_without_its_scales_is_refused_naming_it_before_any_work(models, tmp_path: Path):
    broken = tmp_path / "broken"
    write_fp8_model(models["plain"], broken, drop_scale="model.layers.1.self_attn.o_proj.weight_scale_inv")
    with pytest.raises(ComposerError) as caught:
        compose_text(passthrough(broken, "float32"), tmp_path / "out", ExecutionOptions())
    message = str(caught.value)
    assert "'model.layers.1.self_attn.o_proj.weight'" in message and "float8_e4m3fn" in message
    assert "weight_scale_inv" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_fp8_scales_without_a_block_size_or_of_the_wrong_shape_are_refused(models, tmp_path: Path):
    no_block = tmp_path / "no-block"
    write_fp8_model(models["plain"], no_block, config_change=lambda config: config.pop("quantization_config"))
    with pytest.raises(ComposerError, match="has no 'quantization_config'.*weight_block_size"):
        compose_text(passthrough(no_block, None), tmp_path / "out", ExecutionOptions())

    def other_block(config):
        config["quantization_config"]["weight_block_size"] = [32, 32]

    wrong = tmp_path / "wrong-block"
    write_fp8_model(models["plain"], wrong, config_change=other_block)
    with pytest.raises(
        ComposerError, match=r"weight_scale_inv' of model .* must be floating point with shape \[4, 2\]"
    ):
        compose_text(passthrough(wrong, None), tmp_path / "out", ExecutionOptions())


def test_compose_check_says_which_weights_are_dequantised(models, tmp_path: Path):
    from composer.check import check_recipe

    recipe = tmp_path / "r.yml"
    recipe.write_text(passthrough(models["fp8"], "float32"))
    report = check_recipe(recipe, 1 << 30)
    assert "14 block-scaled FP8 weights (blocks of [48, 40]) are dequantised to bfloat16 as they are read" in report
    assert "the merge reads 21 of its 21 tensors" in report  # the 14 scales are not tensors of the model it reads
    assert report.splitlines()[-1].startswith("ok: a run would download 0 B from the hub")
