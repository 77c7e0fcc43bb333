"""Every registered merge method run end to end (recipe -> compose -> output folder -> transformers) on
tiny random Llama and Qwen3 models, and a representative set on the real SmolLM2-135M-Instruct.

The method table below must name every method in composer.methods.METHODS: a newly registered method
fails `test_every_registered_method_has_a_case` until it is given a case here.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from composer.compose import compose_text
from composer.evaluate import score_text
from composer.execute import ExecutionOptions
from composer.methods import METHODS
from helpers import ENGLISH_TEXT, load_state, save_fine_tune, save_tiny_model

FAMILIES = ("llama", "qwen3")
PROMPT = torch.tensor([[1, 17, 250, 3, 99, 42, 7, 318, 64, 5, 200, 11]])


@dataclass(frozen=True)
class Case:
    """A recipe by roles: `models` are the non-base inputs ("ft1", "ft2": the family's fine-tunes, or
    "base"), `base` whether base_model is set, `per_model` parameters listed in model order."""

    models: tuple[str, ...]
    base: bool = False
    per_model: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)


TWO = ("ft1", "ft2")
WEIGHTS = {"weight": (0.6, 0.4)}
SPARSE = {"weight": (0.6, 0.4), "density": (0.5, 0.7)}

# A minimal valid parameter set for each method, with both fine-tunes wherever the method takes two.
CASES = {
    "passthrough": Case(("ft1",)),
    "linear": Case(TWO, per_model=WEIGHTS),
    "slerp": Case(("ft1",), base=True, parameters={"t": 0.3}),
    "nuslerp": Case(TWO, per_model=WEIGHTS),
    "multislerp": Case(TWO, per_model=WEIGHTS),
    "karcher": Case(TWO),
    "task_arithmetic": Case(TWO, base=True, per_model=WEIGHTS),
    "ties": Case(TWO, base=True, per_model=SPARSE),
    "dare_linear": Case(TWO, base=True, per_model=SPARSE),
    "dare_ties": Case(TWO, base=True, per_model=SPARSE),
    "breadcrumbs": Case(TWO, base=True, per_model=SPARSE, parameters={"gamma": 0.05}),
    "breadcrumbs_ties": Case(TWO, base=True, per_model=SPARSE, parameters={"gamma": 0.05}),
    "della": Case(TWO, base=True, per_model=SPARSE, parameters={"epsilon": 0.2}),
    "della_linear": Case(TWO, base=True, per_model=SPARSE, parameters={"epsilon": 0.2}),
    "sce": Case(TWO, base=True, parameters={"select_topk": 0.5}),
    "model_stock": Case(TWO, base=True),
    "nearswap": Case(("ft1",), base=True, parameters={"t": 0.01}),
    "arcee_fusion": Case(("ft1",), base=True),
    "ram": Case(TWO, base=True),
    "ramplus_tl": Case(TWO, base=True, parameters={"r": 0.5, "alpha": 0.5}),
    "tsv": Case(TWO, base=True),
    "iso_c": Case(TWO, base=True),
    "iso_cts": Case(TWO, base=True),
    "cart": Case(TWO, base=True),
    "pcb": Case(TWO, base=True),
}

# Methods that need more than models and numbers, calibration text (regmean) or LoRA adapters on one base (knots):
# their end-to-end, invariant and reference tests are in tests/test_calibration_methods.py
TESTED_ELSEWHERE = {"regmean", "regmean_plusplus", "knots"}
ROUTINE = sorted(name for name in METHODS if name not in TESTED_ELSEWHERE)

# Recipes that must reproduce one parent (to a few float32 ulps; most exactly): each method's degenerate case.
ONE_MODEL = {"weight": (1.0,)}
WHOLE = {"weight": (1.0,), "density": (1.0,)}
REDUCES_TO_A_PARENT = {
    "passthrough": (Case(("ft1",)), "ft1"),
    "linear": (Case(TWO, per_model={"weight": (1.0, 0.0)}), "ft1"),
    "slerp": (Case(("ft1",), base=True, parameters={"t": 1.0}), "ft1"),
    "nuslerp": (Case(TWO, per_model={"weight": (1.0, 0.0)}), "ft1"),
    "multislerp": (Case(("ft1",), per_model=ONE_MODEL), "ft1"),
    "karcher": (Case(("ft1",)), "ft1"),
    "task_arithmetic": (Case(("ft1",), base=True, per_model=ONE_MODEL), "ft1"),
    "ties": (Case(("ft1",), base=True, per_model=WHOLE), "ft1"),
    "dare_linear": (Case(("ft1",), base=True, per_model=WHOLE), "ft1"),
    "dare_ties": (Case(("ft1",), base=True, per_model=WHOLE), "ft1"),
    "breadcrumbs": (Case(("ft1",), base=True, per_model=WHOLE, parameters={"gamma": 0.0}), "ft1"),
    "breadcrumbs_ties": (Case(("ft1",), base=True, per_model=WHOLE, parameters={"gamma": 0.0}), "ft1"),
    "della": (Case(("ft1",), base=True, per_model=WHOLE), "ft1"),
    "della_linear": (Case(("ft1",), base=True, per_model=WHOLE), "ft1"),
    "sce": (Case(("ft1",), base=True), "ft1"),
    "model_stock": (Case(("ft1", "ft1"), base=True), "ft1"),  # two equal updates: cos = 1, ratio 1
    "nearswap": (Case(("ft1",), base=True, parameters={"t": 1.0e9}), "ft1"),  # every entry is "near"
    "arcee_fusion": None,  # keeps only outlier changes by design: no setting takes all of the other model
    # one model: every change is unique and kept whole (changes below epsilon count as none)
    "ram": (Case(("ft1",), base=True, parameters={"epsilon": 1e-9}), "ft1"),
    "ramplus_tl": (Case(("ft1",), base=True, parameters={"epsilon": 1e-9}), "ft1"),
    "tsv": (Case(("ft1",), base=True), "ft1"),  # one task keeps its whole rank
    "iso_c": None,  # the spectrum is made flat by design: no setting keeps a model's own
    "iso_cts": None,
    "cart": (Case(("ft1",), base=True), "ft1"),  # the model is its own average
    "pcb": (Case(("ft1",), base=True, per_model={"density": (1.0,)}), "ft1"),
}


def case_of(name: str, table: dict):
    """The table's entry for a registered name, falling back to the method's canonical name (aliases)."""
    return table[name] if name in table else table.get(METHODS[name].name)


def flow(mapping: dict) -> str:
    """`mapping` as a one-line YAML mapping (PyYAML reads JSON's 1e-09 as a string, so not json.dumps)."""
    return yaml.safe_dump(mapping, default_flow_style=True, width=1 << 16).strip()


def recipe(name: str, case: Case, folders: dict[str, Path], out_dtype: str | None = None) -> str:
    lines = [f"merge_method: {name}"]
    if case.base:
        lines.append(f"base_model: {folders['base']}")
    lines.append("models:")
    for i, role in enumerate(case.models):
        lines.append(f"  - model: {folders[role]}")
        own = {key: values[i] for key, values in case.per_model.items()}
        if own:
            lines.append(f"    parameters: {flow(own)}")
    if case.parameters:
        lines.append(f"parameters: {flow(case.parameters)}")
    lines += ["dtype: float32", "random_seed: 7"]
    if out_dtype:
        lines.append(f"out_dtype: {out_dtype}")
    return "\n".join(lines) + "\n"


def load_checked(folder: Path):
    """The output loaded by transformers, asserting that every weight was expected and present."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def logits(model, ids: torch.Tensor = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def assert_state_close(actual: dict, expected: dict, tolerance: float = 1e-6) -> None:
    """Same tensor names, and every tensor equal to a few float32 ulps (the spherical methods' rounding)."""
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(
            actual[name].float(),
            tensor.float(),
            rtol=tolerance,
            atol=tolerance,
            msg=lambda m, name=name: f"{name}: {m}",
        )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """torch on one thread for this module: on a busy machine two OpenMP threads make every op wait
    for both cores (a tiny forward pass took 0.5 s instead of 10 ms, a TIES merge of SmolLM2 97 s
    instead of 14 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- tiny random Llama and Qwen3 -------------------------------------------------------------------


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory) -> dict:
    """base; ft1 (every entry moved), ft2 (60% of entries moved: partly overlapping updates, as RAM
    expects); twin1 and twin2, byte copies of the base in folders of their own."""
    root = tmp_path_factory.mktemp(f"end-to-end-{request.param}")
    base = save_tiny_model(root / "base", request.param, 2, seed=5)
    folders = {
        "base": base,
        "ft1": save_fine_tune(base, root / "ft1", seed=1),
        "ft2": save_fine_tune(base, root / "ft2", seed=2, density=0.6),
        "twin1": shutil.copytree(base, root / "twin1"),
        "twin2": shutil.copytree(base, root / "twin2"),
    }
    states = {role: load_state(folders[role]) for role in ("base", "ft1", "ft2")}
    return folders | {"states": states, "base_logits": logits(load_checked(base))}


def test_every_registered_method_has_a_case():
    missing = sorted(name for name in ROUTINE if case_of(name, CASES) is None)
    assert not missing, f"add a Case for {missing} to CASES in {Path(__file__).name}"
    undecided = sorted(
        name for name in ROUTINE if name not in REDUCES_TO_A_PARENT and METHODS[name].name not in REDUCES_TO_A_PARENT
    )
    assert not undecided, f"add {undecided} to REDUCES_TO_A_PARENT (None where no setting reproduces a parent)"


@pytest.mark.parametrize("name", ROUTINE)
def test_method_end_to_end(family, tmp_path, name):
    """The merge loads with exactly the model's weights, runs with finite logits, and is a new model."""
    states = family["states"]
    compose_text(recipe(name, case_of(name, CASES), family), tmp_path / "out", ExecutionOptions())
    out = load_state(tmp_path / "out")
    assert out.keys() == states["base"].keys()
    assert all(
        out[key].dtype == torch.float32 and out[key].shape == tensor.shape for key, tensor in states["base"].items()
    )
    assert torch.isfinite(logits(load_checked(tmp_path / "out"))).all()
    if METHODS[name].blends:
        for role in ("base", "ft1", "ft2"):
            assert any(not torch.equal(out[key], tensor) for key, tensor in states[role].items()), (
                f"{name} returned {role} unchanged"
            )


@pytest.mark.parametrize("name", ROUTINE)
def test_identical_inputs_return_the_input(family, tmp_path, name):
    """Every input the same model (each in a folder of its own): the output is that model, and so are its logits."""
    twins = {"base": family["base"], "ft1": family["twin1"], "ft2": family["twin2"]}
    compose_text(recipe(name, case_of(name, CASES), twins), tmp_path / "out", ExecutionOptions())
    assert_state_close(load_state(tmp_path / "out"), family["states"]["base"])
    torch.testing.assert_close(logits(load_checked(tmp_path / "out")), family["base_logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ROUTINE)
def test_degenerate_setting_returns_one_parent(family, tmp_path, name):
    """linear with weights (1, 0), slerp at t = 1, TIES/DARE/DELLA at density 1 with one model, ... give that model."""
    entry = case_of(name, REDUCES_TO_A_PARENT)
    if entry is None:
        pytest.skip(f"{name} has no setting that reproduces a parent")
    case, parent = entry
    compose_text(recipe(name, case, family), tmp_path / "out", ExecutionOptions())
    assert_state_close(load_state(tmp_path / "out"), family["states"][parent])


# --- the real SmolLM2-135M-Instruct --------------------------------------------------------------

# Each merge method's own code path at SmolLM2's sizes (a 49152 x 576 tied embedding, grouped-query
# attention). DELLA ranks every row by sorting, the costliest selection here: it gets one fine-tune. At
# density 0.5, dropping half of a task vector and rescaling the rest to its L1 norm adds a perturbation
# about as large as the task vector itself, so at lambda 1 the merge lands beyond its parents by design,
# not by a fault (measured on the text below: DELLA 1.179 bits/byte, DARE at the same density 1.161,
# parents 1.078 to 1.109); lambda 0.5 halves the merged task vector (1.098).
REAL_CASES = {
    name: CASES[name]
    for name in ("linear", "slerp", "nuslerp", "task_arithmetic", "ties", "breadcrumbs", "dare_ties", "model_stock")
}
REAL_CASES["della"] = Case(
    ("ft1",), base=True, per_model={"weight": (1.0,), "density": (0.5,)}, parameters={"epsilon": 0.2, "lambda": 0.5}
)
# Merged with itself: the methods whose identical-input case is numerically delicate at real scale
# (a zero angle for the spherical ones, a 0/0 cosine for Model Stock). For linear and the task-vector
# methods it is plain arithmetic on equal tensors or zero task vectors (up to 20 s of CPU each to
# sparsify at SmolLM2's size); the tiny models' identical-input test covers them.
REAL_SELF_MERGE = ("slerp", "nuslerp", "model_stock")
PROMPT_REAL = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2, 9519, 30]])


def short_english_text() -> str:
    """The first paragraph of the tests' English text."""
    return ENGLISH_TEXT.read_text().strip().split("\n\n")[0]


def low_rank_change(
    state: dict[str, torch.Tensor], seed: int, scale: float = 0.05, rank: int = 8
) -> dict[str, torch.Tensor]:
    """A LoRA-like update: each matrix W gets U V (rank `rank`) with entries of standard deviation
    `scale` * std(W); each vector gets noise of `scale` times its mean magnitude."""
    generator = torch.Generator().manual_seed(seed)
    change = {}
    for name, tensor in state.items():
        tensor = tensor.float()
        if tensor.dim() == 2:
            left = torch.randn(tensor.shape[0], rank, generator=generator)
            right = torch.randn(rank, tensor.shape[1], generator=generator)
            change[name] = (left @ right) * (scale * float(tensor.std()) / math.sqrt(rank))
        else:
            change[name] = torch.randn(tensor.shape, generator=generator) * (scale * float(tensor.abs().mean()))
    return change


def bits_per_byte(folder: Path, text: str) -> float:
    from transformers import AutoTokenizer

    return score_text(load_checked(folder), AutoTokenizer.from_pretrained(str(folder)), text).bits_per_byte


@pytest.fixture(scope="module")
def real_family(smollm2_dir, tmp_path_factory) -> Iterator[dict]:
    """SmolLM2 as the base and two "fine-tunes" of it (different low-rank updates on every tensor),
    with their bits per byte on the short text; twin1 and twin2 are SmolLM2 again, as folders of links."""
    root = tmp_path_factory.mktemp("smollm2-fine-tunes")
    state = load_state(smollm2_dir)
    folders = {
        "base": Path(smollm2_dir),
        "ft1": save_fine_tune(smollm2_dir, root / "ft1", change=low_rank_change(state, seed=1)),
        "ft2": save_fine_tune(smollm2_dir, root / "ft2", change=low_rank_change(state, seed=2)),
    }
    del state
    for twin in ("twin1", "twin2"):
        (root / twin).mkdir()
        for path in Path(smollm2_dir).iterdir():
            (root / twin / path.name).symlink_to(path)
        folders[twin] = root / twin
    text = short_english_text()
    scores = {role: bits_per_byte(folders[role], text) for role in ("base", "ft1", "ft2")}
    yield folders | {"text": text, "scores": scores, "base_logits": logits(load_checked(smollm2_dir), PROMPT_REAL)}
    shutil.rmtree(root)  # 1 GB; pytest would keep it with its last three runs


@pytest.fixture
def scratch(tmp_path):
    """tmp_path, emptied after the test: each SmolLM2 merge writes 270 to 540 MB."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.real_model
def test_real_fine_tunes_are_close_to_smollm2(real_family):
    scores = real_family["scores"]
    assert 0.5 < scores["base"] < 1.5
    assert (
        scores["base"] < scores["ft1"] < scores["base"] + 0.2 and scores["base"] < scores["ft2"] < scores["base"] + 0.2
    )


@pytest.mark.real_model
@pytest.mark.parametrize("name", sorted(REAL_CASES))
def test_real_merge_scores_near_its_parents(real_family, scratch, name):
    """Written in bfloat16: loads with every weight, and its bits per byte lie within 0.05 of the
    parents' range (measured: 1.075 to 1.127 against parents at 1.078, 1.099 and 1.109, on the first
    paragraph of tests/data/english.txt; a broken merge scores several bits per byte)."""
    compose_text(recipe(name, REAL_CASES[name], real_family, out_dtype="bfloat16"), scratch / "out", ExecutionOptions())
    score = bits_per_byte(scratch / "out", real_family["text"])
    parents = real_family["scores"].values()
    assert min(parents) - 0.05 < score < max(parents) + 0.05, (score, real_family["scores"])


@pytest.mark.real_model
@pytest.mark.parametrize("name", REAL_SELF_MERGE)
def test_real_merge_of_smollm2_with_itself_is_smollm2(real_family, scratch, name):
    """Each input SmolLM2 (the non-base ones through folders of links, as a model named twice is the base)."""
    same = {"base": real_family["base"], "ft1": real_family["twin1"], "ft2": real_family["twin2"]}
    compose_text(recipe(name, REAL_CASES[name], same), scratch / "out", ExecutionOptions())
    torch.testing.assert_close(
        logits(load_checked(scratch / "out"), PROMPT_REAL), real_family["base_logits"], rtol=1e-5, atol=1e-4
    )
