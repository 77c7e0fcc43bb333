"""Synthetic Llama models for benchmarks: deterministic, any size, written tensor by tensor (never whole in memory).

    python bench/synthetic.py OUT_DIR --count 3 --hidden 2048 --intermediate 5632 --layers 16 --vocab 32000

writes OUT_DIR/base, OUT_DIR/model-1 ... model-COUNT: a base and fine-tunes that are the base plus small
noise (so task-vector methods have something to work on), bf16 safetensors with config.json, and a small
byte-level BPE tokenizer (trained on ../shared/eval texts) so that MoE gates can be computed from prompts.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from composer.sources.safetensors_format import build_header


def llama_config(hidden: int, intermediate: int, layers: int, vocab: int, heads: int, kv_heads: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "rope_theta": 10000.0,
    }


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    hidden, intermediate, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv_width = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        shapes += [
            (prefix + "input_layernorm.weight", (hidden,)),
            (prefix + "self_attn.q_proj.weight", (hidden, hidden)),
            (prefix + "self_attn.k_proj.weight", (kv_width, hidden)),
            (prefix + "self_attn.v_proj.weight", (kv_width, hidden)),
            (prefix + "self_attn.o_proj.weight", (hidden, hidden)),
            (prefix + "post_attention_layernorm.weight", (hidden,)),
            (prefix + "mlp.gate_proj.weight", (intermediate, hidden)),
            (prefix + "mlp.up_proj.weight", (intermediate, hidden)),
            (prefix + "mlp.down_proj.weight", (hidden, intermediate)),
        ]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def _tensor(name: str, shape: tuple[int, ...], seed: int, noise_seed: int | None) -> torch.Tensor:
    import zlib

    generator = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(name.encode()))
    if len(shape) == 1:
        tensor = 1.0 + 0.05 * torch.randn(shape, generator=generator)
    else:
        tensor = torch.randn(shape, generator=generator) * (shape[-1] ** -0.5)
    if noise_seed is not None:
        noise = torch.Generator().manual_seed(noise_seed * 104729 + zlib.crc32(name.encode()))
        tensor += torch.randn(shape, generator=noise) * (0.1 * tensor.abs().mean())
    return tensor.to(torch.bfloat16)


def write_model(folder: Path, config: dict, seed: int, noise_seed: int | None) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(config)
    header, offsets = build_header([(name, shape, torch.bfloat16) for name, shape in shapes])
    path = folder / "model.safetensors"
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(descriptor, header, 0)
        for name, shape in shapes:
            data = _tensor(name, shape, seed, noise_seed).view(torch.uint8).numpy()
            os.pwrite(descriptor, memoryview(data).cast("B"), offsets[name])
    finally:
        os.close(descriptor)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return path.stat().st_size


TOKENIZER_TEXTS = ("en.txt", "pt.txt")


def write_tokenizer(folder: Path, vocab: int) -> None:
    """A byte-level BPE tokenizer trained on the shared evaluation texts (at most `vocab` tokens), so that
    MoE gates can be computed from prompts; deterministic for a given text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts_dir = Path(__file__).resolve().parents[2] / "shared" / "eval"
    lines = [
        line
        for name in TOKENIZER_TEXTS
        if (texts_dir / name).is_file()
        for line in (texts_dir / name).read_text().splitlines()
    ]
    lines = lines or ["the quick brown fox jumps over the lazy dog"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab, 8000),
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(str(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=3, help="fine-tunes besides the base")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    config = llama_config(
        arguments.hidden, arguments.intermediate, arguments.layers, arguments.vocab, arguments.heads, arguments.kv_heads
    )
    names = ["base"] + [f"model-{i}" for i in range(1, arguments.count + 1)]
    for number, name in enumerate(names):
        folder = arguments.out / name
        if (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text()) == config:
            if not (folder / "tokenizer.json").is_file():
                write_tokenizer(folder, arguments.vocab)
            print(f"{folder}: exists")
            continue
        size = write_model(folder, config, arguments.seed, None if number == 0 else arguments.seed + number)
        write_tokenizer(folder, arguments.vocab)
        print(f"{folder}: {size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
