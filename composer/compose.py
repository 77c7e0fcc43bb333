"""The main job: recipe file -> plan -> output folder with weights, config, tokenizer, card and recipe."""

from __future__ import annotations

from pathlib import Path

from composer.card import render_card
from composer.errors import ComposerError
from composer.execute import ExecutionOptions, ExecutionReport, execute
from composer.execute.output_folder import check_output_free
from composer.plan import Plan, build_plan
from composer.recipe import Recipe, load_recipe, parse_recipe

CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}


def resolve_output(recipe: Recipe, out: Path | None, recipe_path: Path | None) -> Path:
    if out is not None:
        return out
    if recipe.output:
        base = recipe_path.parent if recipe_path is not None else Path.cwd()
        return (base / recipe.output) if not Path(recipe.output).is_absolute() else Path(recipe.output)
    raise ComposerError("No output folder: give OUT on the command line or an 'output:' key in the recipe.")


def plan_from_file(recipe_path: Path) -> tuple[Recipe, Plan]:
    recipe, text = load_recipe(recipe_path)
    return recipe, build_plan(recipe, text, recipe_path.parent)


def _write_chat_template(folder: Path, template: str) -> None:
    import json

    text = CHAT_TEMPLATES.get(template, template)
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        settings = json.loads(config_path.read_text())
        settings["chat_template"] = text
        config_path.write_text(json.dumps(settings, indent=2, ensure_ascii=False))
    (folder / "chat_template.jinja").write_text(text)


def write_plan(plan: Plan, out: Path, options: ExecutionOptions, name: str | None = None) -> ExecutionReport:
    def extra_files(folder: Path) -> None:
        if plan.tokenizer_source is not None:
            plan.sources[plan.tokenizer_source].save_tokenizer(folder)
        if plan.chat_template and plan.chat_template != "auto":
            _write_chat_template(folder, plan.chat_template)
        (folder / "README.md").write_text(render_card(plan, name))
        (folder / "composer-recipe.yml").write_text(plan.recipe_text)

    return execute(plan, out, options, extra_files)


def compose_file(recipe_path: Path, out: Path | None, options: ExecutionOptions) -> ExecutionReport:
    recipe, text = load_recipe(recipe_path)
    target = resolve_output(recipe, out, recipe_path)
    check_output_free(target, options.force)
    plan = build_plan(recipe, text, recipe_path.parent)
    return write_plan(plan, target, options, recipe.name)


def compose_text(recipe_text: str, out: Path, options: ExecutionOptions, base_dir: Path | None = None) -> ExecutionReport:
    recipe = parse_recipe(recipe_text, "recipe")
    check_output_free(out, options.force)
    plan = build_plan(recipe, recipe_text, base_dir)
    return write_plan(plan, out, options, recipe.name)
