"""MoE output architectures: which dense families each is built from, its config, and the tensor names it is
saved under -- taken from the installed transformers itself, by saving a miniature of the output model."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from functools import lru_cache

from composer.errors import ComposerError

# the dense MLP projection each per-expert checkpoint name stands for (Mixtral's w1/w3/w2, Qwen's own names)
ROLES = {
    "w1": "gate_proj",
    "w3": "up_proj",
    "w2": "down_proj",
    "gate_proj": "gate_proj",
    "up_proj": "up_proj",
    "down_proj": "down_proj",
}
# config keys that are never carried from the dense config into the MoE one
NOT_CARRIED = {
    "architectures",
    "model_type",
    "transformers_version",
    "_name_or_path",
    "dtype",
    "torch_dtype",
    "id2label",
    "label2id",
}


@dataclass(frozen=True)
class OutputArchitecture:
    name: str  # also the output's model_type
    class_name: str
    dense_types: tuple[str, ...]  # the first is the family this output is the default for
    count_key: str  # config key holding the number of routed experts
    shared_expert: bool
    aliases: tuple[str, ...]  # spellings accepted in the recipe's `architecture:`
    shared_gate: bool = False  # the shared expert's output is scaled by sigmoid(its gate row . x)


OUTPUTS = (
    OutputArchitecture("mixtral", "MixtralForCausalLM", ("llama", "mistral"), "num_local_experts", False, ("mixtral",)),
    OutputArchitecture(
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        ("qwen2", "llama", "mistral"),
        "num_experts",
        True,
        ("qwen", "qwen2", "qwen_moe", "qwen2_moe"),
        shared_gate=True,
    ),
    OutputArchitecture("qwen3_moe", "Qwen3MoeForCausalLM", ("qwen3",), "num_experts", False, ("qwen3", "qwen3_moe")),
    # DeepSeek-V3's attention is multi-head latent attention, so its experts are dense DeepSeek-V3 models (every
    # layer dense); Llama-style attention has no exact MLA form
    OutputArchitecture(
        "deepseek_v3",
        "DeepseekV3ForCausalLM",
        ("deepseek_v3",),
        "n_routed_experts",
        True,
        ("deepseek", "deepseek_v3", "deepseekv3", "deepseek_moe"),
    ),
)


def choose_output(dense_type: str, requested: str | None, has_shared: bool) -> OutputArchitecture:
    supported = ", ".join(f"{o.class_name} (from {'/'.join(o.dense_types)})" for o in OUTPUTS)
    if requested is not None:
        wanted = requested.lower().replace("-", "_")
        output = next((o for o in OUTPUTS if wanted in o.aliases or wanted == o.class_name.lower()), None)
        if output is None:
            raise ComposerError(
                f"Recipe key 'architecture': '{requested}' is not an MoE output composer writes; it writes {supported}."
            )
        if dense_type not in output.dense_types:
            raise ComposerError(
                f"Recipe key 'architecture': {output.class_name} is built from {'/'.join(output.dense_types)} models, "
                f"but the experts are '{dense_type}' models.{_other_output(output, dense_type)}"
            )
    else:
        candidates = [o for o in OUTPUTS if dense_type in o.dense_types and (o.shared_expert or not has_shared)]
        candidates.sort(key=lambda o: o.dense_types[0] != dense_type)
        if not candidates:
            raise ComposerError(f"composer cannot build an MoE from '{dense_type}' models; it writes {supported}.")
        output = candidates[0]
    if has_shared and not output.shared_expert:
        raise ComposerError(
            f"Recipe key 'shared_experts': {output.class_name} has no shared expert; use architecture: qwen (Qwen2-MoE) for one."
        )
    return output


def _other_output(output: OutputArchitecture, dense_type: str) -> str:
    if output.name != "deepseek_v3":
        return ""
    return (
        " DeepSeek-V3's attention is multi-head latent attention, which Llama-style attention cannot be written as, "
        "and mergekit's 'deepseek' output (DeepSeek-MoE 16B) needs remote code that transformers does not ship. "
        + (
            "For a model with a shared expert that loads in transformers, use architecture: qwen (Qwen2-MoE)."
            if dense_type in ("llama", "mistral", "qwen2")
            else ""
        )
    ).rstrip()


def check_dense(config: dict, reference: str) -> None:
    """Experts are dense models: a DeepSeek-V3 checkpoint whose layers past `first_k_dense_replace` are MoE is not."""
    if config.get("model_type") != "deepseek_v3":
        return
    layers, dense = config.get("num_hidden_layers"), config.get("first_k_dense_replace")
    if isinstance(layers, int) and isinstance(dense, int) and dense < layers:
        raise ComposerError(
            f"Model '{reference}' is a DeepSeek-V3 mixture of experts (first_k_dense_replace {dense} of {layers} layers); "
            "the experts of an MoE recipe are dense models, DeepSeek-V3 ones with first_k_dense_replace equal to "
            "num_hidden_layers."
        )


def _target_keys(model_type: str) -> set[str]:
    from transformers import AutoConfig

    return set(AutoConfig.for_model(model_type).to_dict())


def output_config(
    output: OutputArchitecture,
    dense: dict,
    experts: int,
    per_token: int,
    intermediate: int,
    shared_intermediate: int | None,
    dtype_name: str | None,
) -> dict:
    """The MoE config: every key of the dense config that the MoE config class also has (rope, norms, token ids,
    sliding windows, ...), then the MoE keys. Checked against the dense config's attention and MLP layout."""
    from transformers import AutoConfig

    dense_type = dense["model_type"]
    if dense.get("mlp_bias"):
        raise ComposerError(f"The experts' MLPs have biases (mlp_bias: true); {output.class_name} experts have none.")
    normalised = AutoConfig.for_model(**dense).to_dict()
    keys = _target_keys(output.name)
    carried = [key for key in list(dense) + ["rope_parameters"] if key in keys or key.endswith("_token_id")]
    config = {key: normalised[key] for key in carried if key in normalised and key not in NOT_CARRIED}
    config.update(model_type=output.name, architectures=[output.class_name], num_experts_per_tok=per_token)
    config[output.count_key] = experts
    config["intermediate_size"] = intermediate
    if output.name == "mixtral" and dense.get("attention_bias"):
        raise ComposerError(
            "The experts' attention layers have biases (attention_bias: true); Mixtral's have none. Use architecture: qwen."
        )
    if output.name in ("qwen2_moe", "qwen3_moe"):
        config.update(
            moe_intermediate_size=intermediate, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True
        )
    if output.name == "qwen2_moe":
        if dense_type != "qwen2" and dense.get("attention_bias"):
            raise ComposerError(
                "The experts' attention layers have biases on all projections; Qwen2-MoE has them on q/k/v only."
            )
        config["qkv_bias"] = dense_type == "qwen2" or bool(dense.get("attention_bias"))
        config["shared_expert_intermediate_size"] = shared_intermediate
    if output.name == "deepseek_v3":
        if shared_intermediate != intermediate:
            raise ComposerError(
                f"The shared expert's MLP has intermediate_size {shared_intermediate} and the routed experts' {intermediate}; "
                "DeepSeek-V3's shared expert is the routed experts' size."
            )
        # every layer MoE, one expert group, the top-k weights normalised to one and not rescaled
        config.update(
            moe_intermediate_size=intermediate,
            n_shared_experts=1,
            first_k_dense_replace=0,
            routed_scaling_factor=1.0,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
        )
    dtype_key = "torch_dtype" if "torch_dtype" in dense or "dtype" not in dense else "dtype"
    config[dtype_key] = dtype_name or dense.get(dtype_key) or dense.get("dtype") or "float32"
    return config


