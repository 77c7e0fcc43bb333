"""Calibration methods (RegMean, RegMean++) in the plan.

The planner plans every tensor that is not a linear layer's weight with the method's `fallback`, and every linear
layer's weight (each nn.Linear inside the decoder layers, found on the meta model) as a step that waits for its
Gram matrices: the plan carries a `CalibrationRequest` saying what to run, and `composer.calibration` turns those
steps into a chain that runs the models over the calibration text layer by layer while the executor writes the
output. Everything here is checked from configs, headers and the text files before any tensor is read.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import torch

from composer.architecture import Architecture, build_meta_model
from composer.errors import ComposerError
from composer.files import read_text_to_score
from composer.methods import METHODS, MergeMethod
from composer.plan.model import CalibrationRequest, Operation
from composer.recipe.load import RecipeKeyError
from composer.recipe.schema import Merge, Recipe

NAMES = "regmean, regmean_plusplus"


def refuse_in_stages(recipe: Recipe) -> None:
    """Calibration and adapter methods merge as a recipe's one merge only (their steps are not fused into stages)."""
    merges = recipe.merges()
    for position, (name, merge) in enumerate(merges):
        method = METHODS.get(merge.merge_method)
        if method is not None and (method.calibration or method.adapters):
            where = ("merge_method",) if name is None else ("stages", position, "merge_method")
            raise RecipeKeyError(
                where,
                f"merge method '{method.name}' runs only as a recipe's one merge, not in a staged recipe; write its merge "
                "as a recipe of its own and use that recipe's output as a model in this one.",
            )


def fallback_method(method: MergeMethod, recipe: Merge) -> MergeMethod | None:
    """The data-free method a calibration method merges the other tensors with (None for any other method); refuses a
    calibration method without calibration text, and calibration text for a method that reads none."""
    if method.calibration is None:
        if recipe.calibration_text is not None:
            raise RecipeKeyError(
                ("calibration_text",),
                f"merge method '{method.name}' reads no calibration text (only the calibration methods {NAMES} do); "
                "remove 'calibration_text' or choose one of those methods.",
            )
        # KnOTS: what an adapter replaces whole or changes by a bias is averaged
        return METHODS["linear"] if method.adapters else None
    if recipe.calibration_text is None:
        raise RecipeKeyError(
            ("merge_method",),
            f"merge method '{method.name}' merges each linear layer by the Gram matrices of its inputs on a calibration "
            "text, and the recipe gives none; add a top-level 'calibration_text: FILE' (a UTF-8 text file, or a list of "
            "them, relative to the recipe) holding text like what the merged model is for.",
        )
    setting = (recipe.parameters or {}).get("fallback", method.parameter("fallback").default)
    known = sorted(
        name for name, other in METHODS.items() if other.calibration is None and not other.adapters and other.blends
    )
    fallback = METHODS.get(setting) if isinstance(setting, str) else None
    if fallback is None or fallback.calibration is not None or fallback.adapters or not fallback.blends:
        raise RecipeKeyError(
            ("parameters", "fallback"),
            f"fallback must name one data-free merge method for the tensors that are not a linear layer's weight "
            f"(embeddings, norms, biases), one of {', '.join(known)}; got {setting!r}.",
        )
    return fallback


def calibration_texts(setting: str | list[str], recipe_dir: Path | None) -> list[tuple[str, str]]:
    """(path as written, text) of each calibration text file, read and checked now."""
    texts = []
    for written in [setting] if isinstance(setting, str) else setting:
        path = Path(written) if Path(written).is_absolute() else (recipe_dir or Path.cwd()) / written
        if not path.exists():
            raise RecipeKeyError(
                ("calibration_text",),
                f"calibration text file '{written}' does not exist (looked for {path}); give a UTF-8 text file, "
                "relative to the recipe.",
            )
        try:
            texts.append((written, read_text_to_score(path)))
        except ComposerError as error:  # a directory, a pipe, not UTF-8, empty: said with the key that names it
            raise RecipeKeyError(("calibration_text",), str(error)) from None
    return texts


def linear_weight_names(config: dict, architecture: Architecture, count: int, reference: str) -> list[list[str]]:
    """For each decoder layer, the weights of its nn.Linear modules, in the order the layer holds them."""
    model = build_meta_model(config, f"'{reference}'")
    path = architecture.layer_prefix.split("{i}")[0].rstrip(".")
    layers = model.get_submodule(path)
    names = []
    for index in range(count):
        prefix = architecture.layer_prefix.format(i=index)
        names.append(
            [
                f"{prefix}{name}.weight"
                for name, module in layers[index].named_modules()
                if isinstance(module, torch.nn.Linear)
            ]
        )
    return names


