"""Router gates computed when the model is written: the first gate tensor the executor asks for runs the
prompts through the base model (one layer at a time, from disk) and keeps every layer's rows, which are small."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

import torch

from composer.errors import ComposerWarning
from composer.moe import gates as G
from composer.sources import ModelSource


class DegenerateGatesWarning(ComposerWarning):
    """Two experts' router rows cannot tell their prompts apart in some layers."""


@dataclass
class GateSettings:
    mode: str  # hidden, cheap_embed, random, uniform_random
    pooling: str  # mean or last
    rows: str  # discriminant or average
    positives: list[list[str]]  # per expert
    negatives: list[list[str]]
    labels: list[str]  # per expert, for messages
    seed: int = 0


@dataclass
class GateComputer:
    settings: GateSettings
    base: ModelSource
    tokenizer_source: ModelSource
    config: dict
    layer_prefix: str
    progress: bool | None = None
    _rows: dict[int, torch.Tensor] | None = field(default=None, init=False)
    _problems: dict[tuple[int, int], list[tuple[int, str]]] = field(default_factory=dict, init=False)

    @property
    def experts(self) -> int:
        return len(self.settings.positives)

    def rows(self, layer: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The [experts, hidden] router weight of `layer` (float64, on the CPU); prompt-based rows are computed for
        every layer at once, the base model's layers running on `device`."""
        mode = self.settings.mode
        if mode in ("random", "uniform_random"):
            hidden = self.config["hidden_size"]
            return G.random_rows(self.experts, hidden, seed, uniform=mode == "uniform_random")
        if self._rows is None:
            self._rows = self._compute_hidden(device) if mode == "hidden" else self._compute_cheap()
            self.warn()
        return self._rows[layer]

    # --- cheap_embed ------------------------------------------------------------------------------
    def _compute_cheap(self) -> dict[int, torch.Tensor]:
        from composer.moe.hidden import load_tokenizer, tokenize

        tokenizer = load_tokenizer(self.tokenizer_source)
        embeddings = self.base.read("model.embed_tokens.weight").double()

        def average(prompts: list[str]) -> torch.Tensor:
            if not prompts:
                return torch.zeros(embeddings.shape[1], dtype=torch.float64)
            batch = tokenize(tokenizer, prompts)
            return G.pooled(embeddings[batch.ids], batch.mask, self.settings.pooling).mean(0)

        means = torch.stack([average(p) for p in self.settings.positives])
        negatives = torch.stack([average(p) for p in self.settings.negatives])
        del embeddings
        rows = {}
        for layer in range(self.config["num_hidden_layers"]):
            norm_weight = self.base.read(self.layer_prefix.format(i=layer) + "post_attention_layernorm.weight")
            rows[layer] = G.embedding_rows(means, negatives, norm_weight, self.settings.rows)
            self._note_collisions(layer, rows[layer])
        return rows

    # --- hidden -----------------------------------------------------------------------------------
    def _compute_hidden(self, device: torch.device | str) -> dict[int, torch.Tensor]:
        from tqdm import tqdm

        from composer.moe.hidden import load_tokenizer, router_inputs, tokenize

        settings = self.settings
        texts: list[str] = []
        positives, negatives = [], []
        for group, target in ((settings.positives, positives), (settings.negatives, negatives)):
            for prompts in group:
                target.append(list(range(len(texts), len(texts) + len(prompts))))
                texts += prompts
        batch = tokenize(load_tokenizer(self.tokenizer_source), texts)
        layer_count = self.config["num_hidden_layers"]
        enabled = sys.stderr.isatty() if self.progress is None else self.progress
        rows_by_layer = {}
        with tqdm(total=layer_count, desc=f"router gates from {len(texts)} prompts", unit="layer", disable=not enabled, file=sys.stderr) as bar:
            for layer, states in router_inputs(self.base, self.config, batch, self.layer_prefix, device):
                stats = G.statistics(states, batch.mask, positives, negatives, settings.pooling)
                rows = G.discriminant_rows(stats) if settings.rows == "discriminant" else G.average_rows(stats)
                rows_by_layer[layer] = rows
                for e, f, share in G.close_pairs(G.separations(stats)):
                    self._problems.setdefault((e, f), []).append((layer, f"even the best linear router would confuse about {share:.0%} of their prompt tokens"))
                bar.update(1)
        return rows_by_layer

    def _note_collisions(self, layer: int, rows: torch.Tensor) -> None:
        for e, f, cosine in G.collinear_pairs(rows):
            self._problems.setdefault((e, f), []).append((layer, f"their rows have cosine {cosine:.3f} once the common part is removed"))

    def messages(self) -> list[str]:
        messages = []
        for (e, f), found in sorted(self._problems.items()):
            layers = sorted({layer for layer, _ in found})
            example = found[0][1]
            messages.append(
                f"router gates are degenerate: {self.settings.labels[e]} and {self.settings.labels[f]} collide in "
                f"layer{'s' if len(layers) > 1 else ''} {G.layer_ranges(layers)} (e.g. layer {found[0][0]}: {example}); "
                "the router will mix up their inputs there. Give them more distinct prompts."
            )
        return messages

    def warn(self) -> None:
        for message in self.messages():
            warnings.warn(message, DegenerateGatesWarning, stacklevel=2)
        self._problems.clear()
