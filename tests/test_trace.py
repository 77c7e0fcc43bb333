"""`compose trace` on tiny models whose truth is known: depth upscale, linear, SLERP, TIES and MoE merges of
fine-tunes of one base, a sibling fine-tune (related), an unrelated random initialisation (independent),
perturbations after the merge, tokenizers, the recovered recipe composing back to SUSPECT, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from composer.compose import compose_moe_text, compose_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.sources import open_source
from composer.trace.report import format_report, layer_t
from composer.trace.run import TraceOptions, trace_models
from composer.trace.tokenizers import compare_tokenizers, tokenizer_facts
from helpers import (
    BYTE_LEVEL_SPECIAL,
    SENTENCEPIECE_SPECIAL,
    byte_level_tokenizer,
    compose_in_process,
    load_state,
    save_fine_tune,
    save_tiny_model,
    sentencepiece_tokenizer,
    tiny_model_with_tokenizer,
    write_tiny_llama_gguf,
)

OPTIONS = ExecutionOptions(progress=False)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trace")
    models = {"base": save_tiny_model(root / "base", layers=4, seed=0)}
    for name, seed in (("a", 1), ("b", 2), ("sib", 3)):
        models[name] = save_fine_tune(models["base"], root / name, seed=seed)
    models["other"] = save_tiny_model(root / "other", layers=4, seed=7)  # same shape, another random initialisation
    a, b, base = models["a"], models["b"], models["base"]
    recipes = {
        "upscale": f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 3]}}\n"
        f"  - sources:\n      - {{model: {a}, layer_range: [1, 4]}}\ndtype: bfloat16\n",
        "linear": f"merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.3}}}}\n  - {{model: {b}, parameters: {{weight: 0.7}}}}\n"
        "dtype: bfloat16\n",
        "slerp": f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{t: 0.4}}\ndtype: bfloat16\n",
        "ties": f"merge_method: ties\nbase_model: {base}\nmodels:\n  - {{model: {a}, parameters: {{weight: 1.0, density: 0.5}}}}\n"
        f"  - {{model: {b}, parameters: {{weight: 1.0, density: 0.5}}}}\ndtype: bfloat16\n",
    }
    for name, text in recipes.items():
        compose_text(text, root / name, OPTIONS)
        models[name] = root / name
    moe = f"base_model: {base}\ngate_mode: random\nexperts_per_token: 1\nexperts:\n  - source_model: {a}\n  - source_model: {b}\n"
    compose_moe_text(moe, root / "moe", OPTIONS)
    models["moe"] = root / "moe"
    return models


def trace(family, suspect: str, candidates: list[str], base: str | None = None, verify: bool = False):
    return trace_models(
        str(family[suspect]),
        [str(family[name]) for name in candidates],
        TraceOptions(base=str(family[base]) if base else None, verify=verify),
    )


def verdicts(report, family) -> dict[str, str]:
    names = {str(path): name for name, path in family.items()}
    return {names[candidate.model]: candidate.verdict for candidate in report.candidates}


def test_depth_upscale_slices_are_exact_and_recompose_bit_for_bit(family):
    report = trace(family, "upscale", ["a", "sib", "other"], verify=True)
    assert [(layer.method, layer.sources[0][1]) for layer in report.layers] == [("copy", j) for j in (0, 1, 2, 1, 2, 3)]
    slices = [
        [source["layer_range"] for source in piece["sources"]]
        for piece in __import__("yaml").safe_load(report.recipe)["slices"]
    ]
    assert slices == [[[0, 3]], [[1, 4]]]
    assert verdicts(report, family) == {"a": "parent", "sib": "related", "other": "independent"}
    assert max(report.verification.values()) == 0.0


def test_linear_weights_are_recovered_and_the_recipe_recomposes_to_suspect(family):
    report = trace(family, "linear", ["a", "b", "sib", "other"], verify=True)
    assert report.method == "linear"
    for layer in report.layers:
        weights = {Path(model).name: weight for model, _, weight in layer.sources}
        assert set(weights) == {"a", "b"} and abs(weights["a"] - 0.3) <= 0.02 and abs(weights["b"] - 0.7) <= 0.02
        assert abs(layer_t(layer) - 0.7) <= 0.02  # two weights summing to one: the t of an interpolation
    assert verdicts(report, family) == {"a": "parent", "b": "parent", "sib": "related", "other": "independent"}
    assert max(report.verification.values()) == 0.0  # a traced merge recomposes to itself


def test_slerp_t_is_recovered(family):
    report = trace(family, "slerp", ["a", "b", "other"], verify=True)
    assert report.method == "slerp"
    ts = [fit.t for layer in report.layers for fit in layer.tensors if fit.method == "slerp"]
    assert ts and all(abs(t - 0.4) <= 0.03 for t in ts)
    assert "t: 0.4" in report.recipe
    assert max(report.verification.values()) <= 1e-2


def test_ties_family_and_parents_are_named(family):
    report = trace(family, "ties", ["a", "b", "sib", "other"], base="base", verify=True)
    assert report.method == "ties"
    named = verdicts(report, family)
    assert (
        named["a"] == named["b"] == named["base"] == "parent"
        and named["sib"] == "related"
        and named["other"] == "independent"
    )
    densities = [
        fit.density
        for layer in report.layers
        for fit in layer.tensors
        if fit.method == "ties" and fit.name.endswith("proj.weight")
    ]
    assert all(abs(density - 0.5) <= 0.03 for density in densities)
    assert max(report.verification.values()) <= 1e-2


def test_moe_experts_trace_to_the_dense_mlps(family):
    report = trace(family, "moe", ["a", "b", "base", "other"])
    assert report.method == "moe"
    recipe = __import__("yaml").safe_load(report.recipe.split("\n", 2)[2])
    assert recipe["base_model"] == str(family["base"])
    assert [expert["source_model"] for expert in recipe["experts"]] == [str(family["a"]), str(family["b"])]
    assert verdicts(report, family) == {"a": "parent", "b": "parent", "base": "parent", "other": "independent"}


def test_fused_experts_trace_to_the_dense_mlps_one_by_one(family, tmp_path):
    """transformers 5 and mergekit-moe save Mixtral's experts fused (gate_up_proj [experts, 2 x inner, hidden],
    down_proj [experts, hidden, inner]); the trace reads each expert's rows of them as the per-expert tensors."""
    import shutil

    from safetensors.torch import load_file, save_file

    fused = tmp_path / "fused"
    shutil.copytree(family["moe"], fused)
    files = sorted(fused.glob("*.safetensors"))
    tensors = {name: value for path in files for name, value in load_file(path).items()}
    for path in files:
        path.unlink()
    (fused / "model.safetensors.index.json").unlink(missing_ok=True)
    layers = sorted({int(name.split(".")[2]) for name in tensors if ".experts." in name})
    for layer in layers:
        prefix = f"model.layers.{layer}."
        experts = sorted({int(n.split(".")[5]) for n in tensors if n.startswith(prefix + "block_sparse_moe.experts.")})
        each = {
            w: [tensors.pop(f"{prefix}block_sparse_moe.experts.{e}.{w}.weight") for e in experts]
            for w in ("w1", "w3", "w2")
        }
        tensors[prefix + "mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([g, u]) for g, u in zip(each["w1"], each["w3"])]
        )
        tensors[prefix + "mlp.experts.down_proj"] = torch.stack(each["w2"])
        tensors[prefix + "mlp.gate.weight"] = tensors.pop(prefix + "block_sparse_moe.gate.weight")
    save_file(tensors, fused / "model.safetensors", metadata={"format": "pt"})
    family_with_fused = {**family, "fused": fused}
    report = trace(family_with_fused, "fused", ["a", "b", "base", "other"], verify=True)
    assert report.method == "moe"
    recipe = __import__("yaml").safe_load(report.recipe.split("\n", 2)[2])
    assert [expert["source_model"] for expert in recipe["experts"]] == [str(family["a"]), str(family["b"])]
    assert verdicts(report, family_with_fused) == {
        "a": "parent",
        "b": "parent",
        "base": "parent",
        "other": "independent",
    }
    experts = {name: error for name, error in report.verification.items() if ".experts." in name}
    assert experts and max(experts.values()) == 0.0  # every expert rebuilt bit for bit


