"""The same mergekit-moe config through mergekit-moe and through composer, on tiny random Qwen2 models: a Qwen2-MoE
with a shared expert must come out the same (routed experts at full scale, the shared expert scaled by its
residual_scale, its gate row computed from its prompts).

mergekit is never a dependency of composer, so this module is skipped unless a `mergekit-moe` command is found
(the MERGEKIT_MOE environment variable, else PATH): `MERGEKIT_MOE=/tmp/mkvenv/bin/mergekit-moe
.venv/bin/python -m pytest -q tests/test_mergekit_moe_parity.py`. It runs mergekit-moe as a command, in its own
environment.

The gates can agree only where both tools compute the same rows: `cheap_embed` with one prompt per expert, and
composer's `gate_rows: average` (mergekit's rule; composer's default is its discriminant rows). The tokenizer has
no BOS token, which mergekit would put in front of every prompt. mergekit 0.1.5 reads the shared expert only from
the base model or a routed expert (any other model fails with "'NoneType' object has no attribute 'get_tensor'"),
so the shared expert is the base.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_cli import tiny_tokenizer

from composer.compose import compose_moe_text
from composer.execute import ExecutionOptions
from helpers import load_state, logits_of, save_tiny_model

MERGEKIT_MOE = os.environ.get("MERGEKIT_MOE") or shutil.which("mergekit-moe")
pytestmark = pytest.mark.skipif(
    not MERGEKIT_MOE, reason="no mergekit-moe command (set MERGEKIT_MOE; mergekit is never a dependency of composer)"
)

CONFIG = """\
base_model: {base}
architecture: qwen
gate_mode: cheap_embed
dtype: float32
experts_per_token: 1
experts:
  - source_model: {coder}
    positive_prompts: ["the quick brown fox"]
    residual_scale: 0.8
  - source_model: {writer}
    positive_prompts: ["the lazy dog"]
shared_experts:
  - source_model: {base}
    positive_prompts: ["jumps over the fence"]
    residual_scale: 0.5
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mergekit-moe")
    made = {}
    for seed, name in enumerate(("base", "coder", "writer")):
        folder = made[name] = save_tiny_model(root / name, "qwen2", layers=3, seed=seed)
        tiny_tokenizer(folder)
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        settings.pop("bos_token")
        (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return made


def test_qwen2_moe_with_a_shared_expert_matches_mergekit(models, tmp_path):
    config = CONFIG.format(**models)
    (tmp_path / "moe.yml").write_text(config)
    ran = subprocess.run(
        [MERGEKIT_MOE, str(tmp_path / "moe.yml"), str(tmp_path / "mergekit")], capture_output=True, text=True
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    compose_moe_text(config + "gate_rows: average\n", tmp_path / "composer", ExecutionOptions(progress=False))
    ours, theirs = load_state(tmp_path / "composer"), load_state(tmp_path / "mergekit")
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        if name.endswith("gate.weight"):  # float64 rows here, float32 there: the last bit may differ
            torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert torch.equal(ours[name], tensor), name
    ids = torch.arange(1, 40).unsqueeze(0)
    torch.testing.assert_close(logits_of(tmp_path / "composer", ids), logits_of(tmp_path / "mergekit", ids))
