"""Bad input: every mistake a user can make ends the same way.

The CLI runs as a real subprocess, so the exit code and stderr are what a user sees. Each refusal must
exit non-zero, print no traceback, print one paragraph that names the place at fault (file, recipe key
and line, model path, tensor), and leave neither OUT nor a hidden `.OUT.partial-*` folder behind.
The subprocesses are started together (they spend most of their time importing torch).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from composer.errors import ComposerError
from helpers import save_tiny_model


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "composer.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def passthrough(model, layer_range="[0, 4]") -> str:
    return f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {model}\n        layer_range: {layer_range}\n"


def linear(first, second) -> str:
    return f"merge_method: linear\nmodels:\n  - model: {first}\n    parameters: {{weight: 0.5}}\n  - model: {second}\n    parameters: {{weight: 0.5}}\n"


def laughs(levels: int = 9) -> list[str]:
    """A "billion laughs": anchored lists of nine aliases to the list before, `levels` deep (9**levels values)."""
    lists = ["&l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lists += [f"&l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]" for level in range(1, levels)]
    return lists


def alias_bomb_at_top() -> str:
    return "merge_method: linear\n" + "".join(f"l{level}: {text}\n" for level, text in enumerate(laughs()))


def alias_bomb_in_weight(model) -> str:
    return (
        f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters:\n      weight: [{', '.join(laughs())}]\n"
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    llama = save_tiny_model(root / "llama", "llama", layers=4, seed=0)
    wide = save_tiny_model(root / "llama-wide", "llama", layers=4, seed=1, hidden_size=96, intermediate_size=192)
    qwen = save_tiny_model(root / "qwen2", "qwen2", layers=4, seed=2)
    truncated = Path(shutil.copytree(llama, root / "llama-truncated"))
    weights = truncated / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return {"llama": llama, "wide": wide, "qwen": qwen, "truncated": truncated}


def cases(models: dict[str, Path]) -> dict[str, tuple[str | bytes | None, list[str]]]:
    """name -> (content of recipe.yml, or None for no file; arguments after the command name)."""
    llama, wide, qwen, truncated = models["llama"], models["wide"], models["qwen"], models["truncated"]
    default = ["recipe.yml", "out"]
    return {
        "key_typo": (
            f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {llama}\n        layer_rnge: [0, 4]\n",
            default,
        ),
        "top_level_typo": (
            f"merge_method: passthrough\nslcies:\n  - sources:\n      - model: {llama}\n        layer_range: [0, 4]\n",
            default,
        ),
        "missing_model": (passthrough(llama.parent / "no-such-model"), default),
        "layer_range_out_of_bounds": (passthrough(llama, "[2, 9]"), default),
        "shapes_differ": (linear(llama, wide), default),
        "architectures_differ": (linear(llama, qwen), default),
        "truncated_weights": (linear(llama, truncated), default),
        "recipe_missing": (None, ["no-such-recipe.yml", "out"]),
        "bad_yaml": ("merge_method: linear\nmodels:\n  - model: a\n   parameters: {weight: [0.5}\n", default),
        "unknown_method": (linear(llama, llama).replace("merge_method: linear", "merge_method: lineer"), default),
        "slerp_without_base": (
            f"merge_method: slerp\nmodels:\n  - model: {llama}\n  - model: {wide}\nparameters:\n  t: 0.5\n",
            default,
        ),
        "parameter_not_taken": (
            linear(llama, llama).replace("{weight: 0.5}", "{weight: 0.5, densty: 0.3}", 1),
            default,
        ),
        "duplicate_key": (passthrough(llama) + "merge_method: linear\n", default),
        "recipe_not_text": (b"\xff\xfe\x00merge_method", default),
        "bad_memory_budget": (passthrough(llama), [*default, "--memory-budget", "lots"]),
        "bad_device": (passthrough(llama), [*default, "--device", "tpu"]),
        "force_onto_input_model": (passthrough(llama), ["recipe.yml", str(llama), "--force"]),
        "force_onto_other_folder": (passthrough(llama), ["recipe.yml", "papers", "--force"]),
        "nan_weight": (linear(llama, llama).replace("{weight: 0.5}", "{weight: .nan}", 1), default),
        "alias_bomb_at_top": (alias_bomb_at_top(), default),
        "alias_bomb_in_weight": (alias_bomb_in_weight(llama), default),
        "deeply_nested": ("merge_method: linear\nmodels: " + "[" * 20000 + "]" * 20000 + "\n", default),
        "recipe_is_a_pipe": (None, ["pipe.yml", "out"]),
        "recipe_is_dev_zero": (None, ["/dev/zero", "out"]),
    }


@pytest.fixture(scope="module")
def refusals(models, tmp_path_factory):
    """Every case runs at once, each in its own folder; a test waits for its own."""
    root = tmp_path_factory.mktemp("cases")
    pool = ThreadPoolExecutor(max_workers=max(4, os.cpu_count() or 1))
    started: dict[str, tuple[Path, Future]] = {}
    for name, (recipe, arguments) in cases(models).items():
        folder = root / name
        folder.mkdir()
        if isinstance(recipe, bytes):
            (folder / "recipe.yml").write_bytes(recipe)
        elif recipe is not None:
            (folder / "recipe.yml").write_text(recipe)
        if name == "recipe_is_a_pipe":
            os.mkfifo(folder / "pipe.yml")  # nothing ever writes to it: reading it would wait forever
        if name == "force_onto_other_folder":
            (folder / "papers").mkdir()
            (folder / "papers" / "thesis.txt").write_text("years of work")
        started[name] = (folder, pool.submit(run_cli, *arguments, cwd=folder))
    yield {name: (folder, future) for name, (folder, future) in started.items()}
    pool.shutdown(wait=True)


def refused(refusals, name: str) -> str:
    """Wait for a case, check the common rules, and return its message with line wrapping undone."""
    folder, future = refusals[name]
    result = future.result()
    assert result.returncode != 0, f"{name} succeeded:\n{result.stdout}"
    assert "Traceback" not in result.stderr, result.stderr
    text = result.stderr.strip()
    assert text.startswith("error: "), f"stderr is not just the error message:\n{result.stderr}"
    assert all(line.strip() for line in text.splitlines()), f"message is more than one paragraph:\n{text}"
    leftovers = sorted(
        p.name for p in folder.iterdir() if p.name == "out" or p.name.startswith(".out") or ".partial-" in p.name
    )
    assert leftovers == [], f"{name} left {leftovers} behind"
    return " ".join(text.split())


def test_unknown_key_in_a_slice_source_names_its_path_and_line(refusals):
    message = refused(refusals, "key_typo")
    assert "recipe.yml, line 5" in message
    assert "slices[0].sources[0].layer_rnge" in message
    assert "layer_range" in message.split("layer_rnge", 1)[1]  # suggests the right spelling


def test_unknown_top_level_key_names_its_line(refusals):
    message = refused(refusals, "top_level_typo")
    assert "recipe.yml, line 2: unknown key 'slcies'" in message
    assert "'slices'" in message


def test_missing_model_path_is_named(refusals, models):
    message = refused(refusals, "missing_model")
    assert f"'{models['llama'].parent / 'no-such-model'}' does not exist" in message
    assert "slices[0].sources[0].model" in message and "line 4" in message


def test_layer_range_out_of_bounds(refusals):
    message = refused(refusals, "layer_range_out_of_bounds")
    assert "recipe.yml, line 5" in message
    assert "slices[0].sources[0].layer_range" in message
    assert "[2, 9]" in message and "4 layers" in message


def test_tensor_shapes_that_differ_are_refused_naming_the_tensor(refusals, models):
    message = refused(refusals, "shapes_differ")
    assert "model.embed_tokens.weight" in message
    assert str(models["llama"]) in message and str(models["wide"]) in message


def test_models_of_different_architectures_are_refused(refusals, models):
    message = refused(refusals, "architectures_differ")
    assert str(models["llama"]) in message and str(models["qwen"]) in message
    assert "llama" in message and "qwen2" in message and "architecture" in message


def test_truncated_safetensors_file_is_named(refusals, models):
    message = refused(refusals, "truncated_weights")
    assert str(models["truncated"] / "model.safetensors") in message
    assert "truncated" in message


def test_recipe_file_that_does_not_exist(refusals):
    message = refused(refusals, "recipe_missing")
    assert "no-such-recipe.yml" in message and "does not exist" in message


def test_yaml_that_does_not_parse_names_its_line(refusals):
    message = refused(refusals, "bad_yaml")
    assert "recipe.yml, line 4" in message and "YAML" in message
    assert "<unicode string>" not in message


def test_merge_method_that_does_not_exist(refusals):
    message = refused(refusals, "unknown_method")
    assert "recipe.yml, line 1" in message and "merge_method" in message and "lineer" in message
    assert "linear" in message.split("lineer", 1)[1]  # lists (and suggests) the real ones


def test_slerp_without_base_model(refusals):
    message = refused(refusals, "slerp_without_base")
    assert "recipe.yml" in message and "base_model" in message and "slerp" in message


def test_parameter_the_method_does_not_take(refusals):
    message = refused(refusals, "parameter_not_taken")
    assert "recipe.yml, line 4" in message
    assert "models[0].parameters.densty" in message and "linear" in message and "Did you mean 'density'" in message


def test_duplicate_key_is_an_error_not_silently_the_last(refusals):
    message = refused(refusals, "duplicate_key")
    assert "recipe.yml, line 6" in message and "'merge_method'" in message and "line 1" in message


def test_recipe_that_is_not_text(refusals):
    message = refused(refusals, "recipe_not_text")
    assert "recipe.yml" in message and "UTF-8" in message


def test_bad_memory_budget(refusals):
    message = refused(refusals, "bad_memory_budget")
    assert "--memory-budget" in message and "'lots'" in message


def test_bad_device(refusals):
    message = refused(refusals, "bad_device")
    assert "--device" in message and "'tpu'" in message


def test_force_never_writes_over_an_input_model(refusals, models):
    message = refused(refusals, "force_onto_input_model")
    assert str(models["llama"]) in message
    assert (models["llama"] / "model.safetensors").is_file() and (models["llama"] / "config.json").is_file()
    assert not list(models["llama"].parent.glob(f".{models['llama'].name}.*"))


def test_force_never_replaces_a_folder_that_is_not_a_model(refusals):
    message = refused(refusals, "force_onto_other_folder")
    assert "papers" in message
    folder, _ = refusals["force_onto_other_folder"]
    assert (folder / "papers" / "thesis.txt").read_text() == "years of work"


def test_a_nan_weight_is_refused_naming_the_key_and_line(refusals):
    message = refused(refusals, "nan_weight")
    assert "recipe.yml, line 4: 'models[0].parameters.weight'" in message and "finite number, not .nan" in message


@pytest.mark.parametrize(
    "name, words",
    [
        ("alias_bomb_at_top", ("recipe.yml, line 7:", "aliases expand too far")),  # l5: 9**6 values
        ("alias_bomb_in_weight", ("recipe.yml, line 5:", "aliases expand too far")),
        ("deeply_nested", ("recipe.yml, line 2:", "nests more than 100 levels")),
        ("recipe_is_a_pipe", ("pipe.yml", "is a named pipe")),
        ("recipe_is_dev_zero", ("/dev/zero", "is a device")),
    ],
)
def test_recipes_built_to_hang_the_parser_are_refused_at_once(refusals, name, words):
    message = refused(refusals, name)
    assert all(word in message for word in words), message


# --- model files from strangers, through the CLI in process (typer's runner) ----------------------------


def _edit_safetensors_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header with `edit(header)`, keeping its data section as it is."""
    import json
    import struct

    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])