def test_verdicts_survive_a_bf16_round_trip_and_continued_fine_tuning(family, tmp_path):
    state = {name: tensor.to(torch.bfloat16).float() for name, tensor in load_state(family["linear"]).items()}
    tuned = tmp_path / "tuned"
    save_fine_tune(family["linear"], tuned, seed=11, scale=0.004, change=None)
    rounded = tmp_path / "rounded"
    save_fine_tune(
        family["linear"],
        rounded,
        change={name: state[name] - tensor.float() for name, tensor in load_state(family["linear"]).items()},
    )
    for suspect in (tuned, rounded):
        report = trace_models(str(suspect), [str(family[n]) for n in ("a", "b", "sib", "other")], TraceOptions())
        assert verdicts(report, family) == {"a": "parent", "b": "parent", "sib": "related", "other": "independent"}


def test_two_random_initialisations_are_independent(family, tmp_path):
    third = save_tiny_model(tmp_path / "third", layers=4, seed=21)
    report = trace_models(str(family["other"]), [str(family["base"]), str(third)], TraceOptions(verify=True))
    assert [candidate.verdict for candidate in report.candidates] == ["independent", "independent"]
    assert all(candidate.p_value > 1e-3 for candidate in report.candidates)
    assert report.recipe == "" and report.verification is None  # nothing to recover, --verify says so
    assert any("no recipe" in note for note in report.notes)


def test_tokenizer_commonality(tmp_path):
    tokenizer = byte_level_tokenizer(300)
    first = tiny_model_with_tokenizer(tmp_path / "first", tokenizer, BYTE_LEVEL_SPECIAL, seed=1)
    second = tiny_model_with_tokenizer(tmp_path / "second", tokenizer, BYTE_LEVEL_SPECIAL, seed=2)
    foreign = tiny_model_with_tokenizer(
        tmp_path / "foreign", sentencepiece_tokenizer(300), SENTENCEPIECE_SPECIAL, seed=3
    )
    facts = {
        name: tokenizer_facts(open_source(str(path)))
        for name, path in (("first", first), ("second", second), ("foreign", foreign))
    }
    same = compare_tokenizers("second", facts["first"], facts["second"])
    assert (same.verdict, same.shared_vocab, same.same_ids, same.same_merges, same.same_special_tokens) == (
        "is",
        1.0,
        True,
        True,
        True,
    )
    other = compare_tokenizers("foreign", facts["first"], facts["foreign"])
    # trained on the same text, the two vocabularies hold nearly the same pieces, in another order and convention
    assert other.verdict == "shares" and not other.same_ids and not other.same_merges and not other.same_pre_tokenizer


