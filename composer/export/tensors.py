"""Which GGUF tensors a model becomes: llama.cpp's name for each, the transformers tensors it is made of, and the
fix-ups its values need. Only headers are read here; `materialise` reads one GGUF tensor's inputs at a time.

MoE experts are one tensor per projection in GGUF ([experts, rows, columns]): per-expert tensors on disk
(`experts.N.w1`, `experts.N.gate_proj`) are stacked, and transformers' fused `experts.gate_up_proj` is split
into its gate and up halves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from composer.errors import ComposerError
from composer.export.families import Family, transformers_config
from composer.sources.base import ModelSource, TensorInfo

PER_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<projection>\w+)\.weight$")
FUSED_GATE_UP = re.compile(r"^(?P<experts>.+\.experts)\.gate_up_proj(?:\.weight)?$")
FUSED_DOWN = re.compile(r"^(?P<experts>.+\.experts)\.down_proj(?:\.weight)?$")
ROUTERS = ("FFN_GATE_INP", "FFN_GATE_INP_SHEXP")  # kept in float32: small, and they decide which experts run


@dataclass(frozen=True)
class GGUFTensor:
    name: str  # llama.cpp's name
    kind: str  # gguf.MODEL_TENSOR member name
    shape: tuple[int, ...]  # torch order (slowest first), as written
    inputs: tuple[str, ...]  # transformers tensors; several are experts, stacked along a new first axis
    heads: int | None = None  # llama's q/k: rows reordered to llama.cpp's rotary layout, per head
    norm_offset: float = 0.0  # added to the weight (Gemma's norms)
    half: int | None = None  # of a fused gate_up tensor: 0 the gate rows, 1 the up rows
    transposed: bool = False  # a fused expert tensor stored [experts, columns, rows]

    @property
    def keeps_float32(self) -> bool:
        return len(self.shape) == 1 or self.kind in ROUTERS


def tensor_plan(infos: dict[str, TensorInfo], config: dict, family: Family, where: str) -> list[GGUFTensor]:
    """Every GGUF tensor of the model, in the order written (the source's order, experts where their first one is)."""
    import gguf

    arch = next((value for value, name in gguf.MODEL_ARCH_NAMES.items() if name == family.arch), None)
    if arch is None:
        raise ComposerError(
            f"{where}: the installed gguf package ({gguf.__name__} {_version()}) does not know llama.cpp's architecture "
            f"'{family.arch}'; upgrade it with: pip install -U gguf"
        )
    names = gguf.get_tensor_name_map(arch, int(config.get("num_hidden_layers") or 0))
    # the family's default where the file leaves it out (Gemma ties, Llama does not)
    tied = bool(getattr(transformers_config(config, where), "tie_word_embeddings", False))
    hidden = int(config.get("hidden_size") or 0)
    groups: dict[str, list[tuple[int, str]]] = {}
    order: list[tuple[str, str]] = []  # (kind of entry, key)
    for name in infos:
        match = PER_EXPERT.match(name)
        if match:
            key = f"{match['experts']}.{match['projection']}"
            if key not in groups:
                groups[key] = []
                order.append(("experts", key))
            groups[key].append((int(match["index"]), name))
        else:
            order.append(("tensor", name))
    planned = []
    for entry, key in order:
        if entry == "experts":
            planned.append(_stacked(key, groups[key], infos, names, where))
        elif key == "lm_head.weight" and tied:
            continue  # llama.cpp reads the output head from token_embd when there is no output tensor
        else:
            planned += _single(key, infos[key], names, config, family, hidden, where)
    seen: dict[str, str] = {}
    for tensor in planned:
        if tensor.name in seen:
            raise ComposerError(
                f"{where}: tensors '{seen[tensor.name]}' and '{tensor.inputs[0]}' both become GGUF tensor '{tensor.name}'."
            )
        seen[tensor.name] = tensor.inputs[0]
    return planned


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "unknown version"


def _gguf_name(names, key: str, where: str, shown: str) -> tuple[str, str]:
    """(llama.cpp's name, the gguf.MODEL_TENSOR name) of a transformers name without its suffix."""
    found = names.get_type_and_name(key)
    if found is None:
        raise ComposerError(
            f"{where}: tensor '{shown}' has no place in llama.cpp's layout for this architecture, so the GGUF cannot be "
            "written without losing it. Convert this model with llama.cpp's convert_hf_to_gguf.py instead."
        )
    kind, name = found
    return name, kind.name


def _stacked(key, members, infos, names, where: str) -> GGUFTensor:
    members = sorted(members)
    indices = [index for index, _ in members]
    if indices != list(range(len(indices))):
        raise ComposerError(
            f"{where}: the experts of '{key}' are numbered {indices[:8]}, not 0 to {len(indices) - 1} without gaps."
        )
    shapes = {infos[name].shape for _, name in members}
    if len(shapes) != 1:
        raise ComposerError(
            f"{where}: the experts of '{key}' differ in shape ({sorted(shapes)}); they cannot be stacked."
        )
    name, kind = _gguf_name(names, key, where, members[0][1])
    return GGUFTensor(name + ".weight", kind, (len(members), *shapes.pop()), tuple(n for _, n in members))


def _single(name: str, info: TensorInfo, names, config, family: Family, hidden: int, where: str) -> list[GGUFTensor]:
    gate_up = FUSED_GATE_UP.match(name)
    if gate_up and len(info.shape) == 3:
        experts, first, second = info.shape
        transposed = second != hidden and first == hidden
        rows = (second if transposed else first) // 2
        columns = first if transposed else second
        planned = []
        for half, projection in enumerate(("gate_proj", "up_proj")):
            gguf_name, kind = _gguf_name(names, f"{gate_up['experts']}.{projection}", where, name)
            planned.append(
                GGUFTensor(
                    gguf_name + ".weight", kind, (experts, rows, columns), (name,), half=half, transposed=transposed
                )
            )
        return planned
    down = FUSED_DOWN.match(name)
    if down and len(info.shape) == 3:
        experts, first, second = info.shape
        transposed = first != hidden and second == hidden
        gguf_name, kind = _gguf_name(names, f"{down['experts']}.down_proj", where, name)
        shape = (experts, second, first) if transposed else info.shape
        return [GGUFTensor(gguf_name + ".weight", kind, tuple(shape), (name,), transposed=transposed)]
    stem, suffix = (name.rsplit(".", 1) + [""])[:2]
    if suffix not in ("weight", "bias"):
        stem, suffix = name, "weight"
    gguf_name, kind = _gguf_name(names, stem, where, name)
    heads = None
    if family.interleaved_rope and kind in ("ATTN_Q", "ATTN_K"):
        count = config.get("num_attention_heads") if kind == "ATTN_Q" else config.get("num_key_value_heads")
        heads = int(count or config.get("num_attention_heads"))
    offset = family.norm_offset if kind.endswith("NORM") and suffix == "weight" else 0.0
    shape = info.shape
    if kind == "FFN_GATE_INP_SHEXP" and len(shape) == 2 and shape[0] == 1:
        shape = shape[1:]  # llama.cpp's shared-expert gate is a vector
    return [GGUFTensor(f"{gguf_name}.{suffix}", kind, tuple(shape), (name,), heads=heads, norm_offset=offset)]


def interleave_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rows hold each head's rotary halves one after the other; llama.cpp's llama rotates neighbouring pairs."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def materialise(source: ModelSource, tensor: GGUFTensor) -> torch.Tensor:
    """The float32 values of one GGUF tensor, read from `source` now."""
    if len(tensor.inputs) > 1:
        values = torch.stack([source.read(name).to(torch.float32) for name in tensor.inputs])
    else:
        values = source.read(tensor.inputs[0]).to(torch.float32)
    if tensor.transposed:
        values = values.transpose(1, 2)
    if tensor.half is not None:
        rows = values.shape[1] // 2
        values = values[:, tensor.half * rows : (tensor.half + 1) * rows]
    if tensor.heads is not None:
        values = interleave_rotary_rows(values, tensor.heads)
    if tensor.norm_offset:
        values = values + tensor.norm_offset
    return values.reshape(tensor.shape).contiguous()
