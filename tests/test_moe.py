"""Mixtures of experts from dense models, on tiny random models: each output architecture loads with no missing or
unexpected keys and, when every expert is the same model, computes exactly the dense model; tensors land where
transformers reads them; router rows follow their definitions; bad recipes fail before any work."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from test_cli import tiny_tokenizer

from composer.compose import compose_moe_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.moe import gates as G
from composer.moe.compute import DegenerateGatesWarning
from composer.moe.plan import build_moe_plan
from composer.moe.schema import is_moe_recipe, parse_moe_config
from helpers import DATA, load_state, logits_of, save_tiny_model

OPTIONS = ExecutionOptions(progress=False)
MODES = ["hidden", "cheap_embed", "random", "uniform_random"]
PROMPTS = [
    ["the quick brown fox", "a fox jumps over the fence"],
    ["the lazy dog sleeps", "dogs bark at the moon"],
    ["one two three four", "five six seven"],
]


# a dense DeepSeek-V3 (multi-head latent attention, every layer's MLP dense): what a DeepSeek-V3 MoE is built from
DENSE_DEEPSEEK = dict(
    first_k_dense_replace=3,
    num_key_value_heads=4,
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    head_dim=8,
    v_head_dim=16,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-models")
    made = {}
    for name, family, seed, overrides in [
        ("llama", "llama", 0, {}),
        ("llama-b", "llama", 1, {}),
        ("mistral", "mistral", 0, {}),
        ("qwen2", "qwen2", 0, {}),
        ("qwen3", "qwen3", 0, {}),
        ("narrow", "llama", 0, dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1)),
        ("deepseek_v3", "deepseek_v3", 0, DENSE_DEEPSEEK),
        ("deepseek_v3-b", "deepseek_v3", 1, DENSE_DEEPSEEK),
    ]:
        made[name] = save_tiny_model(root / name, family, layers=3, seed=seed, **overrides)
        tiny_tokenizer(made[name])
    # a DeepSeek-V3 whose last two layers are MoE layers (only its config is read: it is refused as an expert)
    moe = made["deepseek_v3-moe"] = Path(shutil.copytree(made["deepseek_v3"], root / "deepseek_v3-moe"))
    config = json.loads((moe / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps(config | {"first_k_dense_replace": 1}))
    return made


def moe_text(
    base: Path, experts: list[Path], mode: str = "hidden", per_token: int = 2, extra: str = "", prompts=PROMPTS
) -> str:
    lines = [
        f"base_model: {base}",
        f"gate_mode: {mode}",
        f"experts_per_token: {per_token}",
        extra.rstrip("\n"),
        "experts:",
    ]
    for expert, expert_prompts in zip(experts, prompts):
        lines += [f"  - source_model: {expert}", f"    positive_prompts: {json.dumps(expert_prompts)}"]
    return "\n".join(line for line in lines if line) + "\n"


def shared_expert(model: Path, prompts: list[str] | None = None) -> str:
    """A recipe's `shared_experts:` entry."""
    entry = f"shared_experts:\n  - source_model: {model}\n"
    return entry + (f"    positive_prompts: {json.dumps(prompts)}\n" if prompts else "")


def loaded(folder: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    problems = {key: value for key, value in info.items() if value}
    assert not problems, f"loading {folder} reported {problems}"
    return model.eval()


CASES = [
    (family, output, mode)
    for family, output in [
        ("llama", "MixtralForCausalLM"),
        ("qwen2", "Qwen2MoeForCausalLM"),
        ("qwen3", "Qwen3MoeForCausalLM"),
    ]
    for mode in MODES
]
CASES += [
    ("mistral", "MixtralForCausalLM", "hidden"),
    ("llama-qwen", "Qwen2MoeForCausalLM", "hidden"),
    ("deepseek_v3", "DeepseekV3ForCausalLM", "hidden"),
    ("deepseek_v3", "DeepseekV3ForCausalLM", "uniform_random"),
    ("deepseek_v3-shared", "DeepseekV3ForCausalLM", "random"),
]


@pytest.mark.parametrize("family,output,mode", CASES, ids=[f"{f}-{m}" for f, _, m in CASES])
def test_identical_experts_give_the_dense_logits(models, tmp_path, family, output, mode):
    """Composer's fixed split of the MLP between the shared expert and the routed ones (`shared_expert_weight`, and
    the default where no shared expert is named) keeps the dense model's function."""
    dense = models[{"llama-qwen": "llama", "deepseek_v3-shared": "deepseek_v3"}.get(family, family)]
    extra = {
        "llama-qwen": "architecture: qwen\nshared_expert_weight: 0.5\n" + shared_expert(dense),
        "deepseek_v3-shared": "shared_expert_weight: 0.25\n" + shared_expert(dense),
    }.get(family, "")
    compose_moe_text(moe_text(dense, [dense] * 3, mode, per_token=2, extra=extra), tmp_path / "moe", OPTIONS)
    model = loaded(tmp_path / "moe")
    assert type(model).__name__ == output
    assert model.config.num_experts_per_tok == 2
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits_of(dense, ids), atol=2e-5, rtol=1e-5)


