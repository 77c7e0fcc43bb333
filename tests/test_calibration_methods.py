"""RegMean, RegMean++ (calibration methods) and KnOTS (LoRA adapters merged in a shared SVD basis), each checked
against an independent reference written here from the papers' formulas in plain torch: the models run whole in
transformers with hooks on their linear layers, the Gram matrices summed and the normal equations solved; the
adapters' updates made dense, concatenated and decomposed by torch.linalg.svd, their coefficients merged by hand.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from composer.compose import compose_file, plan_from_file
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.methods.knots import factored_svd, merged_factors
from composer.methods.regmean import regmean
from helpers import (
    BYTE_LEVEL_SPECIAL,
    byte_level_tokenizer,
    compose_in_process,
    load_state,
    save_fine_tune,
    save_tiny_model,
    tiny_model_with_tokenizer,
)

# about 130 tokens: one calibration window for the tiny models (their context is 256 tokens)
CALIBRATION = (
    "The small town sits at the bend of a slow river, where the old bridge carries trucks every morning.\n"
    "def main():\n    return 42\n\nprint(main())  # the answer\n"
    "A pequena cidade fica à beira de um rio largo e tranquilo, onde os pescadores saem de barco.\n"
)
ALPHA = 0.9
OPTIONS = dict(progress=False)


def write_recipe(folder: Path, text: str, name: str = "recipe.yml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def compose(recipe: Path, out: Path, **keywords) -> Path:
    compose_file(recipe, out, ExecutionOptions(**OPTIONS), **keywords)
    return out


# --- RegMean and RegMean++ ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer llama with a tokenizer and two fine-tunes of it (every tensor moved, embeddings and norms too), and
    the calibration text beside them."""
    root = tmp_path_factory.mktemp("regmean")
    base = tiny_model_with_tokenizer(root / "base", byte_level_tokenizer(300), BYTE_LEVEL_SPECIAL, seed=1, layers=2)
    save_fine_tune(base, root / "one", seed=2, scale=0.05)
    save_fine_tune(base, root / "two", seed=3, scale=0.05)
    (root / "calibration.txt").write_text(CALIBRATION)
    return root