def test_tokenizer_facts_read_without_transformers_are_transformers_facts(tmp_path, monkeypatch):
    """A folder transformers would load from tokenizer.json unchanged is read by the tokenizers library alone (no
    transformers import): the facts are the ones transformers' tokenizer gives, field for field. A config key that
    can change what transformers builds (add_bos_token) sends the folder through transformers."""
    import composer.trace.tokenizers as tokenizers

    def facts_of(folder: Path) -> dict:
        facts = tokenizer_facts(open_source(str(folder)))
        vocabulary = facts.vocabulary
        assert vocabulary.encoder is None  # the trace aligns by token text alone
        return {
            **{key: value for key, value in vars(facts).items() if key != "vocabulary"},
            **vars(vocabulary),
        }

    byte_level = tiny_model_with_tokenizer(tmp_path / "bl", byte_level_tokenizer(300), BYTE_LEVEL_SPECIAL, seed=1)
    pieces = tiny_model_with_tokenizer(tmp_path / "sp", sentencepiece_tokenizer(300), SENTENCEPIECE_SPECIAL, seed=2)
    (byte_level / "chat_template.jinja").write_text("{{ messages }}")
    config = json.loads((pieces / "tokenizer_config.json").read_text())
    (pieces / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": "{{ bos_token }}"}))
    folders = (byte_level, pieces)
    assert all(tokenizers.plain_tokenizer(open_source(str(folder))) is not None for folder in folders)
    plain = [facts_of(folder) for folder in folders]
    monkeypatch.setattr(tokenizers, "plain_tokenizer", lambda source: None)
    assert plain == [facts_of(folder) for folder in folders]
    assert plain[0]["chat_template"] == "{{ messages }}" and plain[1]["roles"]
    monkeypatch.undo()
    (pieces / "tokenizer_config.json").write_text(json.dumps(config | {"add_bos_token": True}))
    assert tokenizers.plain_tokenizer(open_source(str(pieces))) is None


@pytest.mark.real_model
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_a_gguf_tokenizer_is_read_from_its_metadata_as_transformers_reads_it(which):
    """A GGUF file's tokenizer facts come from its metadata alone (transformers' conversion of Gemma 3's vocabulary
    took 34 s and 1 GB): tokens, the text each stands for, special tokens, roles and chat template are those of
    the tokenizer transformers builds from the same file (the bundled folders' tokenizers are that build).
    SmolLM2's merges digest as the folder's do; Gemma 3's file keeps scores, not merges, which are not compared
    with a tokenizer.json's, nor are normalizer and pre-tokenizer."""
    from composer import bundled

    try:
        path, folder = (
            (bundled.smollm2_gguf(), bundled.smollm2_dir())
            if which == "smollm2"
            else (bundled.gemma3_gguf(), bundled.gemma3_dir())
        )
    except ComposerError as error:
        pytest.skip(str(error))
    from_file, built = tokenizer_facts(open_source(str(path))), tokenizer_facts(open_source(str(folder)))
    assert from_file.stored_as == "gguf" and built.stored_as == "tokenizer.json"
    assert from_file.tokens == built.tokens and from_file.keys == built.keys
    assert from_file.special == built.special and from_file.chat_template == built.chat_template
    assert from_file.vocabulary.roles.items() <= built.vocabulary.roles.items()
    assert from_file.vocabulary.adds_bos == built.vocabulary.adds_bos
    comparison = compare_tokenizers("folder", from_file, built)
    assert (comparison.verdict, comparison.same_ids, comparison.same_special_tokens) == ("is", True, True)
    assert comparison.same_merges is (True if which == "smollm2" else None)
    assert comparison.same_normalizer is None and comparison.same_pre_tokenizer is None
    assert "not comparable between GGUF and tokenizer.json" in comparison.line()
    same = compare_tokenizers("itself", from_file, from_file)
    assert same.verdict == "is" and same.same_merges and same.same_normalizer and same.same_pre_tokenizer


def test_a_gguf_tokenizer_by_token_type_and_a_damaged_one(family, tmp_path):
    """From a GGUF's metadata: control tokens stand for no text, byte tokens for their byte, a user-defined token
    for its text as written (a run of spaces is SentencePiece's `▁▁`), others with `▁` read as a space. Merges
    that are not "left right" strings are a clear error naming the file."""
    from transformers import AutoConfig

    state, config = load_state(family["a"]), AutoConfig.from_pretrained(family["a"])
    tokens = [
        "<pad>",
        "<bos>",
        "<0x41>",
        "▁hello",
        "  ",
        "\n\n",
        "wor▁ld",
        *[f"t{index}" for index in range(config.vocab_size - 7)],
    ]
    types = [3, 3, 6, 1, 4, 4, 1, *[1] * (config.vocab_size - 7)]
    path = tmp_path / "with-tokenizer.gguf"
    metadata = {
        "model": "llama",
        "tokens": tokens,
        "token_type": types,
        "scores": [0.0] * len(tokens),
        "bos_token_id": 1,
    }
    write_tiny_llama_gguf(path, state, config, tokenizer=metadata)
    facts = tokenizer_facts(open_source(str(path)))
    assert facts.keys[:7] == [("control", "<pad>"), ("control", "<bos>"), b"A", b" hello", b"  ", b"\n\n", b"wor ld"]
    assert facts.tokens[4] == "▁▁" and facts.special == [("\n\n", False), ("<bos>", True), ("<pad>", True)]
    assert facts.merges_from == "scores" and facts.vocabulary.roles == {"bos": 1}
    damaged = tmp_path / "damaged.gguf"
    write_tiny_llama_gguf(damaged, state, config, tokenizer={**metadata, "model": "gpt2", "merges": ["ab"]})
    with pytest.raises(ComposerError, match=r"damaged\.gguf.*merge 'ab' is not two parts"):
        tokenizer_facts(open_source(str(damaged)))


def test_cli_report_json_and_heat_map(family, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(family["a"].parent)
    code = compose_in_process(
        monkeypatch,
        "trace",
        "linear",
        "--candidates",
        "a",
        "b",
        "other",
        "--json",
        tmp_path / "t.json",
        "--png",
        tmp_path / "t.png",
    )
    out = capsys.readouterr().out
    assert code in (0, None), out
    assert "parent" in out and "independent" in out
    data = json.loads((tmp_path / "t.json").read_text())
    assert list(data)[:6] == ["suspect", "tokenizer", "candidates", "layers", "recipe", "provenance"]
    assert data["suspect"] == "linear" and [c["model"] for c in data["candidates"]] == ["a", "b", "other"]
    assert data["provenance"]["agrees"] is (
        True if data["provenance"]["recorded"] else None
    )  # composer's own record, if written
    assert set(data["layers"][0]) >= {"layer", "sources", "method", "relative_error"}
    assert "model: a" in data["recipe"]  # models named exactly as given
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_one_paragraph_error(family, tmp_path, monkeypatch, capsys):
    with pytest.raises(ComposerError, match="at least one candidate"):
        trace_models(str(family["linear"]), [], TraceOptions())
    with pytest.raises(ComposerError, match="is SUSPECT itself"):
        trace_models(str(family["linear"]), [str(family["a"]), str(family["linear"])], TraceOptions())
    gpt2 = save_tiny_model(tmp_path / "gpt2", "gpt2", layers=2, n_embd=48)  # another architecture, no shape in common
    with pytest.raises(ComposerError, match="same shape"):
        trace_models(str(family["linear"]), [str(gpt2)], TraceOptions(tokenizers=False))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((family["a"] / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    capsys.readouterr()
    code = compose_in_process(monkeypatch, "trace", family["linear"], "--candidates", broken)
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("error: The candidate") and "Traceback" not in error
    folder = tmp_path / "a-folder"
    folder.mkdir()
    for option, path, says in (
        ("--json", folder, "is a folder"),
        ("--png", folder, "is a folder"),
        ("--json", tmp_path / "missing" / "r.json", "does not exist"),
        ("--png", tmp_path / "map.txt", "not an image format"),
    ):  # refused before the trace's work: the report would be lost after it
        code = compose_in_process(monkeypatch, "trace", family["linear"], "--candidates", family["a"], option, path)
        output = capsys.readouterr()
        said = " ".join(output.err.split())
        assert code == 2 and said.startswith(f"error: {option}") and says in said and not output.out


def test_a_candidate_of_another_architecture_is_reported_beside_one_that_fits(family, tmp_path):
    gpt2 = save_tiny_model(tmp_path / "gpt2", "gpt2", layers=2)
    report = trace_models(str(family["linear"]), [str(family["a"]), str(gpt2)], TraceOptions(tokenizers=False))
    assert any("gpt2" in note for note in report.notes)
    assert report.candidates[1].verdict == "independent"


# ---- SUSPECT as GGUF, after layer surgery, as a DARE merge, as a mix of copied and blended layers --------------


@pytest.fixture(scope="module")
def cases(family) -> dict[str, Path]:
    from transformers import AutoConfig

    root = family["a"].parent
    a, b, base, linear = family["a"], family["b"], family["base"], family["linear"]
    recipes = {
        "dare_ties": f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.6, density: 0.4}}}}\n"
        f"  - {{model: {b}, parameters: {{weight: 0.5, density: 0.4}}}}\nrandom_seed: 3\ndtype: bfloat16\n",
        "dare_linear": f"merge_method: dare_linear\nbase_model: {base}\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.6, density: 0.6}}}}\n"
        f"  - {{model: {b}, parameters: {{weight: 0.4, density: 0.6}}}}\nrandom_seed: 3\ndtype: bfloat16\n",
        "dropped": f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {linear}, layer_range: [0, 2]}}\n"
        f"  - sources:\n      - {{model: {linear}, layer_range: [3, 4]}}\ndtype: bfloat16\n",
        "repeated": f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 4]}}\n"
        f"  - sources:\n      - {{model: {a}, layer_range: [3, 4]}}\ndtype: bfloat16\n",
        "mixed": f"stages:\n  - name: blend\n    merge_method: linear\n    slices:\n      - sources:\n"
        f"          - {{model: {a}, layer_range: [2, 4], parameters: {{weight: 0.25}}}}\n"
        f"          - {{model: {b}, layer_range: [2, 4], parameters: {{weight: 0.75}}}}\n    dtype: bfloat16\n"
        f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 2]}}\n"
        f"  - sources:\n      - {{model: blend, layer_range: [0, 2]}}\ndtype: bfloat16\n",
    }
    made = {}
    for name, text in recipes.items():
        compose_text(text, root / name, OPTIONS)
        made[name] = root / name
    state, config = load_state(linear), AutoConfig.from_pretrained(linear)
    for kind in ("Q8_0", "Q4_0"):
        made[kind] = root / f"linear-{kind}.gguf"
        write_tiny_llama_gguf(made[kind], state, config, kind)
    return made


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_a_quantised_gguf_suspect_keeps_its_parents_and_weights(family, cases, kind):
    report = trace_models(str(cases[kind]), [str(family[n]) for n in ("a", "b", "sib", "other")], TraceOptions())
    assert verdicts(report, family) == {"a": "parent", "b": "parent", "sib": "related", "other": "independent"}
    tolerance = 0.02 if kind == "Q8_0" else 0.1  # 4-bit blocks move each weight by several per cent
    for layer in report.layers:
        weights = {Path(model).name: weight for model, _, weight in layer.sources}
        assert (
            set(weights) == {"a", "b"} and abs(weights["a"] - 0.3) <= tolerance and abs(weights["b"] - 0.7) <= tolerance
        )


