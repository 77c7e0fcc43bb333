"""Shared test helpers: tiny random models of each family, saved as real model folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data"
# Plain everyday English prose written for these tests (17 paragraphs, 9.3 KB): the real-model scores are measured on it
ENGLISH_TEXT = DATA / "english.txt"

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=256,
)
FAMILY_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    "olmo2": "olmo2",
    "gpt2": "gpt2",
    "llama4": "llama4_text",
    "ministral": "ministral",
    "ministral3": "ministral3",
    "cohere2": "cohere2",
    "glm": "glm",
    "glm4": "glm4",
    "granite": "granite",
    "olmo3": "olmo3",
}
# Mixture-of-experts families (architecture name -> model type) and the settings that make them tiny: a few experts,
# two a token; DeepSeek with one dense layer first and small latent-attention ranks.
MOE_FAMILY_MODEL_TYPES = {
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
    "deepseek": "deepseek_v3",
    "gpt_oss": "gpt_oss",
}
DEEPSEEK_TINY = dict(
    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
    q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
)  # fmt: skip
MOE_TINY = {
    "mixtral": dict(num_local_experts=3, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=3, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48
    ),
    "qwen3_moe": dict(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=32),
    "deepseek_v3": DEEPSEEK_TINY
    | dict(
        n_group=2,
        topk_group=1,
        head_dim=8,  # transformers' rotary embedding reads head_dim, which DeepSeek means to be qk_rope_head_dim
    ),
    "gpt_oss": dict(num_local_experts=3, num_experts_per_tok=2, sliding_window=32),
    "deepseek_v2": DEEPSEEK_TINY,  # the one model type without output rules: transformers checks its first write
}
# Config settings that tiny models of a family need beyond TINY: ids inside the tiny vocabulary, windows and chunks
# shorter than a test's prompt, and Llama 4's experts (every other layer a mixture of two, the rest dense).
FAMILY_SETTINGS = {
    "gemma2": dict(sliding_window=32),
    "gemma3_text": dict(sliding_window=32),
    "phi3": dict(pad_token_id=0),
    "llama4_text": dict(
        intermediate_size=64, intermediate_size_mlp=128, num_local_experts=2, interleave_moe_layer_step=2,
        attention_chunk_size=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
    "ministral": dict(sliding_window=8),
    "cohere2": dict(sliding_window=8, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "glm": dict(pad_token_id=0, eos_token_id=2),
    "glm4": dict(pad_token_id=0, eos_token_id=2),
    "granite": dict(bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "olmo3": dict(sliding_window=8, bos_token_id=1, eos_token_id=2, pad_token_id=0),
}  # fmt: skip


def tiny_config(model_type: str, layers: int = 4, **overrides):
    from transformers import AutoConfig

    if model_type == "gpt2":
        settings = dict(n_embd=64, n_head=4, n_layer=layers, n_positions=256, vocab_size=320)
    else:
        settings = dict(TINY, num_hidden_layers=layers, head_dim=16)
    if model_type == "phi3":
        settings.pop("head_dim")
    settings.update(MOE_TINY.get(model_type, {}))
    settings.update(FAMILY_SETTINGS.get(model_type, {}))
    settings.update(overrides)
    return AutoConfig.for_model(model_type, **settings)


def save_tiny_model(
    folder: Path, model_type: str = "llama", layers: int = 4, seed: int = 0, dtype=torch.float32, **overrides
) -> Path:
    """A random model of `model_type` written with save_pretrained (safetensors)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, layers, **overrides))
    with torch.no_grad():
        for parameter in model.parameters():  # norms start at one; perturb so every tensor is distinct
            parameter.add_(torch.randn_like(parameter) * 0.02)
    model.to(dtype).save_pretrained(folder)
    return folder


def compose_in_process(monkeypatch, *arguments) -> int:
    """`compose ARGUMENTS` through composer.cli.main in this process (no seconds spent importing torch
    again); its exit code. main() replaces the SIGTERM and SIGHUP handlers and warnings.showwarning: all are put back."""
    import signal
    import sys
    import warnings

    import pytest

    from composer import cli

    monkeypatch.setattr(sys, "argv", ["compose", *map(str, arguments)])
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with pytest.raises(SystemExit) as exited:
            cli.main()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return exited.value.code


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(str(path)))
    return state


