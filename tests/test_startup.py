"""Fast start: the CLI's help imports no torch, and a repeated merge of a known architecture never imports transformers."""

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


def test_a_repeated_merge_does_not_import_transformers(tmp_path: Path):
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
    assert [run.stdout.split()[-1] for run in runs] == [
        "True",
        "False",
    ]  # the first run asks transformers, the second remembers


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
