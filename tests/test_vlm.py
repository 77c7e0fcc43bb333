"""Vision-language models (Gemma 3, Qwen2-VL, Qwen2.5-VL, LLaVA, Mistral 3): their language model merged and sliced
as the text-only model it is, a text-only fine-tune's weights taken into it and out of it, the vision tower and the
projector copied from the base, the config rewritten in its nested text_config."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from composer.compose import compose_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from helpers import load_state
from vlm_models import (
    IN_MEMORY_PREFIX,
    VISION_LANGUAGE_TYPES,
    renamed_copy,
    save_text_finetune,
    save_vision_language_model,
)

IDS = torch.arange(1, 17).unsqueeze(0)
LAYERS = 6
# where transformers 5 saves each family's language model: (prefix of `model.`, prefix of `lm_head.`)
SAVED_PREFIXES = {
    "gemma3": ("language_model.model.", "language_model.lm_head."),
    "qwen2_vl": ("model.", "lm_head."),
    "qwen2_5_vl": ("model.", "lm_head."),
    "llava": ("language_model.model.", "language_model.lm_head."),
    "mistral3": ("language_model.model.", "language_model.lm_head."),
}
CAUSAL_CLASSES = {
    "gemma3": "Gemma3ForCausalLM",
    "qwen2_vl": "Qwen2ForCausalLM",
    "qwen2_5_vl": "Qwen2ForCausalLM",
    "llava": "LlamaForCausalLM",
    "mistral3": "MistralForCausalLM",
}
PROCESSOR = {"image_processor_type": "stand-in", "size": {"height": 28, "width": 28}}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models(model_type) -> (vision-language model, text-only fine-tune of its language model), built once a module."""
    made: dict[str, tuple[Path, Path]] = {}

    def make(model_type: str) -> tuple[Path, Path]:
        if model_type not in made:
            root = tmp_path_factory.mktemp(model_type)
            vision_language = save_vision_language_model(root / "vlm", model_type, LAYERS, seed=len(made))
            (vision_language / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
            made[model_type] = (vision_language, save_text_finetune(vision_language, root / "text", model_type))
        return made[model_type]

    return make


def compose(recipe: str, out: Path) -> Path:
    compose_text(recipe, out, ExecutionOptions(progress=False))
    return out


def slices_recipe(ranges: list[tuple[Path, int, int]], head: str = "") -> str:
    slices = "".join(
        f"  - sources:\n      - model: {model}\n        layer_range: [{start}, {end}]\n" for model, start, end in ranges
    )
    return f"merge_method: passthrough\n{head}slices:\n{slices}"


def load_vision_language(folder: Path):
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(
        str(folder), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def load_text(folder: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def text_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def language_model_names(state: dict, prefixes: tuple[str, str]) -> dict[str, str]:
    """Text-only name -> on-disk name of a vision-language checkpoint's language-model tensors."""
    model, head = prefixes
    names = {}
    for name in state:
        if name.startswith(head):
            names["lm_head." + name.removeprefix(head)] = name
        elif name.startswith(model) and not name.startswith(("model.visual.", "model.vision_tower.")):
            names["model." + name.removeprefix(model)] = name
    return names


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# --- 1. out of a vision-language model, into a text-only one -----------------------------------------


@pytest.mark.parametrize("model_type", VISION_LANGUAGE_TYPES)
def test_language_model_only_is_the_text_model_with_the_same_logits(model_type, models, tmp_path):
    vision_language, _ = models(model_type)
    out = compose(slices_recipe([(vision_language, 0, LAYERS)], "language_model_only: true\n"), tmp_path / "out")
    config = read_config(out)
    assert config["architectures"] == [CAUSAL_CLASSES[model_type]]
    assert "vision_config" not in config and "text_config" not in config
    written = load_state(out)
    source = load_state(vision_language)
    names = language_model_names(source, SAVED_PREFIXES[model_type])
    assert set(written) == set(names) - ({"lm_head.weight"} if config["tie_word_embeddings"] else set())
    for name, tensor in written.items():
        assert torch.equal(tensor, source[names[name]]), name
    assert torch.equal(text_logits(load_text(out)), text_logits(load_vision_language(vision_language)))


# --- 2. a text-only fine-tune into a vision-language model -------------------------------------------


@pytest.mark.parametrize("model_type", VISION_LANGUAGE_TYPES)
def test_text_finetune_goes_into_the_vision_language_model(model_type, models, tmp_path):
    vision_language, finetune = models(model_type)
    recipe = slices_recipe([(finetune, 0, LAYERS)], f"base_model: {vision_language}\n")
    out = compose(recipe, tmp_path / "out")
    base, tuned, written = load_state(vision_language), load_state(finetune), load_state(out)
    assert set(written) == set(base)  # the base's layout, the vision tower and projector included
    names = language_model_names(base, SAVED_PREFIXES[model_type])
    for name, saved in written.items():
        text_name = next((text for text, disk in names.items() if disk == name), None)
        assert torch.equal(saved, tuned[text_name] if text_name else base[name]), name
    assert json.loads((out / "preprocessor_config.json").read_text()) == PROCESSOR
    assert read_config(out)["architectures"] == read_config(vision_language)["architectures"]
    assert torch.equal(text_logits(load_vision_language(out)), text_logits(load_text(finetune)))


# --- 3. the language model's layers stacked deeper ---------------------------------------------------


@pytest.mark.parametrize("model_type", VISION_LANGUAGE_TYPES)
def test_depth_upscale_rewrites_the_text_config_and_keeps_the_vision_tower(model_type, models, tmp_path):
    vision_language, _ = models(model_type)
    out = compose(slices_recipe([(vision_language, 0, 4), (vision_language, 2, 6)]), tmp_path / "out")
    source_layers = [0, 1, 2, 3, 2, 3, 4, 5]
    before, after = read_config(vision_language)["text_config"], read_config(out)["text_config"]
    assert after["num_hidden_layers"] == len(source_layers)
    if "layer_types" in before:  # Llama and Mistral have none
        assert after["layer_types"] == [before["layer_types"][i] for i in source_layers]
    model = load_vision_language(out)
    assert model.config.text_config.num_hidden_layers == len(source_layers)
    source, written = load_state(vision_language), load_state(out)
    prefix = SAVED_PREFIXES[model_type][0] + "layers."
    for index, source_index in enumerate(source_layers):
        name = f"{prefix}{index}.mlp.down_proj.weight"
        assert torch.equal(written[name], source[f"{prefix}{source_index}.mlp.down_proj.weight"])
    outside = [name for name in source if not name.startswith(prefix)]
    assert all(torch.equal(written[name], source[name]) for name in outside)
    assert torch.isfinite(text_logits(model)).all()


# --- 4. merges, both layouts on disk, flat configs, stages --------------------------------------------


@pytest.mark.parametrize("model_type", ["gemma3", "qwen2_vl"])
def test_linear_merge_of_the_vision_language_model_and_a_text_finetune(model_type, models, tmp_path):
    vision_language, finetune = models(model_type)
    recipe = f"""merge_method: linear
base_model: {vision_language}
models:
  - model: {vision_language}
    parameters: {{weight: 0.5}}
  - model: {finetune}
    parameters: {{weight: 0.5}}
"""
    out = compose(recipe, tmp_path / "out")
    base, tuned, written = load_state(vision_language), load_state(finetune), load_state(out)
    model_prefix = SAVED_PREFIXES[model_type][0]
    for suffix in ("layers.2.self_attn.q_proj.weight", "embed_tokens.weight", "norm.weight"):
        expected = (base[model_prefix + suffix] + tuned["model." + suffix]) / 2
        assert torch.allclose(written[model_prefix + suffix], expected, atol=1e-7), suffix
    vision = [name for name in base if "vis" in name or "projector" in name]
    assert vision and all(torch.equal(written[name], base[name]) for name in vision)
    load_vision_language(out)


def current_layout(name: str) -> str:
    """transformers 4.52-4.57's names for a checkpoint that transformers 5 saved."""
    for old, new in (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("visual.", "model.visual."),
        ("model.", "model.language_model."),
    ):
        if name.startswith(old):
            return new + name.removeprefix(old)
    return name


@pytest.mark.parametrize("model_type", ["gemma3", "qwen2_vl"])
def test_the_other_layout_on_disk_is_read_and_kept(model_type, models, tmp_path):
    vision_language, finetune = models(model_type)
    current = renamed_copy(vision_language, tmp_path / "current", current_layout)
    assert any(name.startswith("model.language_model.layers.") for name in load_state(current))
    out = compose(slices_recipe([(finetune, 0, 3), (current, 3, LAYERS)], f"base_model: {current}\n"), tmp_path / "out")
    written = load_state(out)
    assert set(written) == set(load_state(current))
    model = load_vision_language(out)
    with torch.no_grad():
        expected = load_vision_language(vision_language).model.language_model.layers[4].mlp.up_proj.weight
        assert torch.equal(model.model.language_model.layers[4].mlp.up_proj.weight, expected)


def flat_qwen2_vl(vision_language: Path, folder: Path) -> Path:
    """The model as the first Qwen2-VL releases' config.json describe it: text keys at the top level, M-RoPE in
    `rope_scaling`, no text_config."""
    folder = renamed_copy(vision_language, folder, lambda name: name)
    config = read_config(vision_language)
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    text.pop("layer_types")
    text.pop("model_type")
    config.update(text, rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_flat_qwen2_vl_config_is_rewritten_at_the_top_level(models, tmp_path):
    vision_language, _ = models("qwen2_vl")
    flat = flat_qwen2_vl(vision_language, tmp_path / "flat")
    out = compose(slices_recipe([(flat, 0, 4), (flat, 2, 6)]), tmp_path / "upscaled")
    config = read_config(out)
    assert "text_config" not in config and config["num_hidden_layers"] == 8
    assert load_vision_language(out).config.text_config.num_hidden_layers == 8
    text = compose(slices_recipe([(flat, 0, LAYERS)], "language_model_only: true\n"), tmp_path / "text")
    assert read_config(text)["rope_scaling"] == {"type": "default"}
    assert torch.equal(text_logits(load_text(text)), text_logits(load_vision_language(vision_language)))


def test_stages_merge_into_the_vision_language_model_then_upscale_it(models, tmp_path):
    vision_language, finetune = models("gemma3")
    recipe = f"""stages:
  - name: merged
    merge_method: slerp
    base_model: {vision_language}
    models:
      - model: {vision_language}
      - model: {finetune}
    parameters: {{t: 0.3}}
  - name: deeper
    merge_method: passthrough
    slices:
      - sources: [{{model: merged, layer_range: [0, 4]}}]
      - sources: [{{model: merged, layer_range: [2, 6]}}]
"""
    out = compose(recipe, tmp_path / "out")
    assert read_config(out)["text_config"]["num_hidden_layers"] == 8
    model = load_vision_language(out)
    base = load_state(vision_language)
    written = load_state(out)
    vision = [name for name in base if name.startswith(("vision_tower.", "multi_modal_projector."))]
    assert vision and all(torch.equal(written[name], base[name]) for name in vision)
    assert torch.isfinite(text_logits(model)).all()


# --- 5. bad input: refused before any work ------------------------------------------------------------


def edited_config(source: Path, folder: Path, edit) -> Path:
    folder = renamed_copy(source, folder, lambda name: name)
    config = read_config(source)
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def refused(recipe: str, out: Path) -> str:
    with pytest.raises(ComposerError) as error:
        compose(recipe, out)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial*"))
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_finetune_of_another_width_is_refused(models, tmp_path):
    vision_language, finetune = models("qwen2_vl")
    wider = edited_config(finetune, tmp_path / "wider", lambda c: c.update(hidden_size=96))
    message = refused(slices_recipe([(wider, 0, LAYERS)], f"base_model: {vision_language}\n"), tmp_path / "out")
    assert re.search(r"text_config\) has hidden_size 64, but '.*wider' has hidden_size 96", message), message
    assert str(vision_language) in message


def test_a_finetune_with_another_vocabulary_is_refused_with_the_fix(models, tmp_path):
    vision_language, finetune = models("gemma3")
    larger = edited_config(finetune, tmp_path / "larger", lambda c: c.update(vocab_size=384))
    message = refused(slices_recipe([(larger, 0, LAYERS)], f"base_model: {vision_language}\n"), tmp_path / "out")
    assert "vocab_size 320" in message and "vocab_size 384" in message and "tokenizer_source: base" in message


def test_language_model_only_of_a_text_model_is_refused(models, tmp_path):
    _, finetune = models("llava")
    message = refused(slices_recipe([(finetune, 0, LAYERS)], "language_model_only: true\n"), tmp_path / "out")
    assert "language_model_only" in message and "text-only model already" in message


def test_another_vocabulary_for_a_vision_language_output_is_refused(models, tmp_path):
    vision_language, finetune = models("llava")
    recipe = slices_recipe([(finetune, 0, LAYERS)], f"base_model: {vision_language}\ntokenizer_source: union\n")
    assert "use 'base' here (not 'union')" in refused(recipe, tmp_path / "out")


def test_a_vision_language_config_over_weights_without_a_language_model_is_refused(models, tmp_path):
    vision_language, _ = models("mistral3")
    stripped = renamed_copy(vision_language, tmp_path / "stripped", lambda name: name.replace("language_model.", "lm."))
    message = refused(slices_recipe([(stripped, 0, LAYERS)]), tmp_path / "out")
    assert "weights hold no language model" in message and "language_model.model.embed_tokens.weight" in message


# --- 6. the real Gemma 3 270M into a Gemma 3 vision-language model, and back out -----------------------


def gemma3_vision_base(text_model: Path, folder: Path) -> Path:
    """A Gemma3ForConditionalGeneration base built to match the text model's config, with a tiny random vision tower
    and one zero language-model layer (its language model is never read: the recipe takes the text model's)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    from vlm_models import vision_language_config

    text = read_config(text_model)
    text.update(num_hidden_layers=1, layer_types=text["layer_types"][:1])
    config = vision_language_config("gemma3", tied=True)
    config.text_config = type(config.text_config)(**text)
    config.architectures = ["Gemma3ForConditionalGeneration"]
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in AutoModelForImageTextToText.from_config(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in shapes.items():  # saved by transformers 5's names in memory (as 4.52 to 4.57 save them)
        if name.startswith(IN_MEMORY_PREFIX):
            state[name] = torch.zeros(shape, dtype=torch.bfloat16)
        elif not name.startswith("lm_head."):
            state[name] = torch.randn(shape, generator=generator) * 0.02
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"), {"format": "pt"})
    config.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((text_model / name).read_bytes())
    return folder


@pytest.mark.real_model
def test_real_gemma3_270m_into_a_vision_language_model_and_back(tmp_path):
    """Slow (about 15 s on an idle 2-core machine): two 1 GB outputs, copied file to file, and two loads of the 270M."""
    from composer.bundled import gemma3_dir

    text_model = gemma3_dir()
    base = gemma3_vision_base(text_model, tmp_path / "base")
    layers = read_config(text_model)["num_hidden_layers"]
    vision_language = compose(slices_recipe([(text_model, 0, layers)], f"base_model: {base}\n"), tmp_path / "vlm")
    config = read_config(vision_language)
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert config["text_config"]["num_hidden_layers"] == layers
    assert config["text_config"]["layer_types"] == read_config(text_model)["layer_types"]
    with torch.no_grad():
        expected = load_text(text_model)(input_ids=IDS).logits
        assert torch.equal(load_vision_language(vision_language)(input_ids=IDS).logits, expected)
    back = compose(slices_recipe([(vision_language, 0, layers)], "language_model_only: true\n"), tmp_path / "text")
    from safetensors import safe_open

    with (
        safe_open(text_model / "model.safetensors", "pt") as original,
        safe_open(back / "model.safetensors", "pt") as written,
    ):
        assert set(written.keys()) == set(original.keys())
        for name in ("model.embed_tokens.weight", "model.layers.17.mlp.down_proj.weight", "model.norm.weight"):
            assert torch.equal(written.get_tensor(name), original.get_tensor(name)), name


def test_mistral3_with_a_ministral3_language_model(tmp_path):
    """Ministral 3's vision releases are Mistral3ForConditionalGeneration over a `ministral3` language model."""
    vision_language = save_vision_language_model(tmp_path / "vlm", "mistral3", LAYERS, text_type="ministral3")
    out = compose(slices_recipe([(vision_language, 0, LAYERS)], "language_model_only: true\n"), tmp_path / "text")
    assert read_config(out)["architectures"] == ["Ministral3ForCausalLM"]
    assert torch.equal(text_logits(load_text(out)), text_logits(load_vision_language(vision_language)))


def test_a_finetune_with_added_tokens_goes_in_with_tokenizer_source_base(tmp_path):
    """The fix the vocabulary error names: the fine-tune's rows are moved into the base's vocabulary."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from helpers import BYTE_LEVEL_SPECIAL, byte_level_tokenizer, save_tokenizer

    tokenizer = byte_level_tokenizer(320)
    size = tokenizer.get_vocab_size()
    vision_language = save_vision_language_model(tmp_path / "vlm", "qwen2_vl", LAYERS, vocab_size=size)
    save_tokenizer(tokenizer, vision_language, **BYTE_LEVEL_SPECIAL)
    finetune = save_text_finetune(vision_language, tmp_path / "text", "qwen2_vl")
    added = AutoTokenizer.from_pretrained(str(vision_language))
    added.add_tokens(["<tool>", "</tool>"])
    added.save_pretrained(str(finetune))
    state = load_file(str(finetune / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = torch.cat([state[name], torch.randn(2, state[name].shape[1])])
    save_file(state, str(finetune / "model.safetensors"), {"format": "pt"})
    (finetune / "config.json").write_text(json.dumps(read_config(finetune) | {"vocab_size": size + 2}))

    recipe = slices_recipe([(finetune, 0, LAYERS)], f"base_model: {vision_language}\ntokenizer_source: base\n")
    out = compose(recipe, tmp_path / "out")
    assert read_config(out)["text_config"]["vocab_size"] == size
    written = load_state(out)
    assert torch.equal(written["model.embed_tokens.weight"], state["model.embed_tokens.weight"][:size])
    load_vision_language(out)
