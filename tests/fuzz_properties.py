"""Fuzzing the parsers that read files from strangers: recipes, safetensors headers, GGUF headers, config.json.

The property is the same for every parser: any input ends in a correct result or a ComposerError, within
TIME_LIMIT seconds, never in another exception, a hang or a traceback. Each `check_*` function runs one input
and returns what happened ("ok" or the kind of refusal); tests/test_fuzz.py runs them with a small fixed budget,
bench/fuzz.py with a large one and prints what it saw.

Inputs are valid files mutated: byte flips, interesting integers written over length fields, cuts and
insertions for binary formats; YAML-significant tokens (anchors, aliases, brackets, tags, odd scalars) and
nesting for recipes; random JSON values put in the place of header fields.
"""

from __future__ import annotations

import atexit
import copy
import json
import re
import shutil
import signal
import struct
import tempfile
import time
from contextlib import contextmanager
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

from hypothesis import strategies as st

from composer.errors import ComposerError

TIME_LIMIT = 10.0  # seconds for one input; each takes milliseconds, so only a hang comes near it
_scratch = Path(tempfile.mkdtemp(prefix="composer-fuzz-"))
atexit.register(shutil.rmtree, _scratch, ignore_errors=True)


class TooSlow(Exception):
    pass


@contextmanager
def time_limit(seconds: float = TIME_LIMIT):
    """Fail an input that runs past `seconds` (on the main thread, where SIGALRM can interrupt it)."""

    def expired(signum, frame):
        raise TooSlow(f"one input ran for more than {seconds} s")

    try:
        previous = signal.signal(signal.SIGALRM, expired)
    except ValueError:  # not the main thread: measure only
        previous = None
    started = time.monotonic()
    if previous is not None:
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    if time.monotonic() - started > seconds:
        raise TooSlow(f"one input ran for {time.monotonic() - started:.1f} s, more than {seconds} s")


def kind(error: ComposerError) -> str:
    """A refusal's kind: its message with the file name, numbers and quoted names taken out."""
    text = str(error).replace(str(_scratch), "")
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\([^)]*\)", "…", text)
    text = re.sub(r"\d+", "N", text)
    text = re.sub(r"^[^ ]*\.(yml|safetensors|gguf|json)(, line N(, column N)?)?:? ?", "", text)
    return " ".join(text.split()[:9])


def _outcome(run) -> str:
    with time_limit():
        try:
            run()
        except ComposerError as error:
            if "\n" in str(error):
                raise AssertionError(f"a message of more than one line: {error}") from None
            return kind(error)
    return "ok"


def _file(name: str, data: bytes) -> Path:
    path = _scratch / name
    path.write_bytes(data)
    return path


# values of every JSON type (and YAML's), put in the place of header fields and recipe values
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["F32", "BF16", "F16", "I64", "Q9", "9" * 5000]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


# ---- recipes --------------------------------------------------------------------------------------------

SEED_RECIPES = [
    "merge_method: linear\nmodels:\n  - model: org/a\n    parameters: &w {weight: 0.5}\n  - model: org/b\n    parameters: *w\ndtype: bfloat16\n",
    (
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: ./m\n        layer_range: [0, 4]\n"
        "  - sources:\n      - model: ./m\n        layer_range: [2, 4]\n        parameters:\n          scale:\n"
        "            - filter: o_proj\n              value: 0.5\n            - value: 1.0\n"
    ),
    (
        "merge_method: slerp\nbase_model: org/a\nmodels:\n  - model: org/a\n  - model: org/b\nparameters:\n"
        "  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n    - value: 0.5\nrandom_seed: 3\n"
    ),
    (
        "merge_method: ties\nbase_model: org/base\nmodels:\n  - model: org/a\n    parameters:\n      <<: &p {density: 0.5, weight: 0.3}\n"
        "  - model: org/b\n    parameters: *p\nparameters:\n  normalize: true\n  int8_mask: true\ntokenizer_source: union\n"
    ),
    (
        "stages:\n  - name: blend\n    merge_method: linear\n    models:\n      - {model: org/a, parameters: {weight: 1}}\n"
        "      - {model: org/b, parameters: {weight: 1}}\nmerge_method: passthrough\nslices:\n  - sources:\n"
        "      - {model: blend, layer_range: [0, 2]}\n"
    ),
    (
        "base_model: org/base\ngate_mode: hidden\ndtype: bfloat16\nexperts_per_token: 2\nexperts:\n  - source_model: org/a\n"
        "    positive_prompts: &code [\"write a function\", \"fix this bug\"]\n  - source_model: org/b\n"
        "    positive_prompts: [\"once upon a time\"]\n    negative_prompts: *code\n"
    ),
    (
        "name: tiny moe\nmoe:\n  base_model: org/base\n  gate_mode: random\n  experts:\n    - source_model: org/a\n"
        "    - source_model: org/b\nrandom_seed: 1\n"
    ),
]

