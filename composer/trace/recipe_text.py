"""The recovered recipe as YAML composer runs: tensor estimates grouped into slices (runs of consecutive
layers from consecutive source layers), scalars where a parameter is constant, gradients where it changes
smoothly with depth, and filters where attention and MLP differ, so it is as short as a person would write."""

from __future__ import annotations

import re
from dataclasses import dataclass
from statistics import median

import torch
import yaml

from composer.trace.recover import BLENDS, LayerFit, TensorFit

TOLERANCE = 0.01  # a parameter is constant, or follows a gradient, within this
GROUP_TOLERANCE = 0.02  # attention and MLP get settings of their own when they differ by more than this
SNAP = 0.002
GROUPS = ("self_attn", "mlp")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}


def _number(value: float) -> float | int:
    """Rounded to 4 places, and to 2 where that is within SNAP: recipes are written with round numbers, and a
    density's last digits decide which entries a trim keeps."""
    rounded = round(float(value), 2) if abs(value - round(float(value), 2)) <= SNAP else round(float(value), 4)
    return int(rounded) if rounded == int(rounded) and abs(rounded) < 1e9 else rounded


def gradient(values: list[float]) -> float | list[float]:
    """The fewest evenly spaced anchors whose linear interpolation over depth gives `values` within TOLERANCE."""
    count = len(values)
    if count == 0:
        return 0.0
    if max(values) - min(values) <= 2 * TOLERANCE:
        return _number(median(values))
    positions = torch.linspace(0, 1, count, dtype=torch.float64) if count > 1 else torch.ones(1, dtype=torch.float64)
    target = torch.tensor(values, dtype=torch.float64)
    for anchors in sorted({2, 3, 5, 9, count}):
        if anchors > count:
            break
        knots = torch.linspace(0, 1, anchors, dtype=torch.float64)
        spacing = 1 / (anchors - 1)
        basis = (1 - (positions[:, None] - knots[None, :]).abs() / spacing).clamp_min(0)  # hat functions
        solved = torch.linalg.lstsq(basis, target[:, None]).solution.reshape(-1)
        if float((basis @ solved - target).abs().max()) <= TOLERANCE:
            return [_number(v) for v in solved]
    return [_number(v) for v in values]


def _group(name: str) -> str:
    return next((group for group in GROUPS if f".{group}." in name or name.startswith(f"{group}.")), "other")


def _parameter(layers: list[LayerFit], value_of) -> object:
    """A parameter over the layers: per group of tensors (attention, MLP) when they differ, else one setting."""
    per_group: dict[str, list[float]] = {}
    overall: list[float] = []
    for layer in layers:
        grouped: dict[str, list[float]] = {}
        for fit in layer.tensors:
            agrees = fit.method == layer.method or (
                fit.method in ("linear", "copy") and layer.method in ("linear", "slerp")
            )
            value = value_of(fit) if agrees else None
            if value is not None:
                grouped.setdefault(_group(fit.name), []).append(value)
        all_values = [v for values in grouped.values() for v in values]
        overall.append(median(all_values) if all_values else 0.0)
        for group in GROUPS:
            per_group.setdefault(group, []).append(median(grouped[group]) if group in grouped else overall[-1])
    if all(
        max(abs(a - b) for a, b in zip(per_group[group], overall)) <= GROUP_TOLERANCE
        for group in GROUPS
        if per_group.get(group)
    ):
        return gradient(overall)
    entries = [{"filter": group, "value": gradient(values)} for group, values in per_group.items()]
    return entries + [{"value": gradient(overall)}]


def _weight_of(reference: str):
    def value(fit: TensorFit) -> float | None:
        if fit.method == "copy":
            return 1.0 if reference in fit.sources else 0.0
        return fit.weights[fit.sources.index(reference)] if reference in fit.sources else None

    return value


def _t_of(fit: TensorFit) -> float | None:
    return fit.t


def _density_of(fit: TensorFit) -> float | None:
    return fit.density


@dataclass
class RecipeInputs:
    suspect_dtype: torch.dtype
    layers: list[LayerFit]
    method: str  # the blend method the layers agree on, "passthrough" for copies, "mixed" otherwise
    base: str | None = None


def _dtype(inputs: RecipeInputs) -> str:
    return DTYPE_NAMES.get(inputs.suspect_dtype, "float32")


def _runs(layers: list[LayerFit]) -> list[list[LayerFit]]:
    """Consecutive layers with the same sources, each from the next layer of its model."""
    runs: list[list[LayerFit]] = []
    for layer in layers:
        if runs:
            last = runs[-1][-1]
            same_models = [s[0] for s in last.sources] == [s[0] for s in layer.sources]
            next_layers = all(b[1] == a[1] + 1 for a, b in zip(last.sources, layer.sources))
            if same_models and next_layers and last.method == layer.method:
                runs[-1].append(layer)
                continue
        runs.append([layer])
    return runs


def _scale_setting(run: list[LayerFit]) -> object | None:
    """passthrough's `scale` for a run of copies: None where every tensor is copied as it is."""
    scales: dict[str, list[float]] = {}
    for layer in run:
        for fit in layer.tensors:
            suffix = re.sub(r"^.*?\.\d+\.", "", fit.name)
            scales.setdefault(suffix, []).append(fit.weights[0] if fit.method == "scale" else 1.0)
    settings = {suffix: gradient(values) for suffix, values in scales.items()}
    if all(value == 1 for value in settings.values()):
        return None
    entries = [{"filter": suffix, "value": value} for suffix, value in settings.items() if value != 1]
    return entries + [{"value": 1}]


