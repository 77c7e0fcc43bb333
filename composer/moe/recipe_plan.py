"""An MoE recipe (file or text) to its plan, with the stages its experts use fused in; composer.compose writes it."""

from __future__ import annotations

from pathlib import Path

from composer.moe.schema import MoEConfig, load_moe_config


def input_models(config: MoEConfig) -> list[str]:
    """Every model the recipe reads, through its stages (stage names excluded)."""
    stage_names = {stage.name for stage in config.stages or []}
    references = [reference for stage in config.stages or [] for reference in stage.referenced_models()]
    references += config.referenced_models() + ([config.tokenizer_source] if config.tokenizer_source else [])
    return list(dict.fromkeys(reference for reference in references if reference not in stage_names))


def plan_moe_recipe(config: MoEConfig, text: str, recipe_dir: Path | None, sources=None, prompt_model=None):
    """The MoE plan, with any stages (merges its experts use) fused in."""
    from composer.moe.plan import build_moe_plan

    if not config.stages:
        return build_moe_plan(config, text, recipe_dir, sources, prompt_model)
    from composer.plan.staged import check_stage_references, plan_with_stages

    check_stage_references(
        config.stages,
        config.referenced_models() + ([config.tokenizer_source] if config.tokenizer_source else []),
        False,
    )
    return plan_with_stages(
        config.stages,
        config.random_seed,
        text,
        recipe_dir,
        sources,
        lambda opened: build_moe_plan(config, text, recipe_dir, opened, prompt_model),
        "moe",
        input_models(config),
    )


def local_models(config: MoEConfig, recipe_dir: Path | None) -> dict[str, Path]:
    """The recipe's models that are local paths, by what they are (an output must not be written over them)."""
    from composer.sources import local_path

    references = input_models(config)
    located = {reference: local_path(reference, recipe_dir) for reference in references}
    return {f"the input model '{reference}'": path for reference, path in located.items() if path.exists()}


def moe_plan_from_file(path: Path):
    config, text = load_moe_config(path)
    return config, plan_moe_recipe(config, text, Path(path).parent)