def check_whole_models(
    method: MergeMethod, layers: list, count: int, recipe: Merge, architecture: Architecture, base_ref: str
) -> None:
    """What calibration and adapter methods need of a recipe: whole dense models layer for layer, one vocabulary,
    no LiNeS. `layers`: the planner's output layers; `count`: the models' layer count."""
    if recipe.lines is not None:
        raise RecipeKeyError(
            ("lines",),
            f"merge method '{method.name}' does not take LiNeS (it has no task vector for 'lines' to scale); remove 'lines'.",
        )
    if recipe.tokenizer is not None or recipe.tokenizer_source not in (None, "base"):
        raise RecipeKeyError(
            ("tokenizer",) if recipe.tokenizer is not None else ("tokenizer_source",),
            f"merge method '{method.name}' merges models of one vocabulary (a calibration method runs them all on the "
            "same tokens); remove the tokenizer settings.",
        )
    if architecture.experts is not None:
        raise ComposerError(
            f"merge method '{method.name}' merges dense models; '{base_ref}' is a mixture-of-experts model ({architecture.name})."
        )
    models = [model for model, _ in layers[0].sources] if layers else []
    base = layers[0].base_model if layers else None
    whole = len(layers) == count and all(
        [source for _, source in layer.sources] == [index] * len(layer.sources)
        and [model for model, _ in layer.sources] == models
        and layer.base_model == base
        for index, layer in enumerate(layers)
    )
    if not whole:
        raise RecipeKeyError(
            ("slices",),
            f"merge method '{method.name}' merges whole models layer for layer; give the models under 'models:', or "
            "slices that take every layer of every model in order.",
        )


def plan_calibration(
    recipe: Merge,
    method: MergeMethod,
    fallback: MergeMethod,
    layers: list,
    architecture: Architecture,
    base_ref: str,
    config: dict,
    count: int,
    recipe_dir: Path | None,
) -> CalibrationRequest:
    """Check that the recipe can be calibrated (whole models layer for layer, dense, one vocabulary, a fallback that
    fits the models) and say what the calibration pass runs. `layers`: the planner's output layers; `count`: the
    models' layer count."""
    check_whole_models(method, layers, count, recipe, architecture, base_ref)
    models = [model for model, _ in layers[0].sources] if layers else []
    base = layers[0].base_model if layers else None
    merged = [model for model in models if model != base]  # a named base is passed to the fallback, never merged
    if fallback.needs_base and base is None:
        raise RecipeKeyError(
            ("base_model",),
            f"fallback '{fallback.name}' merges onto a base model, and the recipe names none; add 'base_model: MODEL' or "
            "choose a fallback without one (linear).",
        )
    if len(merged) < fallback.min_models or (fallback.max_models is not None and len(merged) > fallback.max_models):
        raise RecipeKeyError(
            ("parameters", "fallback"),
            f"fallback '{fallback.name}' cannot merge {len(merged)} model(s); choose another fallback (linear takes any number).",
        )
    names = linear_weight_names(config, architecture, count, base_ref)
    if not all(names):
        raise ComposerError(
            f"merge method '{method.name}' solves the torch.nn.Linear layers inside each decoder layer, and the layers of "
            f"'{base_ref}' ({architecture.name}) have none (GPT-2's Conv1D layers are not linear layers to it)."
        )
    texts = calibration_texts(recipe.calibration_text, recipe_dir)
    digest = hashlib.sha256("\0".join(text for _, text in texts).encode()).hexdigest()[:12]
    return CalibrationRequest(
        method=method.name,
        source=method.calibration,
        texts=texts,
        digest=digest,
        models=merged,
        layer_prefix=architecture.layer_prefix,
        linear_names=names,
    )


def _needs_the_calibration_pass(inputs: list[torch.Tensor]) -> torch.Tensor:
    raise ComposerError(
        "this linear layer's weight is solved from Gram matrices gathered by running the models over the calibration text "
        "while `compose` writes the model; this command cannot gather them (compose tune cannot score calibration "
        "methods: tune another method, or run the recipe with compose)."
    )


def awaiting_calibration(operation: Operation) -> Operation:
    """A linear layer's step as the planner leaves it: its parameters resolved, its computing left to the calibration
    pass, which replaces it (`composer.calibration`)."""
    return replace(operation, fn=_needs_the_calibration_pass, compute_dtype=None)
