"""A long merge survives a crash: the partial folder journals each finished tensor with its CRC-32, the next run
of the same recipe and inputs resumes it, and the result is byte-identical to an uninterrupted run.

The kill test runs the real CLI and SIGKILLs it at random points, ten times in a row, each run resuming the last.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from composer.compose import compose_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.execute.journal import JOURNAL_FILE
from helpers import save_tiny_model

COMPOSE = [sys.executable, "-m", "composer.cli"]
SIZES = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def recipe(models: dict[str, Path]) -> str:
    """TIES over two fine-tunes (computed tensors) stacked over slices of the base (copied file to file)."""
    return f"""stages:
  - name: tied
    merge_method: ties
    base_model: {models['base']}
    models:
      - model: {models['base']}
      - model: {models['a']}
        parameters: {{weight: 0.6, density: 0.5}}
      - model: {models['b']}
        parameters: {{weight: 0.4, density: 0.7}}
    dtype: float32
  - name: out
    merge_method: passthrough
    slices:
      - sources: [{{model: tied, layer_range: [0, 6]}}]
      - sources: [{{model: {models['base']}, layer_range: [2, 6]}}]
"""


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume-models")
    return {
        name: save_tiny_model(root / name, layers=6, seed=number, **SIZES)
        for number, name in enumerate(("base", "a", "b"))
    }


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("resume-reference") / "out"
    compose_text(recipe(models), out, ExecutionOptions(progress=False, shard_size=2_000_000))
    return digests(out)


def start_working(command: list[str], folder: Path) -> tuple[subprocess.Popen, float]:
    """A CLI run, once it has its partial folder (it is working, not importing); and when that was."""
    process = subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not list(folder.glob(f".out.partial-{process.pid}-*")) and process.poll() is None:
        time.sleep(0.005)
    return process, time.perf_counter()


def test_ten_kills_at_random_points_never_leave_a_complete_looking_output_and_resume_to_the_same_bytes(
    models, reference, tmp_path
):
    (tmp_path / "recipe.yml").write_text(recipe(models))
    command = [*COMPOSE, "recipe.yml", "out", "--shard-size", "2000000", "--no-progress"]
    process, working = start_working(command, tmp_path)
    process.communicate()
    seconds = time.perf_counter() - working  # how long the work takes once it has started
    (tmp_path / "out").rename(tmp_path / "first")
    chance = random.Random(20261206)
    kills = 0
    notes = []
    while kills < 10:
        process, _ = start_working(command, tmp_path)
        time.sleep(chance.uniform(0, seconds))
        process.kill()
        notes.append(process.communicate()[1])
        kills += process.returncode != 0
        if (tmp_path / "out").exists():  # finished (killed, at most, after its output was in place): complete
            assert digests(tmp_path / "out") == reference
            (tmp_path / "out").rename(tmp_path / f"finished-{kills}-{process.pid}")
    journals = list(tmp_path.glob(f".out.partial-*/{JOURNAL_FILE}"))
    left = sum(1 for line in journals[0].read_text().splitlines() if '"tensor"' in line) if journals else 0
    finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert digests(tmp_path / "out") == reference
    assert left == 0 or f"{left} of" in finished.stderr  # what the last kill left was resumed
    resumed = [note for note in [*notes, finished.stderr] if "resuming the run" in note]
    assert len(resumed) >= 3, notes  # kills landed at several points of the work, and each run took the last one's over
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def run_that_fails_after(count: int, monkeypatch) -> None:
    """Make the `count`-th computed tensor's method raise (later runs are unaffected once undone)."""
    from composer.methods.task_arithmetic import methods as task_arithmetic

    real = task_arithmetic.generalized_task_arithmetic
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == count:
            raise OSError(5, "Input/output error")
        return real(*args, **kwargs)

    monkeypatch.setattr(task_arithmetic, "generalized_task_arithmetic", failing)


def partial_of(folder: Path) -> Path:
    found = list(folder.glob(".out.partial-*"))
    assert len(found) == 1, found
    return found[0]