YAML_PIECES = [
    "&a ",
    "*a",
    "&b [",
    "*b",
    "<<: *a\n",
    "<<: [*a, *b]\n",
    "[",
    "]",
    "{",
    "}",
    ": ",
    "- ",
    "\n",
    "  ",
    "\t",
    "#",
    "'",
    '"',
    "? ",
    "|\n",
    ">-\n",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    "%TAG ! tag:x,2000:\n",
    "!!binary ",
    "!!python/object:os.system ",
    "!!set ",
    "!!omap ",
    "!!pairs ",
    "!!timestamp ",
    "!!bool ",
    "!!null ",
    "!!str ",
    "!!seq ",
    "!!map ",
    "!!float ",
    "!!int ",
    "2024-13-45",
    "2001-12-14t21:59:43.10-05:00",
    "9" * 4400,
    "0x1F",
    "0o17",
    "1e999",
    ".nan",
    "-.inf",
    "~",
    "null",
    "true",
    "yes",
    "1_000",
    "\x00",
    "\ufeff",
    "\x85",
    "\u2028",
    "ü",
    "merge_method: ",
    "models:",
    "slices:",
    "parameters:",
    "weight: ",
    "layer_range: ",
    "experts:",
    "moe:",
]


@st.composite
def alias_bombs(draw) -> str:
    levels, width = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    lines = [f"l0: &l0 [{', '.join(['1'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    where = draw(st.sampled_from(["top", "weight"]))
    if where == "top":
        return "merge_method: linear\n" + "\n".join(lines) + "\n"
    inner = ", ".join(line.split(": ", 1)[1] for line in lines)
    return f"merge_method: linear\nmodels:\n  - model: org/a\n    parameters:\n      weight: [{inner}]\n"


@st.composite
def nested_recipes(draw) -> str:
    depth = draw(st.integers(1, 3000))
    opening, closing = draw(st.sampled_from([("[", "]"), ("{a: ", "}"), ("- ", "")]))
    if opening == "- ":
        body = "".join("  " * i + "- \n" for i in range(min(depth, 400)))
        return "merge_method: linear\nmodels:\n" + body
    return f"merge_method: linear\nmodels: {opening * depth}1{closing * depth}\n"


@st.composite
def mutated_recipes(draw) -> str:
    text = draw(st.sampled_from(SEED_RECIPES))
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, len(text)))
        piece = draw(st.one_of(st.sampled_from(YAML_PIECES), st.text(max_size=6)))
        action = draw(st.sampled_from(["insert", "delete", "replace", "repeat line"]))
        end = min(len(text), position + draw(st.integers(0, 12)))
        if action == "insert":
            text = text[:position] + piece + text[position:]
        elif action == "delete":
            text = text[:position] + text[end:]
        elif action == "replace":
            text = text[:position] + piece + text[end:]
        else:
            lines = text.splitlines(keepends=True)
            line = draw(st.integers(0, max(0, len(lines) - 1)))
            text = "".join(lines[: line + 1] + lines[line:])
    return text


@st.composite
def retyped_recipes(draw) -> str:
    """A seed recipe with values somewhere in it replaced by values of other types, written back as YAML."""
    import yaml

    data = yaml.safe_load(draw(st.sampled_from(SEED_RECIPES)))
    for _ in range(draw(st.integers(1, 3))):
        parent, key = None, None
        node = data
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            parent, key = (
                node,
                draw(st.sampled_from(sorted(node, key=str) if isinstance(node, dict) else range(len(node)))),
            )
            node = node[key]
        if parent is not None:
            parent[key] = draw(json_values)
    return yaml.safe_dump(data)


def recipe_texts():
    return st.one_of(mutated_recipes(), retyped_recipes(), alias_bombs(), nested_recipes(), st.text(max_size=200))


