"""The same mergekit config through mergekit and through composer, on tiny random models: the tensors
must be bit-identical in float32 for every deterministic method; for the random ones (whose draws
cannot match) shapes and statistics must agree.

mergekit is never a dependency of composer, so this module is skipped where it cannot be imported
(always in CI). To run it, put an unpacked mergekit and its extra requirements on PYTHONPATH, e.g.
`PYTHONPATH=/tmp/mk/src:/tmp/mkdeps .venv/bin/python -m pytest -q tests/test_mergekit_parity.py`.
bench/mergekit_parity.py prints the same comparison as a table.

A known, accepted difference: where several task-vector entries have exactly the magnitude at the
TIES/breadcrumbs keep threshold, composer keeps the lowest-index ones (exactly int(density * n)
entries), mergekit whichever its top-k returns. Random float32 tensors practically never have such
ties, so the configs below agree to the bit; a model with many equal deltas (e.g. quantised ones)
may differ in those few entries.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from composer.compose import compose_text
from composer.execute import ExecutionOptions
from helpers import load_state, save_fine_tune, save_tiny_model

mergekit_merge = pytest.importorskip(
    "mergekit.merge", reason="mergekit is not importable (it is never a dependency of composer)"
)

FAMILIES = ("llama", "qwen3")
LAYERS = 4


def weighted(*entries: tuple[str, str]) -> str:
    """A `models:` list: (role, flow-style parameters or "") per model."""
    lines = ["models:"]
    for role, parameters in entries:
        lines.append(f"  - model: {{{role}}}")
        if parameters:
            lines.append(f"    parameters: {{{{{parameters}}}}}")
    return "\n".join(lines) + "\n"


TWO_WEIGHTED = weighted(("ft1", "weight: 0.7"), ("ft2", "weight: 0.4"))
THREE_SPARSE = weighted(
    ("ft1", "weight: 0.6, density: 0.5"), ("ft2", "weight: 0.3, density: 0.7"), ("ft3", "weight: 0.5, density: 0.4")
)
BASE = "base_model: {base}\n"
FLOAT32 = "dtype: float32\n"

# mergekit configs, written as a user would; {base}, {ft1}.. are the model folders.
DETERMINISTIC = {
    "linear": "merge_method: linear\n" + TWO_WEIGHTED + FLOAT32,
    "linear_unnormalized": "merge_method: linear\n" + TWO_WEIGHTED + "parameters:\n  normalize: false\n" + FLOAT32,
    "slerp": "merge_method: slerp\n"
    + BASE
    + weighted(("base", ""), ("ft1", ""))
    + "parameters:\n  t: 0.35\n"
    + FLOAT32,
    "slerp_gradients": (
        "merge_method: slerp\n"
        + BASE
        + weighted(("base", ""), ("ft1", ""))
        + "parameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
        + "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n"
        + FLOAT32
    ),
    "nuslerp": "merge_method: nuslerp\n" + TWO_WEIGHTED + FLOAT32,
    "nuslerp_rows_with_base": "merge_method: nuslerp\n"
    + BASE
    + TWO_WEIGHTED
    + "parameters:\n  nuslerp_flatten: false\n  nuslerp_row_wise: true\n"
    + FLOAT32,
    "multislerp": "merge_method: multislerp\n"
    + weighted(("ft1", "weight: 1.0"), ("ft2", "weight: 2.0"), ("ft3", "weight: 0.5"))
    + FLOAT32,
    "multislerp_with_base": "merge_method: multislerp\n" + BASE + TWO_WEIGHTED + FLOAT32,
    "karcher": "merge_method: karcher\n"
    + weighted(("ft1", ""), ("ft2", ""), ("ft3", ""))
    + "parameters:\n  max_iter: 20\n  tol: 1.0e-7\n"
    + FLOAT32,
    "task_arithmetic": "merge_method: task_arithmetic\n"
    + BASE
    + TWO_WEIGHTED
    + "parameters:\n  lambda: 0.8\n"
    + FLOAT32,
    "ties": "merge_method: ties\n" + BASE + THREE_SPARSE + FLOAT32,
    "ties_rescaled_unnormalized": "merge_method: ties\n"
    + BASE
    + THREE_SPARSE
    + "parameters:\n  normalize: false\n  rescale: true\n  lambda: 1.2\n"
    + FLOAT32,
    "breadcrumbs": "merge_method: breadcrumbs\n" + BASE + THREE_SPARSE + "parameters:\n  gamma: 0.05\n" + FLOAT32,
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\n"
    + BASE
    + THREE_SPARSE
    + "parameters:\n  gamma: 0.02\n"
    + FLOAT32,
    "sce": "merge_method: sce\n"
    + BASE
    + weighted(("ft1", ""), ("ft2", ""), ("ft3", ""))
    + "parameters:\n  select_topk: 0.5\n"
    + FLOAT32,
    "model_stock": "merge_method: model_stock\n" + BASE + weighted(("ft1", ""), ("ft2", ""), ("ft3", "")) + FLOAT32,
    "model_stock_filter_wise": "merge_method: model_stock\n"
    + BASE
    + weighted(("ft1", ""), ("ft3", ""))
    + "parameters:\n  filter_wise: true\n"
    + FLOAT32,
    "nearswap": "merge_method: nearswap\n"
    + BASE
    + weighted(("base", ""), ("ft1", ""))
    + "parameters:\n  t: 0.01\n"
    + FLOAT32,
    "arcee_fusion": "merge_method: arcee_fusion\n" + BASE + weighted(("base", ""), ("ft1", "")) + FLOAT32,
    "ram": "merge_method: ram\n" + BASE + weighted(("ft2", ""), ("ft3", "")) + FLOAT32,
    "ramplus_tl": "merge_method: ramplus_tl\n"
    + BASE
    + weighted(("ft2", ""), ("ft3", ""))
    + "parameters:\n  r: 0.3\n  alpha: 0.5\n"
    + FLOAT32,
    "passthrough_slices": (
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: {ft1}\n        layer_range: [0, 3]\n"
        "  - sources:\n      - model: {ft2}\n        layer_range: [1, 4]\n" + FLOAT32
    ),
    "linear_gradient_weights": "merge_method: linear\n"
    + weighted(("ft1", "weight: [0.9, 0.1]"), ("ft2", "weight: 0.5"))
    + FLOAT32,
    "linear_slices_per_slice_weights": (
        "merge_method: linear\nslices:\n"
        "  - sources:\n      - model: {ft1}\n        layer_range: [0, 2]\n        parameters: {{weight: 0.2}}\n"
        "      - model: {ft2}\n        layer_range: [0, 2]\n        parameters: {{weight: 0.8}}\n"
        "  - sources:\n      - model: {ft1}\n        layer_range: [2, 4]\n        parameters: {{weight: [0.9, 0.1]}}\n"
        "      - model: {ft2}\n        layer_range: [2, 4]\n        parameters: {{weight: 0.5}}\n" + FLOAT32
    ),
}

RANDOM = {
    "dare_linear": "merge_method: dare_linear\n" + BASE + THREE_SPARSE + FLOAT32,
    "dare_ties": "merge_method: dare_ties\n" + BASE + THREE_SPARSE + FLOAT32,
    "della": "merge_method: della\n" + BASE + THREE_SPARSE + "parameters:\n  epsilon: 0.2\n" + FLOAT32,
    "della_linear": "merge_method: della_linear\n" + BASE + THREE_SPARSE + "parameters:\n  epsilon: 0.2\n" + FLOAT32,
}

# Known differences from mergekit 0.1.5, each checked to be no more than described (the test then
# reports xfail) and to still exist (remove the entry once it is fixed):
# - "rounding": composer's SLERP takes the angle and its coefficients in float64 from float32 dot
#   products; mergekit normalises first and stays in float32, so many entries differ by 1-2 ulp.
#   SCE sums each task vector's squares in float64, piece by piece (so that a tensor merged a chunk at a
#   time needs no stack of squares, and every machine gets the same model weights); mergekit's float32
#   mean rounds differently, so the model weights, and then many entries, differ by about 1 ulp.
KNOWN_GAPS = {
    "slerp": "rounding",
    "slerp_gradients": "rounding",
    "sce": "rounding",
}
MERGEKIT_FAILS = {
    (
        "qwen3",
        "passthrough_slices",
    ): "mergekit 0.1.5 keeps qwen3's 4 layer_types for the 6 output layers, and transformers 5 refuses to save that config",
}
STATISTICS_MIN_SIZE = 4096  # tensors this large have stable kept-share and norm statistics


def make_models(root: Path, model_type: str) -> dict[str, Path]:
    """base; ft1 (dense update), ft2 and ft3 (updates on 60% and 30% of entries, as RAM expects)."""
    base = save_tiny_model(root / "base", model_type, LAYERS, seed=11)
    return {
        "base": base,
        "ft1": save_fine_tune(base, root / "ft1", seed=1),
        "ft2": save_fine_tune(base, root / "ft2", seed=2, density=0.6),
        "ft3": save_fine_tune(base, root / "ft3", seed=3, density=0.3),
    }


def run_composer(config: str, out: Path) -> dict[str, torch.Tensor]:
    compose_text(config, out, ExecutionOptions())
    return load_state(out)


def run_mergekit(config: str, out: Path) -> dict[str, torch.Tensor]:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    merge_config = MergeConfiguration.model_validate(yaml.safe_load(config))
    run_merge(merge_config, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return load_state(out)


def max_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    return max(float((ours[name].double() - theirs[name].double()).abs().max()) for name in ours)


def random_statistics(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Per tensor: the share of entries left at the base's value, and the norm of the change from the base."""
    statistics = {}
    for name, tensor in state.items():
        if tensor.numel() >= STATISTICS_MIN_SIZE:
            change = tensor.double() - base[name].double()
            statistics[name] = (float((change == 0).double().mean()), float(change.norm()))
    return statistics