def test_tensors_land_where_transformers_reads_them(models, tmp_path):
    """Expert j's MLP in slot j (gate and up fused by transformers on load), attention and norms from the base,
    the router rows the plan computes, residual_scale on the down projection, seeded noise."""
    base, other = models["llama"], models["llama-b"]
    text = moe_text(base, [base, other], per_token=1, prompts=PROMPTS[:2])
    text = text.replace(f"  - source_model: {other}\n", f"  - source_model: {other}\n    residual_scale: 0.5\n")
    plan = build_moe_plan(parse_moe_config(text), text)
    routers = {t.name: t.operation.fn([]) for t in plan.tensors if t.operation.label == "router gate"}
    plan.close()
    compose_moe_text(text, tmp_path / "moe", OPTIONS)
    model = loaded(tmp_path / "moe")
    dense = [load_state(base), load_state(other)]
    for i, layer in enumerate(model.model.layers):
        for j, state in enumerate(dense):
            gate_up = torch.cat(
                [state[f"model.layers.{i}.mlp.gate_proj.weight"], state[f"model.layers.{i}.mlp.up_proj.weight"]]
            )
            torch.testing.assert_close(layer.mlp.experts.gate_up_proj[j], gate_up, rtol=0, atol=0)
            scale = 0.5 if j == 1 else 1.0
            torch.testing.assert_close(
                layer.mlp.experts.down_proj[j], state[f"model.layers.{i}.mlp.down_proj.weight"] * scale, rtol=0, atol=0
            )
        torch.testing.assert_close(
            layer.self_attn.q_proj.weight, dense[0][f"model.layers.{i}.self_attn.q_proj.weight"], rtol=0, atol=0
        )
        router = next(rows for name, rows in routers.items() if f"layers.{i}." in name)
        torch.testing.assert_close(layer.mlp.gate.weight, router.float(), rtol=0, atol=0)
    noisy = text.replace("    residual_scale: 0.5\n", "    noise_scale: 0.01\n")
    compose_moe_text(noisy, tmp_path / "noisy", OPTIONS)
    compose_moe_text(noisy, tmp_path / "noisy-again", OPTIONS)
    first, again = load_state(tmp_path / "noisy"), load_state(tmp_path / "noisy-again")
    name = next(n for n in first if n.endswith("experts.1.w2.weight"))
    difference = first[name] - dense[1][name.replace("block_sparse_moe.experts.1.w2", "mlp.down_proj")]
    assert 0.005 < difference.std().item() < 0.015  # N(0, 0.01^2) noise
    assert torch.equal(first[name], again[name])  # seeded by the tensor's name


def test_qwen2_moe_splits_the_mlp_between_shared_and_routed_experts(models, tmp_path):
    base, shared = models["qwen2"], save_tiny_model(tmp_path / "shared", "qwen2", layers=3, seed=5)
    text = moe_text(
        base,
        [base, base],
        per_token=1,
        prompts=PROMPTS[:2],
        extra="shared_expert_weight: 0.25\n" + shared_expert(shared),
    )
    compose_moe_text(text, tmp_path / "moe", OPTIONS)
    model, routed, common = loaded(tmp_path / "moe"), load_state(base), load_state(shared)
    for i, layer in enumerate(model.model.layers):
        down = f"model.layers.{i}.mlp.down_proj.weight"
        # sigmoid(0) = 1/2 on the shared expert: its down projection is doubled to give weight 0.25 after the gate
        torch.testing.assert_close(layer.mlp.shared_expert.down_proj.weight, common[down] * 0.5, rtol=0, atol=1e-7)
        torch.testing.assert_close(layer.mlp.experts.down_proj[0], routed[down] * 0.75, rtol=0, atol=1e-7)
        assert not layer.mlp.shared_expert_gate.weight.any()
    assert model.config.norm_topk_prob and model.config.qkv_bias


