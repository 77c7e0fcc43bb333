"""The command line: `compose RECIPE [OUT]`, --force, `compose plan`, `compose eval`, `--help`, and the
rule that a failed or interrupted run leaves nothing that looks like an output.

CLI runs are real subprocesses, started together (they spend most of their time importing torch);
a test waits for its own.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from composer.errors import ComposerError
from helpers import compose_in_process, load_state, save_tiny_model

COMPOSE = Path(sys.executable).with_name("compose")


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    command = [str(COMPOSE)] if COMPOSE.is_file() else [sys.executable, "-m", "composer.cli"]
    return subprocess.run([*command, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)


def upscale(model: Path, output: str | None = None) -> str:
    text = (
        "merge_method: passthrough\nslices:\n"
        f"  - sources:\n      - model: {model}\n        layer_range: [0, 3]\n"
        f"  - sources:\n      - model: {model}\n        layer_range: [1, 4]\n"
    )
    return text + (f"output: {output}\n" if output else "")


def blend(first: Path, second: Path) -> str:
    return f"merge_method: linear\nmodels:\n  - model: {first}\n    parameters: {{weight: 0.25}}\n  - model: {second}\n    parameters: {{weight: 0.75}}\n"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) with a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def leftovers(folder: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def tiny_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer (289 tokens, within the tiny model's 320) saved as transformers files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20], trainer=trainer)
    assert tokenizer.get_vocab_size() <= 320
    tokenizer.save(str(folder / "tokenizer.json"))
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    first = save_tiny_model(root / "first", "llama", layers=4, seed=0)
    second = Path(shutil.copytree(first, root / "second"))  # a second model folder; its weights may as well be equal
    speaker = Path(shutil.copytree(first, root / "with-tokenizer"))
    tiny_tokenizer(speaker)
    return {"first": first, "second": second, "speaker": speaker}


# --- scenarios: each runs in its own folder, all at once ------------------------------------------------


# Every run that plans spends seconds importing torch and transformers, so there are few of them:
# an existing OUT is made in process, and `output_key` also puts options first and shards the output.


def existing_out(folder: Path, models, user_file: bool = True) -> Path:
    """An earlier output, made in process, plus (`user_file`) a file of the user's inside it."""
    from composer.compose import compose_text
    from composer.execute import ExecutionOptions

    compose_text(upscale(models["first"]), folder / "out", ExecutionOptions(progress=False))
    if user_file:
        (folder / "out" / "my-notes.txt").write_text("mine")
    return folder / "out"


def scenario_recipe_and_out(folder: Path, models) -> dict:
    (folder / "recipe.yml").write_text(upscale(models["first"]))
    return {"run": run_cli("recipe.yml", "out", cwd=folder)}


def scenario_output_key(folder: Path, models) -> dict:
    (folder / "recipes").mkdir()
    (folder / "recipes" / "upscale.yml").write_text(upscale(models["first"], output="built/model"))
    (folder / "elsewhere").mkdir()
    arguments = ["--no-progress", "--shard-size", "100KB", folder / "recipes" / "upscale.yml"]
    return {"run": run_cli(*arguments, cwd=folder / "elsewhere")}


def scenario_refused(folder: Path, models) -> dict:
    (folder / "recipe.yml").write_text(blend(models["first"], models["second"]))
    before = snapshot(folder)
    return {"run": run_cli("recipe.yml", "out", cwd=folder), "before": before, "after": snapshot(folder)}


def scenario_forced(folder: Path, models) -> dict:
    (folder / "recipe.yml").write_text(blend(models["first"], models["second"]))
    return {"run": run_cli("run", "recipe.yml", "out", "--force", "--readers", "3", cwd=folder)}


def scenario_forced_over_a_user_file(folder: Path, models) -> dict:
    (folder / "recipe.yml").write_text(blend(models["first"], models["second"]))
    before = snapshot(folder)
    return {"run": run_cli("recipe.yml", "out", "--force", cwd=folder), "before": before, "after": snapshot(folder)}


def scenario_bad_readers(folder: Path, models) -> dict:
    (folder / "recipe.yml").write_text(blend(models["first"], models["second"]))
    return {"run": run_cli("recipe.yml", "out", "--readers", "0", cwd=folder)}


def scenario_plan(folder: Path, models) -> dict:
    (folder / "recipe.yml").write_text(blend(models["first"], models["second"]) + "output: would-be-out\n")
    before = snapshot(folder)
    result = run_cli("plan", "recipe.yml", cwd=folder)
    return {"run": result, "before": before, "after": snapshot(folder)}


def scenario_help(folder: Path, models) -> dict:
    started = time.perf_counter()
    result = run_cli("--help", cwd=folder)
    return {"run": result, "seconds": time.perf_counter() - started}


def scenario_eval(folder: Path, models) -> dict:
    (folder / "text.txt").write_text("the lazy dog sleeps while the quick brown fox runs around the old barn.\n" * 3)
    return {"run": run_cli("eval", models["speaker"], "--text", "text.txt", cwd=folder)}


