"""Layer provenance: for every SUSPECT layer, the candidate layer (any depth, any candidate) it resembles most.

Similarity of two tensors is the cosine of their sketches (scale-invariant, so scaled copies match); of two
layers, the mean over SUSPECT's matrices of the best cosine among the candidate layer's matrices of the same
shape. Matching by shape, not by name, is what finds a dense model's MLP among an MoE layer's experts.
Byte-identical tensors (equal digests) score exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from composer.trace.fingerprints import TensorPrint
from composer.trace.layout import TracedModel


@dataclass
class Fingerprinted:
    model: TracedModel
    prints: dict[str, TensorPrint]


@dataclass
class CandidateMatch:
    """How SUSPECT's layers relate to one candidate's."""

    reference: str
    similarity: torch.Tensor  # [SUSPECT layers, candidate layers]
    # SUSPECT matrix name -> candidate layer -> (candidate tensor name, cosine): its best partner in that layer
    partners: dict[str, dict[int, tuple[str, float]]] = field(default_factory=dict)
    identical: dict[str, str] = field(default_factory=dict)  # SUSPECT tensor -> a byte-identical candidate tensor
    shared_shapes: bool = False  # whether any tensor shape is common to both models

    def best_layer(self, layer_position: int) -> tuple[int, float]:
        row = self.similarity[layer_position]
        if row.numel() == 0:
            return -1, 0.0
        best = int(torch.argmax(row))
        return best, float(row[best])


def _unit(sketch: torch.Tensor) -> torch.Tensor:
    flat = sketch.reshape(-1)
    return flat / flat.norm().clamp_min(1e-30)


def _matrices(model: TracedModel, prints: dict[str, TensorPrint], names: list[str]) -> dict[tuple[int, ...], list[str]]:
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name in names:
        if prints[name].sketch is not None:
            by_shape.setdefault(prints[name].shape, []).append(name)
    return by_shape


def match_candidate(suspect: Fingerprinted, candidate: Fingerprinted) -> CandidateMatch:
    s_model, c_model = suspect.model, candidate.model
    s_layers, c_layers = list(s_model.layers), list(c_model.layers)
    c_position = {layer: position for position, layer in enumerate(c_layers)}
    c_layer_of = {name: layer for layer, members in c_model.layers.items() for name in members.values()}
    match = CandidateMatch(c_model.reference, torch.zeros(len(s_layers), len(c_layers)))
    by_digest: dict[str, str] = {}
    for name, tensor_print in candidate.prints.items():
        by_digest.setdefault(tensor_print.digest, name)
    for name, tensor_print in suspect.prints.items():
        if tensor_print.digest in by_digest:
            match.identical[name] = by_digest[tensor_print.digest]
    s_shapes = _matrices(s_model, suspect.prints, list(suspect.prints))
    c_shapes = _matrices(c_model, candidate.prints, [n for n in candidate.prints if n in c_layer_of])
    match.shared_shapes = bool(
        {p.shape for p in suspect.prints.values()} & {p.shape for p in candidate.prints.values()}
    )
    scores: dict[str, torch.Tensor] = {}  # SUSPECT matrix -> best cosine per candidate layer
    for shape, s_names in s_shapes.items():
        c_names = c_shapes.get(shape)
        if not c_names:
            continue
        cosines = (
            torch.stack([_unit(suspect.prints[n].sketch) for n in s_names])
            @ torch.stack([_unit(candidate.prints[n].sketch) for n in c_names]).T
        )
        for row, s_name in enumerate(s_names):
            best = torch.full((len(c_layers),), -1.0)
            partners: dict[int, tuple[str, float]] = {}
            for column, c_name in enumerate(c_names):
                layer = c_layer_of[c_name]
                value = 1.0 if match.identical.get(s_name) == c_name else float(cosines[row, column])
                position = c_position[layer]
                if value > best[position]:
                    best[position] = value
                    partners[layer] = (c_name, value)
            scores[s_name] = best.clamp_min(0.0)
            match.partners[s_name] = partners
    for position, layer in enumerate(s_layers):
        members = [name for name in s_model.layers[layer].values() if suspect.prints[name].sketch is not None]
        found = [scores[name] for name in members if name in scores]
        if found:
            # matrices with no partner of their shape count as zero: a layer only half found is half similar
            match.similarity[position] = torch.stack(found).sum(dim=0) / max(len(members), 1)
    return match