def check_recipe(text: str) -> str:
    """Both recipe parsers (merge recipes and MoE configs) on one text."""
    from composer.moe.schema import MoEConfig, parse_moe_config
    from composer.recipe import Recipe, parse_recipe

    outcomes = []
    for parse, expected in ((parse_recipe, Recipe), (parse_moe_config, MoEConfig)):

        def run(parse=parse, expected=expected):
            assert isinstance(parse(text, "recipe.yml"), expected)

        outcomes.append(_outcome(run))
    return "ok" if "ok" in outcomes else outcomes[0]


# ---- safetensors ------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def seed_safetensors() -> bytes:
    """A real small safetensors file: tensors of several dtypes and shapes, a scalar and an empty one."""
    import torch
    from safetensors.torch import save

    tensors = {
        "embed.weight": torch.arange(24, dtype=torch.float32).reshape(6, 4),
        "norm.weight": torch.ones(4, dtype=torch.bfloat16),
        "layers.0.mlp.weight": torch.arange(8, dtype=torch.float16).reshape(2, 4),
        "step": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
    }
    return save(tensors, metadata={"format": "pt"})


def _split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: object, body: bytes, deep: int = 0) -> bytes:
    """A safetensors file of `header` and `body`; `deep` > 0 writes the string "@deep@" as lists that many levels deep."""
    text = json.dumps(header)
    if deep:
        text = text.replace('"@deep@"', "[" * deep + "]" * deep)
    encoded = text.encode()
    return struct.pack("<Q", len(encoded)) + encoded + body


INTERESTING_INTEGERS = [
    0,
    1,
    7,
    8,
    255,
    256,
    2**16 - 1,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**48,
    2**63 - 1,
    2**63,
    2**64 - 1,
]


# a cut ends most files' story at once, so it is drawn less often than the changes that reach deeper
MUTATIONS = ["flip"] * 3 + ["int64"] * 2 + ["int32"] * 2 + ["byte"] * 2 + ["insert", "delete", "cut"]


@st.composite
def mutated_bytes(draw, seed: bytes, keep: int = 0) -> bytes:
    """`seed` with up to six changes after its first `keep` bytes (a magic number worth keeping)."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        first = min(keep, len(data))
        # spread over the file: hypothesis draws small integers far more often, but two small ones are near uniform
        place = draw(st.integers(0, 63)) * 64 + draw(st.integers(0, 63))
        position = first + place * max(0, len(data) - 1 - first) // 4095
        action = draw(st.sampled_from(MUTATIONS))
        if action == "flip" and position < len(data):
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action in ("int64", "int32"):
            width = 8 if action == "int64" else 4
            value = draw(st.one_of(st.sampled_from(INTERESTING_INTEGERS), st.integers(0, 2**64 - 1))) % (
                1 << (8 * width)
            )
            data[position : position + width] = value.to_bytes(width, "little")
        elif action == "byte" and position < len(data):
            data[position] = draw(st.sampled_from(b'\x00\xff"[]{},:0-9e\\'))
        elif action == "cut":
            del data[position:]
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[position : position + draw(st.integers(1, 16))]
    return bytes(data)


@st.composite
def mutated_headers(draw) -> bytes:
    """The real file's header with fields replaced, shifted, removed or copied; its data section kept."""
    header, body = _split(seed_safetensors())
    header = copy.deepcopy(header)
    names = sorted(name for name in header if name != "__metadata__")
    deep = 0
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(names))
        action = draw(
            st.sampled_from(["field", "shift", "remove", "copy offsets", "entry", "metadata", "new tensor", "deep"])
        )
        entry = header.get(name)
        if not isinstance(entry, dict):
            header[name] = draw(json_values)
        elif action == "field":
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_values)
        elif action == "shift" and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2:
            offsets = entry["data_offsets"]
            which = draw(st.integers(0, 1))
            if isinstance(offsets[which], int):
                offsets[which] += draw(st.integers(-64, 64))
        elif action == "remove":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif action == "copy offsets":
            other = header.get(draw(st.sampled_from(names)))
            if isinstance(other, dict):
                entry.update(
                    {key: copy.deepcopy(other[key]) for key in ("dtype", "shape", "data_offsets") if key in other}
                )
        elif action == "entry":
            header[name] = draw(json_values)
        elif action == "metadata":
            header["__metadata__"] = draw(json_values)
        elif action == "new tensor":
            header[draw(st.text(min_size=1, max_size=8))] = copy.deepcopy(entry)
        else:
            deep = draw(st.integers(50, 100_000))
            entry[draw(st.sampled_from(["shape", "data_offsets", "extra"]))] = "@deep@"
    return _join(header, body, deep)