def calibration_ids(folder: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer(CALIBRATION, return_tensors="pt", add_special_tokens=True)["input_ids"]
    assert 10 < ids.shape[1] < 256  # one window: the reference runs the whole text at once
    return ids


def run_with_hooks(folder: Path, state: dict[str, torch.Tensor], ids: torch.Tensor, layer: int) -> dict:
    """The model of `folder`'s config holding `state`, run over `ids`: X^T X of the inputs of each nn.Linear in
    decoder layer `layer` (float64), by weight name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder))).eval()
    model.load_state_dict(state, strict=False)
    grams, hooks = {}, []
    for name, module in model.model.layers[layer].named_modules():
        if isinstance(module, torch.nn.Linear):

            def hook(module, arguments, output, name=f"model.layers.{layer}.{name}.weight"):
                inputs = arguments[0].reshape(-1, arguments[0].shape[-1]).double()
                grams[name] = inputs.T @ inputs

            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(ids)
    return grams


def reference_regmean(folders: list[Path], plusplus: bool, layers: int = 2) -> dict[str, torch.Tensor]:
    """RegMean from the formula: W^T = (sum G~_i)^-1 sum G~_i W_i^T per linear weight, the rest averaged. Model i's
    Gram matrices at layer l are taken with model i's own weights everywhere (RegMean), or with the merged
    embeddings and merged layers 0..l-1 in front of its layer l (RegMean++): the only difference between the two."""
    states = [load_state(folder) for folder in folders]
    ids = calibration_ids(folders[0])
    merged = {name: sum(state[name] for state in states) / len(states) for name in states[0]}
    for layer in range(layers):
        grams = []
        for state in states:
            inputs_from = dict(state)
            if plusplus:  # what lies before layer `layer` is the merged model's
                inputs_from.update(
                    {
                        name: value
                        for name, value in merged.items()
                        if name.startswith("model.embed_tokens")
                        or any(name.startswith(f"model.layers.{earlier}.") for earlier in range(layer))
                    }
                )
            grams.append(run_with_hooks(folders[0], inputs_from, ids, layer))
        for name in grams[0]:
            scaled = [ALPHA * g[name] + (1 - ALPHA) * torch.diag(torch.diag(g[name])) for g in grams]
            total = sum(scaled)
            right = sum(g @ state[name].double().T for g, state in zip(scaled, states))
            merged[name] = torch.linalg.solve(total, right).T.float()
    return merged


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


REGMEAN_RECIPE = """merge_method: {method}
models:
  - model: one
  - model: two
calibration_text: calibration.txt
"""


@pytest.fixture(scope="module")
def merged(tiny):
    return {
        method: load_state(
            compose(write_recipe(tiny, REGMEAN_RECIPE.format(method=method), f"{method}.yml"), tiny / method)
        )
        for method in ("regmean", "regmean_plusplus")
    }


@pytest.mark.parametrize("method", ["regmean", "regmean_plusplus"])
def test_regmean_matches_the_reference(tiny, merged, method):
    reference = reference_regmean([tiny / "one", tiny / "two"], plusplus=method == "regmean_plusplus")
    out = merged[method]
    assert set(out) == set(reference)
    linear = [name for name in out if name.endswith("proj.weight")]
    assert len(linear) == 14
    for name in out:
        assert relative_error(out[name], reference[name]) < 1e-4, name


def test_regmean_plusplus_differs_from_regmean_only_where_its_inputs_do(tiny, merged):
    """The two share every tensor outside the linear layers (the fallback's mean); their linear layers differ, and
    feeding RegMean++'s inputs to the plain formula gives RegMean++."""
    regular, plus = merged["regmean"], merged["regmean_plusplus"]
    for name in regular:
        if name.endswith("proj.weight"):
            assert relative_error(plus[name], regular[name]) > 1e-3, name
        else:
            assert torch.equal(plus[name], regular[name]), name
    # layer 1 of RegMean++ from the pure function, with Gram matrices taken behind RegMean++'s own layer 0
    states = [load_state(tiny / folder) for folder in ("one", "two")]
    ids = calibration_ids(tiny / "one")
    front = {name: value for name, value in plus.items() if not name.startswith("model.layers.1.")}
    grams = [run_with_hooks(tiny / "one", state | front, ids, 1) for state in states]
    name = "model.layers.1.mlp.down_proj.weight"
    solved = regmean([state[name] for state in states], [g[name].float() for g in grams], ALPHA)
    assert relative_error(plus[name], solved) < 1e-4


@pytest.mark.parametrize(
    "method, models",
    [("regmean", ["one", "one_again"]), ("regmean_plusplus", ["one", "one_again"]), ("regmean", ["one"])],
    ids=["regmean-identical", "plusplus-identical", "regmean-one-model"],
)
def test_identical_models_or_one_model_give_that_model(tiny, method, models, tmp_path):
    if not (tiny / "one_again").exists():
        shutil.copytree(tiny / "one", tiny / "one_again")
    listed = "".join(f"  - model: {model}\n" for model in models)
    recipe = f"merge_method: {method}\nmodels:\n{listed}calibration_text: calibration.txt\n"
    out = load_state(compose(write_recipe(tiny, recipe, f"same-{method}.yml"), tmp_path / "out"))
    one = load_state(tiny / "one")
    for name, value in out.items():
        assert relative_error(value, one[name]) < 1e-4, name


def test_regmean_output_loads_and_runs(tiny, merged):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny / "regmean_plusplus"), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(calibration_ids(tiny / "one")).logits
    assert torch.isfinite(logits).all()
    card = (tiny / "regmean_plusplus" / "README.md").read_text()
    assert "regmean_plusplus" in card and "calibration_text" in card


def test_fallback_and_base_model(tiny, tmp_path):
    """A base model is the fallback's base, never one of the models RegMean solves for; the fallback's own
    parameters come from the recipe."""
    recipe = (
        "merge_method: regmean\nbase_model: base\nmodels:\n  - model: one\n  - model: two\n"
        "parameters:\n  fallback: task_arithmetic\n  lambda: 0.5\ncalibration_text: calibration.txt\n"
    )
    out = load_state(compose(write_recipe(tiny, recipe, "fallback.yml"), tmp_path / "out"))
    base, one, two = (load_state(tiny / folder) for folder in ("base", "one", "two"))
    norm = "model.layers.0.input_layernorm.weight"
    expected = base[norm] + 0.5 * ((one[norm] - base[norm]) + (two[norm] - base[norm]))
    assert torch.allclose(out[norm], expected, atol=1e-6)
    linear = "model.layers.0.self_attn.q_proj.weight"
    assert relative_error(out[linear], load_state(tiny / "regmean")[linear]) < 1e-4


def test_plan_shows_the_calibration_chain(tiny):
    _, plan = plan_from_file(write_recipe(tiny, REGMEAN_RECIPE.format(method="regmean"), "shown.yml"))
    try:
        steps = [t for t in plan.tensors if t.operation.chain is not None]
        assert len(steps) == 14 and plan.calibration is None  # attached
        first = next(t for t in steps if t.name == "model.layers.0.self_attn.q_proj.weight")
        assert first.operation.working_bytes > 0 and first.operation.chain.state_bytes > 0
        assert {ref.name for ref in first.inputs} >= {
            "model.embed_tokens.weight",
            "model.layers.0.mlp.down_proj.weight",
        }
    finally:
        plan.close()


# --- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe, message",
    [
        (
            REGMEAN_RECIPE.format(method="regmean").replace("calibration_text: calibration.txt\n", ""),
            "calibration_text",
        ),
        (
            REGMEAN_RECIPE.format(method="ties").replace("models:", "base_model: base\nmodels:"),
            "reads no calibration text",
        ),
        (REGMEAN_RECIPE.format(method="regmean").replace("calibration.txt", "missing.txt"), "does not exist"),
        (REGMEAN_RECIPE.format(method="regmean") + "parameters:\n  fallback: regmean_plusplus\n", "fallback"),
        (REGMEAN_RECIPE.format(method="regmean") + "parameters:\n  fallback: task_arithmetic\n", "base_model"),
        (REGMEAN_RECIPE.format(method="regmean") + "tokenizer_source: union\n", "one vocabulary"),
        (
            "stages:\n  - name: first\n"
            + "".join("    " + line + "\n" for line in REGMEAN_RECIPE.format(method="regmean").splitlines())
            + "merge_method: linear\nmodels:\n  - model: first\n    parameters: {weight: 1}\n",
            "staged recipe",
        ),
    ],
    ids=["no-text", "text-for-ties", "missing-file", "bad-fallback", "fallback-needs-base", "vocabulary", "stage"],
)
def test_calibration_recipes_refused_before_any_work(tiny, recipe, message):
    path = write_recipe(tiny, recipe, "bad.yml")
    with pytest.raises(ComposerError, match=message):
        plan_from_file(path)
    assert not (tiny / "bad").exists()