def test_removed_and_repeated_layers_are_found(family, cases):
    report = trace_models(
        str(cases["dropped"]), [str(family[n]) for n in ("a", "b", "sib", "other")], TraceOptions(verify=True)
    )
    assert [sorted({j for _, j, _ in layer.sources}) for layer in report.layers] == [[0], [1], [3]]
    assert verdicts(report, family) == {"a": "parent", "b": "parent", "sib": "related", "other": "independent"}
    assert max(report.verification.values()) <= 1e-2
    report = trace_models(str(cases["repeated"]), [str(family[n]) for n in ("a", "other")], TraceOptions(verify=True))
    slices = [
        [source["layer_range"] for source in piece["sources"]] for piece in yaml.safe_load(report.recipe)["slices"]
    ]
    assert slices == [[[0, 4]], [[3, 4]]] and max(report.verification.values()) == 0.0
    assert verdicts(report, family) == {"a": "parent", "other": "independent"}


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_merges_are_detected(family, cases, method):
    report = trace_models(
        str(cases[method]), [str(family[n]) for n in ("a", "b", "sib", "other")], TraceOptions(base=str(family["base"]))
    )
    assert report.method == method
    assert verdicts(report, family) == {
        "a": "parent",
        "b": "parent",
        "sib": "related",
        "other": "independent",
        "base": "parent",
    }
    density = 0.4 if method == "dare_ties" else 0.6
    densities = [fit.density for layer in report.layers for fit in layer.tensors if fit.name.endswith("proj.weight")]
    assert all(abs(found - density) <= 0.05 for found in densities)