def safetensors_files():
    return st.one_of(mutated_bytes(seed_safetensors()), mutated_headers())


def check_safetensors(data: bytes) -> str:
    """read_layout on the file, then a model folder holding it; an accepted file must be one that reads."""
    from composer.safetensors_header import read_layout
    from composer.sources.folder import SafetensorsFolder
    from composer.sources.safetensors_format import DTYPE_BY_CODE

    folder = _scratch / "safetensors-model"
    folder.mkdir(exist_ok=True)
    path = folder / "model.safetensors"
    path.write_bytes(data)

    def run():
        header, data_start = read_layout(path)
        spans = []
        for name, entry in header.items():
            if name == "__metadata__":
                assert entry is None or all(isinstance(value, str) for value in entry.values())
                continue
            begin, end = entry["data_offsets"]
            count = 1
            for size in entry["shape"]:
                assert isinstance(size, int) and not isinstance(size, bool) and size >= 0
                count *= size
            assert (
                0 <= begin <= end <= len(data) - data_start
                and end - begin == count * DTYPE_BY_CODE[entry["dtype"]].itemsize
            )
            spans.append((begin, end))
        spans = sorted(span for span in spans if span[1] > span[0])
        assert all(first[1] <= second[0] for first, second in pairwise(spans)), "overlapping tensors accepted"
        source = SafetensorsFolder("fuzzed", folder)
        try:
            for name, info in source.tensor_infos().items():
                assert tuple(source.read(name).shape) == info.shape
        finally:
            source.close()

    return _outcome(run)


# ---- GGUF ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def seed_gguf() -> bytes:
    """A small valid GGUF file written with the gguf package: scalars, strings, a string array, a number array,
    a nested array and three tiny tensors (one quantised)."""
    import gguf
    import numpy as np

    path = _scratch / "seed.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("fuzz seed")
    writer.add_license("mit")
    writer.add_block_count(1)
    writer.add_uint32("llama.context_length", 64)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_bool("general.flag", True)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b", "ab"])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0, -3.0])
    writer.add_array("general.nested", [[1, 2], [3]])
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float16))
    writer.add_tensor(
        "blk.0.ffn_up.weight",
        gguf.quantize(np.ones((2, 32), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0),
        raw_dtype=gguf.GGMLQuantizationType.Q8_0,
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def gguf_files():
    return mutated_bytes(seed_gguf(), keep=8)  # the magic and the version


def check_gguf(data: bytes) -> str:
    """read_gguf_header on the file; an accepted header must describe tensors inside the file."""
    from composer.sources.gguf_format import read_gguf_header

    path = _file("fuzzed.gguf", data)

    def run():
        header = read_gguf_header(path)
        assert all(isinstance(key, str) for key in header.metadata)
        for entry in header.tensors.values():
            assert header.data_start <= entry.offset and entry.offset + entry.nbytes <= len(data)

    return _outcome(run)


# ---- config.json --------------------------------------------------------------------------------------

SEED_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
    "layer_types": ["full_attention"] * 4,
    "torch_dtype": "float32",
}


@st.composite
def deep_json(draw) -> bytes:
    depth = draw(st.integers(1, 100_000))
    opening, closing = draw(st.sampled_from([("[", "]"), ('{"a": ', "}")]))
    return ('{"x": ' + opening * depth + "1" + closing * depth + "}").encode()


def config_files():
    seed = json.dumps(SEED_CONFIG, indent=2).encode()
    return st.one_of(
        mutated_bytes(seed),
        deep_json(),
        json_values.map(lambda value: json.dumps(value).encode()),
        st.binary(max_size=64),
    )


def check_config(data: bytes) -> str:
    """The reader every model folder's config.json goes through."""
    from composer.sources.base import FolderFilesMixin

    folder = _scratch / "config-model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_bytes(data)
    reader = FolderFilesMixin()
    reader.folder, reader.reference = folder, "fuzzed"

    def run():
        config = reader.config()
        assert isinstance(config, dict)
        assert json.dumps(config, sort_keys=True) == json.dumps(json.loads(data.decode("utf-8")), sort_keys=True)

    return _outcome(run)


PROPERTIES = {
    "recipes": (recipe_texts, check_recipe),
    "safetensors": (safetensors_files, check_safetensors),
    "gguf": (gguf_files, check_gguf),
    "config": (config_files, check_config),
}
