"""MXFP4 inputs (gpt-oss's official checkpoints, issue 19): each fused expert tensor is read from its `_blocks` and
`_scales` dequantised, the quantised tensors are not written, and the output config has no quantization_config.

Checked against a quantiser written here from the OCP Microscaling spec (round to the nearest E2M1 value under a
per-block power-of-two scale), whose exact dequantisation is known, against a hand-decoded byte example, and against
transformers' own MXFP4 dequantisation (Mxfp4Config(dequantize=True), on the CPU)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from composer.compose import compose_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.sources.folder import open_folder
from composer.sources.mxfp4 import dequantize_mxfp4
from helpers import load_state, save_tiny_model

E2M1_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E2M1_LARGEST_EXPONENT = 2  # 6 = 1.5 x 2^2
EXPERT_TENSORS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
QUANTIZATION_CONFIG = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.embed_tokens", "lm_head"]}


def quantise(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`tensor` [experts, inputs, outputs] as MXFP4 blocks [experts, outputs, inputs / 32, 16] and scales
    [experts, outputs, inputs / 32] (each block of 32 inputs under 2^(floor(log2 of its largest magnitude) - 2), each
    value the nearest E2M1 value, the first of two bytes' nibbles the low one), and the values they encode."""
    experts, inputs, outputs = tensor.shape
    rows = tensor.float().transpose(1, 2).reshape(experts, outputs, inputs // 32, 32)
    exponent = torch.floor(torch.log2(rows.abs().amax(-1).clamp(min=2.0**-100))) - E2M1_LARGEST_EXPONENT
    scaled = rows / torch.exp2(exponent)[..., None]
    magnitude = (scaled.abs()[..., None] - E2M1_MAGNITUDES).abs().argmin(-1)
    negative = scaled < 0
    codes = (magnitude | (negative.int() << 3)).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    values = (
        torch.where(negative, -E2M1_MAGNITUDES[magnitude], E2M1_MAGNITUDES[magnitude]) * torch.exp2(exponent)[..., None]
    )
    return blocks, (exponent + 127).to(torch.uint8), values.reshape(experts, outputs, inputs).transpose(1, 2)


def write_mxfp4_model(plain: Path, folder: Path, drop: str | None = None, change=None) -> dict[str, torch.Tensor]:
    """`plain` (a tiny gpt-oss) re-saved as gpt-oss is published: its expert weights MXFP4, the rest bf16, and a
    quantization_config of mxfp4; returns the values each expert tensor encodes. `drop` leaves a tensor out; `change`
    edits the tensors to be saved and the config."""
    shutil.copytree(plain, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    state, encoded = {}, {}
    for name, tensor in load_state(plain).items():
        if name.endswith(EXPERT_TENSORS):
            state[name + "_blocks"], state[name + "_scales"], encoded[name] = quantise(tensor)
        else:
            state[name] = tensor.to(torch.bfloat16)
    config = json.loads((folder / "config.json").read_text())
    config.pop("torch_dtype", None)
    config.update(dtype="bfloat16", quantization_config={**QUANTIZATION_CONFIG, "quant_method": "mxfp4"})
    state.pop(drop, None)
    if change:
        change(state, config)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return encoded


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mxfp4")
    found = {"root": root}
    for seed in (1, 2):
        plain = save_tiny_model(root / f"plain{seed}", "gpt_oss", layers=2, seed=seed)
        found[f"encoded{seed}"] = write_mxfp4_model(plain, root / f"mxfp4-{seed}")
        found[f"plain{seed}"], found[f"mxfp4{seed}"] = plain, root / f"mxfp4-{seed}"
    return found


def passthrough(model: Path, dtype: str | None = None) -> str:
    return (
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {model}\n        layer_range: [0, 2]\n"
        + (f"dtype: {dtype}\n" if dtype else "")
    )


def test_a_hand_decoded_block_reads_low_nibble_first_and_a_row_as_a_column():
    blocks = torch.zeros((1, 2, 1, 16), dtype=torch.uint8)
    blocks[0, 0, 0, :3] = torch.tensor([0x21, 0xF8, 0x7B])  # codes 1, 2 | 8, 15 | 11, 7
    blocks[0, 1, 0, 15] = 0x3C  # the last two elements of row 1: codes 12, 3
    scales = torch.tensor([[[128], [0]]], dtype=torch.uint8)  # x 2, and x 2^-127
    dequantised = dequantize_mxfp4(blocks, scales)
    assert dequantised.shape == (1, 32, 2) and dequantised.dtype == torch.bfloat16
    row0 = [0.5 * 2, 1.0 * 2, -0.0, -6.0 * 2, -1.5 * 2, 6.0 * 2] + [0.0] * 26
    assert dequantised[0, :, 0].tolist() == row0
    assert math.copysign(1, dequantised[0, 2, 0].item()) == -1  # code 8 is negative zero
    assert dequantised[0, 30:, 1].tolist() == [-2.0 * 2.0**-127, 1.5 * 2.0**-127]  # exact, though subnormal
    assert not dequantised[0, :30, 1].any()
    assert torch.isnan(dequantize_mxfp4(blocks, torch.full((1, 2, 1), 255, dtype=torch.uint8))).all()  # E8M0 NaN


def test_the_folder_shows_each_expert_tensor_dequantised_and_a_config_without_quantization(models):
    source = open_folder("m", models["mxfp41"])
    infos = source.tensor_infos()
    assert not [name for name in infos if name.endswith(("_blocks", "_scales"))]
    assert infos["model.layers.1.mlp.experts.gate_up_proj"].shape == (3, 64, 256)  # [experts, hidden, 2 x inner]
    assert infos["model.layers.1.mlp.experts.down_proj"].shape == (3, 128, 64)  # [experts, inner, hidden]
    plain = open_folder("p", models["plain1"]).tensor_infos()
    assert set(infos) == set(plain)
    for name, encoded in models["encoded1"].items():
        assert infos[name].dtype == torch.bfloat16 and source.byte_range(name) is None
        read = source.read(name)
        assert read.dtype == torch.bfloat16 and torch.equal(read.float(), encoded), name
        original = load_state(models["plain1"])[name]  # FP4 keeps one mantissa bit: ~12% off in norm
        assert (encoded - original).norm() < 0.15 * original.norm(), name
    assert len(models["encoded1"]) == 4
    assert "quantization_config" not in source.config()
    with pytest.raises(ComposerError, match="has no tensor 'model.layers.0.mlp.experts.down_proj_blocks'"):
        source.read("model.layers.0.mlp.experts.down_proj_blocks")


def test_transformers_dequantises_the_checkpoint_to_the_same_tensors(models):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    model, info = AutoModelForCausalLM.from_pretrained(
        models["mxfp41"],
        quantization_config=Mxfp4Config(dequantize=True),
        dtype=torch.bfloat16,
        output_loading_info=True,
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = model.state_dict()
    source = open_folder("m", models["mxfp41"])
    for name in models["encoded1"]:
        assert torch.equal(state[name], source.read(name)), name


def test_a_passthrough_writes_bf16_fused_experts_that_transformers_loads(models, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    compose_text(passthrough(models["mxfp41"]), out, ExecutionOptions())
    written = load_state(out)
    assert not [name for name in written if name.endswith(("_blocks", "_scales"))]
    for name, encoded in models["encoded1"].items():
        assert written[name].dtype == torch.bfloat16 and torch.equal(written[name].float(), encoded), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(
        model.state_dict()["model.layers.0.mlp.experts.gate_up_proj"],
        written["model.layers.0.mlp.experts.gate_up_proj"],
    )


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_a_linear_merge_of_two_mxfp4_models_is_written_in_the_recipes_dtype(models, tmp_path: Path, dtype):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    weighted = {models["mxfp41"]: 0.25, models["mxfp42"]: 0.75}
    entries = "".join(
        f"  - model: {model}\n    parameters: {{weight: {weight}}}\n" for model, weight in weighted.items()
    )
    compose_text(
        "merge_method: linear\nmodels:\n" + entries + (f"dtype: {dtype}\n" if dtype else ""), out, ExecutionOptions()
    )
    written = load_state(out)
    wanted = torch.float32 if dtype else torch.bfloat16  # the checkpoints' own dtype unless the recipe says
    for name in models["encoded1"]:
        expected = (0.25 * models["encoded1"][name] + 0.75 * models["encoded2"][name]).to(wanted)
        assert written[name].dtype == wanted and written[name].shape == expected.shape, name
        assert torch.allclose(written[name], expected, atol=1e-6, rtol=0), name
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_compose_check_says_which_tensors_are_dequantised(models, tmp_path: Path):
    from composer.check import check_recipe

    recipe = tmp_path / "r.yml"
    recipe.write_text(passthrough(models["mxfp41"]))
    report = check_recipe(recipe, 1 << 30)
    assert "4 MXFP4 expert tensors are dequantised to bfloat16 as they are read" in report
    assert report.splitlines()[-1].startswith("ok:")


def refused(folder: Path, tmp_path: Path) -> str:
    with pytest.raises(ComposerError) as caught:
        compose_text(passthrough(folder), tmp_path / "out", ExecutionOptions())
    assert not (tmp_path / "out").exists()
    message = str(caught.value)
    assert "\n" not in message and str(folder) in message
    return message


def test_blocks_without_scales_and_scales_without_blocks_are_refused_naming_them(models, tmp_path: Path):
    name = "model.layers.1.mlp.experts.down_proj"
    write_mxfp4_model(models["plain1"], tmp_path / "no-scales", drop=name + "_scales")
    message = refused(tmp_path / "no-scales", tmp_path)
    assert f"'{name}_blocks'" in message and f"no '{name}_scales'" in message and "model.safetensors" in message
    write_mxfp4_model(models["plain1"], tmp_path / "no-blocks", drop=name + "_blocks")
    message = refused(tmp_path / "no-blocks", tmp_path)
    assert f"'{name}_scales'" in message and f"no '{name}_blocks'" in message and "model.safetensors" in message


def test_scales_of_the_wrong_shape_or_type_are_refused_naming_them(models, tmp_path: Path):
    name = "model.layers.0.mlp.experts.gate_up_proj_scales"

    def cut(state, config):
        state[name] = state[name][:, :, :1].clone()

    write_mxfp4_model(models["plain1"], tmp_path / "short", change=cut)
    message = refused(tmp_path / "short", tmp_path)
    assert (
        f"'{name}'" in message and "shape [3, 256, 1]" in message and "must be uint8 with shape [3, 256, 2]" in message
    )

    def unpacked(state, config):  # blocks of 32 bytes, one value a byte, are not MXFP4's
        blocks = state["model.layers.0.mlp.experts.down_proj_blocks"]
        state["model.layers.0.mlp.experts.down_proj_blocks"] = blocks.repeat_interleave(2, dim=-1)

    write_mxfp4_model(models["plain1"], tmp_path / "wide", change=unpacked)
    message = refused(tmp_path / "wide", tmp_path)
    assert "'model.layers.0.mlp.experts.down_proj_blocks'" in message and "[3, 64, 4, 32]" in message


def test_an_mxfp4_config_without_blocks_is_refused_naming_its_file(models, tmp_path: Path):
    folder = tmp_path / "dequantised"
    shutil.copytree(models["plain1"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (folder / "config.json").write_text(json.dumps(config))
    message = refused(folder, tmp_path)
    assert str(folder / "config.json") in message and "says its weights are MXFP4" in message
