"""`compose eval` on a damaged or foreign model, or one whose logits are not finite: one `error:` paragraph
that names the file (or the model and the text) at fault, a non-zero exit, never a traceback.

The bad models are a tiny Llama with a tokenizer, damaged after it is saved. The CLI runs in process
through `composer.cli.main`, as `compose` does (a subprocess per case would spend seconds importing torch
again); test_cli.py runs `compose eval` on a truncated model as a real subprocess.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import (
    BYTE_LEVEL_SPECIAL,
    byte_level_tokenizer,
    compose_in_process,
    load_state,
    save_tiny_model,
    save_tokenizer,
)

TEXT = "The kettle boiled while we talked about the garden and the rain.\n" * 4


class Pickled:
    """Not a tensor: a pickle of it is one that torch's weights_only loader refuses."""


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = save_tiny_model(tmp_path_factory.mktemp("eval") / "good", "llama", layers=2, seed=3)
    save_tokenizer(byte_level_tokenizer(300), folder, **BYTE_LEVEL_SPECIAL)
    return folder


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


def as_bin(folder: Path, state) -> None:
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")


def with_state(folder: Path, change) -> None:
    from safetensors.torch import save_file

    state = load_state(folder)
    change(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


# name -> (damage done to a copy of the good model folder, the file the message must name (relative), words it must hold)
DAMAGES = {
    "truncated_safetensors": (lambda f: cut_in_half(f / "model.safetensors"), "model.safetensors", ["truncated"]),
    "safetensors_header_cut": (
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:20]),
        "model.safetensors",
        ["truncated"],
    ),
    "empty_safetensors": (
        lambda f: (f / "model.safetensors").write_bytes(b""),
        "model.safetensors",
        ["not a safetensors file"],
    ),
    "safetensors_header_not_json": (
        lambda f: (f / "model.safetensors").write_bytes(
            (f / "model.safetensors").read_bytes()[:8] + b"{not json" + (f / "model.safetensors").read_bytes()[17:]
        ),
        "model.safetensors",
        ["header"],
    ),
    "pickled_class_instance": (
        lambda f: as_bin(f, {"thing": Pickled()}),
        "pytorch_model.bin",
        ["pickled object of type", "Pickled", "never runs code"],
    ),
    "truncated_bin": (
        lambda f: (as_bin(f, load_state(f)), cut_in_half(f / "pytorch_model.bin")),
        "pytorch_model.bin",
        ["truncated or damaged"],
    ),
    "no_config": (lambda f: (f / "config.json").unlink(), "", ["no config.json"]),
    "config_not_json": (lambda f: (f / "config.json").write_text("{not json"), "config.json", ["not valid JSON"]),
    "unknown_architecture": (
        lambda f: edit_config(f, model_type="flibbertigibbet", architectures=["FlibForCausalLM"]),
        "config.json",
        ["'flibbertigibbet'"],
    ),
    "config_without_model_type": (lambda f: edit_config(f, model_type=None), "config.json", ["model_type"]),
    "no_tokenizer": (lambda f: [p.unlink() for p in f.iterdir() if "token" in p.name], "", ["no tokenizer"]),
    "tokenizer_not_json": (
        lambda f: (f / "tokenizer.json").write_text("{not json"),
        "tokenizer.json",
        ["not valid JSON"],
    ),
    "tokenizer_json_not_a_tokenizer": (
        lambda f: (f / "tokenizer.json").write_text("{}"),
        "tokenizer.json",
        ["tokenizer"],
    ),
    "config_with_an_unknown_activation": (lambda f: edit_config(f, hidden_act="wiggle"), "config.json", ["wiggle"]),
    "config_wants_more_layers": (
        lambda f: edit_config(f, num_hidden_layers=3),
        "",
        ["model.layers.2.", "random values"],
    ),
    "config_wants_other_shapes": (
        lambda f: edit_config(f, intermediate_size=96),
        "",
        ["'model.layers.0.mlp.down_proj.weight' is [64, 128]", "needs [64, 96]"],
    ),
    "nan_weights": (
        lambda f: with_state(f, lambda s: s["model.norm.weight"].fill_(float("nan"))),
        "",
        ["NaN logits", "text.txt", "token position 0 "],
    ),
    "infinite_weight": (
        lambda f: with_state(f, lambda s: s["model.layers.1.mlp.down_proj.weight"].__setitem__((0, 0), float("inf"))),
        "",
        ["logits", "text.txt"],
    ),
}


