"""A mixture-of-experts model whose experts are fused (every expert of a layer in one tensor, as transformers 5 and
mergekit-moe save Mixtral and Qwen-MoE) seen as the family's per-expert tensors, so the trace compares experts one
by one with dense MLPs. Each expert's piece is a run of rows of the fused tensor where it lies so; the fused tensor
is read whole and split otherwise."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from composer.architecture import architecture_for
from composer.architecture_experts import FusedTensor
from composer.errors import ComposerError
from composer.sources import ModelSource, TensorInfo


@dataclass(frozen=True)
class Piece:
    fused_name: str  # the full name of the fused tensor
    fused: FusedTensor
    expert: int
    position: int  # among the fused tensor's pieces


class UnfusedExperts(ModelSource):
    def __init__(self, source: ModelSource, pieces: dict[str, Piece]):
        super().__init__(source.reference)
        self.source = source
        self.pieces = pieces
        fused_names = {piece.fused_name for piece in pieces.values()}
        infos = {name: info for name, info in source.tensor_infos().items() if name not in fused_names}
        stored = source.tensor_infos()
        for name, piece in pieces.items():
            whole = stored[piece.fused_name]
            shape = list(whole.shape[1:])
            shape[piece.fused.axis] //= len(piece.fused.pieces)
            infos[name] = TensorInfo(name, tuple(shape), whole.dtype)
        self.infos = infos

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return self.infos

    def read(self, name: str) -> torch.Tensor:
        piece = self.pieces.get(name)
        if piece is None:
            return self.source.read(name)
        return piece.fused.split(self.source.read(piece.fused_name)[piece.expert])[piece.position].contiguous()

    def byte_range(self, name: str) -> tuple[Path, int, int] | None:
        piece = self.pieces.get(name)
        if piece is None:
            return self.source.byte_range(name)
        fused = piece.fused
        if fused.axis != 0 or (fused.interleaved and len(fused.pieces) > 1):
            return None  # not a run of rows: read whole and split
        located = self.source.byte_range(piece.fused_name)
        if located is None:
            return None
        path, offset, _ = located
        length = math.prod(self.infos[name].shape) * self.infos[name].dtype.itemsize
        expert_bytes = length * len(fused.pieces)
        return path, offset + piece.expert * expert_bytes + piece.position * length, length

    def row_reader(self, name: str):
        return None if name in self.pieces else self.source.row_reader(name)

    def config(self) -> dict:
        return self.source.config()

    def save_tokenizer(self, destination: Path) -> list[str]:
        return self.source.save_tokenizer(destination)

    def license(self) -> str | None:
        return self.source.license()

    def close(self) -> None:
        self.source.close()

    def has_tokenizer(self) -> bool:
        return self.source.has_tokenizer()

    def input_paths(self) -> dict[str, Path]:
        return self.source.input_paths()

    def __getattr__(self, attribute: str):  # the wrapped source's other abilities (tokenizer files, folder)
        return getattr(self.source, attribute)


def unfused(source: ModelSource, config: dict) -> ModelSource:
    """`source` itself, or, for a mixture-of-experts family whose files hold fused experts, the per-expert view."""
    try:
        architecture = architecture_for(config, source.reference)
    except ComposerError:
        return source
    experts = architecture.experts
    if experts is None:
        return source
    names = list(source.tensor_infos())
    pattern = re.compile("^" + re.escape(architecture.layer_prefix).replace(re.escape("{i}"), r"(\d+)") + r"(.+)$")
    layers = sorted({int(match.group(1)) for name in names if (match := pattern.match(name))})
    if not layers:
        return source
    try:
        sparse = experts.sparse_layers(config, layers[-1] + 1, source.reference)
        layout = experts.layout_of(set(names), architecture.layer_prefix, sparse, source.reference)
    except ComposerError:
        return source
    if not layout.fused:
        return source
    infos = source.tensor_infos()
    pieces = {}
    for layer in layers:
        prefix = architecture.layer_prefix.format(i=layer)
        for fused in layout.fused:
            fused_name = prefix + fused.name
            if fused_name not in infos:
                continue
            for expert in range(infos[fused_name].shape[0]):
                for position, name in enumerate(fused.piece_names(expert)):
                    pieces[prefix + name] = Piece(fused_name, fused, expert, position)
    return UnfusedExperts(source, pieces) if pieces else source
