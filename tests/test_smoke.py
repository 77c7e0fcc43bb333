from pathlib import Path

import torch

from composer.compose import compose_text
from composer.execute import ExecutionOptions
from helpers import load_state, logits_of, save_tiny_model


def test_passthrough_of_every_layer_reproduces_logits(tmp_path: Path):
    source = save_tiny_model(tmp_path / "src", "llama", layers=4)
    recipe = f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {source}\n        layer_range: [0, 4]\n"
    compose_text(recipe, tmp_path / "out", ExecutionOptions())
    assert torch.equal(logits_of(source), logits_of(tmp_path / "out"))
    assert load_state(source).keys() == load_state(tmp_path / "out").keys()
