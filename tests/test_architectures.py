"""Architecture definitions against transformers: declared names, layer-count config keys, inferred families."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from composer.architecture import (
    Architecture,
    architecture_for,
    build_meta_model,
    declared_architectures,
    tied_parameter_names,
)
from composer.compose import compose_text
from composer.execute import ExecutionOptions
from helpers import FAMILY_MODEL_TYPES, MOE_FAMILY_MODEL_TYPES, load_state, logits_of, save_tiny_model, tiny_config

UPSCALE_RANGES = [(0, 4), (2, 6)]
UPSCALE_SOURCE_LAYERS = [0, 1, 2, 3, 2, 3, 4, 5]
# Undeclared causal LMs that transformers builds from a tiny config; composer must infer them. MPT names its
# layer count `n_layers`, reached only through the config's attribute_map.
UNDECLARED_MODEL_TYPES = ["starcoder2", "stablelm", "mpt"]
# Config switches that add the optional tensors of a family.
BIAS_VARIANTS = {
    "llama": dict(attention_bias=True, mlp_bias=True),
    "qwen3": dict(attention_bias=True),
    "olmo2": dict(attention_bias=True),
    "gemma2": dict(attention_bias=True),
    "gemma3_text": dict(attention_bias=True),
    "llama4_text": dict(attention_bias=True),
    "cohere2": dict(attention_bias=True),
    "granite": dict(attention_bias=True, mlp_bias=True),
    "olmo3": dict(attention_bias=True),
}
FAMILIES = list(FAMILY_MODEL_TYPES.values())
IDS = torch.arange(1, 17).unsqueeze(0)
pytestmark = pytest.mark.usefixtures("single_thread")


def passthrough_recipe(source: Path, ranges: list[tuple[int, int]]) -> str:
    slices = "".join(
        f"  - sources:\n      - model: {source}\n        layer_range: [{start}, {end}]\n" for start, end in ranges
    )
    return f"merge_method: passthrough\nslices:\n{slices}"


def compose_passthrough(source: Path, ranges: list[tuple[int, int]], out: Path) -> Path:
    compose_text(passthrough_recipe(source, ranges), out, ExecutionOptions())
    return out


def source_layers_of(ranges: list[tuple[int, int]]) -> list[int]:
    return [index for start, end in ranges for index in range(start, end)]


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def layer_pattern(architecture: Architecture) -> re.Pattern:
    head, tail = architecture.layer_prefix.split("{i}")
    return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + r"(.+)")


def expected_output_state(
    source_state: dict[str, torch.Tensor], architecture: Architecture, source_layers: list[int]
) -> dict[str, torch.Tensor]:
    """Output name -> the source tensor it must equal, for a passthrough whose layer i is source layer source_layers[i]."""
    pattern = layer_pattern(architecture)
    expected = {}
    for name, tensor in source_state.items():
        match = pattern.fullmatch(name)
        if match is None:
            expected[name] = tensor
            continue
        source_index, suffix = int(match.group(1)), match.group(2)
        for output_index, used in enumerate(source_layers):
            if used == source_index:
                expected[architecture.layer_prefix.format(i=output_index) + suffix] = tensor
    return expected


def load_checked(folder: Path):
    """The output loaded by transformers, after asserting every tensor in the files is used and none is missing."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    return model.eval()