def norm_outputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the post-attention norm output [tokens, hidden] of `model` run on one unpadded row of `ids`."""
    captured = []
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: captured.append(out[0]))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return captured


def router_inputs_of(folder: Path, prompts: list[str]) -> list[torch.Tensor]:
    """Per layer, the post-attention norm output of the dense model at `folder`, over every token of `prompts`
    (each run alone, unpadded), pooled by the mean per prompt and averaged over the prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    runs = [norm_outputs(model, torch.tensor([tokenizer(prompt)["input_ids"]])) for prompt in prompts]
    return [sum(run[layer].double().mean(0) for run in runs) / len(runs) for layer in range(len(runs[0]))]


def test_a_mergekit_qwen2_moe_config_gets_mergekit_shared_expert(tmp_path):
    """tests/data/mergekit_moe/qwen2_moe_shared_experts.yml, a mergekit-moe config with a shared expert: the routed
    experts are copied at full scale, the shared expert is scaled only by its residual_scale, and each layer's
    shared_expert_gate is the normalised average router input of the shared expert's prompts (mergekit's rule)."""
    import shutil

    import yaml

    from composer.compose import compose_file

    recipe = tmp_path / "moe.yml"
    shutil.copy(DATA / "mergekit_moe" / "qwen2_moe_shared_experts.yml", recipe)
    config = yaml.safe_load(recipe.read_text())
    for seed, name in enumerate(("qwen2-instruct", "qwen2-math", "qwen2-coder")):
        tiny_tokenizer(save_tiny_model(tmp_path / name, "qwen2", layers=3, seed=seed))
    compose_file(recipe, tmp_path / "out", OPTIONS)
    assert type(loaded(tmp_path / "out")).__name__ == "Qwen2MoeForCausalLM"
    out = load_state(tmp_path / "out")
    shared = config["shared_experts"][0]
    expected_gates = router_inputs_of(tmp_path / "qwen2-instruct", shared["positive_prompts"])
    for layer in range(3):
        down = f"model.layers.{layer}.mlp.down_proj.weight"
        for e, expert in enumerate(config["experts"]):
            source = load_state(tmp_path / expert["source_model"])[down]
            assert torch.equal(out[f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight"], source.bfloat16())
        source = load_state(tmp_path / shared["source_model"])[down]
        torch.testing.assert_close(
            out[f"model.layers.{layer}.mlp.shared_expert.down_proj.weight"], (source * 0.1).bfloat16(), rtol=0, atol=0
        )
        gate = out[f"model.layers.{layer}.mlp.shared_expert_gate.weight"]
        expected = (expected_gates[layer] / expected_gates[layer].norm()).float().unsqueeze(0)
        torch.testing.assert_close(gate.float(), expected, rtol=0, atol=2e-3)  # bfloat16 rounding of a unit row


def test_a_shared_gate_runs_right_after_its_layers_router(models):
    """The shared expert's gate row is made by its layer's router step, so it is the next step of the gates' chain."""
    from composer.plan.schedule import make_schedule

    dense = models["qwen2"]
    text = moe_text(dense, [dense, dense], prompts=PROMPTS[:2], extra=shared_expert(dense, ["a helpful answer"]))
    plan = build_moe_plan(parse_moe_config(text), text)
    order = make_schedule(plan).order
    plan.close()
    chain = next(t.operation.chain for t in order if t.operation.chain is not None)
    steps = [t for t in order if t.operation.chain is chain]
    assert [t.operation.link for t in steps] == list(range(6))
    assert [t.name.split(".", 4)[-1] for t in steps] == ["gate.weight", "shared_expert_gate.weight"] * 3


def test_a_deepseek_v3_moe_has_shared_and_routed_experts_at_full_scale(models, tmp_path):
    """DeepSeek-V3 from dense DeepSeek-V3 models: a named shared expert is added to every token at full scale,
    beside routed experts at full scale (mergekit's semantics); the router has no score correction, one expert group
    and top-k weights that sum to one."""
    base, other = models["deepseek_v3"], models["deepseek_v3-b"]
    text = moe_text(base, [base, other], "random", per_token=1, extra=shared_expert(other))
    compose_moe_text(text, tmp_path / "moe", OPTIONS)
    model, out = loaded(tmp_path / "moe"), load_state(tmp_path / "moe")
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    config = model.config
    assert (config.n_routed_experts, config.n_shared_experts, config.first_k_dense_replace) == (2, 1, 0)
    assert (config.routed_scaling_factor, config.n_group, config.topk_group, config.norm_topk_prob) == (1.0, 1, 1, True)
    first, second = load_state(base), load_state(other)
    for layer in range(3):
        down = f"model.layers.{layer}.mlp.down_proj.weight"
        prefix = f"model.layers.{layer}.mlp."
        assert torch.equal(out[prefix + "experts.0.down_proj.weight"], first[down])
        assert torch.equal(out[prefix + "experts.1.down_proj.weight"], second[down])
        assert torch.equal(out[prefix + "shared_experts.down_proj.weight"], second[down])
        assert not out[prefix + "gate.e_score_correction_bias"].any()
        kv = f"model.layers.{layer}.self_attn.kv_b_proj.weight"
        assert torch.equal(out[kv], first[kv])


def test_the_in_memory_fused_layout_loads_too(models, tmp_path, monkeypatch):
    """Were transformers to save experts stacked (as it holds them), the plan follows its names."""
    import composer.moe.plan as moe_plan
    from composer.architecture import build_meta_model

    def fused_names(config):
        model = build_meta_model(config)
        return [name for name in model.state_dict() if name != "lm_head.weight" or not model.config.tie_word_embeddings]

    monkeypatch.setattr(moe_plan, "checkpoint_names", fused_names)
    monkeypatch.setattr(
        moe_plan, "remembered", lambda kind, question, answer: answer()
    )  # another transformers: asked afresh
    dense = models["qwen3"]
    compose_moe_text(moe_text(dense, [dense] * 3, "random"), tmp_path / "moe", OPTIONS)
    assert any(name.endswith("mlp.experts.gate_up_proj") for name in load_state(tmp_path / "moe"))
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tmp_path / "moe")(ids).logits, logits_of(dense, ids), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_router_inputs_are_the_post_attention_norm_outputs_with_padding_masked(models, family):
    from transformers import AutoModelForCausalLM

    from composer.moe.hidden import PromptBatch, router_inputs
    from composer.sources import open_source

    source = open_source(str(models[family]))
    lengths = [9, 4, 2, 7]
    mask = torch.arange(9).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    ids = torch.randint(1, 300, (4, 9), generator=torch.Generator().manual_seed(0)) * mask
    got = dict(router_inputs(source, source.config(), PromptBatch(ids, mask), "model.layers.{i}."))
    model = AutoModelForCausalLM.from_pretrained(str(models[family]), dtype=torch.float32).eval()
    for p, length in enumerate(lengths):
        for layer, expected in enumerate(norm_outputs(model, ids[p : p + 1, :length])):  # alone, unpadded
            torch.testing.assert_close(got[layer][p, :length], expected, atol=1e-5, rtol=1e-5)


# --- router rows ----------------------------------------------------------------------------------------


def synthetic_statistics(seed: int = 0):
    """Two kinds of tokens that share a large common part (dimension 0), differ a little in a quiet dimension (1)
    and more in a very noisy one (2): averaged rows lean on the noisy difference, the discriminant on the quiet one."""
    generator = torch.Generator().manual_seed(seed)
    hidden, count = 8, 400
    tokens = []
    for sign in (1, -1):
        x = torch.randn(count, hidden, generator=generator, dtype=torch.float64) * 0.2
        x[:, 0] += 10.0
        x[:, 1] += sign * 1.0
        x[:, 2] = x[:, 2] * 30.0 + sign * 2.0
        tokens.append(x)
    states = torch.cat(tokens).unsqueeze(1)  # each token its own one-token prompt
    mask = torch.ones(2 * count, 1, dtype=torch.bool)
    positives = [list(range(count)), list(range(count, 2 * count))]
    return G.statistics(states, mask, positives, [[], []], "mean"), tokens


def test_discriminant_rows_separate_what_averaged_rows_confuse():
    stats, _ = synthetic_statistics()
    held_out = synthetic_statistics(seed=1)[1]
    average = G.routing_shares(G.average_rows(stats), held_out).diagonal()
    discriminant = G.routing_shares(G.discriminant_rows(stats), held_out).diagonal()
    assert discriminant.min() > 0.97
    assert average.max() < 0.75


def test_row_definitions():
    stats, _ = synthetic_statistics()
    means = stats.positive_means
    torch.testing.assert_close(G.average_rows(stats), means / means.norm(dim=-1, keepdim=True))  # mergekit's rows
    rows = G.discriminant_rows(stats)
    torch.testing.assert_close(rows[0], -rows[1])  # centred: only the difference between experts matters
    assert rows.norm(dim=-1).mean().item() == pytest.approx(1.0)
    distances = G.separations(stats)
    assert distances[0, 0] == 0 and distances[0, 1] == distances[1, 0] > 2
    # negatives: the expert is pushed away from its negative prompts' own part
    stats.negative_means[0] = means[1]
    stats.has_negatives[0] = True
    targets = G.expert_targets(stats)
    torch.testing.assert_close(targets[0], means[0] - (means[1] - means.mean(0)))
    torch.testing.assert_close(targets[1], means[1])


def test_pooling_masks_padding():
    states = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(G.pooled(states, mask, "mean"), torch.tensor([[1.0, 2.0], [6.0, 7.0]]))
    torch.testing.assert_close(G.pooled(states, mask, "last"), torch.tensor([[2.0, 3.0], [6.0, 7.0]]))


def test_degenerate_pairs_are_found():
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.99, 0.05], [-1.0, -2.0, 0.0]])
    assert [(e, f) for e, f, _ in G.collinear_pairs(rows)] == [(1, 2)]
    distances = torch.tensor([[0.0, 0.5, 3.0], [0.5, 0.0, 4.0], [3.0, 4.0, 0.0]])
    assert G.close_pairs(distances) == [(0, 1, pytest.approx(0.4013, abs=1e-4))]  # Phi(-0.25)
    assert G.layer_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"


