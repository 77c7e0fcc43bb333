"""Hostile and faulty input found by bench/hostile.py, each fixed defect pinned here.

Every refusal is one `error:` paragraph naming the place at fault, with nothing left behind; nothing a user owns
is touched; nothing hangs. Most cases run through composer.cli.main in this process (no seconds spent importing
torch again); the few that need a process of their own (a hang guarded by a timeout, a signal) run as real
subprocesses, started together.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from composer.compose import compose_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from helpers import (
    BYTE_LEVEL_SPECIAL,
    byte_level_tokenizer,
    compose_in_process,
    load_state,
    save_fine_tune,
    save_tiny_model,
    tiny_model_with_tokenizer,
)

QUIET = ExecutionOptions(progress=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile-models")
    base = tiny_model_with_tokenizer(root / "base", byte_level_tokenizer(300), BYTE_LEVEL_SPECIAL, seed=0)
    found = {"base": base, "ft": save_fine_tune(base, root / "ft", seed=1)}
    gpt2 = save_tiny_model(
        root / "gpt2", "gpt2", layers=2, seed=2, vocab_size=json.loads((base / "config.json").read_text())["vocab_size"]
    )
    for path in base.iterdir():
        if "token" in path.name:
            shutil.copy(path, gpt2 / path.name)
    found["gpt2"] = gpt2
    from composer.compose import compose_moe_text

    moe = f"base_model: {base}\ngate_mode: random\nexperts_per_token: 1\nexperts:\n  - source_model: {base}\n  - source_model: {found['ft']}\n"
    compose_moe_text(moe, root / "moe", QUIET)
    found["moe"] = root / "moe"
    return found


def linear(first, second, extra: str = "") -> str:
    return (
        f"merge_method: linear\nmodels:\n  - model: {first}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {second}\n    parameters: {{weight: 0.5}}\n{extra}"
    )


def cli(monkeypatch, capsys, folder: Path, *arguments) -> tuple[int, str, str]:
    """`compose ARGUMENTS` in process, in `folder`: (exit code, stdout, stderr)."""
    monkeypatch.chdir(folder)
    code = compose_in_process(monkeypatch, *arguments)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(code: int, out: str, err: str) -> str:
    """The rules every refusal keeps; the message with its line wrapping undone."""
    assert code == 2, f"exit {code}:\n{out}\n{err}"
    assert "Traceback" not in out + err and "internal error" not in err, err
    text = err.strip()
    assert text.startswith("error:") and all(line.strip() for line in text.splitlines()), (
        f"not one error paragraph:\n{err}"
    )
    assert out.strip() == "", out
    return " ".join(text.split())


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".replaced-" in p.name)


def copy_with_config(source: Path, folder: Path, **changes) -> Path:
    model = Path(shutil.copytree(source, folder))
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))
    return model


# --- recipes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, words",
    [
        # YAML booleans passed as the layer indices 0 and 1
        (
            "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [false, true]\n",
            ("line 5", "layer_range[0]", "whole number, not false"),
        ),
        # '' is the current folder: the error blamed the output for lying inside it
        ("merge_method: linear\nmodels:\n  - model: ''\n", ("line 3", "models[0].model", "at least 1 character")),
        (
            "merge_method: linear\nmodels: [{model: a}]\ntokenizer:\n  source: base\n  pad_to_multiple_of: 1000000000\n",
            ("line 5", "tokenizer.pad_to_multiple_of", "65536"),
        ),
        (
            "merge_method: linear\nmodels: [{model: a}]\nchat_template: '{% for x in %}'\n",
            ("line 3", "chat_template", "not valid Jinja"),
        ),
    ],
)
def test_recipe_values_that_ran_or_misled_are_refused_by_key_and_line(text, words):
    from composer.recipe import parse_recipe

    with pytest.raises(ComposerError) as caught:
        parse_recipe(text, "recipe.yml")
    assert all(word in str(caught.value) for word in words), str(caught.value)


def test_moe_recipe_refuses_a_blank_prompt_and_a_broken_template():
    from composer.moe.schema import parse_moe_config

    experts = (
        "experts:\n  - source_model: a\n    positive_prompts: ['   ']\n  - source_model: b\n    positive_prompts: [b]\n"
    )
    with pytest.raises(ComposerError, match=r"line 4: 'experts\[0\].positive_prompts': prompt '   ' has no text"):
        parse_moe_config("base_model: a\n" + experts, "recipe.yml")
    with pytest.raises(ComposerError, match="'chat_template': not a known template name"):
        parse_moe_config("base_model: a\nchat_template: '{{ oops'\n" + experts.replace("'   '", "a"), "recipe.yml")


def test_a_custom_chat_template_that_parses_is_kept():
    from composer.recipe import parse_recipe

    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert (
        parse_recipe(f"merge_method: linear\nmodels: [{{model: a}}]\nchat_template: '{template}'\n").chat_template
        == template
    )


def test_an_output_key_through_a_link_cannot_leave_the_recipe_folder(tmp_path):
    from composer.compose import resolve_output
    from composer.recipe import parse_recipe

    (tmp_path / "recipes").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "recipes" / "escape").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "recipes" / "inside").symlink_to(tmp_path / "recipes")
    with pytest.raises(ComposerError, match="points outside the recipe's folder"):
        resolve_output(
            parse_recipe("merge_method: linear\nmodels: [{model: a}]\noutput: escape/out\n"),
            None,
            tmp_path / "recipes" / "r.yml",
        )
    inside = resolve_output(
        parse_recipe("merge_method: linear\nmodels: [{model: a}]\noutput: inside/out\n"),
        None,
        tmp_path / "recipes" / "r.yml",
    )
    assert inside == tmp_path / "recipes" / "inside" / "out"


# --- model configs and weights ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(num_hidden_layers="abc"), ("'m'", "'num_hidden_layers' as 'abc'")),
        (dict(num_hidden_layers=-1), ("'m'", "'num_hidden_layers' as -1")),
        (dict(num_hidden_layers=True), ("'m'", "'num_hidden_layers' as True")),
        (
            dict(num_hidden_layers=10**12),
            ("'m'", "1000000000000", "no tensors of layer 999999999999"),
        ),  # planned a trillion layers
        (dict(tie_word_embeddings="yes"), ("'m'", "tie_word_embeddings")),  # StrictDataclassFieldValidationError
        (dict(torch_dtype="float99", dtype="float99"), ("'m'", "float99")),  # AttributeError from torch
        (dict(num_attention_heads=5), ("'m'", "attention heads")),  # StrictDataclassClassValidationError
        (dict(vocab_size=0), ("'m'", "'vocab_size' as 0")),  # was an AssertionError from torch.nn.Embedding
        (dict(hidden_size=96), ("'m'", "model.embed_tokens.weight", "config.json does not describe its weights")),
    ],
)
def test_a_config_json_transformers_or_its_weights_reject_is_one_error_naming_the_model(
    models, tmp_path, changes, words
):
    copy_with_config(models["base"], tmp_path / "m", **changes)
    recipe = "merge_method: linear\nmodels:\n  - model: m\n    parameters: {weight: 1}\n"
    with pytest.raises(ComposerError) as caught:
        compose_text(recipe, tmp_path / "out", QUIET, base_dir=tmp_path)
    assert all(word in str(caught.value) for word in words), str(caught.value)
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_integer_tensors_are_never_blended(models, tmp_path, dtype):
    """An int8 fine-tune (quantised weights without their scales) was averaged into the base silently."""
    from safetensors.torch import save_file

    model = Path(shutil.copytree(models["ft"], tmp_path / "m"))
    state = load_state(model)
    state["model.layers.0.mlp.up_proj.weight"] = (state["model.layers.0.mlp.up_proj.weight"] * 100).to(dtype)
    save_file(state, str(model / "model.safetensors"))
    with pytest.raises(ComposerError) as caught:
        compose_text(linear(models["base"], model), tmp_path / "out", QUIET)
    message = str(caught.value)
    assert "model.layers.0.mlp.up_proj.weight" in message and str(model) in message and "not floating point" in message
    passthrough = (
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {model}\n        layer_range: [0, 2]\n"
    )
    compose_text(passthrough, tmp_path / "copied", QUIET)  # copying such a tensor unchanged stays possible
    assert load_state(tmp_path / "copied")["model.layers.0.mlp.up_proj.weight"].dtype == dtype


# --- output folders -------------------------------------------------------------------------------------------


def test_a_glob_character_in_out_never_touches_other_outputs_hidden_folders(models, tmp_path):
    """OUT 'o*' globbed '.o*.partial-*': it removed another output's kept partial folder and moved another
    output's old copy (left aside by a killed swap) into itself."""
    kept = tmp_path / ".other.partial-4194000-0badf00d"
    aside = tmp_path / ".other.replaced-4194000"
    kept.mkdir()
    aside.mkdir()
    (kept / "model.safetensors").write_bytes(b"resumable work")
    (aside / "config.json").write_text("{}")
    compose_text(linear(models["base"], models["ft"]), tmp_path / "o*", QUIET)
    assert (kept / "model.safetensors").read_bytes() == b"resumable work" and (
        aside / "config.json"
    ).read_text() == "{}"
    assert (tmp_path / "o*" / "model.safetensors").is_file()