def forward_logits(model) -> torch.Tensor:
    with torch.no_grad():
        logits = model(IDS).logits
    assert logits.shape == (1, IDS.shape[1], model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()
    return logits


def assert_upscaled(source: Path, out: Path, source_layers: list[int]) -> None:
    config = read_config(source)
    architecture = architecture_for(config)
    model = load_checked(out)
    assert model.config.num_hidden_layers == len(source_layers)
    assert architecture.layer_count(read_config(out)) == len(source_layers)
    forward_logits(model)
    expected = expected_output_state(load_state(source), architecture, source_layers)
    written = load_state(out)
    assert sorted(written) == sorted(expected)
    for name, tensor in written.items():
        assert torch.equal(tensor, expected[name]), name


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """Tiny saved models, built once a module: tiny_source(model_type, layers, **overrides)."""
    made: dict[str, Path] = {}

    def make(model_type: str, layers: int = 6, **overrides) -> Path:
        key = f"{model_type}-{layers}-" + "-".join(f"{k}={v}" for k, v in sorted(overrides.items()))
        if key not in made:
            folder = tmp_path_factory.mktemp(re.sub(r"[^A-Za-z0-9_.-]", "_", key)[:80])
            made[key] = save_tiny_model(folder, model_type, layers, seed=len(made), **overrides)
        return made[key]

    return make


# --- 1. depth upscaling of every declared family ---------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILIES)
def test_upscale_copies_each_source_layer_and_loads(model_type, tiny_source, tmp_path):
    source = tiny_source(model_type)
    out = compose_passthrough(source, UPSCALE_RANGES, tmp_path / "out")
    assert source_layers_of(UPSCALE_RANGES) == UPSCALE_SOURCE_LAYERS
    assert_upscaled(source, out, UPSCALE_SOURCE_LAYERS)


@pytest.mark.parametrize("model_type", sorted(BIAS_VARIANTS))
def test_upscale_with_optional_bias_tensors(model_type, tiny_source, tmp_path):
    source = tiny_source(model_type, **BIAS_VARIANTS[model_type])
    out = compose_passthrough(source, UPSCALE_RANGES, tmp_path / "out")
    assert any(name.endswith("bias") for name in load_state(out))
    assert_upscaled(source, out, UPSCALE_SOURCE_LAYERS)


# --- 2. per-layer config keys follow their source layer ---------------------------------------------

SLIDING_QWEN = dict(use_sliding_window=True, sliding_window=8, max_window_layers=3)
IRREGULAR_TYPES = [
    "full_attention",
    "sliding_attention",
    "sliding_attention",
    "full_attention",
    "full_attention",
    "sliding_attention",
]


@pytest.mark.parametrize(
    "model_type, overrides",
    [
        ("gemma3_text", {}),
        ("gemma3_text", dict(layer_types=IRREGULAR_TYPES)),
        ("gemma2", {}),
        ("gemma2", dict(layer_types=IRREGULAR_TYPES)),
        ("qwen2", SLIDING_QWEN),
        ("qwen3", SLIDING_QWEN),
        ("cohere2", {}),
        ("olmo3", {}),
        ("ministral", dict(layer_types=IRREGULAR_TYPES)),
        ("llama4_text", {}),
    ],
    ids=[
        "gemma3-default",
        "gemma3-irregular",
        "gemma2-default",
        "gemma2-irregular",
        "qwen2-sliding",
        "qwen3-sliding",
        "cohere2-default",
        "olmo3-default",
        "ministral-irregular",
        "llama4-default",
    ],
)
def test_layer_types_follow_source_layers(model_type, overrides, tiny_source, tmp_path):
    source = tiny_source(model_type, **overrides)
    source_types = read_config(source)["layer_types"]
    assert len(set(source_types)) > 1
    out = compose_passthrough(source, UPSCALE_RANGES, tmp_path / "out")
    wanted = [source_types[i] for i in UPSCALE_SOURCE_LAYERS]
    assert read_config(out)["layer_types"] == wanted
    assert load_checked(out).config.layer_types == wanted


def test_llama4_moe_layers_and_no_rope_layers_follow_source_layers(tiny_source, tmp_path):
    """Llama 4 lists its mixture-of-experts layers by index (`moe_layers`), and which layers skip RoPE per layer."""
    source = tiny_source("llama4_text")  # every other layer a mixture of experts: 1, 3, 5
    config = read_config(source)
    assert config["moe_layers"] == [1, 3, 5] and len(set(config["no_rope_layers"])) > 1
    ranges = [(0, 2), (1, 6)]  # output layers come from 0,1,1,2,3,4,5
    out = compose_passthrough(source, ranges, tmp_path / "out")
    written = read_config(out)
    assert written["moe_layers"] == [1, 2, 4, 6]
    assert written["no_rope_layers"] == [config["no_rope_layers"][i] for i in source_layers_of(ranges)]
    assert_upscaled(source, out, source_layers_of(ranges))


@pytest.mark.parametrize("model_type", ["gemma3_text", "qwen2"])
def test_layer_types_derived_from_older_config_keys(model_type, tiny_source, tmp_path):
    """Hub configs of Gemma 3 / Qwen2.5 often carry only sliding_window_pattern / max_window_layers, no layer_types."""
    overrides = SLIDING_QWEN if model_type == "qwen2" else {}
    saved = tiny_source(model_type, **overrides)
    source = tmp_path / "source"
    source.mkdir()
    for path in saved.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    config = read_config(saved)
    source_types = config.pop("layer_types")
    if model_type == "gemma3_text":
        config.pop("_sliding_window_pattern", None)
        config["sliding_window_pattern"] = 6
    (source / "config.json").write_text(json.dumps(config))
    out = compose_passthrough(source, UPSCALE_RANGES, tmp_path / "out")
    wanted = [source_types[i] for i in UPSCALE_SOURCE_LAYERS]
    assert load_checked(out).config.layer_types == wanted


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_max_window_layers_counts_output_layers_below_the_threshold(model_type, tiny_source, tmp_path):
    source = tiny_source(model_type, **SLIDING_QWEN)  # source layers 0-2 full attention, 3-5 sliding
    ranges = [(0, 2), (0, 6)]  # output layers come from 0,1,0,1,2,3,4,5: five full, then three sliding
    out = compose_passthrough(source, ranges, tmp_path / "out")
    config = read_config(out)
    assert config["max_window_layers"] == 5
    assert config["layer_types"] == ["full_attention"] * 5 + ["sliding_attention"] * 3
    assert_upscaled(source, out, source_layers_of(ranges))


# --- 3. declared definitions agree with transformers -------------------------------------------------


def declared_names(architecture: Architecture, layers: int, tied: bool) -> tuple[set[str], set[str]]:
    """(required, optional) tensor names of a model with `layers` layers."""
    required = {w.name for w in architecture.pre + architecture.post if not (tied and w.tied_to) and not w.optional}
    optional = {w.name for w in architecture.pre + architecture.post if w.optional}
    for index in range(layers):
        for weight in architecture.layer_weights(index):
            (optional if weight.optional else required).add(weight.name)
    return required, optional


def meta_model_names(model) -> set[str]:
    names = set(model.state_dict())
    if model.config.get_text_config().tie_word_embeddings:
        names -= set(tied_parameter_names(model))
    return names


FAMILY_VARIANTS = [(model_type, {}) for model_type in FAMILIES]
FAMILY_VARIANTS += [(model_type, dict(tie_word_embeddings=True)) for model_type in ("llama", "qwen2", "qwen3")]
FAMILY_VARIANTS += [(model_type, dict(tie_word_embeddings=False)) for model_type in ("gemma2", "gemma3_text", "gpt2")]
FAMILY_VARIANTS += [(model_type, overrides) for model_type, overrides in BIAS_VARIANTS.items()]


@pytest.mark.parametrize(
    "model_type, overrides", FAMILY_VARIANTS, ids=[f"{m}-{'-'.join(o) or 'default'}" for m, o in FAMILY_VARIANTS]
)
def test_declared_tensor_names_match_transformers(model_type, overrides):
    layers = 3
    config = tiny_config(model_type, layers, **overrides).to_dict()
    architecture = declared_architectures()[model_type]
    model = build_meta_model(config)
    names = meta_model_names(model)
    tied = bool(model.config.get_text_config().tie_word_embeddings)
    required, optional = declared_names(architecture, layers, tied)
    assert required <= names, f"declared but absent: {sorted(required - names)}"
    assert names <= required | optional, (
        f"built by transformers but not declared: {sorted(names - required - optional)}"
    )
    if overrides in BIAS_VARIANTS.values():  # some layer holds each optional tensor (Llama 4: dense or MoE layers)
        held = {w.suffix for i in range(layers) for w in architecture.layer_weights(i) if w.name in names}
        unheld = set(architecture.layer_optional) - held
        unheld |= {w.name for w in architecture.pre + architecture.post if w.optional} - names
        assert not unheld, f"optional tensors no config switch produces: {sorted(unheld)}"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_declared_vocab_ties_and_layer_keys_match_transformers(model_type):
    layers = 3
    architecture = declared_architectures()[model_type]
    model = build_meta_model(tiny_config(model_type, layers, tie_word_embeddings=True).to_dict())
    shapes = model.state_dict()
    vocab_size = model.config.get_text_config().vocab_size
    for weight in architecture.pre + architecture.post:
        if weight.vocab_axis is not None:
            assert shapes[weight.name].shape[weight.vocab_axis] == vocab_size, weight.name
    declared_ties = {w.name: w.tied_to for w in architecture.pre + architecture.post if w.tied_to}
    assert declared_ties == tied_parameter_names(model)

    config = model.config.to_dict()
    assert config[architecture.layer_count_keys[0]] == layers
    per_layer = {key for key, value in config.items() if isinstance(value, list) and len(value) == layers}
    declared = set(architecture.per_layer_keys) | set(architecture.layer_index_keys)
    assert per_layer <= declared, f"undeclared per-layer keys: {sorted(per_layer - declared)}"


def test_every_family_in_the_test_table_is_declared():
    """Dense families are tested here, mixture-of-experts ones in test_moe_inputs.py."""
    tables = FAMILY_MODEL_TYPES | MOE_FAMILY_MODEL_TYPES
    assert set(tables.values()) <= set(declared_architectures())
    assert {a.name for a in declared_architectures().values()} == set(tables)


# --- 4. undeclared architectures are inferred -------------------------------------------------------


@pytest.mark.parametrize("model_type", UNDECLARED_MODEL_TYPES)
def test_undeclared_architecture_is_inferred_and_upscaled(model_type, tiny_source, tmp_path):
    assert model_type not in declared_architectures()
    source = tiny_source(model_type)
    architecture = architecture_for(read_config(source))
    assert architecture.inferred
    count_key = architecture.layer_count_keys[0]
    assert read_config(source)[count_key] == 6
    out = compose_passthrough(source, UPSCALE_RANGES, tmp_path / "out")
    assert read_config(out)[count_key] == len(UPSCALE_SOURCE_LAYERS)
    assert_upscaled(source, out, UPSCALE_SOURCE_LAYERS)


@pytest.mark.parametrize("model_type", UNDECLARED_MODEL_TYPES)
def test_inferred_definition_matches_meta_model(model_type):
    layers = 3
    config = tiny_config(model_type, layers).to_dict()
    architecture = architecture_for(config)
    model = build_meta_model(config)
    tied = bool(model.config.get_text_config().tie_word_embeddings)
    required, optional = declared_names(architecture, layers, tied)
    assert not optional
    assert required == meta_model_names(model)
    assert architecture.layer_count(config) == layers


# --- 5. a passthrough of every layer is the identity ------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILIES + UNDECLARED_MODEL_TYPES)
def test_full_passthrough_reproduces_logits(model_type, tiny_source, tmp_path):
    source = tiny_source(model_type)
    out = compose_passthrough(source, [(0, 6)], tmp_path / "out")
    assert load_state(source).keys() == load_state(out).keys()
    assert torch.equal(logits_of(source, IDS), logits_of(out, IDS))


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_split_passthrough_of_every_layer_reproduces_logits(model_type, tiny_source, tmp_path):
    source = tiny_source(model_type)
    out = compose_passthrough(source, [(0, 1), (1, 4), (4, 6)], tmp_path / "out")
    for key in ("num_hidden_layers", "layer_types"):
        assert read_config(out).get(key) == read_config(source).get(key), key
    assert torch.equal(logits_of(source, IDS), logits_of(out, IDS))


# --- 6. releases that reuse a declared family under its model_type -----------------------------------

RELEASE_SHAPES = {
    # Mistral-Nemo: heads of 128 on a 5120-wide model, so q_proj is not square (here 4 heads of 32 on 64)
    "mistral-nemo": ("mistral", dict(head_dim=32)),
    # Phi-4-mini: Phi-3's layout with the head tied to the embeddings and RoPE on three quarters of each head
    "phi4-mini": ("phi3", dict(tie_word_embeddings=True, partial_rotary_factor=0.75)),
}


@pytest.mark.parametrize("release", sorted(RELEASE_SHAPES))
def test_releases_of_a_declared_family_upscale_and_pass_through(release, tiny_source, tmp_path):
    model_type, overrides = RELEASE_SHAPES[release]
    source = tiny_source(model_type, **overrides)
    assert not architecture_for(read_config(source)).inferred
    out = compose_passthrough(source, UPSCALE_RANGES, tmp_path / "upscaled")
    assert_upscaled(source, out, UPSCALE_SOURCE_LAYERS)
    copy = compose_passthrough(source, [(0, 6)], tmp_path / "copy")
    assert torch.equal(logits_of(source, IDS), logits_of(copy, IDS))
