"""The tiny stand-ins that the mergekit config corpus (tests/data/mergekit_configs) names, and the corpus itself.

Each corpus file is a mergekit config as model cards, blogs and repos write them (written afresh for composer's
tests), whose model ids are `$name` placeholders for the folders `build_models` makes: Llama (`base`, `ft1`..`ft3`),
Mistral (`m...`), Qwen2 (`q...`), Qwen3 (`q3...`), Gemma 2 (`g...`) and Phi-3 (`p...`) models of four layers with a
real byte-level tokenizer, their fine-tunes, bf16 copies of the Llama ones (`h...`), two fine-tunes with a chat
template (`chat1`, `chat2`), one with two added tokens (`ftok`), one with its vocabulary padded to 384 rows
(`ftpad`), a Llama with another tokenizer (SentencePiece-style, `spft`), a LoRA adapter for `base` (`lora`) and two
Gemma 3 vision-language models in the hub's layout (`vbase`, `vft1`, for `modules:` configs).
A file's first lines say how to run and read it: `# corpus: kind=yaml|multi|multi:FINAL|moe
compare=exact|rounded|random`, and, for a shape composer refuses with a message saying how to fix it,
`# composer refuses: TEXT OF THE MESSAGE`.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "data" / "mergekit_configs"


@dataclass(frozen=True)
class CorpusConfig:
    name: str
    kind: str  # yaml (mergekit-yaml), multi (mergekit-multi; multi:NAME when every document is named), moe
    compare: str  # exact (float32: bits or 4e-7 relative), rounded (16-bit), random (statistics only)
    refused: str | None  # the text of composer's refusal, for a shape composer refuses
    template: str

    def text(self, models: dict[str, str]) -> str:
        return string.Template(self.template).substitute(models)


def corpus() -> dict[str, CorpusConfig]:
    configs = {}
    for path in sorted(CORPUS.glob("*.yml")):
        template = path.read_text(encoding="utf-8")
        header = template.lstrip("\ufeff").replace("\r\n", "\n")  # (a file may be written as on Windows)
        kind, compare = re.search(r"^# corpus: kind=(\S+) compare=(\S+)$", header, re.MULTILINE).groups()
        refused = re.search(r"^# composer refuses: (.+)$", header, re.MULTILINE)
        configs[path.stem] = CorpusConfig(path.stem, kind, compare, refused.group(1) if refused else None, template)
    return configs


# ---- the tiny stand-ins --------------------------------------------------------------------------------------


def build_models(root: Path) -> dict[str, str]:
    """The corpus's models (the module's docstring lists them) under `root`, by placeholder name; what `root` already
    holds (its models.json) is kept."""
    import torch

    from helpers import (
        BYTE_LEVEL_SPECIAL,
        SENTENCEPIECE_SPECIAL,
        byte_level_tokenizer,
        save_fine_tune,
        sentencepiece_tokenizer,
        tiny_model_with_tokenizer,
    )

    done = json.loads((root / "models.json").read_text()) if (root / "models.json").exists() else {}
    paths: dict[str, Path] = {name: Path(path) for name, path in done.items()}
    tokenizer = byte_level_tokenizer(320)
    families = (("", "llama", False), ("m", "mistral", False), ("q", "qwen2", False), ("q3", "qwen3", False))
    families += (("g", "gemma2", None), ("p", "phi3", False))
    for prefix, model_type, tied in families:
        if f"{prefix}base" in paths:
            continue
        base = tiny_model_with_tokenizer(
            root / f"{prefix}base", tokenizer, BYTE_LEVEL_SPECIAL, seed=7, tied=tied, model_type=model_type, layers=4
        )
        paths[f"{prefix}base"] = base
        paths[f"{prefix}ft1"] = save_fine_tune(base, root / f"{prefix}ft1", seed=1)
        paths[f"{prefix}ft2"] = save_fine_tune(base, root / f"{prefix}ft2", seed=2, density=0.6)
        paths[f"{prefix}ft3"] = save_fine_tune(base, root / f"{prefix}ft3", seed=3, density=0.3)
    if "hbase" not in paths:  # bf16 on disk, as real checkpoints are
        for name in ("base", "ft1", "ft2", "ft3"):
            paths[f"h{name}"] = bf16_copy(paths[name], root / f"h{name}")
    if "ftpad" not in paths:
        paths["ftpad"] = padded_vocabulary_model(paths["ft2"], root / "ftpad", rows=384)
    if "spft" not in paths:  # the same architecture with another tokenizer (SentencePiece-style, byte fallback)
        paths["spft"] = tiny_model_with_tokenizer(
            root / "spft", sentencepiece_tokenizer(300), SENTENCEPIECE_SPECIAL, seed=8, tied=False, layers=4
        )
    if "chat1" not in paths:
        for number in (1, 2):
            paths[f"chat{number}"] = with_chat_template(paths[f"ft{number}"], root / f"chat{number}")
    if "ftok" not in paths:
        paths["ftok"] = added_tokens_model(paths["ft1"], root / "ftok")
    if "lora" not in paths:
        paths["lora"] = lora_adapter(paths["base"], root / "lora")
    if "vbase" not in paths:
        for name, seed in (("vbase", 7), ("vft1", 1)):
            paths[name] = vision_language_stand_in(paths["base"], root / name, seed)
    del torch
    mapping = {name: str(path) for name, path in paths.items()}
    (root / "models.json").write_text(json.dumps(mapping))
    return mapping


def vision_language_stand_in(tokenizer_model: Path, folder: Path, seed: int) -> Path:
    """A tiny Gemma 3 vision-language model with `tokenizer_model`'s tokenizer, its vision tower named as the hub's
    checkpoints name it (`vision_tower.vision_model.`, which mergekit's definition reads)."""
    import shutil

    from vlm_models import renamed_copy, save_vision_language_model

    scratch = folder.parent / f".{folder.name}-saved"
    save_vision_language_model(scratch, "gemma3", layers=4, seed=seed)
    renamed_copy(scratch, folder, lambda name: name.replace("vision_tower.", "vision_tower.vision_model.", 1))
    shutil.rmtree(scratch)
    for file in tokenizer_model.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copyfile(file, folder / file.name)
    return folder


def bf16_copy(source: Path, folder: Path) -> Path:
    """A copy of a model folder with its weights in bfloat16."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    state = {}
    for path in source.glob("*.safetensors"):
        state |= {name: tensor.to(torch.bfloat16) for name, tensor in load_file(str(path)).items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def padded_vocabulary_model(source: Path, folder: Path, rows: int) -> Path:
    """A fine-tune whose embedding and head were padded to `rows` rows (a multiple of 64), tokenizer unchanged."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    model.resize_token_embeddings(rows, mean_resizing=False)
    model.save_pretrained(str(folder))
    for file in source.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (folder / file.name).write_bytes(file.read_bytes())
    return folder


def with_chat_template(source: Path, folder: Path) -> Path:
    """A copy of a fine-tune whose tokenizer has a ChatML chat template (the base has none)."""
    import shutil

    shutil.copytree(source, folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["chat_template"] = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    return folder


def added_tokens_model(source: Path, folder: Path) -> Path:
    """A fine-tune whose tokenizer gained two tokens, with two new embedding and head rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    tokenizer.add_tokens(["<|tool|>", "<think>"], special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    torch.manual_seed(5)
    with torch.no_grad():
        model.get_input_embeddings().weight[-2:] = torch.randn(2, model.config.hidden_size) * 0.05
        model.get_output_embeddings().weight[-2:] = torch.randn(2, model.config.hidden_size) * 0.05
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def lora_adapter(base: Path, folder: Path) -> Path:
    """A PEFT LoRA adapter (rank 4 on q_proj and v_proj) for `base`."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    generator = torch.Generator().manual_seed(9)
    state = {}
    for layer in range(layers):
        for projection, out in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{projection}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(4, hidden, generator=generator) * 0.1
            state[f"{prefix}.lora_B.weight"] = torch.randn(out, 4, generator=generator) * 0.1
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": str(base),
        "fan_in_fan_out": False,
        "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
    return folder