def _overlap_two_tensors(header: dict) -> None:
    """Point one layer's post-attention norm at the bytes of its input norm (same shape, same size)."""
    header["model.layers.0.post_attention_layernorm.weight"]["data_offsets"] = header[
        "model.layers.0.input_layernorm.weight"
    ]["data_offsets"]


def nested_gguf(depth: int) -> bytes:
    """A GGUF header whose one metadata value is an array of an array of ... `depth` levels deep."""
    import struct

    key = b"general.nested"
    value = struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack(
        "<IQ", 4, 0
    )  # arrays of one array, then an empty uint32 array
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", 9) + value


@pytest.fixture(scope="module")
def damaged(models, tmp_path_factory) -> dict[str, tuple[Path, str, tuple[str, ...]]]:
    """name -> (model to merge, the file at fault, words the message must hold)."""
    root = tmp_path_factory.mktemp("damaged")

    def copy(name: str) -> Path:
        return Path(shutil.copytree(models["llama"], root / name))

    cases = {}
    folder = copy("offsets-as-strings")
    _edit_safetensors_header(
        folder / "model.safetensors", lambda h: h["model.norm.weight"].update(data_offsets=["0", "256"])
    )
    cases["offsets_as_strings"] = (folder, folder / "model.safetensors", ("model.norm.weight", "data_offsets"))
    folder = copy("dtype-as-list")
    _edit_safetensors_header(folder / "model.safetensors", lambda h: h["model.norm.weight"].update(dtype=["F32"]))
    cases["dtype_as_list"] = (folder, folder / "model.safetensors", ("model.norm.weight", "dtype"))
    folder = copy("overlapping")
    _edit_safetensors_header(folder / "model.safetensors", _overlap_two_tensors)
    words = ("model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight", "overlap")
    cases["overlapping_tensors"] = (folder, folder / "model.safetensors", words)
    folder = copy("config-not-utf8")
    (folder / "config.json").write_bytes((folder / "config.json").read_bytes().replace(b'"llama"', b'"ll\xffama"'))
    cases["config_not_utf8"] = (folder, folder / "config.json", ("UTF-8", "byte"))
    folder = copy("config-a-list")
    (folder / "config.json").write_text("[1, 2, 3]")
    cases["config_is_a_list"] = (folder, folder / "config.json", ("JSON object", "a list"))
    gguf = root / "nested.gguf"
    gguf.write_bytes(nested_gguf(5000))
    cases["gguf_nested_arrays"] = (gguf, gguf, ("general.nested", "nested more than 8"))
    return cases