def scenario_eval_truncated(folder: Path, models) -> dict:
    model = Path(shutil.copytree(models["speaker"], folder / "model"))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (folder / "text.txt").write_text("the quick brown fox.\n")
    return {"run": run_cli("eval", "model", "--text", "text.txt", cwd=folder)}


def scenario_eval_missing_text(folder: Path, models) -> dict:
    return {"run": run_cli("eval", models["speaker"], "--text", "no-such-text.txt", cwd=folder)}


SCENARIOS = {
    name.removeprefix("scenario_"): function
    for name, function in list(globals().items())
    if name.startswith("scenario_")
}


@pytest.fixture(scope="module")
def scenarios(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    pool = ThreadPoolExecutor(max_workers=len(SCENARIOS))
    futures: dict[str, tuple[Path, Future]] = {}
    for name in ["eval", *SCENARIOS]:  # the slowest first
        if name not in futures:
            folder = root / name
            folder.mkdir()
            if name in ("refused", "forced", "forced_over_a_user_file"):
                existing_out(folder, models, user_file=name != "forced")
            futures[name] = (folder, pool.submit(SCENARIOS[name], folder, models))
    yield {name: (folder, future) for name, (folder, future) in futures.items()}
    pool.shutdown(wait=True)


def outcome(scenarios, name: str) -> tuple[Path, dict]:
    folder, future = scenarios[name]
    return folder, future.result()


def succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr


def assert_model_folder(folder: Path, layers: int) -> None:
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == layers
    assert (folder / "composer-recipe.yml").is_file() and (folder / "README.md").is_file()
    assert any(name.endswith(f"layers.{layers - 1}.mlp.down_proj.weight") for name in load_state(folder))


# --- tests -------------------------------------------------------------------------------------------


def test_compose_recipe_out_writes_the_model(scenarios):
    folder, result = outcome(scenarios, "recipe_and_out")
    succeeded(result["run"])
    assert sorted(p.name for p in folder.iterdir()) == ["out", "recipe.yml"]  # no partial folder left beside it
    assert "wrote" in result["run"].stdout and "out" in result["run"].stdout
    assert_model_folder(folder / "out", layers=6)  # 3 + 3 layers stacked from the 4-layer model


def test_compose_recipe_alone_uses_the_output_key_relative_to_the_recipe(scenarios):
    folder, result = outcome(scenarios, "output_key")
    succeeded(result["run"])
    out = folder / "recipes" / "built" / "model"
    assert_model_folder(out, layers=6)
    assert (out / "model.safetensors.index.json").is_file()  # --shard-size, given before the recipe, was applied
    assert list((folder / "elsewhere").iterdir()) == []
    assert leftovers(folder / "recipes" / "built", "model") == ["model"]


def test_existing_out_is_refused_and_left_untouched_without_force(scenarios):
    _, result = outcome(scenarios, "refused")
    refused = result["run"]
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "out" in refused.stderr and "--force" in refused.stderr
    assert result["after"] == result["before"]  # not one byte changed, nothing added


def test_force_never_replaces_an_output_that_holds_a_file_of_the_users(scenarios):
    _, result = outcome(scenarios, "forced_over_a_user_file")
    refused = result["run"]
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "my-notes.txt" in refused.stderr and "composer did not write" in refused.stderr
    assert result["after"] == result["before"]


def test_a_reader_count_below_one_is_refused_before_any_work(scenarios):
    folder, result = outcome(scenarios, "bad_readers")
    refused = result["run"]
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "--readers" in refused.stderr and not (folder / "out").exists()


def test_existing_out_is_replaced_with_force(scenarios):
    folder, result = outcome(scenarios, "forced")
    succeeded(result["run"])
    out = folder / "out"
    assert_model_folder(out, layers=4)
    assert "linear" in (out / "composer-recipe.yml").read_text()
    assert leftovers(folder) == ["out"]


def test_plan_prints_every_tensor_with_inputs_operation_bytes_and_peak_memory_and_writes_nothing(scenarios, models):
    folder, result = outcome(scenarios, "plan")
    succeeded(result["run"])
    assert result["after"] == result["before"]
    lines = result["run"].stdout.splitlines()
    names = list(load_state(models["first"]))
    for name in names:
        line = next((line for line in lines if line.startswith(name + " ")), None)
        assert line is not None, f"{name} is not in the plan"
        assert "linear" in line and "weight=[0.25, 0.75]" in line
        assert f"{models['first']}:{name}" in line and f"{models['second']}:{name}" in line
    totals = lines[-1]
    assert f"tensors: {len(names)}" in totals
    for word in ("read:", "write:", "peak memory"):
        assert word in totals
    assert re.search(r"read: [\d.]+ [KM]iB", totals) and re.search(r"peak memory[^:]*: [\d.]+ [KM]?i?B", totals)


def test_help_exits_zero_without_loading_torch(scenarios):
    _, result = outcome(scenarios, "help")
    succeeded(result["run"])
    for command in ("run", "plan", "eval"):
        assert command in result["run"].stdout
    probe = (
        "import sys\nfrom composer.cli import main\nsys.argv = ['compose', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('loaded:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert loaded.stdout.strip().endswith("loaded: []"), "--help must not wait for torch or transformers to load"


def test_eval_prints_perplexity_tokens_and_bits_per_byte(scenarios):
    _, result = outcome(scenarios, "eval")
    succeeded(result["run"])
    header, row = result["run"].stdout.strip().splitlines()[-2:]
    assert header.split() == ["text", "tokens", "bytes", "perplexity", "bits/byte"]
    name, tokens, size, perplexity, bits = row.split()
    assert (
        name == "text.txt"
        and int(tokens) > 10
        and int(size) == len(("the lazy dog sleeps while the quick brown fox runs around the old barn.\n" * 3).encode())
    )
    assert 1 < float(perplexity) < 10_000 and 0 < float(bits) < 20


def test_eval_of_a_truncated_model_is_one_error_naming_the_file(scenarios):
    """test_eval_errors.py has every other kind of damage, run in process."""
    _, result = outcome(scenarios, "eval_truncated")
    run = result["run"]
    assert run.returncode == 2 and "Traceback" not in run.stdout + run.stderr and run.stdout == ""
    message = " ".join(run.stderr.split())
    assert (
        message.startswith("error: model/model.safetensors is truncated") and len(run.stderr.strip().split("\n\n")) == 1
    )


def test_eval_names_a_missing_text_file(scenarios):
    _, result = outcome(scenarios, "eval_missing_text")
    assert result["run"].returncode != 0 and "Traceback" not in result["run"].stderr
    assert "no-such-text.txt" in result["run"].stderr


# --- in process: a run that fails midway leaves nothing behind ------------------------------------------


class FailingReads:
    """Replaces SafetensorsFolder.read: the first `after` reads work, then `error` is raised."""

    def __init__(self, monkeypatch, after: int, error: BaseException):
        from composer.sources.folder import SafetensorsFolder

        self.real = SafetensorsFolder.read
        self.after = after
        self.error = error
        self.reads = 0
        failing = self

        def read(source, name):
            failing.reads += 1
            if failing.reads > failing.after:
                raise failing.error
            return failing.real(source, name)

        monkeypatch.setattr(SafetensorsFolder, "read", read)


@pytest.mark.parametrize(
    "error", [OSError(5, "Input/output error"), KeyboardInterrupt()], ids=["read-error", "interrupt"]
)
def test_a_run_that_fails_midway_leaves_no_out_and_no_partial_folder(models, tmp_path, monkeypatch, error):
    from composer.compose import compose_text
    from composer.execute import ExecutionOptions

    failing = FailingReads(monkeypatch, after=10, error=error)
    with pytest.raises(type(error)):
        compose_text(upscale(models["first"]), tmp_path / "out", ExecutionOptions(progress=False, copy_files=False))
    assert failing.reads == 11  # it did fail midway: ten tensors were read and written first
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overlap", [True, False])
def test_a_file_to_file_copy_that_fails_midway_leaves_no_out(models, tmp_path, monkeypatch, overlap):
    from composer.compose import compose_text
    from composer.execute import ExecutionOptions
    from composer.execute.writer import ShardedWriter

    real, copies = ShardedWriter.copy_range, []

    def copy_range(writer, *arguments):
        copies.append(arguments)
        if len(copies) > 10:
            raise OSError(28, "No space left on device")
        return real(writer, *arguments)

    monkeypatch.setattr(ShardedWriter, "copy_range", copy_range)
    with pytest.raises(ComposerError, match="Writing the output .* failed: No space left on device"):
        compose_text(upscale(models["first"]), tmp_path / "out", ExecutionOptions(progress=False, overlap=overlap))
    assert len(copies) > 10
    assert list(tmp_path.iterdir()) == []


def test_a_forced_run_that_fails_midway_keeps_the_old_out(models, tmp_path, monkeypatch):
    from composer.compose import compose_text
    from composer.execute import ExecutionOptions

    out = tmp_path / "out"
    compose_text(upscale(models["first"]), out, ExecutionOptions(progress=False))
    before = snapshot(tmp_path)
    FailingReads(monkeypatch, after=10, error=OSError(28, "No space left on device"))
    with pytest.raises(ComposerError, match="Writing the output .* failed: No space left on device"):
        compose_text(blend(models["first"], models["second"]), out, ExecutionOptions(force=True, progress=False))
    assert snapshot(tmp_path) == before


def test_the_cli_reports_an_os_error_without_a_traceback(models, tmp_path, monkeypatch, capsys):
    (tmp_path / "recipe.yml").write_text(blend(models["first"], models["second"]))  # a merge reads its inputs
    FailingReads(monkeypatch, after=3, error=OSError(28, "No space left on device", str(tmp_path / "out")))
    monkeypatch.chdir(tmp_path)
    assert compose_in_process(monkeypatch, "recipe.yml", "out", "--no-progress") != 0
    message = capsys.readouterr().err
    assert "No space left on device" in message and "out" in message and "Traceback" not in message
    assert leftovers(tmp_path) == []
