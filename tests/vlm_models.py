"""Tiny vision-language models of each declared family, and text-only fine-tunes of their language models, built with
transformers and saved as real model folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from helpers import TINY

TEXT = dict(TINY, head_dim=16)
VISION = {
    "gemma3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14, vision_use_head=False),  # as Gemma 3 ships
    "qwen2_vl": dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
    "qwen2_5_vl": dict(depth=1, hidden_size=32, out_hidden_size=64, num_heads=2, intermediate_size=64, fullatt_block_indexes=[0]),
    "llava": dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32),
    "mistral3": dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14, head_dim=16),
}  # fmt: skip
# the text config's model_type in the vision-language model, and the text-only family of its fine-tunes
TEXT_TYPES = {
    "gemma3": ("gemma3_text", "gemma3_text"),
    "qwen2_vl": ("qwen2_vl_text", "qwen2"),
    "qwen2_5_vl": ("qwen2_5_vl_text", "qwen2"),
    "llava": ("llama", "llama"),
    "mistral3": ("mistral", "mistral"),
}
OTHER_KEYS = {
    "gemma3": dict(mm_tokens_per_image=4, image_token_index=300, boi_token_index=301, eoi_token_index=302),
    "qwen2_vl": dict(image_token_id=300, video_token_id=301, vision_start_token_id=302, vision_end_token_id=303),
    "qwen2_5_vl": dict(image_token_id=300, video_token_id=301, vision_start_token_id=302, vision_end_token_id=303),
    "llava": dict(image_token_index=300),
    "mistral3": dict(image_token_index=300, spatial_merge_size=2),
}
VISION_LANGUAGE_TYPES = list(VISION)
IN_MEMORY_PREFIX = "model.language_model."


def text_settings(model_type: str, layers: int, text_type: str | None = None, **overrides) -> dict:
    """The text config of a tiny `model_type`; `text_type`: another model_type for its language model."""
    text_type = text_type or TEXT_TYPES[model_type][0]
    settings = dict(TEXT, num_hidden_layers=layers, model_type=text_type, bos_token_id=1, eos_token_id=2)
    if model_type == "gemma3":
        settings.update(sliding_window=32, pad_token_id=0)
    if model_type.startswith("qwen2"):  # M-RoPE over (time, height, width): a third of the rotary pairs each
        settings["rope_parameters"] = dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3])
    settings.update(overrides)
    return settings


def vision_language_config(model_type: str, layers: int = 6, tied: bool | None = None, **text_overrides):
    from transformers import AutoConfig

    keys = dict(OTHER_KEYS[model_type])
    if tied is not None:
        keys["tie_word_embeddings"] = tied
    elif model_type == "mistral3":
        keys["tie_word_embeddings"] = False  # as Mistral Small 3.1; transformers' default ties
    return AutoConfig.for_model(
        model_type,
        text_config=text_settings(model_type, layers, **text_overrides),
        vision_config=VISION[model_type],
        **keys,
    )


def perturbed(model, seed: int, scale: float = 0.02):
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():  # norms start at one; perturb so every tensor is distinct
            parameter.add_(torch.randn_like(parameter) * scale)
    return model


def save_vision_language_model(
    folder: Path, model_type: str, layers: int = 6, seed: int = 0, tied: bool | None = None, **text_overrides
) -> Path:
    """A random vision-language model written with save_pretrained (the layout transformers 5 saves)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(vision_language_config(model_type, layers, tied, **text_overrides))
    perturbed(model, seed).save_pretrained(folder)
    return folder


def text_only_config(vision_language_folder: Path, model_type: str) -> dict:
    """The config.json a text-only fine-tune of the model's language model has, made here independently of composer."""
    config = json.loads((vision_language_folder / "config.json").read_text())
    text = dict(config["text_config"])
    text["model_type"] = TEXT_TYPES[model_type][1]
    text["tie_word_embeddings"] = config.get("tie_word_embeddings", False)
    rope = text.get("rope_parameters")
    if isinstance(rope, dict):
        text["rope_parameters"] = {k: v for k, v in rope.items() if k != "mrope_section"}
    return text


def save_text_finetune(
    vision_language_folder: Path, folder: Path, model_type: str, seed: int = 1, scale: float = 0.02
) -> Path:
    """A text-only (...ForCausalLM) fine-tune of the vision-language model's language model: its weights moved by noise."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    source = AutoModelForImageTextToText.from_pretrained(str(vision_language_folder), dtype=torch.float32)
    state = {}
    for name, tensor in source.state_dict().items():
        if name.startswith(IN_MEMORY_PREFIX):
            state["model." + name.removeprefix(IN_MEMORY_PREFIX)] = tensor
        elif name.startswith("lm_head."):
            state[name] = tensor
    text = text_only_config(vision_language_folder, model_type)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**text))
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    perturbed(model, seed, scale).save_pretrained(folder)
    return folder


def renamed_copy(source: Path, folder: Path, rename) -> Path:
    """A copy of a model folder whose tensors are renamed by `rename(name) -> name` (another on-disk layout)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    state = load_file(str(source / "model.safetensors"))
    save_file(
        {rename(name): tensor for name, tensor in state.items()}, str(folder / "model.safetensors"), {"format": "pt"}
    )
    return folder