def test_a_mix_of_copied_and_blended_layers_is_recovered_as_stages(family, cases):
    report = trace_models(str(cases["mixed"]), [str(family[n]) for n in ("a", "b", "other")], TraceOptions(verify=True))
    assert [layer.method for layer in report.layers] == ["copy", "copy", "linear", "linear"]
    recipe = yaml.safe_load(report.recipe)
    assert recipe["merge_method"] == "passthrough" and len(recipe["stages"]) == 1
    stage = recipe["stages"][0]
    weights = {Path(source["model"]).name: source["parameters"]["weight"] for source in stage["slices"][0]["sources"]}
    assert stage["merge_method"] == "linear" and weights == {"a": 0.25, "b": 0.75}
    assert max(report.verification.values()) <= 1e-2  # within bf16 rounding
    assert verdicts(report, family) == {"a": "parent", "b": "parent", "other": "independent"}


# ---- tokenizers: a transplant, a vocabulary with added tokens ----------------------------------------------------


@pytest.fixture(scope="module")
def speaking(tmp_path_factory) -> dict[str, Path]:
    """Tiny models that speak a byte-level tokenizer, a merge of two of them, and that merge given other tokenizers."""
    from composer.transplant import TransplantOptions, run_transplant

    root = tmp_path_factory.mktemp("speaking")
    tokenizer = byte_level_tokenizer(300)
    models = {"base": tiny_model_with_tokenizer(root / "base", tokenizer, BYTE_LEVEL_SPECIAL, seed=1)}
    models["a"] = save_fine_tune(models["base"], root / "a", seed=2)
    models["b"] = save_fine_tune(models["base"], root / "b", seed=3)
    models["other"] = tiny_model_with_tokenizer(root / "other", tokenizer, BYTE_LEVEL_SPECIAL, seed=4)
    models["foreign"] = tiny_model_with_tokenizer(
        root / "foreign", sentencepiece_tokenizer(300), SENTENCEPIECE_SPECIAL, seed=5
    )
    extended = byte_level_tokenizer(300)
    extended.add_tokens(["<|tool_call|>", "prefeitura", "freezes"])
    models["extended"] = tiny_model_with_tokenizer(root / "extended", extended, BYTE_LEVEL_SPECIAL, seed=6)
    merge = (
        f"merge_method: linear\nmodels:\n  - {{model: {models['a']}, parameters: {{weight: 0.4}}}}\n"
        f"  - {{model: {models['b']}, parameters: {{weight: 0.6}}}}\ndtype: float32\n"
    )
    compose_text(merge, root / "merge", OPTIONS)
    models["merge"] = root / "merge"
    for name, donor in (("transplanted", "foreign"), ("widened", "extended")):
        run_transplant(str(models["merge"]), str(models[donor]), root / name, TransplantOptions(), OPTIONS)
        models[name] = root / name
    return models


