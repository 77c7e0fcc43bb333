"""Fast start: the CLI's help imports no torch, and a merge of an architecture with output rules never imports transformers."""

import subprocess
import sys
from pathlib import Path

from helpers import save_tiny_model

CHECK = """
import sys
from pathlib import Path
from composer.compose import compose_text
from composer.execute import ExecutionOptions
compose_text(Path(sys.argv[1]).read_text(), Path(sys.argv[2]), ExecutionOptions(force=True, progress=False))
assert "ray" not in sys.modules, "a merge on this machine imported ray"
print("transformers" in sys.modules)
"""


def test_help_imports_neither_torch_nor_transformers():
    code = "import sys\nfrom composer.cli import app\nprint('torch' in sys.modules, 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == [
        "False",
        "False",
    ]


def test_a_merge_of_a_ruled_architecture_does_not_import_transformers(tmp_path: Path):
    source = save_tiny_model(tmp_path / "src", layers=3)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: passthrough\nslices:\n  - sources: [{{model: {source}, layer_range: [0, 3]}}]\n  - sources: [{{model: {source}, layer_range: [1, 3]}}]\n"
    )
    env = {"COMPOSER_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    runs = [
        subprocess.run(
            [sys.executable, "-c", CHECK, str(recipe), str(tmp_path / "out")], capture_output=True, text=True, env=env
        )
        for _ in range(2)
    ]
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr[-2000:]
    # the architecture definition's output rules answer for the first run too (tests/test_output_rules.py)
    assert [run.stdout.split()[-1] for run in runs] == ["False", "False"]


def test_a_repeated_moe_with_random_gates_does_not_import_transformers(tmp_path: Path):
    source = save_tiny_model(tmp_path / "src", layers=2)
    recipe = tmp_path / "moe.yml"
    recipe.write_text(
        f"base_model: {source}\ngate_mode: random\nexperts:\n  - source_model: {source}\n  - source_model: {source}\n"
    )
    env = {"COMPOSER_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    check = CHECK.replace(
        "compose_text(Path(sys.argv[1]).read_text(), Path(sys.argv[2]),",
        "compose_file(Path(sys.argv[1]), Path(sys.argv[2]),",
    ).replace("import compose_text", "import compose_file")
    runs = [
        subprocess.run(
            [sys.executable, "-c", check, str(recipe), str(tmp_path / "out")], capture_output=True, text=True, env=env
        )
        for _ in range(2)
    ]
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr[-2000:]
    assert [run.stdout.split()[-1] for run in runs] == ["True", "False"]  # the MoE config and layout are remembered


FIRST_WRITE = """
import sys
from pathlib import Path
from composer.compose import compose_text
from composer.execute import ExecutionOptions
from composer.execute.writer import ShardedWriter

seen = []  # whether transformers was imported when the first tensor had been written
write = ShardedWriter.write


def recording_write(self, *arguments, **keywords):
    result = write(self, *arguments, **keywords)
    if not seen:
        seen.append("transformers" in sys.modules)
    return result


ShardedWriter.write = recording_write
compose_text(Path(sys.argv[1]).read_text(), Path(sys.argv[2]), ExecutionOptions(force=True, progress=False))
print(seen[0], "transformers" in sys.modules)
"""


def test_a_first_merge_writes_before_transformers_is_imported(tmp_path: Path):
    """A never-seen config of a model type without output rules (DeepSeek-V2) is checked by transformers beside the
    writes, not before them."""
    first, second = (
        save_tiny_model(tmp_path / name, "deepseek_v2", layers=2, seed=seed) for name, seed in (("a", 0), ("b", 1))
    )
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {first}\n  - model: {second}\nparameters: {{weight: 0.5}}\n"
    )
    env = {
        "COMPOSER_CACHE": str(tmp_path / "cache"),
        "COMPOSER_NATIVE": "0",
        "PATH": "/usr/bin:/bin",
        "HF_HUB_OFFLINE": "1",
    }
    run = subprocess.run(
        [sys.executable, "-c", FIRST_WRITE, str(recipe), str(tmp_path / "out")], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["False", "True"]  # not before the first write; the deferred check ran later
