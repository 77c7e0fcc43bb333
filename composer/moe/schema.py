"""The MoE recipe: mergekit-moe's config as it is, plus composer's own keys (descriptions, a prompt corpus,
pooling, gate rows, output and name). Also accepted nested under a `moe:` key of a native recipe."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from composer.errors import ComposerError, ComposerWarning
from composer.files import YAML_FILE_LIMIT, read_text
from composer.recipe.schema import ChatTemplate, Stage, Strict
from composer.yaml_text import check_duplicate_keys, line_of, parse_yaml, path_text

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random")
# mergekit's spellings of the hidden mode with the pooling built in
GATE_MODE_ALIASES = {"hidden_avg": ("hidden", "mean"), "hidden_last": ("hidden", "last")}
PROMPT_MODES = ("hidden", "cheap_embed")


def _has_text(prompts: list[str] | None) -> list[str] | None:
    for prompt in prompts or []:
        if not prompt.strip():
            raise ValueError(f"prompt {prompt!r} has no text; a router row from it would be a row for blank space")
    return prompts


Prompts = Annotated[list[str], AfterValidator(_has_text)]


class Expert(Strict):
    source_model: str
    positive_prompts: Optional[Prompts] = None
    negative_prompts: Optional[Prompts] = None
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None
    # composer's own keys
    description: Optional[str] = None
    name: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _revision_beside_source(cls, data):
        """`revision:` beside `source_model:` (mergekit drops it) is the hub revision of the expert's model."""
        if not isinstance(data, dict) or "revision" not in data:
            return data
        data = dict(data)
        revision, model = data.pop("revision"), data.get("source_model")
        if not isinstance(model, str):
            raise ValueError("'revision' needs 'source_model' written as a hub id (org/name) beside it")
        if not isinstance(revision, (str, int)) or isinstance(revision, bool) or not str(revision).strip():
            raise ValueError(f"'revision' must be a branch, tag or commit name, not {revision!r}")
        if "@" in model:
            raise ValueError(f"'revision' is given, but '{model}' already names a revision after '@'; keep one of them")
        if Path(model).expanduser().exists() or model.startswith((".", "/", "~")):
            raise ValueError(
                f"'revision' is set, but '{model}' is a local path, which has no revisions; remove the revision, or give a hub id (org/name)"
            )
        data["source_model"] = f"{model}@{revision}"
        return data

    @field_validator("source_model", mode="before")
    @classmethod
    def _reference(cls, value):
        from composer.recipe.load import model_reference

        return model_reference(value)


# mergekit-moe's own command-line options, beside mergekit's
MERGEKIT_MOE_OPTIONS = ("i_understand_this_is_not_useful_without_training", "load_in_4bit", "load_in_8bit", "verbose")
# keys mergekit-moe does not have: a file with any of them is a composer recipe, not a mergekit config
COMPOSER_KEYS = frozenset(
    {
        "pooling",
        "gate_rows",
        "prompt_corpus",
        "prompt_model",
        "prompts_per_expert",
        "shared_expert_weight",
        "output",
        "name",
        "stages",
    }
)


class MoEConfig(Strict):
    base_model: str
    experts: list[Expert] = Field(min_length=1)
    gate_mode: str = "hidden"
    experts_per_token: int = 2
    shared_experts: Optional[list[Expert]] = None
    dtype: Optional[str] = None
    architecture: Optional[str] = None
    tokenizer_source: Optional[str] = None
    chat_template: Optional[ChatTemplate] = None
    random_seed: Optional[int] = None
    # composer's own keys
    pooling: Optional[Literal["mean", "last"]] = None
    gate_rows: Literal["discriminant", "average"] = "discriminant"
    prompt_corpus: Optional[str] = None
    prompt_model: Optional[str] = None
    prompts_per_expert: int = Field(default=8, ge=1)
    # a fixed share for the shared expert (composer's split); absent: mergekit's gate from the shared expert's prompts
    shared_expert_weight: Optional[float] = Field(default=None, gt=0.0, lt=1.0)
    output: Optional[str] = None
    name: Optional[str] = None
    stages: Optional[Annotated[list[Stage], Field(min_length=1)]] = None  # merges whose outputs experts may use

    @field_validator("base_model", "tokenizer_source", mode="before")
    @classmethod
    def _reference(cls, value):
        from composer.recipe.load import model_reference

        return model_reference(value)

    @model_validator(mode="after")
    def _check(self):
        mode = self.gate_mode
        if mode in GATE_MODE_ALIASES:
            mode, pooling = GATE_MODE_ALIASES[mode]
            if self.pooling is not None and self.pooling != pooling:
                raise ValueError(f"gate_mode '{self.gate_mode}' pools by '{pooling}', but pooling is '{self.pooling}'")
            self.gate_mode, self.pooling = mode, pooling
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode '{self.gate_mode}' is not one of {', '.join(GATE_MODES)}")
        if self.pooling is None:
            self.pooling = "mean"
        return self

    @property
    def gated_shared_expert(self) -> bool:
        """mergekit's shared expert: named in `shared_experts`, at full scale, its weight left to its gate (computed
        from its prompts on Qwen2-MoE). Otherwise composer's fixed split (`shared_expert_weight`, default 0.5)."""
        return bool(self.shared_experts) and self.shared_expert_weight is None

    @property
    def shared_weight(self) -> float:
        """The shared expert's fixed share of the MLP output, where the split is fixed."""
        return 0.5 if self.shared_expert_weight is None else self.shared_expert_weight

    @property
    def uses_prompts(self) -> bool:
        return self.gate_mode in PROMPT_MODES

    def referenced_models(self) -> list[str]:
        seen: list[str] = []
        for reference in [self.base_model] + [e.source_model for e in self.experts + (self.shared_experts or [])]:
            if reference not in seen:
                seen.append(reference)
        return seen

    def expert_label(self, index: int) -> str:
        expert = self.experts[index]
        return f"expert {index} ({expert.name or expert.source_model})"