@pytest.fixture(scope="module", params=FAMILIES)
def models(request, tmp_path_factory) -> dict[str, Path]:
    return make_models(tmp_path_factory.mktemp(f"parity-{request.param}"), request.param) | {"family": request.param}


@pytest.mark.parametrize("case", sorted(DETERMINISTIC))
def test_deterministic_methods_are_bit_identical_to_mergekit(models, tmp_path, case):
    if (models["family"], case) in MERGEKIT_FAILS:
        pytest.skip(MERGEKIT_FAILS[models["family"], case])
    config = DETERMINISTIC[case].format(**models)
    ours, theirs = run_composer(config, tmp_path / "composer"), run_mergekit(config, tmp_path / "mergekit")
    assert ours.keys() == theirs.keys()
    assert all(
        ours[name].dtype == tensor.dtype == torch.float32 and ours[name].shape == tensor.shape
        for name, tensor in theirs.items()
    )
    differing = sorted(name for name, tensor in theirs.items() if not torch.equal(ours[name], tensor))
    gap = KNOWN_GAPS.get(case)
    if gap is None:
        assert not differing, f"{case}: {differing} differ by up to {max_difference(ours, theirs):.3g}"
    else:  # "rounding"
        assert differing, f"{case} is now bit-identical to mergekit: remove it from KNOWN_GAPS"
        for name, tensor in theirs.items():
            torch.testing.assert_close(
                ours[name], tensor, rtol=4e-7, atol=1e-8, msg=lambda m, name=name: f"{name}: {m}"
            )
        pytest.xfail(
            f"{case}: {len(differing)} tensors differ from mergekit in the last bits (up to {max_difference(ours, theirs):.3g})"
        )


