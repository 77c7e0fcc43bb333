"""`compose moe.yml OUT` and `compose plan moe.yml`: an MoE recipe file to a plan and an output folder."""

from __future__ import annotations

import re
from pathlib import Path

from composer.errors import ComposerError
from composer.files import YAML_FILE_LIMIT, read_text
from composer.moe.schema import MoEConfig, is_moe_recipe, load_moe_config
from composer.yaml_text import parse_yaml


def is_moe_file(path: Path) -> bool:
    """Whether a recipe file is an MoE recipe (False for anything unreadable: the normal loader reports it)."""
    try:
        return is_moe_recipe(parse_yaml(read_text(Path(path), "Recipe file", YAML_FILE_LIMIT), str(path))[1])
    except ComposerError:
        return False


def check_recipe_file(path: Path) -> None:
    """Fast feedback on a recipe of either kind, before heavy imports."""
    if is_moe_file(path):
        load_moe_config(path)
    else:
        from composer.recipe import load_recipe

        load_recipe(path)


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

    check_stage_references(config.stages, config.referenced_models() + ([config.tokenizer_source] if config.tokenizer_source else []), False)
    return plan_with_stages(
        config.stages, config.random_seed, text, recipe_dir, sources,
        lambda opened: build_moe_plan(config, text, recipe_dir, opened, prompt_model), "moe", input_models(config),
    )


def _local_models(config: MoEConfig, recipe_dir: Path | None) -> dict[str, Path]:
    from composer.sources import local_path

    references = input_models(config)
    located = {reference: local_path(reference, recipe_dir) for reference in references}
    return {f"the input model '{reference}'": path for reference, path in located.items() if path.exists()}


def moe_plan_from_file(path: Path):
    config, text = load_moe_config(path)
    return config, plan_moe_recipe(config, text, Path(path).parent)


def compose_moe_file(path: Path, out: Path | None, options, seed: int | None = None):
    from composer.compose import resolve_output, write_plan
    from composer.execute.output_folder import check_output_free, check_output_not_input

    config, text = load_moe_config(path)
    if seed is not None:
        config = config.model_copy(update={"random_seed": seed})
        line = f"random_seed: {seed}  # set on the command line with --seed"
        text, replaced = re.subn(r"^random_seed:.*$", line, text, flags=re.MULTILINE)
        text = text if replaced else text.rstrip("\n") + "\n" + line + "\n"
    target = resolve_output(config, out, path)
    check_output_free(target, options.force)
    protected = {"the recipe file": Path(path)} | _local_models(config, Path(path).parent)
    check_output_not_input(target, protected)
    plan = plan_moe_recipe(config, text, Path(path).parent)
    return write_plan(plan, target, options, config.name, protected)


def compose_moe_text(text: str, out: Path, options, base_dir: Path | None = None, sources=None, prompt_model=None):
    """An MoE recipe given as text (tests, examples), written to `out`."""
    from composer.compose import write_plan
    from composer.execute.output_folder import check_output_free, check_output_not_input
    from composer.moe.schema import parse_moe_config

    config = parse_moe_config(text, "recipe")
    check_output_free(out, options.force)
    check_output_not_input(out, _local_models(config, base_dir))
    plan = plan_moe_recipe(config, text, base_dir, sources, prompt_model)
    return write_plan(plan, out, options, config.name)