def test_a_transplanted_tokenizer_keeps_the_parents_and_matches_embeddings_through_the_alignment(speaking):
    report = trace_models(
        str(speaking["transplanted"]), [str(speaking[n]) for n in ("a", "b", "other")], TraceOptions()
    )
    assert verdicts(report, speaking) == {"a": "parent", "b": "parent", "other": "independent"}
    assert [t.verdict for t in report.tokenizers] == ["shares"] * 3 and not report.tokenizers[0].same_ids
    embedding = next(fit for fit in report.outer if fit.name == "model.embed_tokens.weight")
    assert embedding.aligned_rows and embedding.aligned_rows > 100  # the tokens both vocabularies have
    weights = dict(zip((Path(s).name for s in embedding.sources), embedding.weights))
    assert set(weights) == {"a", "b"} and abs(weights["a"] - 0.4) <= 0.02 and abs(weights["b"] - 0.6) <= 0.02
    assert embedding.relative_error <= 1e-3


def test_a_vocabulary_with_added_tokens_extends_its_parents(speaking):
    report = trace_models(str(speaking["widened"]), [str(speaking[n]) for n in ("a", "b", "other")], TraceOptions())
    assert [t.verdict for t in report.tokenizers] == ["extends"] * 3
    assert verdicts(report, speaking) == {"a": "parent", "b": "parent", "other": "independent"}
    embedding = next(fit for fit in report.outer if fit.name == "model.embed_tokens.weight")
    assert embedding.aligned_rows == 300 and embedding.method == "linear" and embedding.relative_error <= 1e-5


# ---- the provenance record: agreeing, forged, stripped --------------------------------------------------------


def with_record(source: Path, folder: Path, parents: dict[str, Path]) -> Path:
    """A copy of the model folder `source` whose weights carry a composer.provenance record naming `parents`."""
    import shutil

    from safetensors.torch import save_file

    from composer.sources.digests import source_digests

    shutil.copytree(source, folder)
    entries = []
    for name, path in parents.items():
        opened = open_source(str(path))
        entries.append(
            {"model": name, "hub_id": None, "revision": None, "path": str(path), "weights": source_digests(opened)}
        )
        opened.close()
    record = {"composer_version": "0.test", "recipe_sha256": "0" * 64, "parents": entries}
    save_file(
        load_state(source), str(folder / "model.safetensors"), metadata={"composer.provenance": json.dumps(record)}
    )
    return folder


def test_the_provenance_record_is_read_and_checked_against_the_weights(family, tmp_path):
    candidates = [str(family[n]) for n in ("a", "b", "sib", "other")]
    honest = with_record(family["linear"], tmp_path / "honest", {"a": family["a"], "b": family["b"]})
    report = trace_models(str(honest), candidates, TraceOptions(tokenizers=False))
    assert report.provenance.recorded and report.provenance.agrees is True
    assert [parent["matched"] for parent in report.provenance.parents] == [str(family["a"]), str(family["b"])]
    forged = with_record(family["linear"], tmp_path / "forged", {"a": family["a"], "sib": family["sib"]})
    report = trace_models(str(forged), candidates, TraceOptions(tokenizers=False))
    assert report.provenance.recorded and report.provenance.agrees is False
    assert verdicts(report, family) == {"a": "parent", "b": "parent", "sib": "related", "other": "independent"}
    assert "DO NOT agree" in format_report(report)
    stripped = save_fine_tune(family["linear"], tmp_path / "stripped", change={})  # the same weights, no record
    report = trace_models(str(stripped), candidates, TraceOptions(tokenizers=False))
    assert not report.provenance.recorded and report.provenance.agrees is None
    assert verdicts(report, family) == {"a": "parent", "b": "parent", "sib": "related", "other": "independent"}


def test_a_small_memory_budget_reads_in_blocks_and_changes_nothing(family):
    from composer.trace.fingerprints import fingerprint_model
    from composer.trace.layout import open_traced

    model = open_traced(str(family["linear"]), "SUSPECT")
    try:
        whole, blocked = (
            fingerprint_model(model, 1 << 30),
            fingerprint_model(model, 16 << 10),
        )  # 16 KB: many blocks a tensor
    finally:
        model.close()
    assert all(
        whole[n].digest == blocked[n].digest and torch.allclose(whole[n].sketch, blocked[n].sketch)
        for n in whole
        if whole[n].sketch is not None
    )
    small = trace_models(
        str(family["linear"]), [str(family[n]) for n in ("a", "b", "other")], TraceOptions(memory_budget=16 << 10)
    )
    assert verdicts(small, family) == {"a": "parent", "b": "parent", "other": "independent"}
    for layer in small.layers:
        weights = {Path(model).name: weight for model, _, weight in layer.sources}
        assert abs(weights["a"] - 0.3) <= 0.02 and abs(weights["b"] - 0.7) <= 0.02


def test_mapped_blocks_are_the_read_blocks_and_a_shortened_file_is_an_error(family, tmp_path):
    """The fingerprint pass reads a safetensors file's pages in place (mapped a block at a time): the same bytes as a
    read, and a file cut short since it was opened is a ComposerError, never a fault on the missing pages."""
    import shutil

    from composer.trace.layout import open_traced

    folder = tmp_path / "copy"
    shutil.copytree(family["a"], folder)
    model = open_traced(str(folder), "SUSPECT")
    try:
        for name in model.infos:
            read = list(model.reader.blocks(name, 7))
            mapped = list(model.reader.blocks(name, 7, mapped=True))
            assert [start for start, _ in read] == [start for start, _ in mapped]
            assert all(a.dtype == b.dtype and torch.equal(a, b) for (_, a), (_, b) in zip(read, mapped))
        del read, mapped
        last = max(model.infos, key=lambda n: model.reader.source.byte_range(n)[1])
        weights = model.reader.source.byte_range(last)[0]
        with open(weights, "r+b") as handle:
            handle.truncate(model.reader.source.byte_range(last)[1] + 2)
        with pytest.raises(ComposerError, match="changed since it was opened"):
            list(model.reader.blocks(last, 1 << 20, mapped=True))
    finally:
        model.close()


