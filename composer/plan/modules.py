"""A recipe's modules besides the language model (`vision_tower`, `multi_modal_projector`, ...; the family's own are
declared in `architectures/vision_language/*.yaml`): which of the base's tensors each covers, and where each of its
models keeps them, all checked before any tensor is read. The output keeps the base's names (its layout)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from composer.errors import ComposerError
from composer.plan.vision_language import LanguageTower, VisionLanguageFamily, vision_language_families
from composer.recipe.load import RecipeKeyError
from composer.recipe.parameters import layer_t
from composer.recipe.schema import Module
from composer.sources import ModelSource, TensorInfo

LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)\.")


@dataclass(frozen=True)
class ModuleInputs:
    """One recipe module over a base model: its models, and for each of the base's tensors in the module (by its name
    in the base), that tensor's name in each model."""

    name: str
    module: Module
    models: list[str]
    within: dict[str, str]  # base's tensor name -> its name within the module (the prefix taken off)
    names: dict[str, dict[str, str]]  # base's tensor name -> model -> its name there
    layers: int | None  # the module's layer count in the base's config, where it has layers

    def t(self, name: str) -> float:
        """A tensor's place in the module's depth (0 outside its layers), where a gradient parameter is read."""
        found = LAYER_INDEX.search(self.within[name]) if self.layers else None
        if found is None or int(found.group(1)) >= self.layers:
            return 0.0
        return layer_t(int(found.group(1)), self.layers)


def _config_value(config: dict, key: str):
    value = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _known(family: VisionLanguageFamily) -> str:
    return ", ".join(f"'{name}'" for name in ("text_decoder", *family.modules))


def _check_slices(name: str, module: Module, layers: int | None, base: str) -> None:
    """A module's slices must take the whole module: one slice, every source over the same range, all its layers."""
    where = ("modules", name, "slices")
    if len(module.slices) != 1:
        raise RecipeKeyError(
            where,
            f"a module's slices must be one slice that takes the whole module, got {len(module.slices)}; composer "
            "merges a vision tower or projector whole, not layer range by layer range.",
        )
    for index, source in enumerate(module.slices[0].sources):
        start, end = source.layer_range
        if layers is not None and (start, end) != (0, layers):
            raise RecipeKeyError(
                where + (0, "sources", index, "layer_range"),
                f"layer_range [{start}, {end}] does not take the whole module: '{name}' of the base model '{base}' has "
                f"{layers} layers, so write [0, {layers}] (composer merges a module whole).",
            )
        if source.layer_range != module.slices[0].sources[0].layer_range:
            raise RecipeKeyError(
                where + (0, "sources", index, "layer_range"),
                "every source of a module's slice must take the same layer range (the whole module).",
            )


def _locate(
    name: str, family: VisionLanguageFamily, model: str, source: ModelSource, base_names: dict[str, str]
) -> dict[str, tuple[str, TensorInfo]]:
    """Where `model` keeps each of the base's tensors of module `name`: base name -> (its name, its tensor)."""
    config = source.config()
    other = vision_language_families().get(config.get("model_type"))
    if other is None or other.name != family.name:
        what = f"a {other.name} vision-language model" if other else "a text-only model"
        raise ComposerError(
            f"Module '{name}' lists the model '{model}', which is {what} (its config.json's model_type is "
            f"'{config.get('model_type')}'), so it has no {name} of a {family.name} model to merge; list only "
            f"{family.name} vision-language models there, or leave '{model}' out of the module."
        )
    infos = source.tensor_infos()
    located = {}
    for base_name, relative in base_names.items():
        found = next(
            (
                prefix + relative
                for prefix in family.modules[name].prefixes
                if prefix + relative in infos and family.module_of(prefix + relative) == (name, relative)
            ),
            None,
        )
        if found is None:
            raise ComposerError(
                f"Module '{name}' lists the model '{model}', which has no tensor '{relative}' in its {name} (the base "
                f"model's '{base_name}'), so the two towers cannot be merged; list models whose {name} is the base "
                f"model's in form (fine-tunes of one release), or leave '{model}' out of the module."
            )
        located[base_name] = (found, infos[found])
    return located


def module_inputs(
    modules: dict[str, Module],
    base: str,
    tower: LanguageTower | None,
    sources: dict[str, ModelSource],
) -> dict[str, ModuleInputs]:
    """Each recipe module over the base model, checked: a module the base's family has, over a vision-language base,
    whose models are that family's and hold the base's tensors of it in the same shapes."""
    first = next(iter(modules))
    if tower is None:
        raise RecipeKeyError(
            ("modules", first),
            f"the base model '{base}' is a text-only model, whose one module is its language model ('text_decoder', "
            "or 'default'); a vision tower, projector or other module belongs to a vision-language base. Remove "
            f"'{first}', or make a vision-language model the base_model.",
        )
    family = tower.family
    base_infos = sources[base].tensor_infos()
    in_module: dict[str, dict[str, str]] = {}
    for tensor in tower.other_tensors(base_infos):
        found = family.module_of(tensor)
        if found is not None:
            in_module.setdefault(found[0], {})[tensor] = found[1]
    planned = {}
    for name, module in modules.items():
        if name not in family.modules:
            raise RecipeKeyError(
                ("modules", name),
                f"a {family.name} model (as the base model '{base}' is) has no module '{name}'; its modules are "
                f"{_known(family)} (the language model: its slices or models may also stand at the top level).",
            )
        if name not in in_module:
            raise RecipeKeyError(
                ("modules", name),
                f"the base model '{base}' holds no tensors of its '{name}', so there is none to merge.",
            )
        key = family.modules[name].layer_count
        layers = _config_value(sources[base].config(), key) if key else None
        if module.slices:
            _check_slices(name, module, layers, base)
        models = module.model_references()
        names: dict[str, dict[str, str]] = {tensor: {} for tensor in in_module[name]}
        for model in dict.fromkeys(models + [base]):
            for tensor, (there, info) in _locate(name, family, model, sources[model], in_module[name]).items():
                shape = base_infos[tensor].shape
                if info.shape != shape:
                    raise ComposerError(
                        f"Module '{name}' lists the model '{model}', whose tensor '{there}' has shape {list(info.shape)} "
                        f"where the base model '{base}' has {list(shape)} ('{tensor}'); a module's models must hold its "
                        f"tensors in the same shapes. Leave '{model}' out of the module."
                    )
                names[tensor][model] = there
        planned[name] = ModuleInputs(name, module, models, in_module[name], names, layers)
    return planned
