"""The model families composer writes as GGUF, and what llama.cpp needs to know about each beyond the tensors.

Tensor names come from the gguf package's own table (gguf.TensorNameMap, which llama.cpp's converter uses); the
generic metadata keys are transformers' GGUF table (GGUF_CONFIG_MAPPING, which composer reads GGUF files with)
taken in reverse. What neither holds is here: the GGUF architecture of each transformers model type, the two
weight fix-ups llama.cpp's graphs expect (llama's rotary row order, Gemma's norm offset) and the MoE keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from composer.errors import ComposerError


@dataclass(frozen=True)
class Family:
    arch: str  # the GGUF architecture (general.architecture)
    mapping_key: str  # the family's entry in transformers' GGUF_CONFIG_MAPPING
    interleaved_rope: bool = False  # llama.cpp rotates pairs of rows: q/k rows are reordered from HF's two halves
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + weight): GGUF stores the weight plus this
    moe: bool = False


FAMILIES = {
    "llama": Family("llama", "llama", interleaved_rope=True),
    "mistral": Family("llama", "mistral", interleaved_rope=True),
    "mixtral": Family("llama", "mistral", interleaved_rope=True, moe=True),
    "qwen2": Family("qwen2", "qwen2"),
    "qwen3": Family("qwen3", "qwen3"),
    "qwen2_moe": Family("qwen2moe", "qwen2_moe", moe=True),
    "qwen3_moe": Family("qwen3moe", "qwen3_moe", moe=True),
    "gemma2": Family("gemma2", "gemma2", norm_offset=1.0),
    "gemma3_text": Family("gemma3", "gemma3", norm_offset=1.0),
}

# llama.cpp's graphs fix how the router's top-k weights are normalised; a config asking otherwise would run differently
TOP_K_NORMALISED = {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True}


def family_of(config: dict, where: str) -> Family:
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        raise ComposerError(
            f"{where}: composer cannot write model type '{model_type}' as GGUF; it writes "
            f"{', '.join(sorted(FAMILIES))}. Convert this model with llama.cpp's convert_hf_to_gguf.py instead."
        )
    return family


def rope_theta(config, where: str) -> tuple[float, float | None]:
    """(rope base, linear scaling factor or None), refusing the scalings llama.cpp needs more than a key for."""
    parameters = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in parameters:  # Gemma 3: one set per attention kind; the global one is GGUF's
        parameters = parameters["full_attention"]
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", None))
    kind = parameters.get("rope_type", "default")
    if theta is None:
        raise ComposerError(f"{where}: the config gives no rope_theta, which GGUF's rope.freq_base needs.")
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        return float(theta), float(parameters["factor"])
    raise ComposerError(
        f"{where}: the config's rope scaling '{kind}' is not one composer writes to GGUF (it writes default and linear). "
        "Convert this model with llama.cpp's convert_hf_to_gguf.py instead."
    )


def check_exportable(config: dict, where: str) -> Family:
    """The family of a model with `config`, refusing (before any tensor is read) what would not run as it does in transformers."""
    family = family_of(config, where)
    loaded = transformers_config(config, where)
    rope_theta(loaded, where)
    model_type = config["model_type"]
    if model_type in TOP_K_NORMALISED:
        normalised = bool(getattr(loaded, "norm_topk_prob", True))
        if normalised != TOP_K_NORMALISED[model_type]:
            raise ComposerError(
                f"{where}: norm_topk_prob is {normalised} in the config, but llama.cpp's {family.arch} always runs with "
                f"{TOP_K_NORMALISED[model_type]}; the GGUF would compute something else, so composer does not write it."
            )
    if model_type in ("qwen2_moe", "qwen3_moe") and (
        getattr(loaded, "mlp_only_layers", None) or getattr(loaded, "decoder_sparse_step", 1) != 1
    ):
        raise ComposerError(
            f"{where}: some layers are dense (mlp_only_layers or decoder_sparse_step), which llama.cpp's {family.arch} "
            "does not run; composer does not write it."
        )
    if model_type in ("gemma2", "gemma3_text"):
        _check_attention_scale(loaded, family, where)
    if getattr(loaded, "use_sliding_window", False) and model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        raise ComposerError(
            f"{where}: use_sliding_window is on, which llama.cpp's {family.arch} does not run; composer does not write it."
        )
    return family


# the layer counts llama.cpp takes for the 27B models, whose attention is scaled by hidden size / heads
LARGEST_GEMMA_LAYERS = {"gemma2": 46, "gemma3_text": 62}


def _check_attention_scale(loaded, family: Family, where: str) -> None:
    """llama.cpp scales Gemma's attention by the head size, or for a 27B model (known by its layer count) by hidden
    size / heads, where transformers uses query_pre_attn_scalar: they must agree."""
    head_dim = loaded.head_dim
    expected = head_dim
    if loaded.num_hidden_layers == LARGEST_GEMMA_LAYERS[loaded.model_type]:
        expected = loaded.hidden_size // loaded.num_attention_heads
    if loaded.query_pre_attn_scalar != expected:
        raise ComposerError(
            f"{where}: query_pre_attn_scalar is {loaded.query_pre_attn_scalar}, but llama.cpp's {family.arch} with "
            f"{loaded.num_hidden_layers} layers scales attention by {expected}; the GGUF would compute something else, "
            "so composer does not write it."
        )


def transformers_config(config: dict, where: str):
    """The config as transformers reads it, defaults filled in."""
    from transformers import AutoConfig

    settings = {key: value for key, value in config.items() if key not in ("model_type", "transformers_version")}
    try:
        return AutoConfig.for_model(config["model_type"], **settings)
    except (ValueError, TypeError, KeyError) as error:
        raise ComposerError(f"{where}: transformers cannot read this config ({error}).") from None


def architecture_keys(config: dict, family: Family, vocab_rows: int, where: str) -> dict[str, int | float]:
    """The `{arch}.*` metadata llama.cpp reads for this model, by key."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    loaded = transformers_config(config, where)
    keys: dict[str, int | float] = {}
    for gguf_key, hf_key in GGUF_CONFIG_MAPPING.get(family.mapping_key, {}).items():
        value = getattr(loaded, hf_key, None) if hf_key else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and gguf_key not in ("rope.freq_base",):
            keys[gguf_key] = value
    head_dim = getattr(loaded, "head_dim", None) or loaded.hidden_size // loaded.num_attention_heads
    theta, linear_factor = rope_theta(loaded, where)
    keys |= {
        "vocab_size": vocab_rows,
        "rope.freq_base": theta,
        "rope.dimension_count": head_dim,
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "attention.head_count_kv": getattr(loaded, "num_key_value_heads", None) or loaded.num_attention_heads,
    }
    if linear_factor is not None:
        keys |= {"rope.scaling.type": "linear", "rope.scaling.factor": linear_factor}
    keys |= _family_keys(config["model_type"], loaded)
    return keys