@pytest.mark.parametrize(
    "case",
    [
        "offsets_as_strings",
        "dtype_as_list",
        "overlapping_tensors",
        "config_not_utf8",
        "config_is_a_list",
        "gguf_nested_arrays",
    ],
)
def test_damaged_model_files_are_refused_naming_the_file(damaged, case, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from composer.cli import app

    model, at_fault, words = damaged[case]
    (tmp_path / "recipe.yml").write_text(passthrough(model))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "recipe.yml", "out", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception, SystemExit))
    text = result.stderr.strip()
    assert text.startswith("error: ") and all(line.strip() for line in text.splitlines()), text
    message = " ".join(text.split())
    assert str(at_fault) in message and all(word in message for word in words), message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yml"]


# --- in process: the same checks happen before any tensor data is read --------------------------------


@pytest.fixture
def reads_forbidden(monkeypatch):
    from composer.sources.folder import SafetensorsFolder

    def forbidden(self, name):
        raise AssertionError(f"tensor {name} was read before the models were checked")

    monkeypatch.setattr(SafetensorsFolder, "read", forbidden)


@pytest.mark.parametrize("other, fault", [("wide", "model.embed_tokens.weight"), ("qwen", "architectures")])
def test_incompatible_models_are_refused_before_any_tensor_is_read(models, tmp_path, reads_forbidden, other, fault):
    from composer.compose import compose_text
    from composer.execute import ExecutionOptions

    with pytest.raises(ComposerError, match=fault):
        compose_text(linear(models["llama"], models[other]), tmp_path / "out", ExecutionOptions())
    assert list(tmp_path.iterdir()) == []