def test_degenerate_gates_warn_naming_the_experts(models, tmp_path):
    dense = models["llama"]
    prompts = [["the quick brown fox"], ["the quick brown fox", "the quick brown fox"], ["the lazy dog"]]
    text = moe_text(dense, [dense] * 3, prompts=prompts).replace(
        "  - source_model", "  - name: kind{}\n    source_model", 3
    )
    text = text.replace("kind{}", "fox", 1).replace("kind{}", "fox-again", 1).replace("kind{}", "dog", 1)
    with pytest.warns(DegenerateGatesWarning) as caught:
        compose_moe_text(text, tmp_path / "moe", OPTIONS)
    messages = [str(w.message) for w in caught if w.category is DegenerateGatesWarning]  # not the mergekit note
    assert len(messages) == 1, "\n".join(messages)
    assert "expert 0 (fox) and expert 1 (fox-again) collide in layers 0-2" in messages[0]


# --- recipes ------------------------------------------------------------------------------------------


def test_mergekit_and_native_spellings(models):
    dense = models["llama"]
    mergekit = f"""base_model: {dense}
gate_mode: hidden_last
dtype: bfloat16
experts_per_token: 1
experts:
  - source_model:
      model:
        path: {dense}
    positive_prompts: ["code"]
    negative_prompts: ["story"]
    noise_scale: 0.0
    residual_scale: 1.0
  - source_model: {dense}
    positive_prompts: ["story"]
"""
    assert is_moe_recipe(__import__("yaml").safe_load(mergekit))
    config = parse_moe_config(mergekit)
    assert (config.gate_mode, config.pooling, config.experts[0].source_model) == ("hidden", "last", str(dense))
    nested = "name: native\noutput: out\nrandom_seed: 3\nmoe:\n" + "".join(
        f"  {line}\n" for line in mergekit.replace("hidden_last", "cheap_embed").splitlines()
    )
    config = parse_moe_config(nested)
    assert (config.name, config.output, config.random_seed, config.gate_mode, config.pooling) == (
        "native",
        "out",
        3,
        "cheap_embed",
        "mean",
    )
    assert not is_moe_recipe({"merge_method": "linear", "models": []})


