"""A model folder's own files (an index's shard names, links among its files) cannot make composer read, or copy
into an output, a file outside the folder (for a hub snapshot: outside its repository in the hub cache), while a
hub snapshot's links into blobs/ and a user's folder of links to another model still work (model_files)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from composer.compose import compose_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.sources import open_source
from helpers import save_tiny_model

SECRET = "SECRET-KEY-MATERIAL"
COMMIT = "c" * 40
WEIGHTS = {"layer.weight": torch.arange(16, dtype=torch.float32).reshape(4, 4), "norm.weight": torch.ones(4)}


def write_model(folder: Path, tensors: dict[str, torch.Tensor] = WEIGHTS) -> Path:
    """A minimal model folder: one safetensors file, a config, a tokenizer file and a card with a licence."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    (folder / "tokenizer.json").write_text('{"model": "the real tokenizer"}')
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\nA model.\n")
    return folder


def write_secret(tmp_path: Path) -> Path:
    secret = tmp_path / "home" / ".ssh" / "id_rsa"
    secret.parent.mkdir(parents=True)
    secret.write_text(SECRET)
    return secret


def write_index(folder: Path, index_name: str, shard: str) -> None:
    (folder / index_name).write_text(json.dumps({"weight_map": {name: shard for name in WEIGHTS}}))


# ---- names in an index ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("where", ["dotdot", "absolute"])
def test_an_index_cannot_name_a_shard_outside_the_folder(tmp_path: Path, fmt: str, where: str):
    elsewhere = tmp_path / f"elsewhere.{fmt}"
    if fmt == "safetensors":
        save_file(WEIGHTS, elsewhere)
    else:
        torch.save(WEIGHTS, elsewhere)
    folder = tmp_path / "models" / "downloaded"
    folder.mkdir(parents=True)
    index_name = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    shard = f"../../elsewhere.{fmt}" if where == "dotdot" else str(elsewhere)
    write_index(folder, index_name, shard)
    with pytest.raises(ComposerError) as caught:
        open_source(str(folder))
    message = str(caught.value)
    assert str(folder / index_name) in message and f"'{shard}'" in message and str(elsewhere) in message
    assert "\n" not in message


def hub_repository(tmp_path: Path, files: dict[str, Path]) -> Path:
    """A hub cache repository laid out as huggingface_hub does (models--a--b/{blobs, snapshots/COMMIT}), each file
    of `files` a blob that the snapshot links to; returns the snapshot folder."""
    repository = tmp_path / "hf" / "hub" / "models--a--b"
    snapshot = repository / "snapshots" / COMMIT
    (repository / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for number, (name, source) in enumerate(sorted(files.items())):
        blob = repository / "blobs" / f"{number:040x}"
        shutil.copyfile(source, blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_a_hub_snapshot_works_through_its_links_into_blobs(tmp_path: Path):
    real = write_model(tmp_path / "real")
    snapshot = hub_repository(tmp_path, {path.name: path for path in real.iterdir()})
    assert all((snapshot / name).is_symlink() for name in ("model.safetensors", "tokenizer.json", "config.json"))
    source = open_source(str(snapshot))
    assert torch.equal(source.read("layer.weight"), WEIGHTS["layer.weight"])
    assert source.config()["model_type"] == "llama" and source.license() == "apache-2.0"
    out = tmp_path / "out"
    out.mkdir()
    assert "tokenizer.json" in source.save_tokenizer(out)
    assert (out / "tokenizer.json").read_text() == (real / "tokenizer.json").read_text()
    source.close()


def test_a_hub_snapshot_shard_linking_out_of_its_repository_is_refused(tmp_path: Path):
    """In the hub cache every file is a link; one that leaves the repository (models--a--b) is not followed,
    even for weights, and even when the index names it plainly."""
    real = write_model(tmp_path / "real")
    shard = "model-00001-of-00001.safetensors"
    write_index(real, "model.safetensors.index.json", shard)
    snapshot = hub_repository(
        tmp_path,
        {"config.json": real / "config.json", "model.safetensors.index.json": real / "model.safetensors.index.json"},
    )
    elsewhere = tmp_path / "private" / "model.safetensors"
    elsewhere.parent.mkdir()
    save_file(WEIGHTS, elsewhere)
    (snapshot / shard).symlink_to(elsewhere)
    with pytest.raises(ComposerError) as caught:
        open_source(str(snapshot))
    message = str(caught.value)
    assert str(snapshot / shard) in message and str(elsewhere) in message and "models--a--b" in message


def test_a_folder_of_links_the_user_made_keeps_working(tmp_path: Path):
    """tests/test_methods_end_to_end.py's twins: every file a link to a model folder elsewhere; the weights may be
    links anywhere, the tokenizer, config and card may link to where the weights are."""
    real = write_model(tmp_path / "real")
    shard = "model-00001-of-00001.safetensors"
    (real / "model.safetensors").rename(real / shard)
    write_index(real, "model.safetensors.index.json", shard)
    twin = tmp_path / "links" / "twin"
    twin.mkdir(parents=True)
    for path in real.iterdir():
        (twin / path.name).symlink_to(path)
    source = open_source(str(twin))
    assert torch.equal(source.read("norm.weight"), WEIGHTS["norm.weight"])
    assert source.config()["hidden_size"] == 4 and source.license() == "apache-2.0"
    out = tmp_path / "out"
    out.mkdir()
    assert set(source.save_tokenizer(out)) == {"tokenizer.json"}
    source.close()


def test_a_model_folder_that_is_itself_a_link_works(tmp_path: Path):
    real = write_model(tmp_path / "real")
    (tmp_path / "alias").symlink_to(real)
    source = open_source(str(tmp_path / "alias"))
    assert source.has_tokenizer() and source.config()["model_type"] == "llama"
    source.close()


# ---- files copied into the output ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "config.json", "README.md"])
def test_a_copied_file_linking_out_of_the_folder_is_refused(tmp_path: Path, name: str):
    folder = write_model(tmp_path / "model")
    secret = write_secret(tmp_path)
    (folder / name).unlink(missing_ok=True)
    (folder / name).symlink_to(secret)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ComposerError) as caught:  # config.json is read as the folder opens (its quantization)
        source = open_source(str(folder))
        {"config.json": source.config, "README.md": source.license}.get(name, lambda: source.save_tokenizer(out))()
    assert str(folder / name) in str(caught.value) and str(secret) in str(caught.value)
    assert not any(SECRET in path.read_text() for path in out.iterdir())


def test_a_twin_tokenizer_may_not_link_beyond_the_folder_its_weights_are_in(tmp_path: Path):
    real = write_model(tmp_path / "real")
    secret = write_secret(tmp_path)
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "model.safetensors").symlink_to(real / "model.safetensors")
    (twin / "tokenizer.json").symlink_to(secret)
    with pytest.raises(ComposerError, match="id_rsa"):
        open_source(str(twin)).has_tokenizer()