def test_out_names_up_to_255_bytes_work_and_longer_ones_are_refused_by_name(models, tmp_path):
    """A legal 240-byte OUT failed: its hidden `.OUT.partial-PID-XXXX` folder's name passed 255 bytes."""
    recipe = linear(models["base"], models["ft"])
    for length in (240, 255):
        compose_text(recipe, tmp_path / ("x" * length), QUIET)
        assert (tmp_path / ("x" * length) / "model.safetensors").is_file()
    with pytest.raises(ComposerError, match="its name is 256 bytes long, and a file name may have at most 255"):
        compose_text(recipe, tmp_path / ("y" * 256), QUIET)
    assert hidden(tmp_path) == []


def test_a_full_disk_is_one_error_naming_out(models, tmp_path, monkeypatch):
    import errno

    from composer.execute import direct_io, writer

    def full(descriptor, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer, "write_all", full)
    monkeypatch.setattr(direct_io, "write_all", full)
    with pytest.raises(ComposerError) as caught:
        compose_text(linear(models["base"], models["ft"]), tmp_path / "out", QUIET)
    assert str(caught.value).startswith(f"Writing the output {tmp_path / 'out'} failed: No space left on device.")
    assert list(tmp_path.iterdir()) == []


def test_a_second_interrupt_during_the_clean_up_still_removes_the_partial_folder(models, tmp_path, monkeypatch):
    """Ctrl-C twice: the second one landed while the first was being cleaned up and left the partial folder."""
    from composer.execute import writer
    from composer.methods import linear as linear_module

    def fail(*args, **kwargs):
        raise RuntimeError("the first failure")

    real_close = writer.ShardedWriter.close

    def interrupted_close(self):
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, in the middle of the clean-up
        time.sleep(0.05)
        real_close(self)

    monkeypatch.setattr(linear_module, "linear", fail)
    monkeypatch.setattr(writer.ShardedWriter, "close", interrupted_close)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # ignored in a run started with `&`
    try:
        with pytest.raises(KeyboardInterrupt):
            compose_text(linear(models["base"], models["ft"]), tmp_path / "out", QUIET)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert list(tmp_path.iterdir()) == []


