"""The architecture definitions' `output_rules:` against the installed transformers: each config table is the config
class's declared fields, each key's type check refuses what transformers refuses, and the shapes the rules give are
the ones transformers' model holds, over configs that move every size and switch every optional tensor."""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest

from composer.architecture import build_meta_model, checkpoint_shapes, declared_architectures, tied_parameter_names
from composer.compose import compose_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.output_rules import KeyDeclaration
from composer.plan import build_plan
from composer.plan.output_config import check_with_output_rules, shapes_from_rules
from composer.recipe import parse_recipe
from helpers import save_tiny_model, tiny_config

# the model types whose definition has rules for them (DeepSeek's hold for deepseek_v3, not deepseek_v2)
RULED = sorted(
    model_type
    for model_type, architecture in declared_architectures().items()
    if architecture.output_rules and architecture.output_rules.hold_for(model_type)
)


def _architecture(model_type):
    return declared_architectures()[model_type]


def _type_text(annotation) -> str:
    if annotation is type(None):
        return "None"
    if typing.is_typeddict(annotation):  # RopeParameters: transformers checks only that it is a dict
        return "dict"
    if annotation in (int, float, bool, str, dict):
        return annotation.__name__
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        return " | ".join(dict.fromkeys(_type_text(part) for part in typing.get_args(annotation)))
    if origin is list:
        return f"list[{_type_text(typing.get_args(annotation)[0])}]"
    assert origin is dict, annotation
    return "dict"


def _declared_by_transformers(model_type: str) -> dict[str, str]:
    """`key: TYPE [= DEFAULT] [within LOW..HIGH]`, as a definition's `config:` table says it, for every field the config
    class declares beyond PreTrainedConfig's own (which transformers does not check strictly)."""
    from transformers import PreTrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    base = {field.name for field in dataclasses.fields(PreTrainedConfig)}
    table = {}
    for field in dataclasses.fields(CONFIG_MAPPING[model_type]):
        if field.name in base:
            continue
        text = _type_text(field.type)
        default = field.default
        if default is None:
            text += " = ~"
        elif isinstance(default, bool):
            text += f" = {str(default).lower()}"
        elif isinstance(default, (int, float, str)):
            text += f" = {default}"
        for validator in field.metadata.get("validator", []):
            cells = [cell.cell_contents for cell in validator.__closure__ or ()]
            bounds = [cell for cell in cells if isinstance(cell, (int, float)) and not isinstance(cell, bool)]
            text += f" within {min(bounds)}..{max(bounds)}"
        table[field.name] = text
    return table


@pytest.mark.parametrize("model_type", RULED)
def test_a_config_table_is_what_transformers_declares(model_type):
    architecture = _architecture(model_type)
    wanted = _declared_by_transformers(model_type)
    expected = {key: KeyDeclaration.parse(text) for key, text in wanted.items()}
    assert architecture.output_rules.declarations == expected, "the table transformers declares:\n" + "\n".join(
        f"    {key}: {text}" for key, text in wanted.items()
    )


HOSTILE_VALUES = [True, 0, 1, 2.5, "yes", None, [1, 2], [True], ["a"], {"rope_type": "default"}, -1.0]


@pytest.mark.parametrize("model_type", RULED)
def test_a_value_of_the_wrong_type_is_refused_where_transformers_refuses_it(model_type):
    from huggingface_hub.errors import StrictDataclassFieldValidationError
    from transformers import AutoConfig

    architecture = _architecture(model_type)
    rules = architecture.output_rules
    base = tiny_config(model_type).to_dict()
    disagreements = []
    for key in rules.declarations:
        for value in HOSTILE_VALUES:
            config = dict(base, **{key: value})
            try:
                AutoConfig.for_model(**config)
                transformers_refuses = False
            except StrictDataclassFieldValidationError as error:
                transformers_refuses = f"'{key}'" in str(error)
            except Exception:  # noqa: BLE001  (refused for a reason other than the type: not this test's question)
                continue
            native_refuses = not rules.declarations[key].accepts(value)
            if native_refuses != transformers_refuses:
                disagreements.append((key, value, transformers_refuses))
    assert disagreements == []