@pytest.mark.parametrize("case", sorted(RANDOM))
def test_random_methods_agree_with_mergekit_in_distribution(models, tmp_path, case):
    """Per tensor, the share of entries that no model changes and the size of the change agree."""
    config = RANDOM[case].format(**models)
    ours, theirs = run_composer(config, tmp_path / "composer"), run_mergekit(config, tmp_path / "mergekit")
    assert ours.keys() == theirs.keys()
    assert all(ours[name].shape == tensor.shape and ours[name].dtype == tensor.dtype for name, tensor in theirs.items())
    base = load_state(models["base"])
    ours_statistics, theirs_statistics = random_statistics(ours, base), random_statistics(theirs, base)
    assert ours_statistics.keys() == theirs_statistics.keys() and ours_statistics
    for name, (unchanged, norm) in theirs_statistics.items():
        our_unchanged, our_norm = ours_statistics[name]
        assert abs(our_unchanged - unchanged) < 0.03, (name, our_unchanged, unchanged)
        assert our_norm == pytest.approx(norm, rel=0.1), name


def test_a_number_written_without_a_decimal_point(models, tmp_path):
    """PyYAML reads `1e-5` (no ".") as a string; mergekit's pydantic config takes it as the number."""
    config = (
        "merge_method: ram\n" + BASE + weighted(("ft2", ""), ("ft3", "")) + "parameters:\n  epsilon: 1e-5\n" + FLOAT32
    ).format(**models)
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = run_composer(config, tmp_path / "composer")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], tensor) for name, tensor in theirs.items())