def test_recipe_key_errors_name_the_key_and_line_without_a_file(models, tmp_path, reads_forbidden):
    from composer.compose import compose_text
    from composer.execute import ExecutionOptions

    text = passthrough(models["llama"]) + passthrough(models["llama"], "[1, 5]").split("slices:\n", 1)[1]
    with pytest.raises(ComposerError) as caught:
        compose_text(text, tmp_path / "out", ExecutionOptions())
    assert str(caught.value).startswith("recipe, line 8: recipe key 'slices[1].sources[0].layer_range'")


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\nslices: []\ndtype: 3\n",
            "recipe, line 4: 'dtype'",
        ),
        (
            "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, x]\n",
            "line 5: 'slices[0].sources[0].layer_range[1]'",
        ),
        (
            "merge_method: linear\nmodels: [{model: a}]\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]\n",
            "give exactly one of 'models'",
        ),
        ("[a, b]\n", "must be a YAML mapping"),
        ("", "it is empty"),
        (
            "merge_method: linear\nmodels:\n  - model: a\n    parametres: {weight: 1}\n",
            "line 4: unknown key 'models[0].parametres'. Did you mean 'parameters'?",
        ),
        ("merge_method: linear\nmodels: 5\n", "recipe, line 2: 'models': Input should be a valid list"),
        (
            "merge_method: passthrough\nslices: [{sources: true}]\n",
            "recipe, line 2: 'slices[0].sources': Input should be a valid list",
        ),
    ],
)
def test_schema_problems_read_as_one_line_naming_the_key(text, expected):
    from composer.recipe import parse_recipe

    with pytest.raises(ComposerError) as caught:
        parse_recipe(text)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message and "Value error" not in message