def test_missing_calibration_text_on_the_command_line(tiny, monkeypatch, capsys):
    path = write_recipe(tiny, REGMEAN_RECIPE.format(method="regmean_plusplus").split("calibration_text")[0], "cli.yml")
    assert compose_in_process(monkeypatch, path, tiny / "cli-out") == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "calibration_text" in error and "Traceback" not in error
    assert not (tiny / "cli-out").exists()


# --- KnOTS -----------------------------------------------------------------------------------------------------


def lora_adapter(base: Path, out: Path, seed: int, **settings) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
        LoraConfig(init_lora_weights=False, **settings),
    )
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A 2-layer llama and two adapters of it: different ranks, scalings and target modules."""
    root = tmp_path_factory.mktemp("knots")
    base = save_tiny_model(root / "base", layers=2)
    lora_adapter(base, root / "first", 1, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    lora_adapter(base, root / "second", 2, r=3, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "o_proj"])
    return root


def dense_update(adapter: Path, module: str) -> torch.Tensor | None:
    """scaling * B @ A of `module` in a PEFT adapter folder, or None when the adapter leaves it alone."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    state = load_state(adapter)
    key = f"base_model.model.{module}.lora_A.weight"
    if key not in state:
        return None
    rank = config["r"]
    scaling = config["lora_alpha"] / (rank**0.5 if config.get("use_rslora") else rank)
    return scaling * state[key.replace("lora_A", "lora_B")] @ state[key]


def reference_knots(base: torch.Tensor, updates: list[torch.Tensor], merge: str, density: float, lambda_: float):
    """KnOTS from the paper: SVD of the updates side by side, coefficient matrices S V_i^T, merged by TIES (keep the
    largest share `density` of each by magnitude, elect each entry's sign by the sum, average the agreeing entries)
    or by their mean, then base + lambda U merged."""
    concatenated = torch.cat([update.double() for update in updates], dim=1)
    u, s, vh = torch.linalg.svd(concatenated, full_matrices=False)
    kept = s > 1e-5 * s[0]
    u, s, vh = u[:, kept], s[kept], vh[kept]
    width = updates[0].shape[1]
    coefficients = torch.stack([s[:, None] * vh[:, i * width : (i + 1) * width] for i in range(len(updates))])
    # an adapter that leaves the tensor alone has a zero coefficient matrix; the SVD leaves it rounding noise
    coefficients[coefficients.abs() < 1e-10 * coefficients.abs().max()] = 0
    if merge == "ties":
        flat = coefficients.reshape(len(updates), -1)
        keep = int(density * flat.shape[1])
        trimmed = torch.zeros_like(flat)
        for i in range(len(updates)):
            top = flat[i].abs().topk(keep).indices
            trimmed[i, top] = flat[i, top]
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
        merged = merged.reshape(coefficients.shape[1:])
    else:
        merged = coefficients.mean(0)
    return (base.double() + lambda_ * u @ merged).float()