def checkpoint_names(config: dict) -> list[str]:
    """The tensor names the installed transformers writes for a model of `config` (save_pretrained of a
    miniature with the same layer and expert counts), so the output loads the way that version's own saves do."""
    import json

    frozen = json.dumps(config, sort_keys=True)
    return list(_checkpoint_names(frozen))


@lru_cache(maxsize=8)
def _checkpoint_names(frozen: str) -> tuple[str, ...]:
    import json
    import tempfile
    from pathlib import Path

    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny = dict(json.loads(frozen))
    tiny.update(
        hidden_size=16,
        intermediate_size=8,
        moe_intermediate_size=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        vocab_size=32,
    )
    if "shared_expert_intermediate_size" in tiny:
        tiny["shared_expert_intermediate_size"] = 8
    tiny.pop("torch_dtype", None)
    tiny.pop("dtype", None)
    model_type = tiny.pop("model_type")
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **tiny))
    with tempfile.TemporaryDirectory(prefix="composer-moe-layout-") as folder, quiet_progress():
        model.save_pretrained(folder)
        names = []
        for path in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(path), "pt") as handle:
                names += list(handle.keys())
    return tuple(names)


@contextlib.contextmanager
def quiet_progress():
    """transformers' own progress bars off (saving the miniature, loading a model to inspect)."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


@dataclass(frozen=True)
class MoETensor:
    """What one checkpoint tensor of an MoE layer holds."""

    # 'copy' (from the base), 'expert', 'experts_gate_up', 'experts_down', 'shared', 'router', 'shared_gate',
    # 'router_bias' (DeepSeek-V3's e_score_correction_bias)
    kind: str
    layer: int | None
    expert: int | None = None
    role: str | None = None  # the dense MLP projection: gate_proj, up_proj or down_proj


LAYER = re.compile(r"^(?P<prefix>.*?\.)(?P<layer>\d+)\.(?P<rest>.+)$")


def classify(name: str, layer_prefix: str, dense_layer_suffixes: set[str]) -> MoETensor:
    """Map a checkpoint name of the MoE output onto what it is built from; unknown names are an error."""
    base_prefix = layer_prefix.split("{i}")[0]
    match = LAYER.match(name)
    if not match or match.group("prefix") != base_prefix:
        return MoETensor("copy", None)
    layer, rest = int(match.group("layer")), match.group("rest")
    if rest in dense_layer_suffixes and not rest.startswith("mlp."):
        return MoETensor("copy", layer)
    patterns = [
        (r"\.experts\.(\d+)\.(\w+)\.weight$", "expert"),
        (r"\.experts\.gate_up_proj$", "experts_gate_up"),
        (r"\.experts\.down_proj$", "experts_down"),
        (r"\.shared_experts?\.(\w+)\.weight$", "shared"),
        (r"\.shared_expert_gate\.weight$", "shared_gate"),
        (r"\.gate\.weight$", "router"),
        (r"\.gate\.e_score_correction_bias$", "router_bias"),
    ]
    for pattern, kind in patterns:
        found = re.search(pattern, "." + rest)
        if not found:
            continue
        if kind == "expert":
            role = ROLES.get(found.group(2))
            if role is not None:
                return MoETensor(kind, layer, int(found.group(1)), role)
        elif kind == "shared":
            role = ROLES.get(found.group(1))
            if role is not None:
                return MoETensor(kind, layer, None, role)
        else:
            return MoETensor(kind, layer)
    raise ComposerError(
        f"The installed transformers saves the MoE output with a tensor '{name}' that composer does not know how to build."
    )
