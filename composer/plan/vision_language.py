"""Vision-language models (Gemma 3, Qwen2-VL / Qwen2.5-VL, LLaVA, Mistral 3 `...ForConditionalGeneration`): where
each keeps its language model, so that the language model is merged and sliced as the text-only model it is
(`...ForCausalLM`), and a text-only fine-tune's weights can go into it or come out of it. The families are declared in
`architectures/vision_language/*.yaml`.

A plan names the language model's tensors as the text-only model does (`model.layers.3.mlp.up_proj.weight`,
`lm_head.weight`); a `LanguageTower` says where one checkpoint keeps them, which depends on the transformers version
that saved it (`language_model.model.`, `model.language_model.` or `model.`). Everything else in its files (the vision
tower, the projector) is copied whole."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cache

from pydantic import BaseModel, ConfigDict

from composer.architecture import Architecture, architecture_for, tied_parameter_names, transformers_config
from composer.errors import ComposerError
from composer.plan.transformers_facts import config_defaults, remembered
from composer.yaml_text import load_package_data


class Layout(BaseModel):
    """Where a checkpoint keeps what the text-only model names `model.*` and `lm_head.*`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    lm_head: str


class TowerModule(BaseModel):
    """One of mergekit's modules of the family besides the language model (`vision_tower`, `multi_modal_projector`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prefixes: list[str]  # of its tensors' names, in every layout; a tensor belongs to the longest prefix that fits
    layer_count: str | None = (
        None  # the config key (dotted: `vision_config.depth`) of its layer count, if it has layers
    )


class VisionLanguageFamily(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    model_types: list[str]
    # the text-only family whose fine-tunes fit the language model; None: its text config's own model_type
    causal_lm_model_type: str | None = None
    # M-RoPE, which on text alone is the 1-D RoPE of the text-only family: its text-only form drops `mrope_section`
    multimodal_rope: bool = False
    layouts: list[Layout]  # the first whose embeddings the checkpoint holds is its layout
    modules: dict[str, TowerModule] = {}

    def module_of(self, name: str) -> tuple[str, str] | None:
        """(module, the tensor's name within it) for a tensor outside the language model, or None outside every one."""
        fits = [
            (prefix, module)
            for module, definition in self.modules.items()
            for prefix in definition.prefixes
            if name.startswith(prefix)
        ]
        if not fits:
            return None
        prefix, module = max(fits, key=lambda fit: len(fit[0]))
        return module, name.removeprefix(prefix)


# how transformers 5 holds every declared family in memory
IN_MEMORY = Layout(model="model.language_model.", lm_head="lm_head.")
# sizes that a text-only fine-tune must share with the language model it goes into (or comes out of)
SHARED_SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
# top-level keys of a flat config (text keys at the top, as the first Qwen2-VL releases have) that are not text keys
NOT_TEXT_KEYS = ("vision_config", "text_config", "architectures", "auto_map")


@cache
def vision_language_families() -> dict[str, VisionLanguageFamily]:
    from architectures import vision_language_files

    by_model_type = {}
    for path in vision_language_files():
        try:
            family = VisionLanguageFamily.model_validate(load_package_data(path.read_text()))
        except Exception as error:
            raise ComposerError(f"Vision-language definition {path} is invalid: {error}") from None
        by_model_type.update(dict.fromkeys(family.model_types, family))
    return by_model_type


def is_vision_language(config: dict) -> bool:
    return config.get("model_type") in vision_language_families()


def language_tower(config: dict, tensor_names, reference: str) -> LanguageTower | None:
    """The language model of `reference` when it is a declared vision-language model (None for any other model), placed
    by its tensor names."""
    family = vision_language_families().get(config.get("model_type"))
    if family is None:
        return None
    names = set(tensor_names)
    for layout in family.layouts:
        if layout.model + "embed_tokens.weight" in names:
            return LanguageTower(family, reference, config, layout)
    where = ", ".join(f"'{layout.model}embed_tokens.weight'" for layout in family.layouts)
    raise ComposerError(
        f"Model '{reference}' is a {family.name} vision-language model by its config.json (model_type "
        f"'{config['model_type']}'), but its weights hold no language model where that family keeps one (none of {where}); "
        "the config does not describe these weights."
    )


def _text_facts(config: dict, reference: str) -> dict:
    """What transformers makes of a vision-language config's text part, and whether it ties the head to the embeddings."""

    def answer() -> dict:
        effective = transformers_config(config, f"'{reference}'")
        text = effective.get_text_config()
        facts = {key: getattr(text, key, None) for key in (*SHARED_SIZES, "vocab_size", "num_hidden_layers")}
        facts["model_type"] = text.model_type
        facts["tie_word_embeddings"] = bool(getattr(effective, "tie_word_embeddings", False))
        return facts

    return remembered("vision-language text", config, answer)


def causal_lm_class(model_type: str) -> str:
    """transformers' text-only class name for `model_type` (Qwen2ForCausalLM for qwen2, ...)."""

    def answer() -> str:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if not isinstance(name, str):
            raise ComposerError(
                f"transformers has no text-only causal-LM class for model_type '{model_type}', so the language model "
                "cannot be written on its own; leave out 'language_model_only' to write the whole vision-language model."
            )
        return name

    return remembered("causal-lm class", model_type, answer)


def one_dimensional_rope(config: dict) -> None:
    """M-RoPE settings turned into the 1-D RoPE they are on text alone (in place)."""
    for key in ("rope_scaling", "rope_parameters"):
        settings = config.get(key)
        if not isinstance(settings, dict):
            continue
        settings = {
            name: value for name, value in settings.items() if name not in ("mrope_section", "mrope_interleaved")
        }
        for name in ("type", "rope_type"):
            if settings.get(name) == "mrope":
                settings[name] = "default"
        config[key] = settings


@dataclass(frozen=True)
class LanguageTower:
    """The language model of one vision-language checkpoint, and where that checkpoint keeps its tensors."""

    family: VisionLanguageFamily
    reference: str
    config: dict  # the whole config.json
    layout: Layout

    def on_disk(self, name: str) -> str:
        """Where the checkpoint keeps the text-only model's tensor `name`."""
        for text_prefix, prefix in (("model.", self.layout.model), ("lm_head.", self.layout.lm_head)):
            if name.startswith(text_prefix):
                return prefix + name.removeprefix(text_prefix)
        raise ComposerError(
            f"The language model of '{self.reference}' has a tensor '{name}' outside `model.` and `lm_head.`, which a "
            f"{self.family.name} model cannot hold."
        )

    def in_language_model(self, name: str) -> bool:
        if self.layout.model == "model.":  # the oldest layout keeps only the language model under `model.`
            return name.startswith(("model.", self.layout.lm_head))
        return name.startswith((self.layout.model, self.layout.lm_head))

    def other_tensors(self, names) -> list[str]:
        """Its tensors outside the language model (the vision tower, the projector), in file order."""
        return [name for name in names if not self.in_language_model(name)]

    def facts(self) -> dict:
        return _text_facts(self.config, self.reference)

    def ties(self) -> bool:
        return self.facts()["tie_word_embeddings"]

    def text_config(self) -> dict:
        """The config of its language model: the nested `text_config` (or a flat config's text keys), with the sizes
        transformers fills in where the file leaves them out."""
        nested = self.config.get("text_config")
        if isinstance(nested, dict):
            text = copy.deepcopy(nested)
        else:
            text = {key: copy.deepcopy(value) for key, value in self.config.items() if key not in NOT_TEXT_KEYS}
        facts = self.facts()
        text["model_type"] = facts["model_type"]
        for key in (*SHARED_SIZES, "vocab_size", "num_hidden_layers"):
            if text.get(key) is None and facts[key] is not None:
                text[key] = facts[key]
        return text

    def architecture(self) -> Architecture:
        """The text-only family's definition, which names the language model's tensors."""
        return architecture_for(self.causal_lm_config(self.text_config()), f"the language model of '{self.reference}'")

    def causal_lm_config(self, text_config: dict) -> dict:
        """A text-only model's config.json for this language model with `text_config`."""
        causal = {key: copy.deepcopy(value) for key, value in text_config.items() if key != "_name_or_path"}
        model_type = self.family.causal_lm_model_type or causal["model_type"]
        causal["model_type"] = model_type
        causal["architectures"] = [causal_lm_class(model_type)]
        causal["tie_word_embeddings"] = self.ties()
        for key in ("torch_dtype", "dtype"):
            if key in self.config and "torch_dtype" not in causal and "dtype" not in causal:
                causal[key] = self.config[key]
        if self.family.multimodal_rope:
            one_dimensional_rope(causal)
        return causal

    def with_text_config(self, text_config: dict) -> dict:
        """The whole config.json with its language model's config replaced by `text_config`; keys a config also holds
        at the top level (flat configs, and some that hold both) are changed there too."""
        output = copy.deepcopy(self.config)
        nested = output.get("text_config")
        before = nested if isinstance(nested, dict) else self.config
        if isinstance(nested, dict):
            output["text_config"] = text_config
        for key, value in text_config.items():
            if key == "model_type" or before.get(key) == value:
                continue
            if not isinstance(nested, dict) or key in output:
                output[key] = value
        return output


def check_language_models_agree(
    tower: LanguageTower, other: str, other_config: dict, other_tower: LanguageTower | None, vocabulary_moves: bool
) -> None:
    """Refuse, before any work, a model whose language model cannot share tensors with `tower`'s: another width,
    another head count, another vocabulary (unless the recipe moves rows into one output vocabulary)."""
    mine = tower.facts()
    if other_tower is not None:
        theirs = other_tower.facts()
        what = f"'{other}' (the language model of a vision-language model)"
    else:
        theirs = config_defaults(other_config, (*SHARED_SIZES, "vocab_size"), f"'{other}'")
        what = f"'{other}'"
    for key in SHARED_SIZES + (() if vocabulary_moves else ("vocab_size",)):
        if mine.get(key) is None or theirs.get(key) is None or mine[key] == theirs[key]:
            continue
        hint = (
            " Their vocabularies differ: add 'tokenizer_source: base' so that each model's rows are moved into the "
            "base model's vocabulary before merging."
            if key == "vocab_size"
            else f" Use a fine-tune of the same base model as '{tower.reference}' (its config.json's {key} is {mine[key]})."
        )
        raise ComposerError(
            f"Model '{tower.reference}' is a vision-language model whose language model (its text_config) has {key} "
            f"{mine[key]}, but {what} has {key} {theirs[key]}: their weights cannot be merged or stacked together.{hint}"
        )


def build_meta_vision_language_model(config: dict, reference: str):
    """The transformers image-text-to-text class for `config`, instantiated on the meta device."""
    import torch
    from transformers import AutoModelForImageTextToText

    model_config = transformers_config(config, reference)
    try:
        with torch.device("meta"):
            return AutoModelForImageTextToText.from_config(model_config)
    except Exception as error:  # noqa: BLE001  (a config whose sizes cannot build the model)
        text = " ".join(str(error).split())[:300]
        raise ComposerError(
            f"The config.json of {reference} does not build a vision-language model in transformers "
            f"({type(error).__name__}: {text})."
        ) from None


def language_model_tensors(model) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """A meta vision-language model's language-model tensors by their text-only names (name -> shape), and the
    names transformers ties to others."""

    def text_name(name: str) -> str | None:
        for prefix, text_prefix in ((IN_MEMORY.model, "model."), (IN_MEMORY.lm_head, "lm_head.")):
            if name.startswith(prefix):
                return text_prefix + name.removeprefix(prefix)
        return None

    shapes = {}
    for name, tensor in model.state_dict().items():
        text = text_name(name)
        if text is not None:
            shapes[text] = tuple(tensor.shape)
    tied = {text_name(name) for name in tied_parameter_names(model)} - {None}
    return shapes, tied