KNOTS_RECIPE = (
    "merge_method: knots\nmodels:\n  - model: base+first\n  - model: base+second\nparameters: {{{parameters}}}\n"
)


@pytest.mark.parametrize(
    "merge, density, lambda_", [("ties", 1.0, 1.0), ("ties", 0.4, 0.7), ("linear", 1.0, 1.5)], ids=str
)
def test_knots_matches_the_reference(adapters, tmp_path, merge, density, lambda_):
    recipe = KNOTS_RECIPE.format(parameters=f"merge: {merge}, density: {density}, lambda: {lambda_}")
    out = load_state(compose(write_recipe(adapters, recipe, f"knots-{merge}-{density}.yml"), tmp_path / "out"))
    base = load_state(adapters / "base")
    changed = 0
    for name, value in out.items():
        module = name.removesuffix(".weight")
        updates = [dense_update(adapters / which, module) for which in ("first", "second")]
        if all(update is None for update in updates):
            assert torch.equal(value, base[name]), name  # no adapter touches it: the base's bytes
            continue
        updates = [torch.zeros_like(base[name]) if update is None else update for update in updates]
        expected = reference_knots(base[name], updates, merge, density, lambda_)
        assert relative_error(value - base[name], expected - base[name]) < 1e-4, name
        changed += 1
    assert changed == 8  # q, v, o and down in both layers


def test_factored_svd_against_the_exact_svd():
    generator = torch.Generator().manual_seed(0)
    lefts = [torch.randn(48, rank, generator=generator) for rank in (4, 6, 3)]
    rights = [torch.randn(rank, 40, generator=generator) for rank in (4, 6, 3)]
    u, s, vh = factored_svd(lefts, rights)
    dense = torch.cat([left.double() @ right.double() for left, right in zip(lefts, rights)], dim=1)
    exact = torch.linalg.svdvals(dense)
    assert u.shape == (48, 13) and vh.shape == (13, 120)
    assert torch.allclose(s, exact[:13], rtol=1e-10, atol=1e-10)
    assert (dense - (u * s) @ vh).abs().max() < 1e-10 * dense.abs().max()
    assert exact[13:].max() < 1e-10 * exact[0]  # the rest of the exact spectrum is rounding
    b, a = merged_factors(lefts, rights, [1.0, 1.0, 1.0], "linear", rank=5)
    assert b.shape == (48, 5) and a.shape == (5, 40)


def test_knots_as_lora_writes_the_merged_adapter(adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(adapters, KNOTS_RECIPE.format(parameters="density: 0.5"), "as-lora.yml")
    full = load_state(compose(recipe, tmp_path / "full"))
    compose(recipe, tmp_path / "adapter", as_lora=True)
    assert {path.name for path in (tmp_path / "adapter").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(adapters / "base"), dtype=torch.float32), str(tmp_path / "adapter")
    ).merge_and_unload()
    state = model.state_dict()
    for name, value in full.items():
        assert torch.allclose(state[name], value, atol=1e-5), name
    merged_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full"), dtype=torch.float32).eval()
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        logits = merged_model(ids).logits
        assert torch.isfinite(logits).all()
        assert torch.allclose(model(ids).logits, logits, atol=1e-4)  # the merged adapter on its base is the merge


def test_knots_refusals(adapters, tmp_path, monkeypatch, capsys):
    other = save_tiny_model(tmp_path / "other", layers=2, seed=5)
    lora_adapter(other, tmp_path / "on-other", 3, r=2, lora_alpha=2, target_modules=["q_proj"])
    cases = [
        ("merge_method: knots\nmodels:\n  - model: base+first\n  - model: base\n", "not a BASE\\+ADAPTER"),
        (
            f"merge_method: knots\nmodels:\n  - model: base+first\n  - model: {other}+{tmp_path / 'on-other'}\n",
            "different bases",
        ),
        (KNOTS_RECIPE.format(parameters="rank: 6"), "rank 6 is larger than the matrix"),
        (KNOTS_RECIPE.format(parameters="merge: slerp"), "merge must be one of"),
    ]
    for text, message in cases:
        with pytest.raises(ComposerError, match=message):
            plan_from_file(write_recipe(adapters, text, "refused.yml"))
    # --as-lora of a merge that is not KnOTS
    linear = write_recipe(
        adapters, "merge_method: linear\nmodels:\n  - model: base\n    parameters: {weight: 1}\n", "linear.yml"
    )
    assert compose_in_process(monkeypatch, linear, tmp_path / "lora", "--as-lora") == 2
    assert "--as-lora writes the merged adapter of a knots merge" in capsys.readouterr().err
    assert not (tmp_path / "lora").exists()