def save_fine_tune(
    base: Path,
    folder: Path,
    seed: int = 0,
    scale: float = 0.02,
    density: float = 1.0,
    change: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A stand-in for a fine-tune: a copy of the model folder `base` (config, tokenizer) whose weights
    are moved by `change` (tensor name -> addend) where given, else by noise of standard deviation
    `scale` on a `density` share of the entries. Written as one model.safetensors."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(base, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in load_state(base).items():
        if change is not None:
            state[name] = (tensor.float() + change[name]).to(tensor.dtype) if name in change else tensor
            continue
        noise = torch.randn(tensor.shape, generator=generator) * scale
        if density < 1:
            noise *= torch.rand(tensor.shape, generator=generator) < density
        state[name] = tensor + noise
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def logits_of(folder: Path, ids: torch.Tensor | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    if ids is None:
        ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        return model(ids).logits


# --- tiny tokenizers trained in a second, and tiny models that speak them ---------------------------

TOKENIZER_CORPUS = [
    "The small town sits at the bend of a slow river, where the old bridge carries trucks every morning.",
    "A pequena cidade fica à beira de um rio largo e tranquilo, onde os pescadores saem de barco.",
    "No centro da cidade há uma praça com uma igreja antiga e um café onde os moradores conversam.",
    "Water expands when it freezes, so ice floats and the pond keeps living things alive in winter.",
    "Ele também disse que a ponte velha seria reformada no próximo ano, com ajuda da prefeitura.",
    "def main():\n    return 42\n\n\nprint(main())  # the answer\n",
] * 3


def byte_level_tokenizer(size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TOKENIZER_CORPUS, trainer)
    return tokenizer


def sentencepiece_tokenizer(size: int):
    """BPE over `▁`-marked words with byte-fallback tokens <0x00>..<0xFF> in the vocabulary, as Gemma and Llama 2."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Replace(" ", "▁")
    trained.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"], show_progress=False
    )
    trained.train_from_iterator(TOKENIZER_CORPUS, trainer)
    spec = json.loads(trained.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ],
    }
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [vocab["<bos>"]], "tokens": ["<bos>"]}},
    }
    return Tokenizer.from_str(json.dumps(spec))


def save_tokenizer(tokenizer, folder: Path, **special) -> int:
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)
    wrapped.save_pretrained(str(folder))
    return len(wrapped)


def tiny_model_with_tokenizer(
    folder: Path,
    tokenizer,
    special: dict,
    seed: int,
    tied: bool | None = True,
    rows: int | None = None,
    model_type: str = "llama",
    layers: int = 2,
    **overrides,
) -> Path:
    """A tiny model whose vocabulary is `tokenizer`'s (or `rows` rows), its special-token ids set from `special`.
    `tied`: None leaves tie_word_embeddings at the family's default; `overrides` go to the config."""
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder.parent / f".{folder.name}-tokenizer"
    size = save_tokenizer(tokenizer, scratch, **special)
    ids = {
        f"{role}_token_id": tokenizer.token_to_id(special[f"{role}_token"])
        for role in ("bos", "eos", "pad")
        if f"{role}_token" in special
    }
    if model_type == "gpt2":  # its config has no bos, eos or pad ids to set
        ids = {}
    if tied is not None:
        overrides["tie_word_embeddings"] = tied
    save_tiny_model(folder, model_type, layers=layers, seed=seed, vocab_size=rows or size, **ids, **overrides)
    for path in scratch.iterdir():
        shutil.copy(path, folder / path.name)
    shutil.rmtree(scratch)
    return folder


BYTE_LEVEL_SPECIAL = {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
}
SENTENCEPIECE_SPECIAL = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}


# ---- GGUF: a tiny llama written as llama.cpp writes one ------------------------------------------------------


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The row order llama.cpp's converter stores q/k in: each head's two rotary halves interleaved."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def write_tiny_llama_gguf(
    path: Path, state: dict[str, torch.Tensor], config, quantisation: str | None = None, tokenizer: dict | None = None
) -> None:
    """A llama model as llama.cpp's converter writes it: its matrices quantised to `quantisation` (a GGML type name,
    "Q8_0", "Q4_0") where given, everything else float32; `tokenizer`: metadata `tokenizer.ggml.<key>` -> value."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (tokenizer or {}).items():
        if isinstance(value, list):
            writer.add_array(f"tokenizer.ggml.{key}", value)
        elif isinstance(value, str):
            writer.add_string(f"tokenizer.ggml.{key}", value)
        else:
            writer.add_uint32(f"tokenizer.ggml.{key}", value)
    writer.add_name("tiny llama")
    writer.add_license("mit")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    gguf_names = {
        "embed_tokens": "token_embd",
        "norm": "output_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for name, tensor in state.items():
        tensor = tensor.float()
        if name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            parts = name.removeprefix("model.").removesuffix(".weight")
            if parts.startswith("layers."):
                _, layer, rest = parts.split(".", 2)
                gguf_name = f"blk.{layer}.{gguf_names[rest]}.weight"
            else:
                gguf_name = f"{gguf_names[parts]}.weight"
        if ".attn_q." in gguf_name:
            tensor = llama_cpp_permute(tensor, config.num_attention_heads)
        elif ".attn_k." in gguf_name:
            tensor = llama_cpp_permute(tensor, config.num_key_value_heads)
        values = tensor.numpy()
        if quantisation and values.ndim == 2:
            kind = gguf.GGMLQuantizationType[quantisation]
            writer.add_tensor(gguf_name, gguf.quantize(values, kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def reshard(folder: Path, shards: int) -> list[Path]:
    """Split a folder's model.safetensors into `shards` files with an index, as large checkpoints are published."""
    import json

    from safetensors.torch import load_file, save_file

    single = folder / "model.safetensors"
    tensors = load_file(single)
    names = list(tensors)
    paths, weight_map = [], {}
    for number in range(shards):
        part = names[number * len(names) // shards : (number + 1) * len(names) // shards]
        path = folder / f"model-{number + 1:05d}-of-{shards:05d}.safetensors"
        save_file({name: tensors[name] for name in part}, path, metadata={"format": "pt"})
        weight_map |= {name: path.name for name in part}
        paths.append(path)
    total = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    single.unlink()
    return paths