def test_a_tokenizer_linking_out_never_reaches_a_composed_output(tmp_path: Path):
    """The defect end to end: a downloaded model whose tokenizer.json links to a private file."""
    model = save_tiny_model(tmp_path / "downloaded", layers=1)
    secret = write_secret(tmp_path)
    (model / "tokenizer.json").symlink_to(secret)
    out = tmp_path / "out"
    with pytest.raises(ComposerError, match="tokenizer.json"):
        compose_text(f"merge_method: passthrough\nmodels:\n  - model: {model}\n", out, ExecutionOptions(progress=False))
    written = [path for path in tmp_path.rglob("*") if path.is_file() and not path.is_symlink() and path != secret]
    assert not any(SECRET.encode() in path.read_bytes() for path in written)


def write_adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    factors = {
        "base_model.model.layer.lora_A.weight": torch.ones(1, 4),
        "base_model.model.layer.lora_B.weight": torch.ones(4, 1),
    }
    save_file(factors, folder / "adapter_model.safetensors")
    return folder


def test_an_adapter_tokenizer_linking_out_of_its_folder_is_refused(tmp_path: Path):
    base = write_model(tmp_path / "base")
    adapter = write_adapter(tmp_path / "adapter")
    (adapter / "tokenizer.json").symlink_to(write_secret(tmp_path))
    source = open_source(f"{base}+{adapter}")
    assert torch.equal(source.read("layer.weight"), WEIGHTS["layer.weight"] + 1)
    with pytest.raises(ComposerError, match="adapter/tokenizer.json"):
        source.save_tokenizer(tmp_path)
    source.close()


def test_a_hub_adapter_linking_out_of_its_repository_is_refused(tmp_path: Path):
    base = write_model(tmp_path / "base")
    adapter = write_adapter(tmp_path / "adapter")
    snapshot = hub_repository(tmp_path, {"adapter_config.json": adapter / "adapter_config.json"})
    (snapshot / "adapter_model.safetensors").symlink_to(adapter / "adapter_model.safetensors")
    with pytest.raises(ComposerError, match="adapter_model.safetensors"):
        open_source(f"{base}+{snapshot}")


def test_gguf_tokenizer_comes_from_the_gguf_alone(tmp_path: Path, monkeypatch):
    """transformers reads tokenizer files lying beside a GGUF too: it is shown a folder with nothing but the GGUF."""
    from types import SimpleNamespace

    import transformers

    from composer.sources.gguf_file import GGUFFile

    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF")
    (folder / "tokenizer_config.json").symlink_to(write_secret(tmp_path))
    seen = []

    class Tokenizer:
        def save_pretrained(self, destination):
            (Path(destination) / "tokenizer.json").write_text("{}")

    def from_pretrained(path, gguf_file):
        seen.append(sorted(os.listdir(path)))
        assert Path(path, gguf_file).resolve() == (folder / "model.gguf").resolve()
        return Tokenizer()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    source = GGUFFile.__new__(GGUFFile)
    source.path, source.header = folder / "model.gguf", SimpleNamespace(metadata={"tokenizer.ggml.tokens": ["a"]})
    out = tmp_path / "out"
    out.mkdir()
    assert source.save_tokenizer(out) == ["tokenizer.json"]
    assert seen == [["model.gguf"]]