def _family_keys(model_type: str, loaded) -> dict:
    if model_type == "mixtral":
        return {"expert_count": loaded.num_local_experts, "expert_used_count": loaded.num_experts_per_tok}
    if model_type in ("qwen2_moe", "qwen3_moe"):
        keys = {
            "expert_count": loaded.num_experts,
            "expert_used_count": loaded.num_experts_per_tok,
            "expert_feed_forward_length": loaded.moe_intermediate_size,
        }
        if model_type == "qwen2_moe":
            keys["expert_shared_feed_forward_length"] = loaded.shared_expert_intermediate_size
        return keys
    if model_type in ("gemma2", "gemma3_text"):
        keys = {"attention.sliding_window": loaded.sliding_window}
        layer_types = getattr(loaded, "layer_types", None)
        if layer_types:  # which layers slide, as the config says (a depth upscale moves the pattern)
            keys["attention.sliding_window_pattern"] = [kind == "sliding_attention" for kind in layer_types]
        local = (getattr(loaded, "rope_parameters", None) or {}).get("sliding_attention", {}).get("rope_theta")
        if local is not None:
            keys["rope.freq_base_swa"] = float(local)
        for gguf_key, hf_key in (
            ("attn_logit_softcapping", "attn_logit_softcapping"),
            ("final_logit_softcapping", "final_logit_softcapping"),
        ):
            if getattr(loaded, hf_key, None):
                keys[gguf_key] = float(getattr(loaded, hf_key))
        return keys
    return {}