def compose_eval(model: Path, text: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    """`compose eval MODEL --text TEXT` in process: (exit code, stdout, stderr)."""
    code = compose_in_process(monkeypatch, "eval", model, "--text", text)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(code: int, out: str, err: str) -> str:
    """The common rules; returns the message with line wrapping undone."""
    assert code != 0, f"eval succeeded:\n{out}"
    assert "Traceback" not in out + err, err
    text = err.strip()
    assert text.startswith("error:"), f"stderr is not just the error message:\n{err}"
    assert all(line.strip() for line in text.splitlines()), f"message is more than one paragraph:\n{text}"
    assert out.strip() == "", "a table header or a score was printed before the error"
    return " ".join(text.split())


@pytest.mark.parametrize("name", list(DAMAGES))
def test_a_damaged_model_is_one_error_naming_the_file(good, tmp_path, monkeypatch, capsys, name):
    damage, at_fault, words = DAMAGES[name]
    model = Path(shutil.copytree(good, tmp_path / name))
    damage(model)
    (tmp_path / "text.txt").write_text(TEXT)
    message = refused(*compose_eval(model, tmp_path / "text.txt", monkeypatch, capsys))
    assert str(model / at_fault).rstrip("/") in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("content", [b"this is not gguf", b"", b"GGUF" + b"\xff" * 60])
def test_a_gguf_file_that_is_not_gguf_is_named(tmp_path, monkeypatch, capsys, content):
    (tmp_path / "model.gguf").write_bytes(content)
    (tmp_path / "text.txt").write_text(TEXT)
    message = refused(*compose_eval(tmp_path / "model.gguf", tmp_path / "text.txt", monkeypatch, capsys))
    assert str(tmp_path / "model.gguf") in message
    assert "recipe" not in message  # the GGUF conversion is a recipe inside composer; the user wrote none


def test_the_good_model_scores(good, tmp_path, monkeypatch, capsys):
    """The damage is what each case above is refused for: the model it started from scores."""
    (tmp_path / "text.txt").write_text(TEXT)
    code, out, err = compose_eval(good, tmp_path / "text.txt", monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert out.split()[:5] == ["text", "tokens", "bytes", "perplexity", "bits/byte"]


class NaNFrom(torch.nn.Module):
    """A stand-in causal LM whose logits turn NaN from absolute token position `start` on (it sees positions
    through the ids, which here are 0, 1, 2, ...)."""

    def __init__(self, start: int, vocabulary: int = 1000):
        super().__init__()
        self.start, self.vocabulary = start, vocabulary
        self.config = type("Config", (), {"max_position_embeddings": 64, "name_or_path": "stand-in"})()

    def forward(self, ids):
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocabulary)
        logits[ids >= self.start] = float("nan")
        return type("Output", (), {"logits": logits})()


class Counting:
    """A tokenizer whose ids are the token positions, so a position in the text is its id."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        return {"input_ids": torch.arange(len(text.split())).unsqueeze(0)}

    def decode(self, ids):
        return " ".join(f"w{int(i)}" for i in ids)


@pytest.mark.parametrize("start", [0, 40, 150])
def test_non_finite_logits_name_the_first_position_in_any_window(start):
    """Windows of 64 tokens with a stride of 32: the position reported is where the text first has NaN logits."""
    from composer.errors import ComposerError
    from composer.evaluate import score_text

    with pytest.raises(ComposerError) as caught:
        score_text(NaNFrom(start), Counting(), "word " * 200, text_name="notes.txt", model_name="models/merged")
    message = str(caught.value)
    assert message.startswith("Model 'models/merged' gives NaN logits on notes.txt")
    assert f"first at token position {start} of 200" in message and f"w{start}'" in message


@pytest.mark.parametrize("window, stride", [(8, None), (8, 4), (8, 7), (8, 8), (8, 20), (2, 1), (5, 3)])
def test_the_scoring_windows_score_every_token_after_the_first_once(window, stride):
    """Each token after the first is scored once, always with context; a stride of a whole window (or more) used to
    score only the last token of every window after the first."""
    from composer.evaluate import scoring_windows

    for tokens in (2, 7, 8, 9, 30, 101):
        scored = []
        for start, end, first_new in scoring_windows(tokens, limit=1024, window=window, stride=stride):
            assert end - start <= window and 0 <= first_new < end - start
            scored += range(start + 1 + first_new, end)  # loss i of a window predicts its token i + 1
        assert scored == list(range(1, tokens)), (tokens, scored)