# --- the command line ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, words",
    [
        (["r.yml", "out", "--frobnicate"], ("No such option: --frobnicate", "'compose run -h'")),
        (["r.yml", "out", "--readers", "0"], ("'--readers'", "greater than or equal to 1")),
        (["r.yml", "out", "again"], ("unexpected extra argument", "again")),
        (["eval", "model"], ("Missing option '--text'",)),
        (["--version"], ("No such option: --version",)),
        (["r.yml", "out", "--device", "cuda:99"], ("--device cuda:99",)),
    ],
)
def test_command_line_mistakes_are_one_error_paragraph(tmp_path, monkeypatch, capsys, arguments, words):
    """They were the command-line library's framed box (and an unavailable device an internal error)."""
    (tmp_path / "r.yml").write_text("merge_method: linear\nmodels: [{model: a}]\n")
    message = refused(*cli(monkeypatch, capsys, tmp_path, *arguments))
    assert all(word in message for word in words), message


def test_no_arguments_prints_the_help(tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, tmp_path)
    assert code == 0 and "Usage: compose" in out and err == ""


def test_eval_refuses_a_text_of_one_token(models, tmp_path, monkeypatch, capsys):
    """It printed perplexity 1.000 and 0 bits per byte: a score of nothing."""
    (tmp_path / "t.txt").write_text("a")
    message = refused(*cli(monkeypatch, capsys, tmp_path, "eval", models["base"], "--text", "t.txt"))
    assert "t.txt is 1 token(s) long" in message and "at least two tokens" in message