def _variants(architecture) -> list[dict]:
    """Configs that move each size the rules read and switch each flag that adds tensors."""
    rules = architecture.output_rules
    keys = rules.declarations
    variants = [{}, {"num_key_value_heads": 4}, {"intermediate_size": 96, "vocab_size": 300}]
    if "head_dim" in keys or "head_dim" in rules.derived:
        variants.append({"head_dim": 8})
    if "head_dim" not in keys or "None" in keys["head_dim"].kinds:
        variants.append({"head_dim": None})
    flags = ("attention_bias", "mlp_bias", "qkv_bias", "use_qk_norm")
    variants += [{flag: not keys[flag].default} for flag in flags if flag in keys]
    variants += [{"tie_word_embeddings": tie} for tie in (True, False)]
    # which layers hold experts, and how many; and other keys that switch tensors (DeepSeek's q_proj or q_a/q_b pair)
    switches = [
        {"mlp_only_layers": [0]}, {"decoder_sparse_step": 2}, {"first_k_dense_replace": 0},
        {"first_k_dense_replace": 2}, {"moe_layers": [0]}, {"moe_layers": []}, {"moe_layers": None},
        {"moe_layers": LEFT_OUT, "interleave_moe_layer_step": 3}, {"q_lora_rank": None},
    ]  # fmt: skip
    variants += [switch for switch in switches if set(switch) <= set(keys)]
    if architecture.experts is not None:  # every name of the count at once (transformers maps one to the other)
        variants.append({key: 2 for key in architecture.experts.count_keys})
    # keys a config.json leaves out, which transformers fills with defaults or derives from others
    variants += [{key: LEFT_OUT} for key in ("head_dim", "num_key_value_heads", "tie_word_embeddings", "n_inner")]
    kept = ("hidden_size", "n_embd", "num_attention_heads", "n_head", "num_hidden_layers", "n_layer")
    variants.append({key: LEFT_OUT for key in keys if key not in kept})
    return variants


LEFT_OUT = object()


@pytest.mark.parametrize("model_type", RULED)
def test_the_shapes_of_the_rules_are_transformers_own(model_type):
    architecture = _architecture(model_type)
    for variant in _variants(architecture):
        for layers in (1, 3):
            config = tiny_config(model_type, layers).to_dict() | variant
            config = {
                key: value
                for key, value in config.items()
                if (value is not None or key in variant) and value is not LEFT_OUT
            }
            try:
                model = build_meta_model(config)
            except ComposerError:  # what transformers cannot build, the rules refuse too
                with pytest.raises(ComposerError):
                    shapes_from_rules(architecture, config, "m")
                continue
            saved = checkpoint_shapes(model)
            in_memory = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
            for held in (saved, in_memory):
                if getattr(model.config, "tie_word_embeddings", False):
                    for target in tied_parameter_names(model):
                        held.pop(target, None)
            # a mixture of experts: one tensor per expert is how transformers saves it, fused how it holds them
            for layout in architecture.experts.layouts if architecture.experts else [None]:
                wanted = in_memory if layout is not None and layout.fused else saved
                assert shapes_from_rules(architecture, config, "m", layout) == wanted, (variant, layers, layout)


def test_rules_for_some_of_a_definitions_model_types_leave_the_others_to_transformers():
    """DeepSeek's rules are DeepseekV3Config's: a deepseek_v2 config (which declares other keys) is not checked by
    them, and planning leaves it to transformers' own check."""
    architecture = declared_architectures()["deepseek_v3"]
    assert declared_architectures()["deepseek_v2"] is architecture and "deepseek_v2" not in RULED
    assert not check_with_output_rules(architecture, tiny_config("deepseek_v2", 2).to_dict(), {}, "m")
    with pytest.raises(ComposerError, match="lacks"):
        check_with_output_rules(architecture, tiny_config("deepseek_v3", 2).to_dict(), {}, "m")


def test_a_run_of_a_ruled_architecture_does_not_import_transformers_and_plan_still_asks_it(tmp_path, monkeypatch):
    """The rules answer for a run (the deferred check is not made); `compose plan` keeps transformers' own check."""
    source = save_tiny_model(tmp_path / "m", layers=2)
    monkeypatch.setenv("COMPOSER_CACHE", str(tmp_path / "cache"))
    recipe = f"merge_method: linear\nmodels:\n  - model: {source}\n    parameters: {{weight: 1}}\n"
    plan = build_plan(parse_recipe(recipe, "recipe"), recipe)
    try:
        assert plan.deferred_checks == [] and len(plan.plan_checks) == 1
        plan.run_deferred_checks()
    finally:
        plan.close()


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(rms_norm_eps=1), ("'rms_norm_eps' as 1", "LlamaConfig", "1.0, not 1")),
        (dict(eos_token_id=[2, True]), ("'eos_token_id'", "list of whole numbers")),
        (dict(initializer_range=3.0), ("'initializer_range' as 3.0", "from 0.0 to 1.0")),
        (dict(head_dim=None, hidden_size=66), ("'hidden_size' 66", "'num_attention_heads' 4", "attention heads")),
        (dict(dtype="float99"), ("'dtype' as 'float99'", "not a torch dtype")),
        (dict(attention_bias=True), ("would not load with transformers", "lacks 8 tensor(s)", "_proj.bias")),
    ],
)
def test_a_config_the_rules_refuse_is_one_error_before_any_work(tmp_path, changes, words):
    import json

    source = save_tiny_model(tmp_path / "m", layers=2)
    config = json.loads((source / "config.json").read_text()) | changes
    (source / "config.json").write_text(json.dumps(config))
    recipe = "merge_method: linear\nmodels:\n  - model: m\n    parameters: {weight: 1}\n"
    with pytest.raises(ComposerError) as caught:
        compose_text(recipe, tmp_path / "out", ExecutionOptions(progress=False), base_dir=tmp_path)
    assert all(word in str(caught.value) for word in words), str(caught.value)
    assert not (tmp_path / "out").exists()