# ---- the estimator and the fingerprints, on tensors alone (no model: fast) ------------------------------------


def test_a_blend_of_nearly_equal_sources_rounded_to_bf16_is_fitted_without_bias():
    """Fine-tunes of one base differ by about one bf16 step; rounding their blend to bf16 snaps it to one source's
    grid point or the other's, which pulls a least-squares fit over every entry towards the ends (0.70/0.30 for
    0.6/0.4 here). The fit over the entries whose sources lie several steps apart is not pulled."""
    from composer.trace.fits import NormalEquations

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1 << 20, generator=generator) * 0.05
    a, b = (base + torch.randn(1 << 20, generator=generator) * 2e-4 for _ in range(2))
    blend = torch.lerp(a.bfloat16(), b.bfloat16(), 0.4)  # as composer's and mergekit's bf16 slerp of such tensors
    blocks = [(blend.float(), [a, b])]
    every_entry = NormalEquations.gather(blocks, 2).solve()
    assert abs(every_entry.weights[1] - 0.4) > 0.05
    fit = NormalEquations.gather(blocks, 2, torch.bfloat16).solve()
    assert abs(fit.weights[0] - 0.6) <= 0.01 and abs(fit.weights[1] - 0.4) <= 0.01
    assert 0 < fit.informative < 1 << 20 and fit.relative_error < 3e-3  # the residual is over every entry


def test_sketches_of_large_matrices_keep_fixed_rows_and_do_not_depend_on_the_blocks():
    from composer.trace.fingerprints import SKETCH_ROWS, fingerprint, projection, sketched_rows
    from composer.trace.reading import digest_aligned

    matrix = torch.randn(2000, 24, generator=torch.Generator().manual_seed(3)).bfloat16()
    rows = sketched_rows(2000)
    assert len(rows) == SKETCH_ROWS and rows[0] == 0 and rows[-1] == 1999
    whole = fingerprint("w", (2000, 24), torch.bfloat16, [(0, matrix)])
    step = digest_aligned(96, 24 * 2)  # blocks of whole digest pieces
    blocked = fingerprint(
        "w", (2000, 24), torch.bfloat16, [(start, matrix[start : start + step]) for start in range(0, 2000, step)]
    )
    assert whole.digest == blocked.digest and torch.equal(whole.sketch, blocked.sketch)
    assert torch.allclose(whole.sketch, matrix[rows].float() @ projection(24))