@pytest.mark.parametrize(
    "damage, words",
    [
        (
            lambda m: (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:5000]),
            ("model.safetensors", "truncated"),
        ),
        (lambda m: (m / "tokenizer.json").write_text('{"model": 5}'), ("tokenizer",)),
    ],
)
def test_route_checks_the_model_as_eval_does(models, tmp_path, monkeypatch, capsys, damage, words):
    """A truncated or damaged MoE was an internal error from transformers."""
    model = Path(shutil.copytree(models["moe"], tmp_path / "moe"))
    damage(model)
    (tmp_path / "p.txt").write_text("def main(): pass\n")
    message = refused(*cli(monkeypatch, capsys, tmp_path, "route", model, "--prompts", "p.txt", "--png", "map.png"))
    assert all(word in message for word in words), message
    assert not (tmp_path / "map.png").exists()


def test_route_refuses_a_model_without_routers_of_any_layout(models, tmp_path, monkeypatch, capsys):
    (tmp_path / "p.txt").write_text("def main(): pass\n")
    message = refused(*cli(monkeypatch, capsys, tmp_path, "route", models["gpt2"], "--prompts", "p.txt"))
    assert "GPT2LMHeadModel has no decoder layers with routers" in message


@pytest.mark.parametrize(
    "png, words",
    [
        ("map.txt", ("--png map.txt", "'.txt'")),
        ("map", ("--png map", "no extension")),
        ("folder", ("--png folder is a folder",)),
        ("no/map.png", ("does not exist",)),
    ],
)
def test_route_checks_the_png_path_before_it_measures(models, tmp_path, monkeypatch, capsys, png, words):
    """Pillow's 'unknown file extension' came as an internal error after the whole measurement (or a table, then an error)."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "p.txt").write_text("def main(): pass\n")
    message = refused(*cli(monkeypatch, capsys, tmp_path, "route", models["moe"], "--prompts", "p.txt", "--png", png))
    assert all(word in message for word in words), message


@pytest.mark.parametrize("content, words", [("{not json", ("JSONDecodeError",)), ("{}", ("KeyError", "added_tokens"))])
def test_a_donor_with_a_broken_tokenizer_is_named_by_its_own_files(
    models, tmp_path, monkeypatch, capsys, content, words
):
    """The message named the temporary folder the files were copied into, or was an internal KeyError."""
    donor = tmp_path / "donor"
    donor.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(models["base"] / name, donor / name)
    (donor / "tokenizer.json").write_text(content)
    message = refused(
        *cli(
            monkeypatch, capsys, tmp_path, "transplant", models["base"], "out", "--tokenizer", "donor", "--no-progress"
        )
    )
    assert "donor/tokenizer.json" in message and "composer-tokenizer-" not in message
    assert all(word in message for word in words), message


def test_transplant_refuses_a_padding_that_would_exhaust_memory(models, tmp_path, monkeypatch, capsys):
    message = refused(
        *cli(
            monkeypatch,
            capsys,
            tmp_path,
            "transplant",
            models["base"],
            "out",
            "--tokenizer",
            models["base"],
            "--pad-to-multiple-of",
            "1000000000",
            "--no-progress",
        )
    )
    assert "--pad-to-multiple-of" in message and "65536" in message


# --- adapters and extract-lora ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(models, tmp_path_factory) -> Path:
    from composer.extract_lora import extract_lora

    folder = tmp_path_factory.mktemp("hostile-adapter") / "adapter"
    extract_lora(str(models["ft"]), str(models["base"]), folder, rank=2, modules=["q_proj"], progress=False)
    return folder


@pytest.mark.parametrize(
    "edit, words",
    [
        (
            lambda text: text.replace('"lora_alpha": 2', '"lora_alpha": NaN'),
            ("'lora_alpha' must be a positive number (got nan)",),
        ),
        (
            lambda text: text.replace('"rank_pattern": {}', '"rank_pattern": {"q_proj": "x"}'),
            ("'rank_pattern.q_proj' must be a positive number",),
        ),
        (
            lambda text: text.replace('"alpha_pattern": {}', '"alpha_pattern": [1, 2]'),
            ("'alpha_pattern' must map module name patterns",),
        ),
    ],
)
def test_adapter_configs_with_odd_numbers_are_refused(models, adapter, tmp_path, edit, words):
    copy = Path(shutil.copytree(adapter, tmp_path / "a"))
    (copy / "adapter_config.json").write_text(edit((copy / "adapter_config.json").read_text()))
    with pytest.raises(ComposerError) as caught:
        compose_text(linear(f"{models['base']}+{copy}", models["ft"]), tmp_path / "out", QUIET)
    assert str(copy / "adapter_config.json") in str(caught.value) and all(
        word in str(caught.value) for word in words
    ), str(caught.value)


@pytest.mark.parametrize(
    "change, words", [("nan", ("holds NaN or infinite values",)), ("int8", ("torch.int8, not floating point",))]
)
def test_extract_lora_refuses_what_has_no_low_rank_approximation(models, tmp_path, change, words):
    from safetensors.torch import save_file

    from composer.extract_lora import extract_lora

    model = Path(shutil.copytree(models["ft"], tmp_path / "m"))
    state = load_state(model)
    name = "model.layers.0.self_attn.q_proj.weight"
    state[name] = state[name].fill_(float("nan")) if change == "nan" else (state[name] * 100).to(torch.int8)
    save_file(state, str(model / "model.safetensors"))
    with pytest.raises(ComposerError) as caught:
        extract_lora(str(model), str(models["base"]), tmp_path / "out", rank=2, progress=False)
    assert name in str(caught.value) and all(word in str(caught.value) for word in words), str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# --- hangs, in processes of their own -------------------------------------------------------------------------


def run_cli(*args, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "composer.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_what_used_to_hang_ends(models, tmp_path):
    """eval looped forever over a model whose config gives max_position_embeddings 1 (a window of one token never
    moves on); route ran a 200 000-word prompt through full attention. Both run at once, each with a timeout."""
    model = copy_with_config(models["base"], tmp_path / "m", max_position_embeddings=1)
    (tmp_path / "t.txt").write_text("hello there, general kenobi")
    (tmp_path / "p.txt").write_text("word " * 200_000 + "\n")
    with ThreadPoolExecutor(2) as pool:
        scored = pool.submit(run_cli, "eval", model, "--text", "t.txt", cwd=tmp_path)
        routed = pool.submit(
            run_cli, "route", models["moe"], "--prompts", "p.txt", "--png", "map.png", "--totals", cwd=tmp_path
        )
        scored, routed = scored.result(), routed.result()
    assert scored.returncode == 2 and "max_position_embeddings 1" in " ".join(scored.stderr.split()), scored.stderr
    assert routed.returncode == 0, routed.stderr
    assert "its first 1024 are routed" in " ".join(routed.stderr.split()) and (tmp_path / "map.png").is_file()


def test_an_interrupt_while_starting_is_one_error_paragraph(monkeypatch, capsys):
    """A signal before a command's own handling (while typer parses, or a lazy import runs) printed a traceback."""
    from composer import cli
    from composer.signals import Interrupted

    def interrupted():
        raise Interrupted("interrupted by SIGTERM")

    monkeypatch.setattr(cli, "_main", interrupted)
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with pytest.raises(SystemExit) as exited:
            cli.main()
    finally:  # main() makes SIGTERM and SIGHUP stop a run: the handlers are put back for the tests after this one
        for number, handler in previous.items():
            signal.signal(number, handler)
    assert exited.value.code == 130
    assert capsys.readouterr().err == "error: interrupted by SIGTERM; nothing was written.\n"