def passthrough_recipe(inputs: RecipeInputs) -> dict:
    slices = []
    for run in _runs(inputs.layers):
        model, first = run[0].sources[0][0], run[0].sources[0][1]
        source: dict = {"model": model, "layer_range": [first, first + len(run)]}
        scale = _scale_setting(run)
        if scale is not None:
            source["parameters"] = {"scale": scale}
        slices.append({"sources": [source]})
    return {"merge_method": "passthrough", "slices": slices, "dtype": _dtype(inputs)}


def blend_recipe(inputs: RecipeInputs, models: list[str]) -> dict:
    """`models:` form: every layer blends the same models' layers at the same depth."""
    method, layers = inputs.method, inputs.layers
    recipe: dict = {"merge_method": method}
    if method == "slerp":
        base = inputs.base or models[0]
        other = next(m for m in models if m != base)
        recipe["base_model"] = base
        recipe["models"] = [{"model": base}, {"model": other}]
        recipe["parameters"] = {"t": _parameter(layers, _t_of)}
    elif method == "linear":
        recipe["models"] = [{"model": m, "parameters": {"weight": _parameter(layers, _weight_of(m))}} for m in models]
        sums = [sum(s[2] for s in layer.sources) for layer in layers]
        if any(abs(total - 1) > 0.01 for total in sums):
            recipe["parameters"] = {"normalize": False}
    else:  # task arithmetic, TIES, DARE: task vectors on a base
        recipe["base_model"] = inputs.base
        entries = []
        for m in models:
            if m == inputs.base:
                continue
            parameters: dict = {"weight": _parameter(layers, _weight_of(m))}
            if method != "task_arithmetic":
                parameters["density"] = _parameter(layers, _density_of)
            entries.append({"model": m, "parameters": parameters})
        recipe["models"] = entries
    recipe["dtype"] = _dtype(inputs)
    return recipe


def _models_of(layers: list[LayerFit], base: str | None, method: str) -> list[str]:
    models = []
    for layer in layers:
        for reference, _, _ in layer.sources:
            if reference not in models:
                models.append(reference)
    if base and base not in models and method not in ("linear", "slerp"):
        models.insert(0, base)
    return models


def whole_models(layers: list[LayerFit], layer_counts: dict[str, int]) -> bool:
    """Whether every layer blends the same models' layers at its own depth, over all of each model's layers: the
    `models:` form says exactly that."""
    runs = _runs(layers)
    if len(runs) != 1 or not runs[0][0].sources:
        return False
    return all(j == 0 and layer_counts.get(m) == len(layers) for m, j, _ in runs[0][0].sources)


def _stage_name(number: int, taken: set[str]) -> str:
    name = f"blend{number}"
    while name in taken:
        name += "_"
    return name


def staged_recipe(inputs: RecipeInputs) -> dict:
    """Copied runs of layers and blended ones, stacked: each blended run is a stage (its method over the source
    layers it blends, as slices) and the output is a passthrough of the copied slices and the stages."""
    stages, slices = [], []
    for run in _runs(inputs.layers):
        first = run[0]
        if not first.sources:
            continue  # matches no candidate (the report says so): nothing to rebuild it from
        if first.method in ("copy", "scale"):
            slices.append(passthrough_recipe(RecipeInputs(inputs.suspect_dtype, run, "passthrough"))["slices"][0])
            continue
        models = _models_of(run, inputs.base, first.method)
        stage = blend_recipe(RecipeInputs(inputs.suspect_dtype, run, first.method, inputs.base), models)
        start = {reference: layer for reference, layer, _ in first.sources}
        base = stage.get("base_model")
        if base is not None and base not in start:
            start[base] = next(iter(start.values()))  # the base's layers at the depth of the first source's
        sources = []
        for entry in stage.pop("models"):
            source = {"model": entry["model"], "layer_range": [start[entry["model"]], start[entry["model"]] + len(run)]}
            if "parameters" in entry:
                source["parameters"] = entry["parameters"]
            sources.append(source)
        if base is not None and all(source["model"] != base for source in sources):
            sources.append({"model": base, "layer_range": [start[base], start[base] + len(run)]})
        name = _stage_name(len(stages) + 1, set(models))
        stages.append(
            {
                "name": name,
                **{k: v for k, v in stage.items() if k != "dtype"},
                "slices": [{"sources": sources}],
                "dtype": stage["dtype"],
            }
        )
        slices.append({"sources": [{"model": name, "layer_range": [0, len(run)]}]})
    return {"stages": stages, "merge_method": "passthrough", "slices": slices, "dtype": _dtype(inputs)}


def recipe_text(inputs: RecipeInputs, note: str = "", layer_counts: dict[str, int] | None = None) -> str:
    """`layer_counts`: each candidate's layer count (a `models:` recipe takes all of a model's layers)."""
    layers = inputs.layers
    if inputs.method == "passthrough":
        recipe = passthrough_recipe(inputs)
    elif inputs.method != "mixed" and (layer_counts is None or whole_models(layers, layer_counts)):
        recipe = blend_recipe(inputs, _models_of(layers, inputs.base, inputs.method))
    else:
        recipe = staged_recipe(inputs)
    header = "# recovered by compose trace" + (f": {note}" if note else "") + "\n"
    return header + yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None, width=120)


def agreed_method(layers: list[LayerFit]) -> str:
    methods = {layer.method for layer in layers}
    if methods <= {"copy", "scale"}:
        return "passthrough"
    blends = methods & set(BLENDS)
    if len(blends) == 1 and methods <= blends | {"copy"}:
        return next(iter(blends))
    return "mixed"
