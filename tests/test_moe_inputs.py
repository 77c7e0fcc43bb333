"""Mixture-of-experts models as inputs (issue 19): Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 and gpt-oss, each a
tiny model built with transformers, in both on-disk layouts (one tensor per expert, as transformers saves most of
them; and fused, every expert of a layer in one tensor, as transformers 5 holds them and gpt-oss ships).

Merges go expert by expert with the router merged as an ordinary tensor, depth upscales follow which layers hold
experts, outputs keep the input's layout and load in transformers with no missing or unexpected keys, and
`compose extract-expert` writes one expert as a dense model of the matching family."""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_methods_end_to_end import CASES, one_thread, recipe  # noqa: F401  (one_thread: autouse, torch on one thread)

from composer.architecture import MoELayer, architecture_for, build_meta_model, checkpoint_shapes, tied_parameter_names
from composer.architecture_experts import FusedTensor
from composer.compose import compose_text
from composer.errors import ComposerError, ComposerWarning
from composer.execute import ExecutionOptions
from helpers import (
    MOE_FAMILY_MODEL_TYPES,
    MOE_TINY,
    compose_in_process,
    load_state,
    save_fine_tune,
    save_tiny_model,
    tiny_config,
)

LAYERS = 3
IDS = torch.arange(1, 13).unsqueeze(0)
MODEL_TYPES = list(MOE_FAMILY_MODEL_TYPES.values())
FUSED_ONLY = {"gpt_oss"}  # ships its experts fused; transformers has no per-expert layout for it
LAYOUTS = [(model_type, "per-expert") for model_type in MODEL_TYPES if model_type not in FUSED_ONLY]
LAYOUTS += [(model_type, "fused") for model_type in MODEL_TYPES]
LAYOUT_IDS = [f"{model_type}-{layout}" for model_type, layout in LAYOUTS]
OPTIONS = ExecutionOptions(progress=False)


@contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ComposerWarning)
        yield


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def save_fused(model, folder: Path) -> Path:
    """`model` saved under the names transformers 5 holds in memory: every expert of a layer in one tensor."""
    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    for target in tied_parameter_names(model) if model.config.tie_word_embeddings else []:
        state.pop(target, None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def fused_copy(folder: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    return save_fused(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32), out)


def load_checked(folder: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_checked(folder)(IDS).logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(model_type, layout, role): a base model ("base") or a fine-tune of it ("a", "b"), built once a module."""
    made: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("moe")

    def make(model_type: str, layout: str = "per-expert", role: str = "base") -> Path:
        key = (model_type, layout, role)
        if key in made:
            return made[key]
        folder = root / "-".join(key)
        if layout == "fused" and model_type not in FUSED_ONLY:
            made[key] = fused_copy(make(model_type, "per-expert", role), folder)
        elif role == "base":
            made[key] = save_tiny_model(folder, model_type, LAYERS, seed=1)
        else:
            made[key] = save_fine_tune(make(model_type, layout), folder, seed=ord(role))
        return made[key]

    return make


def compose(recipe: str, out: Path) -> Path:
    compose_text(recipe, out, OPTIONS)
    return out


def passthrough(source: Path, ranges: list[tuple[int, int]]) -> str:
    slices = "".join(f"  - sources: [{{model: {source}, layer_range: [{a}, {b}]}}]\n" for a, b in ranges)
    return f"merge_method: passthrough\nslices:\n{slices}"


# --- 1. the definitions name what transformers builds, in both layouts ----------------------------


@pytest.mark.parametrize("model_type, layout", LAYOUTS, ids=LAYOUT_IDS)
def test_declared_layer_tensors_match_transformers(model_type, layout):
    config = tiny_config(model_type, LAYERS).to_dict()
    architecture = architecture_for(config)
    assert not architecture.inferred and architecture.experts is not None
    experts = architecture.experts
    model = build_meta_model(config)
    # transformers holds the fused layout in memory and saves the per-expert one (gpt-oss: fused both ways)
    names = set(model.state_dict()) if layout == "fused" else set(checkpoint_shapes(model))
    sparse = experts.sparse_layers(config, LAYERS)
    chosen = next(candidate for candidate in experts.layouts if candidate.name == layout)
    required, optional = set(), set()
    for weight in architecture.pre + architecture.post:
        if not (weight.tied_to and model.config.tie_word_embeddings):
            required.add(weight.name)
    for index in range(LAYERS):
        moe = MoELayer(sparse[index], chosen, experts.count(config))
        for weight in architecture.layer_weights(index, moe):
            (optional if weight.optional else required).add(weight.name)
    assert required <= names, f"declared but absent: {sorted(required - names)}"
    assert names <= required | optional, f"built but not declared: {sorted(names - required - optional)}"
    assert experts.layout_of(names, architecture.layer_prefix, sparse, "tiny") == chosen
    if model_type == "deepseek_v3":
        assert sparse == [False, True, True]  # first_k_dense_replace: 1


def test_fused_pieces_split_and_join_back():
    gate_up = torch.arange(2 * 3 * 8).reshape(2, 3, 8)  # gpt-oss: [experts, hidden, 2 x inner], gate and up alternate
    interleaved = FusedTensor("gate_up_proj", ("g{e}", "u{e}"), axis=1, interleaved=True)
    gate, up = interleaved.split(gate_up[1])
    assert torch.equal(gate, gate_up[1][:, ::2]) and torch.equal(up, gate_up[1][:, 1::2])
    assert torch.equal(interleaved.join([gate, up]), gate_up[1])
    stacked = gate_up.reshape(2, 4, 6)  # Mixtral: [experts, 2 x inner, hidden], gate rows then up rows
    following = FusedTensor("gate_up_proj", ("g{e}", "u{e}"), axis=0, interleaved=False)
    gate, up = following.split(stacked[0])
    assert torch.equal(gate, stacked[0][:2]) and torch.equal(up, stacked[0][2:])
    assert torch.equal(following.join([gate, up]), stacked[0])


# --- 2. depth upscales (passthrough slices) ---------------------------------------------------------


@pytest.mark.parametrize("model_type, layout", LAYOUTS, ids=LAYOUT_IDS)
def test_passthrough_of_every_layer_reproduces_the_model(model_type, layout, tiny, tmp_path):
    source = tiny(model_type, layout)
    out = compose(passthrough(source, [(0, 1), (1, LAYERS)]), tmp_path / "out")
    assert load_state(out).keys() == load_state(source).keys()  # the input's layout, tensor for tensor
    assert torch.equal(logits(out), logits(source))


def layer_map(state: dict[str, torch.Tensor], source_layers: list[int]) -> dict[str, torch.Tensor]:
    """Output name -> the source tensor it must equal, for a stack whose layer i is source layer source_layers[i]."""
    expected = {}
    for name, tensor in state.items():
        if not name.startswith("model.layers."):
            expected[name] = tensor
            continue
        index, rest = name.removeprefix("model.layers.").split(".", 1)
        for position, used in enumerate(source_layers):
            if used == int(index):
                expected[f"model.layers.{position}.{rest}"] = tensor
    return expected


@pytest.mark.parametrize("model_type, layout", LAYOUTS, ids=LAYOUT_IDS)
def test_depth_upscale_copies_layers_and_loads(model_type, layout, tiny, tmp_path):
    source = tiny(model_type, layout)
    out = compose(passthrough(source, [(0, LAYERS), (1, LAYERS)]), tmp_path / "out")
    source_layers = [0, 1, 2, 1, 2]
    written, expected = load_state(out), layer_map(load_state(source), source_layers)
    assert written.keys() == expected.keys()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in written.items())
    model = load_checked(out)
    assert model.config.num_hidden_layers == len(source_layers)
    config = read_config(out)
    if model_type == "deepseek_v3":
        assert config["first_k_dense_replace"] == 1
    if "layer_types" in read_config(source):
        assert config["layer_types"] == [read_config(source)["layer_types"][i] for i in source_layers]
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_qwen_dense_layers_follow_their_source_layer(tmp_path):
    source = save_tiny_model(tmp_path / "source", "qwen3_moe", LAYERS, seed=3, mlp_only_layers=[1])
    out = compose(passthrough(source, [(0, 2), (1, LAYERS)]), tmp_path / "out")  # source layers 0, 1, 1, 2
    assert read_config(out)["mlp_only_layers"] == [1, 2]
    assert "model.layers.2.mlp.gate_proj.weight" in load_state(out)
    load_checked(out)


def test_a_dense_deepseek_layer_after_one_with_experts_is_refused(tiny, tmp_path):
    source = tiny("deepseek_v3")
    with pytest.raises(ComposerError, match="dense layer after layer 0, which holds experts.*first_k_dense_replace"):
        compose(passthrough(source, [(1, LAYERS), (0, LAYERS)]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_slice_merging_a_dense_layer_with_one_with_experts_is_refused(tiny, tmp_path):
    a, b = tiny("deepseek_v3", role="a"), tiny("deepseek_v3", role="b")
    recipe = f"""merge_method: linear
slices:
  - sources:
      - {{model: {a}, layer_range: [0, 2], parameters: {{weight: 0.5}}}}
      - {{model: {b}, layer_range: [1, 3], parameters: {{weight: 0.5}}}}
"""
    with pytest.raises(
        ComposerError, match="Output layer 0 would merge layer 0 .* \\(dense\\) with layer 1 .* \\(with experts\\)"
    ):
        compose(recipe, tmp_path / "out")


def test_models_in_different_layouts_are_refused(tiny, tmp_path):
    a, b = tiny("mixtral", "per-expert", "a"), tiny("mixtral", "fused", "b")
    recipe = f"merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.5}}}}\n  - {{model: {b}, parameters: {{weight: 0.5}}}}\n"
    with pytest.raises(ComposerError, match="one tensor per expert.*fused"):
        compose(recipe, tmp_path / "out")


# --- 3. merges across fine-tunes of one MoE --------------------------------------------------------


@pytest.mark.parametrize("model_type, layout", LAYOUTS, ids=LAYOUT_IDS)
def test_linear_at_one_and_zero_reproduces_the_first_model(model_type, layout, tiny, tmp_path):
    a, b = tiny(model_type, layout, "a"), tiny(model_type, layout, "b")
    recipe = f"""merge_method: linear
models:
  - {{model: {a}, parameters: {{weight: 1.0}}}}
  - {{model: {b}, parameters: {{weight: 0.0}}}}
dtype: float32
"""
    out = compose(recipe, tmp_path / "out")
    written, first = load_state(out), load_state(a)
    assert written.keys() == first.keys()
    assert all(torch.equal(tensor, first[name]) for name, tensor in written.items())
    assert torch.equal(logits(out), logits(a))


def fused_pieces(state: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """A fused-layout state as per-expert tensors (the definition's pieces: gate and up apart), the rest as it is."""
    config = tiny_config(model_type, LAYERS).to_dict()
    architecture = architecture_for(config)
    fused_layout = next(layout for layout in architecture.experts.layouts if layout.fused)
    pieces = {}
    for name, tensor in state.items():
        fused = next((f for f in fused_layout.fused if name.endswith("." + f.name)), None)
        if fused is None:
            pieces[name] = tensor
            continue
        prefix = name.removesuffix(fused.name)
        for expert in range(tensor.shape[0]):
            pieces |= dict(zip([prefix + p for p in fused.piece_names(expert)], fused.split(tensor[expert])))
    return pieces


@pytest.mark.parametrize("method", sorted(CASES))
def test_every_method_merges_fused_experts_as_it_merges_per_expert_ones(method, tiny, tmp_path):
    """Each method, run on fine-tunes of a Qwen3-MoE held one tensor per expert and on the same models held fused,
    writes the same weights: a fused tensor is merged expert by expert, gate and up apart, each with the parameters
    and random draws its per-expert tensor gets. The router gate is merged as an ordinary tensor."""
    merged = {}
    for layout in ("per-expert", "fused"):
        folders = {role: tiny("qwen3_moe", layout, role) for role in ("base", "a", "b")}
        folders |= {"ft1": folders["a"], "ft2": folders["b"]}
        out = compose(recipe(method, CASES[method], folders), tmp_path / layout)
        merged[layout] = load_state(out)
        assert merged[layout].keys() == load_state(folders["base"]).keys()
    per_expert, fused = merged["per-expert"], fused_pieces(merged["fused"], "qwen3_moe")
    assert fused.keys() == per_expert.keys()
    for name, tensor in per_expert.items():
        torch.testing.assert_close(fused[name], tensor, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    if method not in ("passthrough", "arcee_fusion"):  # these two may keep one model's router as it is
        router = "model.layers.0.mlp.gate.weight"
        assert not torch.equal(per_expert[router], load_state(tiny("qwen3_moe", role="a"))[router])


def test_deepseek_routing_bias_stays_float32_in_a_bfloat16_merge(tiny, tmp_path):
    a, b = tiny("deepseek_v3", role="a"), tiny("deepseek_v3", role="b")
    recipe_text = f"""merge_method: task_arithmetic
base_model: {tiny("deepseek_v3")}
models:
  - {{model: {a}, parameters: {{weight: 0.5}}}}
  - {{model: {b}, parameters: {{weight: 0.5}}}}
out_dtype: bfloat16
"""
    written = load_state(compose(recipe_text, tmp_path / "out"))
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert written[bias].dtype == torch.float32  # transformers keeps it in float32: routing hangs on its small gaps
    assert written["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    load_checked(tmp_path / "out")


# --- 4. one expert out as a dense model ------------------------------------------------------------

DENSE_OF = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3", "deepseek_v3": "deepseek_v3"}
ALL_DENSE = {"deepseek_v3": dict(first_k_dense_replace=LAYERS)}  # DeepSeek's dense form: the family, no experts
# MoE settings under which a layer whose experts are all one MLP computes that MLP: the router's top-k weights sum to 1
WEIGHTS_SUM_TO_ONE = {
    "mixtral": {},
    "qwen2_moe": dict(norm_topk_prob=True, moe_intermediate_size=128, shared_expert_intermediate_size=32),
    "qwen3_moe": dict(norm_topk_prob=True, moe_intermediate_size=128),
    "deepseek_v3": dict(moe_intermediate_size=128, routed_scaling_factor=1.0),
}


def moe_from_dense(dense: Path, model_type: str, folder: Path, layout: str, shared_scale: float = 0.0, **overrides):
    """An MoE whose every expert is a copy of the dense model's MLP of that layer; attention, norms, embeddings and
    DeepSeek's dense first layer are the dense model's. Shared experts are random times `shared_scale`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(5)
    settings = {
        k: v for k, v in read_config(dense).items() if k not in ("model_type", "architectures", "transformers_version")
    }
    settings |= MOE_TINY[model_type] | WEIGHTS_SUM_TO_ONE[model_type] | overrides  # DeepSeek: one dense layer first
    config = AutoConfig.for_model(model_type, **settings)
    model = AutoModelForCausalLM.from_config(config).eval()
    dense_state = load_state(dense)
    with torch.no_grad():
        for name, parameter in model.state_dict().items():
            if name in dense_state:
                parameter.copy_(dense_state[name])
            elif name.endswith("mlp.experts.gate_up_proj"):  # [experts, 2 x inner, hidden]
                layer = name.removesuffix("experts.gate_up_proj")
                parameter.copy_(
                    torch.cat([dense_state[layer + "gate_proj.weight"], dense_state[layer + "up_proj.weight"]])
                )
            elif name.endswith("mlp.experts.down_proj"):  # [experts, hidden, inner]
                parameter.copy_(dense_state[name.removesuffix("experts.down_proj") + "down_proj.weight"])
            elif ".shared_expert" in name and "down_proj" in name:
                parameter.mul_(shared_scale)
    if layout == "fused":
        return save_fused(model, folder)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dense_and_moe(tmp_path_factory):
    """dense_and_moe(model_type, layout) -> (the dense model, an MoE built from it), built once a module."""
    made: dict[tuple, tuple[Path, Path]] = {}
    root = tmp_path_factory.mktemp("from-dense")

    def make(model_type: str, layout: str) -> tuple[Path, Path]:
        if (model_type, layout) not in made:
            dense_folder = root / f"{model_type}-dense"
            if not dense_folder.exists():
                save_tiny_model(dense_folder, DENSE_OF[model_type], LAYERS, seed=2, **ALL_DENSE.get(model_type, {}))
            made[model_type, layout] = (
                dense_folder,
                moe_from_dense(dense_folder, model_type, root / f"{model_type}-{layout}", layout),
            )
        return made[model_type, layout]

    return make


EXTRACTABLE = [(m, layout) for m in DENSE_OF for layout in ("per-expert", "fused")]


@pytest.mark.parametrize("model_type, layout", EXTRACTABLE, ids=[f"{m}-{kind}" for m, kind in EXTRACTABLE])
def test_an_expert_of_an_moe_built_from_a_dense_model_is_that_model(model_type, layout, dense_and_moe, tmp_path):
    from composer.extract_expert import extract_expert

    dense, moe = dense_and_moe(model_type, layout)
    torch.testing.assert_close(logits(moe), logits(dense), rtol=1e-4, atol=1e-4)  # the MoE computes the dense model
    out = tmp_path / "expert"
    with pytest.warns() if model_type == "qwen2_moe" else _no_warning():  # its shared expert's sigmoid gate
        extract_expert(str(moe), 1, out, OPTIONS)
    config = read_config(out)
    assert config["model_type"] == DENSE_OF[model_type]
    if model_type == "deepseek_v3":
        assert config["first_k_dense_replace"] == LAYERS
    torch.testing.assert_close(logits(out), logits(dense), rtol=1e-5, atol=1e-5)


def test_deepseek_expert_keeps_the_shared_expert_and_the_routed_scale(dense_and_moe, tmp_path):
    """With shared experts that are not zero and routed_scaling_factor 2.5, the dense model still computes what the MoE
    computes when every expert is one MLP: 2.5 x that MLP plus the shared expert."""
    from composer.extract_expert import extract_expert

    dense, _ = dense_and_moe("deepseek_v3", "per-expert")
    moe = moe_from_dense(
        dense, "deepseek_v3", tmp_path / "moe", "per-expert", shared_scale=1.0, routed_scaling_factor=2.5
    )
    extract_expert(str(moe), 3, tmp_path / "expert", OPTIONS)
    assert read_config(tmp_path / "expert")["intermediate_size"] == 2 * 128  # the expert and the shared expert
    torch.testing.assert_close(logits(tmp_path / "expert"), logits(moe), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(moe), logits(dense), atol=1e-3)


def test_extract_expert_on_the_command_line(dense_and_moe, tmp_path, monkeypatch, capsys):
    dense, moe = dense_and_moe("qwen2_moe", "per-expert")
    out = tmp_path / "expert"
    assert (
        compose_in_process(monkeypatch, "extract-expert", moe, "--expert", "2", "--no-shared", out, "--no-progress")
        == 0
    )
    assert "wrote expert 2 of" in capsys.readouterr().out
    config = read_config(out)
    assert (config["model_type"], config["architectures"], config["intermediate_size"]) == (
        "qwen2",
        ["Qwen2ForCausalLM"],
        128,
    )
    assert "num_experts" not in config and "shared_expert_intermediate_size" not in config
    torch.testing.assert_close(logits(out), logits(dense), rtol=1e-5, atol=1e-5)  # its shared expert was zero
    assert (out / "README.md").is_file() and (out / "composer-recipe.yml").read_text().startswith(
        "# compose extract-expert"
    )


@pytest.mark.parametrize(
    "model, expert, message",
    [
        ("mixtral", "3", r"--expert 3 is out of range: model '.*' has 3 experts a layer, numbered 0 to 2"),
        ("mixtral", "-1", r"--expert -1 is out of range"),
        ("llama", "0", r"is not a mixture of experts that composer knows.*Mixtral, Qwen2-MoE"),
        ("gpt_oss", "0", r"gpt-oss's clamped GLU.*cannot be written as a dense model"),
    ],
)
def test_extract_expert_refuses_bad_input_before_any_work(model, expert, message, tiny, tmp_path, monkeypatch, capsys):
    import re

    source = save_tiny_model(tmp_path / "llama", "llama", 2) if model == "llama" else tiny(model, "fused")
    out = tmp_path / "out"
    capsys.readouterr()  # what building the model printed
    assert compose_in_process(monkeypatch, "extract-expert", source, "--expert", expert, out) != 0
    error = " ".join(capsys.readouterr().err.split())
    assert error.startswith("error: ") and re.search(message, error), error
    assert "Traceback" not in error and not out.exists()
