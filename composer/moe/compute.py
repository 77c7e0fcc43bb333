"""Router gates as steps of the plan: each layer's gate tensor is computed by the executor, from inputs it reads
within its memory budget, like any other tensor.

What a gate step reads is what its plan entry lists. A `hidden` gate reads the embeddings (the first gate) and
its whole layer (with any layer between it and the previous gate), runs that layer over the prompts and hands the
prompts' hidden states on to the next gate; a `cheap_embed` gate reads the embeddings (the first gate) and its
layer's post-attention norm, and hands on the experts' embedding averages; random gates read nothing. The gates
of one MoE form a `Chain`: the schedule runs them in layer order, the state they hand on (hidden states of every
prompt, with their position tables and masks; or the averages) is the chain's declared bytes, and what one step
holds while it runs (its layer widened to float32, activations, the statistics) its working bytes. The prompts
are tokenized when the plan is made, which gives those numbers; no model runs then. The executor knows none of
this: it sees tensors with inputs, byte counts and an order to keep.

A Qwen2-MoE shared expert's gate row, where it comes from the shared expert's prompts (mergekit's rule), is made
by its layer's router step from the same run (the shared prompts are part of the batch) and handed out by the
next step of the chain: router steps take the even places of the chain, shared gates the odd ones.

Called without its inputs or out of order (a test, a preview), a gate reads what it needs from the base itself.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

import torch

from composer.errors import ComposerWarning
from composer.moe import gates as G
from composer.moe.hidden import EMBEDDINGS, FLOAT32, LayerRunner, PromptBatch, run_bytes, state_bytes
from composer.plan.model import Chain
from composer.sources import ModelSource, TensorInfo

PROMPT_MODES = ("hidden", "cheap_embed")
NORM = "post_attention_layernorm.weight"
FLOAT64 = 8  # bytes


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
    # the shared expert's prompts, where its gate row is computed from them (Qwen2-MoE's shared_expert_gate)
    shared_positives: list[str] | None = None
    shared_negatives: list[str] = field(default_factory=list)


def _dense_layer_names(config: dict, reference: str) -> list[list[str]]:
    from composer.architecture import build_meta_model

    return [list(layer.state_dict()) for layer in build_meta_model(config, f"'{reference}'").model.layers]


@dataclass
class GateComputer:
    """The router rows of every layer of one MoE, and the state its gate steps hand on. Made when the plan is."""

    settings: GateSettings
    base: ModelSource
    tokenizer_source: ModelSource
    config: dict
    layer_prefix: str
    router_layers: list[int] | None = None  # the layers with a router, ascending (default: every layer)
    progress: bool | None = None
    chain: Chain | None = field(default=None, init=False)  # the gate steps' chain (None for random gates)
    _rows: dict[int, torch.Tensor] = field(default_factory=dict, init=False)
    _shared_rows: dict[int, torch.Tensor] = field(default_factory=dict, init=False)
    _problems: dict[tuple[int, int], list[tuple[int, str]]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.router_layers is None:
            self.router_layers = list(range(self.config["num_hidden_layers"]))
        self._runner: LayerRunner | None = None
        self._bar = None
        self._averages: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.settings.mode in PROMPT_MODES:
            self._prepare()

    @property
    def experts(self) -> int:
        return len(self.settings.positives)

    @property
    def shared_groups(self) -> list[list[str]]:
        """The shared expert's positive and negative prompts (none when its gate is not computed from prompts)."""
        settings = self.settings
        return [settings.shared_positives, settings.shared_negatives] if settings.shared_positives else []

    # --- the plan's view: what each gate reads and holds -----------------------------------------------------
    def _prepare(self) -> None:
        """Tokenize the prompts (and, for hidden gates, learn the names of each layer's weights): nothing runs."""
        from composer.moe.hidden import load_tokenizer, tokenize
        from composer.plan.transformers_facts import remembered

        settings = self.settings
        tokenizer = load_tokenizer(self.tokenizer_source)
        if settings.mode == "cheap_embed":
            self._groups = [
                [tokenize(tokenizer, prompts) if prompts else None for prompts in group]
                for group in (settings.positives, settings.negatives, self.shared_groups)
            ]
            self.chain = Chain(
                label="router gates from embedding averages",
                state_bytes=2 * self.experts * self.config["hidden_size"] * FLOAT64,
            )
            return
        texts: list[str] = []
        self._members: tuple[list[list[int]], list[list[int]]] = (
            [],
            [],
        )  # rows of the batch holding each expert's positives, negatives
        self._shared_members: list[list[int]] = []  # rows holding the shared expert's positives, negatives
        for group, target in zip(
            (settings.positives, settings.negatives, self.shared_groups), (*self._members, self._shared_members)
        ):
            for prompts in group:
                target.append(list(range(len(texts), len(texts) + len(prompts))))
                texts += prompts
        self._batch: PromptBatch = tokenize(tokenizer, texts)
        self._layer_names: list[list[str]] = remembered(
            "dense-layer-names", self.config, lambda: _dense_layer_names(self.config, self.base.reference)
        )
        self.chain = Chain(
            label=f"router gates from {len(texts)} prompts", state_bytes=state_bytes(self.config, self._batch)
        )

    def _previous(self, layer: int) -> int:
        return max((earlier for earlier in self.router_layers if earlier < layer), default=-1)

    def input_names(self, layer: int) -> list[str]:
        """The base's tensors that the gate of `layer` reads."""
        mode = self.settings.mode
        if mode not in PROMPT_MODES:
            return []
        names = [EMBEDDINGS] if layer == self.router_layers[0] else []
        if mode == "cheap_embed":
            return names + [self.layer_prefix.format(i=layer) + NORM]
        for index in range(self._previous(layer) + 1, layer + 1):
            names += [self.layer_prefix.format(i=index) + name for name in self._layer_names[index]]
        return names

    def working_bytes(self, layer: int, inputs: list[TensorInfo]) -> int:
        """What the gate step of `layer` holds while it runs, beyond its inputs, its result and the chain's state."""
        hidden = self.config["hidden_size"]
        mode = self.settings.mode
        if mode not in PROMPT_MODES:
            return 3 * self.experts * hidden * FLOAT64
        if mode == "cheap_embed":
            if layer != self.router_layers[0]:
                return 4 * self.experts * hidden * FLOAT64
            stored = next(info.dtype.itemsize for info in inputs if info.name == EMBEDDINGS)
            # a group's rows as gathered, widened, and weighted for pooling
            return max(
                batch.ids.numel() * hidden * (stored + 2 * FLOAT64)
                for group in self._groups
                for batch in group
                if batch is not None
            )
        widened = sum(
            info.nbytes // info.dtype.itemsize * FLOAT32
            for info in inputs
            if info.name != EMBEDDINGS and info.dtype != torch.float32
        )
        prompts, width = self._batch.ids.shape
        statistics = G.statistics_bytes(prompts, width, int(self._batch.mask.sum()), hidden)
        return run_bytes(self.config, self._batch, widened) + statistics

    # --- the executor's view: the rows ----------------------------------------------------------------------
    def rows(self, layer: int, seed: int, inputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The [experts, hidden] router weight of `layer` (float64, on the CPU). `inputs` are the tensors
        `input_names(layer)` names, on the device the layers are to run on (read here from the base when not given).
        Prompt-based gates take the layers in order; one asked for out of order first does the gates before it."""
        mode = self.settings.mode
        if mode not in PROMPT_MODES:
            return G.random_rows(self.experts, self.config["hidden_size"], seed, uniform=mode == "uniform_random")
        if layer not in self._rows:
            for earlier in self.router_layers:
                if earlier >= layer:
                    break
                if earlier not in self._rows:
                    self._take(earlier, self._read(earlier))
            self._take(layer, list(inputs) if inputs else self._read(layer))
        return self._rows[layer]

    def shared_row(self, layer: int, seed: int) -> torch.Tensor:
        """The [1, hidden] gate row of the shared expert in `layer` (float64, on the CPU): mergekit's rule over the
        shared expert's prompts (their averaged router input less their negatives', normalised), made while the
        router of `layer` is; random rows for random gate modes."""
        mode = self.settings.mode
        if mode not in PROMPT_MODES:
            return G.random_rows(1, self.config["hidden_size"], seed, uniform=mode == "uniform_random")
        if not self.settings.shared_positives:
            raise ValueError("the shared expert's gate is computed from its prompts, and it has none")
        if layer not in self._shared_rows:
            self.rows(layer, seed)
        return self._shared_rows[layer]

    def _read(self, layer: int) -> list[torch.Tensor]:
        return [self.base.read(name) for name in self.input_names(layer)]

    def _take(self, layer: int, inputs: list[torch.Tensor]) -> None:
        named = dict(zip(self.input_names(layer), inputs))
        del inputs
        self._rows[layer] = (
            self._hidden_rows(layer, named) if self.settings.mode == "hidden" else self._cheap_rows(layer, named)
        )
        if layer == self.router_layers[-1]:
            self._finish()

    # --- cheap_embed ------------------------------------------------------------------------------
    def _cheap_rows(self, layer: int, named: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._averages is None:
            table = named.pop(EMBEDDINGS)

            def average(batch: PromptBatch | None) -> torch.Tensor:
                if batch is None:
                    return torch.zeros(table.shape[1], dtype=torch.float64)
                # rows gathered in the stored dtype, then widened on the CPU: the values a float64 table's rows have
                states = table[batch.ids.to(table.device)].cpu().double()
                return G.pooled(states, batch.mask, self.settings.pooling).mean(0)

            positives, negatives, shared = self._groups
            self._averages = (
                torch.stack([average(b) for b in positives]),
                torch.stack([average(b) for b in negatives]),
            )
            if shared:
                self._shared_average = G.gate_row(average(shared[0]), average(shared[1]))
            del table
        if self.shared_groups:
            self._shared_rows[layer] = self._shared_average
        norm_weight = named[self.layer_prefix.format(i=layer) + NORM].cpu()
        rows = G.embedding_rows(*self._averages, norm_weight, self.settings.rows)
        self._note_collisions(layer, rows)
        return rows

    # --- hidden -----------------------------------------------------------------------------------
    def _hidden_rows(self, layer: int, named: dict[str, torch.Tensor]) -> torch.Tensor:
        from tqdm import tqdm

        if self._runner is None:
            self._runner = LayerRunner(self.config, self._batch, self.base.reference)
            self._runner.start(named.pop(EMBEDDINGS))
            enabled = sys.stderr.isatty() if self.progress is None else self.progress
            self._bar = tqdm(
                total=len(self.router_layers),
                desc=f"router gates from {self._batch.ids.shape[0]} prompts",
                unit="layer",
                disable=not enabled,
                file=sys.stderr,
            )
        for index in range(self._previous(layer) + 1, layer + 1):
            prefix = self.layer_prefix.format(i=index)
            states = self._runner.run(index, {name: named.pop(prefix + name) for name in self._layer_names[index]})
        positives, negatives = self._members
        if self._shared_members:
            shared_positives, shared_negatives = (
                G.pooled(states[rows], self._batch.mask[rows], self.settings.pooling).double().mean(0)
                if rows
                else torch.zeros(states.shape[-1], dtype=torch.float64)
                for rows in self._shared_members
            )
            self._shared_rows[layer] = G.gate_row(shared_positives, shared_negatives)
        stats = G.statistics(states, self._batch.mask, positives, negatives, self.settings.pooling)
        del states
        rows = G.discriminant_rows(stats) if self.settings.rows == "discriminant" else G.average_rows(stats)
        for e, f, share in G.close_pairs(G.separations(stats)):
            self._problems.setdefault((e, f), []).append(
                (layer, f"even the best linear router would confuse about {share:.0%} of their prompt tokens")
            )
        self._bar.update(1)
        return rows

    def _finish(self) -> None:
        """The last gate is done: let go of the state and say which experts the rows cannot tell apart."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        self._averages = None
        self.warn()

    def _note_collisions(self, layer: int, rows: torch.Tensor) -> None:
        for e, f, cosine in G.collinear_pairs(rows):
            self._problems.setdefault((e, f), []).append(
                (layer, f"their rows have cosine {cosine:.3f} once the common part is removed")
            )

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
