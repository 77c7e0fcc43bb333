"""Mixtures of experts from dense models: Mixtral, Qwen2-MoE, Qwen3-MoE and DeepSeek-V3 outputs, router gates from prompts."""

from composer.moe.schema import MoEConfig, is_moe_recipe, load_moe_config, parse_moe_config

__all__ = ["MoEConfig", "build_moe_plan", "is_moe_recipe", "load_moe_config", "parse_moe_config"]


def build_moe_plan(*args, **kwargs):
    from composer.moe.plan import build_moe_plan as build

    return build(*args, **kwargs)