BAD = {
    "different architectures": (
        lambda m: moe_text(m["llama"], [m["llama"], m["qwen2"]]),
        r"experts\[1\]\.source_model.*qwen2 model but the base",
    ),
    "different hidden sizes": (
        lambda m: moe_text(m["llama"], [m["llama"], m["narrow"]]),
        r"hidden_size 32 but the base .* has 64",
    ),
    "no prompts": (
        lambda m: moe_text(m["llama"], [m["llama"], m["llama"]], prompts=[["a"], []]),
        r"needs prompts for every expert, and expert 1",
    ),
    "too many per token": (
        lambda m: moe_text(m["llama"], [m["llama"], m["llama"]], per_token=3),
        r"experts_per_token.*3 is not between 1 and the number of experts \(2\)",
    ),
    "identical prompts": (
        lambda m: moe_text(m["llama"], [m["llama"], m["llama"]], prompts=[["a", "b"], ["b", "a"]]),
        r"have the same prompts",
    ),
    "shared expert on mixtral": (
        lambda m: moe_text(m["llama"], [m["llama"]] * 2, extra="architecture: mixtral\n" + shared_expert(m["llama"])),
        r"shared_experts.*no shared expert",
    ),
    "wrong family for output": (
        lambda m: moe_text(m["llama"], [m["llama"]] * 2, extra="architecture: qwen3\n"),
        r"built from qwen3 models, but the experts are 'llama'",
    ),
    "unknown gate mode": (
        lambda m: moe_text(m["llama"], [m["llama"]] * 2, mode="hiden"),
        r"gate_mode 'hiden' is not one of hidden",
    ),
    "misspelt key": (
        lambda m: moe_text(m["llama"], [m["llama"]] * 2).replace("positive_prompts", "positve_prompts", 1),
        r"line 6: unknown key 'experts\[0\]\.positve_prompts'\. Did you mean 'positive_prompts'",
    ),
    "shared expert without prompts": (
        lambda m: moe_text(m["qwen2"], [m["qwen2"]] * 2, extra=shared_expert(m["qwen2"])),
        r"shared_experts\[0\].*gate is computed from its prompts, as mergekit-moe does.*'shared_expert_weight'",
    ),
    "deepseek from llama": (
        lambda m: moe_text(m["llama"], [m["llama"]] * 2, extra="architecture: deepseek\n"),
        r"DeepseekV3ForCausalLM is built from deepseek_v3 models.*multi-head latent attention.*architecture: qwen",
    ),
    "deepseek shared expert with prompts": (
        lambda m: moe_text(m["deepseek_v3"], [m["deepseek_v3"]] * 2, extra=shared_expert(m["deepseek_v3"], ["hello"])),
        r"shared_experts\[0\].*has no gate.*remove them",
    ),
    "deepseek moe as an expert": (
        lambda m: moe_text(m["deepseek_v3"], [m["deepseek_v3"], m["deepseek_v3-moe"]]),
        r"deepseek_v3-moe' is a DeepSeek-V3 mixture of experts \(first_k_dense_replace 1 of 3 layers\)",
    ),
    "deepseek with one expert": (
        lambda m: moe_text(m["deepseek_v3"], [m["deepseek_v3"]], "random", per_token=1),
        r"two routed experts or more",
    ),
    "description without corpus": (
        lambda m: moe_text(m["llama"], [m["llama"]] * 2).replace(
            "    positive_prompts", "    description: code\n    positive_prompts", 1
        ),
        r"description.*no 'prompt_corpus'",
    ),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_recipes_fail_before_any_work(models, tmp_path, case):
    make, message = BAD[case]
    with pytest.raises(ComposerError, match=message):
        compose_moe_text(make(models), tmp_path / "moe", OPTIONS)
    assert list(tmp_path.iterdir()) == []


def test_cli_plan_run_and_route(models, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from composer.cli import app

    dense = models["llama"]
    recipe = tmp_path / "moe.yml"
    text = moe_text(dense, [dense, dense], per_token=1, prompts=PROMPTS[:2], extra="name: tiny moe\n")
    recipe.write_text(
        text.replace("  - source_model", "  - name: animal{}\n    source_model", 2)
        .replace("animal{}", "fox", 1)
        .replace("animal{}", "dog", 1)
    )
    (tmp_path / "held-out.yml").write_text('fox: ["brown foxes jump", "the fox"]\ndog: ["a sleepy dog", "dogs"]\n')
    runner = CliRunner()
    planned = runner.invoke(app, ["plan", str(recipe)])
    assert planned.exit_code == 0, planned.output
    assert "note: output: MixtralForCausalLM, 2 experts, top-1 routing" in planned.output
    assert "note: expert 0 (fox): 2 prompt(s), e.g. 'the quick brown fox'" in planned.output
    assert (
        "model.layers.2.block_sparse_moe.gate.weight" in planned.output and "router gate mode=hidden" in planned.output
    )
    written = runner.invoke(app, ["run", str(recipe), str(tmp_path / "out")])
    assert written.exit_code == 0, written.output
    png = tmp_path / "routing.png"
    routed = runner.invoke(
        app, ["route", str(tmp_path / "out"), "--prompts", str(tmp_path / "held-out.yml"), "--png", str(png)]
    )
    assert routed.exit_code == 0, routed.output
    lines = routed.output.splitlines()
    assert (
        lines[0]
        == "routing of 4 prompt(s) through 3 layers, top-1 of 2 experts; shares of token choices, over all layers"
    )
    header = next(line for line in lines if line.startswith("group"))
    assert header.split()[-2:] == ["fox", "dog"]  # expert names from the recipe kept with the model
    for group in ("fox", "dog", "all"):
        row = next(line for line in lines if line.startswith(f"{group} "))
        shares = [float(cell.rstrip("%")) for cell in row.split()[-2:]]
        assert sum(shares) == pytest.approx(100.0, abs=0.11)
    assert "layer   fox>fox   fox>dog   dog>fox   dog>dog" in routed.output
    assert sum(1 for line in lines if line.startswith(("fox ", "dog "))) == 2 + 4  # group totals, then each prompt
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 60
    dense_model = runner.invoke(
        app, ["route", str(dense), "--prompts", str(tmp_path / "held-out.yml"), "--png", str(tmp_path / "no.png")]
    )
    assert dense_model.exit_code == 2 and "has a layer without a router" in dense_model.output
    assert not (tmp_path / "no.png").exists()


def test_an_expert_may_be_a_stage(models, tmp_path):
    """A recipe's stages feed the MoE in the same pass: expert 1 is a linear merge that is never written."""
    first, second = models["llama"], models["llama-b"]
    stages = (
        f"stages:\n  - name: blend\n    merge_method: linear\n    models:\n      - model: {first}\n        parameters: {{weight: 0.5}}\n"
        f"      - model: {second}\n        parameters: {{weight: 0.5}}\n"
    )
    text = moe_text(first, [first, Path("blend")], per_token=1, prompts=PROMPTS[:2], extra=stages)
    report = compose_moe_text(text, tmp_path / "moe", OPTIONS)
    assert max(report.reads.values()) == 1 and {ref.model for ref in report.reads} == {str(first), str(second)}
    model, a, b = loaded(tmp_path / "moe"), load_state(first), load_state(second)
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(model.model.layers[1].mlp.experts.down_proj[1], (a[name] + b[name]) / 2)
    card = (tmp_path / "moe" / "README.md").read_text()
    assert "1. `blend`: linear" in card and f"`{second}`" in card
    unused = moe_text(first, [first, first], per_token=1, prompts=PROMPTS[:2], extra=stages)
    with pytest.raises(ComposerError, match="stage 'blend' is not used"):
        compose_moe_text(unused, tmp_path / "unused", OPTIONS)


def test_random_gates_follow_the_seed(models, tmp_path):
    from composer.compose import compose_file

    dense = models["llama"]
    recipe = tmp_path / "moe.yml"
    recipe.write_text(moe_text(dense, [dense] * 2, "random", per_token=1, prompts=PROMPTS[:2]))
    routers = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        compose_file(recipe, tmp_path / name, OPTIONS, seed=seed)
        routers[name] = load_state(tmp_path / name)["model.layers.0.block_sparse_moe.gate.weight"]
    assert torch.equal(routers["a"], routers["b"]) and not torch.equal(routers["a"], routers["c"])
    assert (
        "random_seed: 6  # set on the command line with --seed" in (tmp_path / "c" / "composer-recipe.yml").read_text()
    )


def test_covariance_solve_in_token_space_equals_the_direct_solve():
    """Fewer prompt tokens than dimensions: the Woodbury form gives the direct solve's answer."""
    generator = torch.Generator().manual_seed(0)
    for tokens in (40, 260):
        centred = torch.randn(tokens, 200, dtype=torch.float64, generator=generator)
        stats = G.ExpertStatistics(
            torch.zeros(3, 200, dtype=torch.float64),
            torch.zeros(3, 200, dtype=torch.float64),
            torch.zeros(3, dtype=torch.bool),
            centred,
        )
        right = torch.randn(200, 5, dtype=torch.float64, generator=generator)
        direct = torch.linalg.solve(G.regularised_covariance(stats), right)
        torch.testing.assert_close(G.solve_covariance(stats, right), direct, rtol=1e-10, atol=1e-10)


def test_gates_list_what_they_read_and_the_schedule_counts_what_they_hold(models, tmp_path, monkeypatch):
    """A router's plan entry names the base tensors its gate reads: hidden gates the embeddings (the first) and their
    layer, cheap_embed gates the embeddings (the first) and their layer's post-attention norm, random gates nothing.
    Prompt gates form a chain that runs in layer order, whose state the predicted peak counts; planning runs no model.
    The executor reads the gates' inputs within its budget: with almost none, the same bytes."""
    from composer.moe.hidden import LayerRunner
    from composer.plan.schedule import make_schedule

    dense = models["llama"]
    layer_one = sorted(name for name in load_state(dense) if name.startswith("model.layers.1."))
    with monkeypatch.context() as patch:
        patch.setattr(LayerRunner, "run", lambda *arguments: pytest.fail("planning ran the model"))
        for mode in ("hidden", "cheap_embed", "random"):
            text = moe_text(dense, [dense, dense], mode, prompts=PROMPTS[:2])
            plan = build_moe_plan(parse_moe_config(text), text)
            gates = {int(t.name.split(".")[2]): t for t in plan.tensors if t.operation.label == "router gate"}
            read = {layer: [ref.name for ref in gate.inputs] for layer, gate in gates.items()}
            schedule = make_schedule(plan)
            plan.close()
            chain = gates[0].operation.chain
            if mode == "random":
                assert all(not names for names in read.values()) and chain is None and schedule.carried_bytes == 0
                continue
            assert (
                all(gate.operation.chain is chain for gate in gates.values())
                and schedule.carried_bytes == chain.state_bytes > 0
            )
            assert [t.operation.link for t in schedule.order if t.operation.chain is chain] == [
                0,
                2,
                4,
            ]  # odd places: shared gates
            assert schedule.peak_bytes >= chain.state_bytes + max(
                gate.operation.working_bytes for gate in gates.values()
            )
            if mode == "hidden":
                assert read[0][0] == "model.embed_tokens.weight" and sorted(read[1]) == layer_one
                assert chain.state_bytes >= 4 * 64 * 4  # at least four prompts' hidden states in float32 (a token each)
            else:
                norm = "model.layers.{}.post_attention_layernorm.weight"
                assert read == {
                    0: ["model.embed_tokens.weight", norm.format(0)],
                    1: [norm.format(1)],
                    2: [norm.format(2)],
                }
    text = moe_text(dense, [dense, models["llama-b"]], per_token=1, prompts=PROMPTS[:2])
    roomy = compose_moe_text(text, tmp_path / "roomy", OPTIONS)
    assert roomy.reads[next(ref for ref in roomy.reads if ref.name == "model.layers.1.self_attn.q_proj.weight")] == 1
    compose_moe_text(text, tmp_path / "tight", ExecutionOptions(progress=False, memory_budget=1))
    assert load_state(tmp_path / "roomy").keys() == load_state(tmp_path / "tight").keys()
    assert (tmp_path / "roomy" / "model.safetensors").read_bytes() == (
        tmp_path / "tight" / "model.safetensors"
    ).read_bytes()


def test_a_mergekit_moe_config_is_told_that_its_router_rows_are_composers(models, tmp_path):
    """The router rows differ from mergekit-moe's by design (docs/moe.md); a mergekit config says so, a composer
    recipe (any key of composer's own) does not."""
    from composer.errors import ComposerWarning
    from composer.moe.schema import parse_moe_config

    dense = models["llama"]
    text = moe_text(dense, [dense] * 2, prompts=[["code"], ["stories"]])
    with pytest.warns(ComposerWarning, match="gate_rows: average"):
        parse_moe_config(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ComposerWarning)
        parse_moe_config(text + "gate_rows: average\n")
        parse_moe_config(text + "pooling: mean\n")


def test_keys_mergekit_moe_ignores_are_named_and_skipped_but_typos_are_refused(models):
    from composer.errors import ComposerWarning
    from composer.moe.schema import parse_moe_config

    dense = models["llama"]
    text = moe_text(dense, [dense] * 2, prompts=[["code"], ["stories"]]) + "gate_rows: average\n"
    with pytest.warns(ComposerWarning) as caught:
        config = parse_moe_config(text + "lazy_unpickle: true\nload_in_4bit: false\nout_dtype: bfloat16\n")
    messages = " ".join(str(w.message) for w in caught)
    assert all(f"'{key}' has no effect" in messages for key in ("lazy_unpickle", "load_in_4bit", "out_dtype"))
    assert config == parse_moe_config(text)
    with pytest.raises(ComposerError, match="gate_mod"):
        parse_moe_config(text + "gate_mod: hidden\n")
