"""The main job: recipe file -> plan -> output folder with weights, config, tokenizer, card and recipe. The one place
that tells a merge recipe from an MoE recipe: composer.moe only builds plans."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from composer.card import render_card
from composer.chat_templates import template_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions, ExecutionReport, execute
from composer.execute.output_folder import check_output_free, check_output_not_input
from composer.moe.recipe_plan import input_models as moe_input_models
from composer.moe.recipe_plan import local_models as moe_local_models
from composer.moe.recipe_plan import moe_plan_from_file, plan_moe_recipe
from composer.moe.schema import load_moe_config, parse_moe_config
from composer.plan import Plan, build_plan
from composer.provenance import provenance_record, shard_metadata
from composer.recipe import Recipe, load_recipe, parse_recipe
from composer.recipe.load import RecipeKeyError
from composer.recipe_files import is_moe_file
from composer.sources import local_path


def resolve_output(recipe: Recipe, out: Path | None, recipe_path: Path | None) -> Path:
    """OUT from the command line, else the recipe's `output:` key, which may only name a folder beside or below the
    recipe: a recipe from someone else must not be able to aim a run (and --force) anywhere on the machine."""
    if out is not None:
        return out
    where = f"{recipe_path}: " if recipe_path is not None else ""
    if recipe.output:
        base = recipe_path.parent if recipe_path is not None else Path.cwd()
        target = Path(os.path.abspath(base / recipe.output))
        # links followed: `output: escape/out` with `escape` a link to elsewhere leaves the folder as surely as '..' does
        inside = Path(os.path.realpath(base)) in Path(os.path.realpath(target)).parents
        if Path(recipe.output).is_absolute() or Path(os.path.abspath(base)) not in target.parents or not inside:
            raise ComposerError(
                f"{where}'output: {recipe.output}' points outside the recipe's folder; a recipe may only name an output folder "
                "beside or below itself. Give OUT on the command line to write elsewhere."
            )
        return target
    raise ComposerError(f"{where}no output folder: give OUT on the command line or an 'output:' key in the recipe.")


def merge_plan(recipe: Recipe, text: str, recipe_dir: Path | None, source_name: str, sources=None) -> Plan:
    """build_plan, with errors about a recipe key given the recipe's name and the key's line; the plan says how to
    build it again (on a cluster's workers)."""
    try:
        plan = build_plan(recipe, text, recipe_dir, sources)
    except RecipeKeyError as error:
        raise error.located(text, source_name) from None
    if plan.calibration is not None:
        from composer.calibration import attach_calibration

        try:
            attach_calibration(plan)
        except BaseException:
            plan.close()
            raise
    plan.replay = (merge_plan, (recipe, text, recipe_dir, source_name))
    return plan


def moe_plan(config, text: str, recipe_dir: Path | None) -> Plan:
    """An MoE recipe's plan (stages fused in); the plan says how to build it again (on a cluster's workers)."""
    plan = plan_moe_recipe(config, text, recipe_dir)
    plan.replay = (moe_plan, (config, text, recipe_dir))
    return plan


def plan_from_file(recipe_path: Path, open_inputs: Callable[[list[str], Path], dict] | None = None) -> tuple:
    """(recipe, plan) of a recipe file of either kind. `open_inputs(references, recipe folder)` opens the recipe's models
    (all of them, tokenizer sources too) for the planner; by default the planner opens each as it needs it."""
    if is_moe_file(recipe_path):
        if open_inputs is None:
            return moe_plan_from_file(recipe_path)
        config, text = load_moe_config(recipe_path)
        sources = open_inputs(moe_input_models(config), recipe_path.parent)
        return config, plan_moe_recipe(config, text, recipe_path.parent, sources)
    recipe, text = load_recipe(recipe_path)
    sources = open_inputs(input_references(recipe), recipe_path.parent) if open_inputs is not None else None
    return recipe, merge_plan(recipe, text, recipe_path.parent, str(recipe_path), sources)


def input_references(recipe: Recipe) -> list[str]:
    """Every model a merge recipe reads, in every stage, tokenizer sources included."""
    references = recipe.input_models()
    for _, merge in recipe.merges():
        choice = merge.tokenizer.source if merge.tokenizer else merge.tokenizer_source
        references += [choice] if choice and choice not in ("base", "union") and choice not in references else []
    return references


def _local_models(recipe: Recipe, recipe_dir: Path | None) -> dict[str, Path]:
    """The recipe's model references that are local paths (resolved as the sources resolve them)."""
    references = input_references(recipe)
    paths = {}
    for reference in references:
        path = local_path(reference, recipe_dir)
        if path.exists():
            paths[f"the input model '{reference}'"] = path
    return paths


def _input_paths(plan: Plan) -> dict[str, Path]:
    paths = {}
    for source in plan.sources.values():
        paths |= source.input_paths()
    return paths


def _write_chat_template(folder: Path, template: str) -> None:
    import json

    from composer.files import read_json_object

    text = template_text(template)
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        settings = read_json_object(config_path)
        settings["chat_template"] = text
        config_path.write_text(json.dumps(settings, indent=2, ensure_ascii=False))
    (folder / "chat_template.jinja").write_text(text)


def write_plan(
    plan: Plan, out: Path, options: ExecutionOptions, name: str | None = None, protected: dict[str, Path] | None = None
) -> ExecutionReport:
    """Execute the plan into `out`. `protected` adds paths (e.g. the recipe file) that `out` must not hold."""
    try:
        check_output_not_input(out, _input_paths(plan) | (protected or {}))
    except ComposerError:
        plan.close()
        raise

    record = provenance_record(plan)
    plan.shard_metadata.update(shard_metadata(record))

    def extra_files(folder: Path) -> None:
        if plan.tokenizer_source is not None:
            plan.sources[plan.tokenizer_source].save_tokenizer(folder)
        if plan.chat_template and plan.chat_template != "auto":
            _write_chat_template(folder, plan.chat_template)
        (folder / "README.md").write_text(render_card(plan, name, record))
        (folder / "composer-recipe.yml").write_text(plan.recipe_text)

    connect = None
    if options.ray is not None:  # (Ray is imported only then)
        from composer.execute.cluster import Cluster

        connect = Cluster.connect
    return execute(plan, out, options, extra_files, cluster=connect)


def _with_seed_line(text: str, seed: int) -> str:
    """The recipe text (embedded in the card) saying that --seed is in force."""
    line = f"random_seed: {seed}  # set on the command line with --seed"
    text, replaced = re.subn(r"^random_seed:.*$", line, text, flags=re.MULTILINE)
    return text if replaced else text.rstrip("\n") + "\n" + line + "\n"


def with_seed(recipe: Recipe, text: str, seed: int) -> tuple[Recipe, str]:
    """The recipe with --seed in force for the output and every stage, and the recipe text saying so."""
    stages = [stage.model_copy(update={"random_seed": seed}) for stage in recipe.stages or []] or None
    seeded = recipe.model_copy(update={"random_seed": seed, "stages": stages})
    text = _with_seed_line(text, seed)
    if any(stage.random_seed is not None for stage in recipe.stages or []):
        text += f"# --seed {seed} also replaced every stage's own random_seed\n"
    return seeded, text


def write_adapter(
    plan: Plan, out: Path, options: ExecutionOptions, protected: dict[str, Path] | None = None
) -> ExecutionReport:
    """Execute a KnOTS plan's merged update as a PEFT LoRA adapter into `out` (--as-lora): adapter_config.json,
    adapter_model.safetensors (B @ A the merged update, scaling 1), a card and the recipe."""
    import json

    from composer.extract_lora import ADAPTER_FILE, Target, adapter_config
    from composer.plan.knots import SOURCE, adapter_tensors
    from composer.sources.lora import ADAPTER_CONFIG

    try:
        check_output_not_input(out, _input_paths(plan) | (protected or {}))
        tensors, ranks = adapter_tensors(plan)
    except ComposerError:
        plan.close()
        raise
    base_reference = plan.sources[SOURCE].base.reference
    rank = max(ranks.values())
    targets = [Target(f"{module}.weight", module, (0, 0), False) for module in ranks]
    config = adapter_config(base_reference, rank, targets, list(ranks), {})
    # each module's own rank with lora_alpha equal to it: scaling 1 everywhere, so B @ A is the merged update itself
    config["rank_pattern"] = {re.escape(module): k for module, k in ranks.items() if k != rank}
    config["alpha_pattern"] = dict(config["rank_pattern"])
    plan.tensors, plan.weights_file, plan.config_file, plan.tokenizer_source = tensors, ADAPTER_FILE, None, None
    record = provenance_record(plan)
    plan.shard_metadata.update(shard_metadata(record))
    card = (
        f"---\nbase_model: {json.dumps(base_reference)}\nlibrary_name: peft\ntags:\n- composer\n- lora\n- knots\n---\n"
        f"# KnOTS merge of {len(plan.parents)} LoRA adapters\n\n"
        f"A LoRA adapter for `{base_reference}` holding the KnOTS merge (Stoica et al. 2025) of "
        + ", ".join(f"`{parent}`" for parent in plan.parents)
        + f", written by composer (`compose --as-lora`); rank {rank}"
        + (
            f" (per module: {len(config['rank_pattern'])} modules have their own rank)"
            if config["rank_pattern"]
            else ""
        )
        + f".\n\n## Recipe\n\n```yaml\n{plan.recipe_text.rstrip()}\n```\n"
    )

    def extra_files(folder: Path) -> None:
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (folder / "README.md").write_text(card)
        (folder / "composer-recipe.yml").write_text(plan.recipe_text)

    return execute(plan, out, options, extra_files)


def compose_file(
    recipe_path: Path,
    out: Path | None,
    options: ExecutionOptions,
    seed: int | None = None,
    as_lora: bool = False,
    check_plan=None,
) -> ExecutionReport:
    """Run a recipe file of either kind into `out` (default: its `output:` key); with `as_lora`, write a KnOTS merge
    as the merged LoRA adapter instead of the merged model. `check_plan(plan, out)`, where given, may refuse the run
    once the plan is known, before any tensor is read (the CLI's --gguf checks the family so)."""
    if is_moe_file(recipe_path):
        if as_lora:
            raise ComposerError(
                f"{recipe_path} is a mixture-of-experts recipe; --as-lora writes the merged adapter of a knots merge."
            )
        return _compose_moe_file(recipe_path, out, options, seed, check_plan)
    recipe, text = load_recipe(recipe_path)
    if seed is not None:
        recipe, text = with_seed(recipe, text, seed)
    target = resolve_output(recipe, out, recipe_path)
    check_output_free(target, options.force)
    protected = {"the recipe file": recipe_path} | _local_models(recipe, recipe_path.parent)
    check_output_not_input(target, protected)  # before any work; write_plan checks again with every source resolved
    plan = merge_plan(recipe, text, recipe_path.parent, str(recipe_path))
    _checked(plan, target, check_plan)
    if as_lora:
        return write_adapter(plan, target, options, protected)
    return write_plan(plan, target, options, recipe.name, protected)


def _checked(plan: Plan, target: Path, check_plan) -> None:
    if check_plan is None:
        return
    try:
        check_plan(plan, target)
    except BaseException:
        plan.close()
        raise


def _compose_moe_file(
    path: Path, out: Path | None, options: ExecutionOptions, seed: int | None, check_plan=None
) -> ExecutionReport:
    config, text = load_moe_config(path)
    if seed is not None:
        config, text = config.model_copy(update={"random_seed": seed}), _with_seed_line(text, seed)
    target = resolve_output(config, out, path)
    check_output_free(target, options.force)
    protected = {"the recipe file": Path(path)} | moe_local_models(config, Path(path).parent)
    check_output_not_input(target, protected)
    plan = plan_moe_recipe(config, text, Path(path).parent)
    _checked(plan, target, check_plan)
    return write_plan(plan, target, options, config.name, protected)


def compose_text(
    recipe_text: str, out: Path, options: ExecutionOptions, base_dir: Path | None = None
) -> ExecutionReport:
    """Run a merge recipe given as text (tests, examples, the demo) into `out`."""
    recipe = parse_recipe(recipe_text, "recipe")
    check_output_free(out, options.force)
    check_output_not_input(out, _local_models(recipe, base_dir))
    plan = merge_plan(recipe, recipe_text, base_dir, "recipe")
    return write_plan(plan, out, options, recipe.name)


def compose_moe_text(
    text: str, out: Path, options: ExecutionOptions, base_dir: Path | None = None, sources=None, prompt_model=None
) -> ExecutionReport:
    """Run an MoE recipe given as text (tests, examples) into `out`."""
    config = parse_moe_config(text, "recipe")
    check_output_free(out, options.force)
    check_output_not_input(out, moe_local_models(config, base_dir))
    if sources is None and prompt_model is None:
        plan = moe_plan(config, text, base_dir)
    else:  # models opened by the caller: a plan no other process can build again
        plan = plan_moe_recipe(config, text, base_dir, sources, prompt_model)
    return write_plan(plan, out, options, config.name)