MERGE_WITH_EVERY_NUMBER = """\
merge_method: ties
base_model: a
models:
  - model: b
    parameters:
      weight: {weight}
      density: {density}
parameters:
  lambda: {top}
  normalize: true
tokenizer:
  pad_to_multiple_of: {pad}
random_seed: {seed}
"""
FINE = {
    "weight": "0.5",
    "density": "[0.2, 0.8]",
    "top": "[{filter: mlp, value: 0.5}, {value: 1}]",
    "pad": "8",
    "seed": "3",
}


@pytest.mark.parametrize(
    "key, written, shown, line, location",
    [
        ("weight", ".nan", ".nan", 6, "models[0].parameters.weight"),
        ("weight", ".NaN", ".nan", 6, "models[0].parameters.weight"),
        ("weight", "-.inf", "-.inf", 6, "models[0].parameters.weight"),
        ("weight", "nan", "'nan'", 6, "models[0].parameters.weight"),  # a YAML string, which methods read as a number
        ("weight", "1e999", "'1e999'", 6, "models[0].parameters.weight"),
        ("density", "[0.2, .inf, 0.8]", ".inf", 7, "models[0].parameters.density"),  # a gradient
        ("density", "[0.2, inf]", "'inf'", 7, "models[0].parameters.density"),
        ("top", "[{filter: mlp, value: .nan}, {value: 1}]", ".nan", 9, "parameters.lambda"),  # a filtered value
        ("top", "{filter: mlp, value: [0, +.inf]}", ".inf", 9, "parameters.lambda"),
        ("pad", ".inf", "", 12, "tokenizer.pad_to_multiple_of"),
        ("seed", ".nan", "", 13, "random_seed"),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_key_and_line(key, written, shown, line, location):
    from composer.recipe import parse_recipe

    text = MERGE_WITH_EVERY_NUMBER.format(**(FINE | {key: written}))
    with pytest.raises(ComposerError) as caught:
        parse_recipe(text, "recipe.yml")
    message = str(caught.value)
    assert message.startswith(f"recipe.yml, line {line}: '{location}': Input should be a finite number"), message
    assert message.endswith(f"not {shown}.") if shown else "finite number" in message
    assert "\n" not in message and message.count("recipe.yml") == 1  # one problem, not one per member of a union


def test_a_filter_that_reads_as_a_number_is_still_a_filter():
    from composer.recipe import parse_recipe

    recipe = parse_recipe(
        "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: [{filter: Infinity, value: 1}]\n"
    )
    assert recipe.models[0].parameters["weight"][0].filter == "Infinity"


@pytest.mark.parametrize(
    "where, line, location",
    [
        ("slice source", 6, "slices[0].sources[0].parameters.weight"),
        ("slice", 7, "slices[0].parameters.weight"),
        ("stage", 5, "stages[0].parameters.weight"),
        ("layer range", 5, "slices[0].sources[0].layer_range[1]"),
    ],
)
def test_non_finite_numbers_in_slices_and_stages_are_refused(where, line, location):
    from composer.recipe import parse_recipe

    texts = {
        "slice source": "merge_method: linear\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n        parameters: {weight: .nan}\n",
        "slice": "merge_method: linear\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n    parameters:\n      weight: [1, .inf]\n",
        "stage": "stages:\n  - name: first\n    merge_method: linear\n    parameters:\n      weight: -.inf\n    models: [{model: a}]\n",
        "layer range": "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, .inf]\n",
    }
    with pytest.raises(ComposerError) as caught:
        parse_recipe(texts[where], "recipe.yml")
    assert str(caught.value).startswith(f"recipe.yml, line {line}: '{location}': Input should be a finite number")


MOE_WITH_EVERY_NUMBER = """\
base_model: a
experts_per_token: {per_token}
prompts_per_expert: {prompts}
shared_expert_weight: {shared}
experts:
  - source_model: b
    noise_scale: {noise}
    residual_scale: {residual}
stages:
  - name: s
    merge_method: linear
    models: [{{model: a, parameters: {{weight: {stage}}}}}]
"""
MOE_FINE = {"per_token": "1", "prompts": "4", "shared": "0.5", "noise": "0.1", "residual": "1.0", "stage": "1"}


@pytest.mark.parametrize(
    "key, line, location",
    [
        ("per_token", 2, "experts_per_token"),
        ("prompts", 3, "prompts_per_expert"),
        ("shared", 4, "shared_expert_weight"),
        ("noise", 7, "experts[0].noise_scale"),
        ("residual", 8, "experts[0].residual_scale"),
        ("stage", 12, "stages[0].models[0].parameters.weight"),
    ],
)
@pytest.mark.parametrize("written", [".nan", ".inf", "-.inf"])
def test_non_finite_numbers_in_an_moe_recipe_are_refused(key, line, location, written):
    from composer.moe.schema import parse_moe_config

    with pytest.raises(ComposerError) as caught:
        parse_moe_config(MOE_WITH_EVERY_NUMBER.format(**(MOE_FINE | {key: written})), "moe.yml")
    message = str(caught.value)
    assert message.startswith(f"moe.yml, line {line}: '{location}': Input should be a finite number"), message
    assert "\n" not in message and message.count("moe.yml") == 1
    parse_moe_config(MOE_WITH_EVERY_NUMBER.format(**MOE_FINE), "moe.yml")  # the same recipe with finite numbers is fine


def test_a_method_parameter_given_a_non_finite_number_in_code_is_refused():
    """The schema refuses these in a recipe file; a Parameter refuses them however they arrive."""
    from composer.methods import METHODS

    weight = METHODS["linear"].parameter("weight")
    for value in (float("nan"), float("inf"), "nan", "-inf", "1e999"):
        with pytest.raises(ValueError, match="finite number"):
            weight.coerce(value)
    assert weight.coerce("1e-5") == 1e-5 and weight.coerce(2) == 2


def test_anchors_aliases_and_merge_keys_work_as_before_with_lines_where_the_text_puts_them():
    from composer.recipe import parse_recipe

    shared = "merge_method: linear\nmodels:\n  - &m\n    model: a\n    parameters: &p {weight: 0.5}\n"
    recipe = parse_recipe(shared + "  - <<: *m\n    model: b\n    parameters:\n      <<: *p\n      weight: 0.25\n")
    assert [(entry.model, entry.parameters) for entry in recipe.models] == [
        ("a", {"weight": 0.5}),
        ("b", {"weight": 0.25}),
    ]
    with pytest.raises(ComposerError, match=r"recipe, line 8: 'models\[1\].parameters'"):  # the overriding key's line
        parse_recipe(shared + "  - <<: *m\n    model: b\n    parameters: 5\n")
    with pytest.raises(ComposerError, match="an alias stands for a node that holds it"):
        parse_recipe("merge_method: linear\nmodels: &a [*a]\n")
    with pytest.raises(ComposerError, match=r"recipe: a value cannot be read \(month must be in 1..12\)"):
        parse_recipe("merge_method: linear\nname: 2024-13-45\n")
    with pytest.raises(
        ComposerError, match="recipe, line 2, column 7: not valid YAML: a number written with 200001 characters"
    ):
        parse_recipe(
            "merge_method: linear\nname: 1" + ":1" * 100_000 + "\n"
        )  # sexagesimal: PyYAML's product would take minutes
    tagged_values = [
        ("!!timestamp soon", "'soon' is not a date or time"),
        ("!!bool maybe", "'maybe' is not true or false"),
        ("!!float ''", "'' is not a number"),
        ("!!int 0x", "'0x' is not a number"),
    ]
    for tagged, expected in tagged_values:
        with pytest.raises(ComposerError, match=f"recipe, line 2, column 7: not valid YAML: {expected}"):
            parse_recipe(f"merge_method: linear\nname: {tagged}\n")


def test_moe_configs_get_the_same_bounds():
    from composer.moe.schema import parse_moe_config

    with pytest.raises(ComposerError, match="moe.yml, line .*aliases expand too far"):
        parse_moe_config(
            "base_model: b\nexperts:\n  - source_model: a\n    positive_prompts: [" + ", ".join(laughs()) + "]\n",
            "moe.yml",
        )
    with pytest.raises(ComposerError, match="moe.yml, line 3: the YAML nests more than 100 levels"):
        parse_moe_config("base_model: b\nexperts:\n  - source_model: " + "[" * 5000 + "]" * 5000 + "\n", "moe.yml")


def test_small_file_readers_take_only_small_regular_utf8_files(tmp_path):
    from composer.files import read_json_object, read_text

    path = tmp_path / "config.json"
    os.mkfifo(tmp_path / "pipe.json")
    cases = [
        (b'{"a": "' + b"x" * 100 + b'"}', {"limit": 64}, "is larger than the 64 bytes composer reads"),
        (b'{"a": "\xc3("}', {}, "is not UTF-8 text (byte 7 cannot be decoded)"),
        (b"[1, 2]", {}, "must hold a JSON object ({...}) at the top; it holds a list"),
        (b'{"a": ' + b"[" * 150 + b"]" * 150 + b"}", {}, "nests more than 100 levels deep"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, "nests more than 100 levels deep"),
        (b'{"a": 1,}', {}, "is not valid JSON (line 1, column 9"),
    ]
    for data, options, expected in cases:
        path.write_bytes(data)
        with pytest.raises(ComposerError) as caught:
            read_json_object(path, **options)
        assert str(caught.value).startswith(str(path)) and expected in str(caught.value)
    for where, expected in [
        (tmp_path / "pipe.json", "is a named pipe"),
        (tmp_path, "is a folder"),
        (tmp_path / "no.json", "does not exist"),
    ]:
        with pytest.raises(ComposerError, match=f"^Prompt file {where} {expected}"):
            read_text(where, "Prompt file")