def _sub_step_fine_tunes(count: int, seed: int = 0):
    """A base and fine-tunes whose task vectors are about a step of bf16's grid each, as short real fine-tunes
    are, all rounded to bf16 as a merge run in `dtype: bfloat16` sees them."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(1 << 18, generator=generator) * 0.05
    tunes = [base + torch.randn(1 << 18, generator=generator) * 4e-4 for _ in range(count)]
    return base.bfloat16(), [x.bfloat16() for x in tunes]


def test_ties_of_sub_step_fine_tunes_in_bf16_is_told_from_a_blend_with_its_density_and_shares():
    """Rounding to bf16 leaves as many entries at the base in a dense blend as TIES's trim does, so the support test
    cannot tell them apart; the entries where one task vector alone moves can (real SmolLM2 fine-tunes: mergekit's
    TIES at density 0.6, weights 0.7/0.5, read as DARE with wrong weights before)."""
    from composer.methods.linear import linear
    from composer.methods.task_arithmetic.methods import ties
    from composer.trace.fits import single_mover_signature
    from composer.trace.recover import ties_shares

    base, (a, b) = _sub_step_fine_tunes(2)
    merged = ties([a, b], base, [0.7, 0.5], [0.6, 0.6])
    signature = single_mover_signature(merged, base.float(), [a.float(), b.float()])
    assert signature is not None and signature.kept_magnitude < 0.5  # TIES: trimmed by magnitude
    assert all(abs(density - 0.6) <= 0.01 for density in signature.trim_densities)
    shares = ties_shares(merged, base.float(), [a.float(), b.float()], signature)
    assert abs(shares[0] - 0.7 / 1.2) <= 0.02 and abs(shares[1] - 0.5 / 1.2) <= 0.02
    blend = linear([a, b], [0.3, 0.7])
    assert single_mover_signature(blend, base.float(), [a.float(), b.float()]) is None


def test_dare_of_sub_step_fine_tunes_in_bf16_shows_its_density_and_sign_election():
    from composer.methods.task_arithmetic.methods import dare_linear, dare_ties
    from composer.trace.fits import single_mover_signature

    base, (a, b) = _sub_step_fine_tunes(2, seed=1)
    for method, elected in ((dare_ties, True), (dare_linear, False)):
        merged = method([a, b], base, [0.5, 0.5], [0.5, 0.5], generator=torch.Generator().manual_seed(0))
        signature = single_mover_signature(merged, base.float(), [a.float(), b.float()])
        assert signature is not None and signature.kept_magnitude >= 0.5  # dropped at random, not by magnitude
        assert abs(signature.density - 0.5) <= 0.02
        assert all(abs(c * signature.density - 0.5) <= 0.02 for c in signature.coefficients)
        assert (signature.sign_election > 0.9) == elected


def test_the_p_value_is_a_distribution_free_bound():
    from composer.trace.verdict import ALPHA, cantelli_bound

    assert cantelli_bound(0.02, 0.019, 0.0005) == pytest.approx(1 / (1 + 4))  # z = 2: no verdict of relation
    assert cantelli_bound(0.018, 0.019, 0.0005) == 1.0
    assert cantelli_bound(0.019 + 31.7 * 0.0005, 0.019, 0.0005) < ALPHA  # about 32 standard deviations


def test_a_small_share_left_by_continued_fine_tuning_is_not_a_parent():
    """A linear merge of two fine-tunes, fine-tuned further, still fits their base at shares of 0.02-0.04 in most
    layers (bench/trace_real.py, case `tuned`): related, not a parent; a TIES base is a parent at any share."""
    from composer.trace.verdict import IndependenceTest, verdict

    related = IndependenceTest(statistic=0.9, null_mean=0.02, null_std=0.0005, p_value=3e-7, matrices=200)
    unrelated = IndependenceTest(statistic=0.02, null_mean=0.02, null_std=0.0005, p_value=1.0, matrices=200)
    assert verdict(related, 0.03, is_recipe_base=False) == "related"
    assert verdict(related, 0.3, is_recipe_base=False) == "parent"
    assert verdict(related, 0.0, is_recipe_base=True) == "parent"
    assert verdict(unrelated, 0.5, is_recipe_base=False) == "independent"


def test_a_gguf_suspect_is_dequantised_a_block_of_rows_at_a_time_within_the_budget(family, cases, monkeypatch):
    """A GGUF SUSPECT's matrices are dequantised in blocks of rows, never whole, so a trace with --verify and a
    16 KB budget holds no dequantised piece above it (llama's q and k, which transformers permutes, are read whole:
    64 x 64 float32 here, 16 KB); the report is the one a large budget gives (to rounding)."""
    from composer.sources.gguf_file import GGUFFile

    candidates = [str(family[n]) for n in ("a", "b", "other")]
    large = trace_models(str(cases["Q8_0"]), candidates, TraceOptions(verify=True))
    pieces = []
    dequantised = GGUFFile._dequantized

    def recorded(self, gguf_name, rows=None):
        values = dequantised(self, gguf_name, rows)
        pieces.append((gguf_name, values.nbytes))
        return values

    monkeypatch.setattr(GGUFFile, "_dequantized", recorded)
    small = trace_models(str(cases["Q8_0"]), candidates, TraceOptions(verify=True, memory_budget=16 << 10))
    largest = {}
    for name, size in pieces:
        largest[name] = max(size, largest.get(name, 0))
    assert largest["token_embd.weight"] < 16 << 10 and max(largest.values()) <= 16 << 10
    assert verdicts(small, family) == verdicts(large, family) == {"a": "parent", "b": "parent", "other": "independent"}
    for mine, theirs in zip(small.layers, large.layers, strict=True):  # the sums taken in other blocks: rounding
        assert [(m, j) for m, j, _ in mine.sources] == [(m, j) for m, j, _ in theirs.sources]
        assert [w for _, _, w in mine.sources] == pytest.approx([w for _, _, w in theirs.sources], abs=1e-9)
    assert small.verification.keys() == large.verification.keys()
    assert all(abs(small.verification[n] - large.verification[n]) <= 1e-6 for n in large.verification)


def test_a_layer_whose_slerp_is_its_blend_joins_the_slerp_around_it():
    """Seen on Gemma 3 270M: in a SLERP of two fine-tunes (t 0.35), one layer's tensors were nearly parallel, so each
    fitted as linear with the same t, and the recovered recipe was three stages where one SLERP does."""
    import torch

    from composer.trace.recipe_text import RecipeInputs, agreed_method, recipe_text
    from composer.trace.recover import LayerFit, TensorFit, slerp_throughout

    def layer(index: int, method: str, t: float | None, sources=("a", "b")) -> LayerFit:
        fits = [
            TensorFit(f"model.layers.{index}.{part}.weight", method, list(sources), [1 - 0.35, 0.35], 1e-3, t=t)
            for part in ("self_attn.q_proj", "mlp.up_proj")
        ]
        return LayerFit(index, method, [(s, index, w) for s, w in zip(sources, (0.65, 0.35))], 1e-3, fits)

    layers = [layer(0, "slerp", 0.35), layer(1, "linear", 0.35), layer(2, "slerp", 0.35)]
    joined = slerp_throughout(layers)
    assert [fit.method for fit in joined] == ["slerp"] * 3 and agreed_method(joined) == "slerp"
    text = recipe_text(RecipeInputs(torch.bfloat16, joined, "slerp"), "", {"a": 3, "b": 3})
    assert "stages" not in text and "t: 0.35" in text, text
    # a linear layer that SLERP does not explain (no t), or from other models, stays linear
    kept = slerp_throughout([layer(0, "slerp", 0.35), layer(1, "linear", None), layer(2, "linear", 0.35, ("a", "c"))])
    assert [fit.method for fit in kept] == ["slerp", "linear", "linear"]