NATIVE_KEYS = {"moe", "name", "output", "random_seed", "stages"}


def is_moe_recipe(data: object) -> bool:
    """A mergekit-moe config (experts, no merge_method) or a native recipe with an `moe:` section."""
    if not isinstance(data, dict):
        return False
    return isinstance(data.get("moe"), dict) or ("experts" in data and "merge_method" not in data)


def _flatten(data: dict) -> tuple[dict, tuple]:
    """The MoE keys at the top level, and the key path prefix errors need for the nested spelling."""
    if "moe" not in data:
        return data, ()
    extra = sorted(set(data) - NATIVE_KEYS)
    if extra:
        raise ValueError(
            f"unknown key '{extra[0]}' beside 'moe'; put the MoE settings inside 'moe:' (only name, output, random_seed and stages go beside it)"
        )
    inner = dict(data["moe"])
    for key in ("name", "output", "random_seed", "stages"):
        if key in data:
            inner[key] = data[key]
    return inner, ("moe",)


def _without_ignored_keys(data: dict, root, source_name: str) -> dict:
    """A mergekit-moe config without the keys mergekit-moe ignores (its command line's options written into the
    file, `out_dtype`), each named in a warning; real typos stay unknown keys."""
    from composer.recipe.schema import MERGEKIT_OPTIONS

    ignored = {
        name: f"it is an option of mergekit's command line (--{name.replace('_', '-')}), not of its config"
        for name in (*MERGEKIT_OPTIONS, *MERGEKIT_MOE_OPTIONS)
    }
    ignored["out_dtype"] = "mergekit-moe's config has no 'out_dtype' and writes 'dtype'; set 'dtype' for the output's"
    kept = {}
    for key, value in data.items():
        if key not in ignored:
            kept[key] = value
            continue
        line = line_of(root, (key,))
        warnings.warn(
            f"{source_name}{f', line {line}' if line else ''}: '{key}' has no effect there ({ignored[key]}); "
            "mergekit-moe ignores it, and so does composer.",
            ComposerWarning,
            stacklevel=3,
        )
    return kept


def _suggestion(key: object) -> str:
    import difflib

    if not isinstance(key, str):
        return ""
    known = set(MoEConfig.model_fields) | set(Expert.model_fields)
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.7)
    return f" Did you mean '{close[0]}'?" if close else " docs/moe.md lists every key."


def parse_moe_config(text: str, source_name: str = "recipe") -> MoEConfig:
    root, data = parse_yaml(text, source_name)
    if not is_moe_recipe(data):
        raise ComposerError(
            f"{source_name} is not an MoE recipe: it needs 'base_model' and 'experts' (or an 'moe:' section)."
        )
    check_duplicate_keys(root, source_name)
    try:
        flat, prefix = _flatten(data)
    except ValueError as error:
        raise ComposerError(f"{source_name}: {error}.") from None
    if not prefix:
        flat = _without_ignored_keys(flat, root, source_name)
    if isinstance(flat.get("stages"), list):
        from composer.recipe.load import normalise_mergekit

        flat = {
            **flat,
            "stages": [normalise_mergekit(stage) if isinstance(stage, dict) else stage for stage in flat["stages"]],
        }
    try:
        config = MoEConfig.model_validate(flat)
    except ValidationError as error:
        problems = sorted(error.errors(), key=lambda problem: problem["type"] != "extra_forbidden")
        messages = []
        for problem in problems:
            location = tuple(
                p
                for p in problem["loc"]
                if isinstance(p, int) or (isinstance(p, str) and "[" not in p and p != "function-after")
            )
            location = location if location[:1] == ("stages",) else prefix + location  # stages sit beside 'moe:'
            line = line_of(root, location)
            where = f"{source_name}, line {line}" if line else source_name
            if problem["type"] == "extra_forbidden":
                message = (
                    f"{where}: unknown key '{path_text(location)}'.{_suggestion(location[-1] if location else None)}"
                )
            elif problem["type"] == "missing":
                message = f"{where}: required key '{path_text(location)}' is missing."
            else:
                detail = str(problem["msg"]).removeprefix("Value error, ").rstrip(".")
                message = f"{where}: '{path_text(location)}': {detail}." if location else f"{where}: {detail}."
            if message not in messages:
                messages.append(message)
        raise ComposerError(" ".join(messages[:4])) from None
    if not prefix and config.uses_prompts and not COMPOSER_KEYS & set(flat):
        warnings.warn(
            f"{source_name}: a mergekit-moe config: the routers' rows are composer's (a linear discriminant of the "
            "experts' prompts over each router's own input, docs/moe.md), which route held-out text better than "
            "mergekit's averaged hidden states and so differ from mergekit's rows; add 'gate_rows: average' for "
            "mergekit's averaging rule.",
            ComposerWarning,
            stacklevel=2,
        )
    return config


def load_moe_config(path) -> tuple[MoEConfig, str]:
    text = read_text(Path(path), "Recipe file", YAML_FILE_LIMIT)
    return parse_moe_config(text, str(path)), text