def test_a_failed_run_kept_with_keep_partial_resumes_to_the_same_bytes(models, reference, tmp_path, monkeypatch):
    options = ExecutionOptions(progress=False, shard_size=2_000_000, keep_partial=True)
    with monkeypatch.context() as patch:
        run_that_fails_after(12, patch)
        with pytest.raises(OSError):
            compose_text(recipe(models), tmp_path / "out", options)
    partial = partial_of(tmp_path)
    assert not (tmp_path / "out").exists() and (partial / JOURNAL_FILE).is_file()
    report = compose_text(recipe(models), tmp_path / "out", ExecutionOptions(progress=False, shard_size=2_000_000))
    assert report.resumed >= 11 and digests(tmp_path / "out") == reference
    assert not partial.exists() and not (tmp_path / "out" / JOURNAL_FILE).exists()


def test_a_finished_tensor_whose_bytes_were_lost_is_written_again(models, reference, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        run_that_fails_after(12, patch)
        with pytest.raises(OSError):
            compose_text(
                recipe(models),
                tmp_path / "out",
                ExecutionOptions(progress=False, shard_size=2_000_000, keep_partial=True),
            )
    partial = partial_of(tmp_path)
    lines = [json.loads(line) for line in (partial / JOURNAL_FILE).read_text().splitlines()[1:] if line.strip()]
    finished = [entry["tensor"] for entry in lines]
    spoiled = sorted(partial.glob("*.safetensors"))[0]
    data = bytearray(spoiled.read_bytes())
    data[-1] ^= 0xFF  # a power loss kept the journal line but not the last page of this shard
    spoiled.write_bytes(bytes(data))
    (partial / JOURNAL_FILE).open("a").write('{"tensor": "torn')  # and the journal's last line is torn
    report = compose_text(recipe(models), tmp_path / "out", ExecutionOptions(progress=False, shard_size=2_000_000))
    assert digests(tmp_path / "out") == reference
    assert 0 < report.resumed < len(finished)


def test_resume_modes(models, tmp_path, monkeypatch):
    options = ExecutionOptions(progress=False, shard_size=2_000_000)
    with pytest.raises(ComposerError, match="no partial output of an earlier run"):
        compose_text(recipe(models), tmp_path / "out", ExecutionOptions(progress=False, resume="require"))
    with monkeypatch.context() as patch:
        run_that_fails_after(5, patch)
        with pytest.raises(OSError):
            compose_text(
                recipe(models),
                tmp_path / "out",
                ExecutionOptions(progress=False, shard_size=2_000_000, keep_partial=True),
            )
    partial = partial_of(tmp_path)
    other = recipe(models).replace("weight: 0.6", "weight: 0.5")
    with pytest.raises(ComposerError, match="another recipe, other inputs or other options"):
        compose_text(other, tmp_path / "out", ExecutionOptions(progress=False, shard_size=2_000_000, resume="require"))
    assert partial.is_dir()  # --resume never removes what it cannot resume
    with pytest.raises(ComposerError, match="another recipe"):  # another shard size is another layout
        compose_text(recipe(models), tmp_path / "out", ExecutionOptions(progress=False, resume="require"))
    report = compose_text(
        recipe(models), tmp_path / "out", ExecutionOptions(progress=False, shard_size=2_000_000, resume="never")
    )
    assert report.resumed == 0 and not partial.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    del options


def test_a_partial_folder_of_another_recipe_is_removed_with_a_note(models, tmp_path, monkeypatch, caplog):
    with monkeypatch.context() as patch:
        run_that_fails_after(5, patch)
        with pytest.raises(OSError):
            compose_text(recipe(models), tmp_path / "out", ExecutionOptions(progress=False, keep_partial=True))
    partial = partial_of(tmp_path)
    caplog.set_level("INFO", logger="composer")
    report = compose_text(
        recipe(models).replace("density: 0.5", "density: 0.6"), tmp_path / "out", ExecutionOptions(progress=False)
    )
    assert report.resumed == 0 and not partial.exists()
    assert any("removed" in record.getMessage() and partial.name in record.getMessage() for record in caplog.records)


def test_an_input_that_changed_is_never_resumed(models, tmp_path, monkeypatch):
    import shutil

    copied = {name: Path(shutil.copytree(path, tmp_path / "models" / name)) for name, path in models.items()}
    with monkeypatch.context() as patch:
        run_that_fails_after(5, patch)
        with pytest.raises(OSError):
            compose_text(recipe(copied), tmp_path / "out", ExecutionOptions(progress=False, keep_partial=True))
    weights = copied["b"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # rewritten: same size, a new modification time
    report = compose_text(recipe(copied), tmp_path / "out", ExecutionOptions(progress=False))
    assert report.resumed == 0
