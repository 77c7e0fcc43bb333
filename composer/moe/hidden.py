"""Run a dense model one decoder layer at a time and hand out for each layer what an MoE router in that layer
receives: the output of the layer's post-attention norm.

Only one layer's weights are in memory at a time (handed in, run over every prompt, freed); the hidden states of
the prompts are kept between layers (`LayerRunner`, whose memory `state_bytes` and `run_bytes` put in numbers for
the executor's budget). `router_inputs` reads the layers from a ModelSource itself, for a preview outside a plan.
Prompts are right-padded into one batch; `mask` says which positions are real tokens, and the attention masks
keep padding out of every real token's context."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from composer.errors import ComposerError
from composer.memory import empty
from composer.sources import ModelSource

MAX_PROMPT_TOKENS = 1024
CHUNK = 16  # prompts per forward call
EMBEDDINGS = "model.embed_tokens.weight"
FLOAT32 = 4  # bytes


@dataclass
class PromptBatch:
    ids: torch.Tensor  # [prompts, tokens], right-padded with 0
    mask: torch.Tensor  # [prompts, tokens], True at real tokens


def load_tokenizer(source: ModelSource):
    """The tokenizer of `source` (the base or the tokenizer source of an MoE)."""
    from composer.sources.tokenizer import load_source_tokenizer

    return load_source_tokenizer(source, "router gates from prompts need one")


def tokenize(tokenizer, texts: list[str]) -> PromptBatch:
    """Each text tokenized as the model would see it by default (special tokens included), right-padded."""
    rows = [tokenizer(text, truncation=True, max_length=MAX_PROMPT_TOKENS)["input_ids"] for text in texts]
    empty = [i for i, row in enumerate(rows) if not row]
    if empty:
        raise ComposerError(f"Prompt {texts[empty[0]]!r} has no tokens; every prompt needs some text.")
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    return PromptBatch(ids, mask)


def _attention_masks(
    model_config, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
) -> dict[str, object]:
    """The attention mask of each layer type (full and, where the config has it, sliding window)."""
    import inspect

    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    # no cache: named `cache` from transformers 5.2x, `past_key_values` before
    no_cache = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
    arguments = dict(
        config=model_config,
        inputs_embeds=hidden,
        attention_mask=mask.long(),
        position_ids=positions,
        **{no_cache: None},
    )
    masks = {"full_attention": create_causal_mask(**arguments)}
    if getattr(model_config, "sliding_window", None):
        masks["sliding_attention"] = create_sliding_window_causal_mask(**arguments)
    return masks


def _layer_type(model_config, index: int) -> str:
    types = getattr(model_config, "layer_types", None)
    if types:
        return types[index]
    return "sliding_attention" if getattr(model_config, "sliding_window", None) else "full_attention"


class LayerRunner:
    """A dense model run over a batch of prompts one decoder layer at a time. The caller hands in each layer's weights
    in turn (as read, in their stored dtype) and gets back the router's input in that layer; the prompts' hidden states
    are kept here from one layer to the next, and a layer's weights are let go once it has run."""

    def __init__(self, config: dict, batch: PromptBatch, reference: str):
        from composer.architecture import build_meta_model

        model = build_meta_model(config, f"'{reference}'")
        self.model_config = model.config
        self.inner = model.model
        self.layers = self.inner.layers
        if not all(hasattr(layer, "post_attention_layernorm") for layer in self.layers):
            raise ComposerError(
                f"The layers of '{reference}' have no post_attention_layernorm, so the router's input is unknown."
            )
        self.batch = batch
        self.hidden: torch.Tensor | None = None

    def layer_names(self, index: int) -> list[str]:
        """The names of layer `index`'s weights, relative to its prefix."""
        return list(self.layers[index].state_dict())

    def start(self, embeddings: torch.Tensor, device: torch.device | str | None = None) -> None:
        """The prompts' hidden states from the embedding table; the layers run on `device` (default: the table's)."""
        device = torch.device(device) if device is not None else embeddings.device
        self.device = device
        # rows looked up in the stored dtype, then widened: the same values without a float32 copy of the table
        self.hidden = torch.nn.functional.embedding(self.batch.ids.to(embeddings.device), embeddings).float().to(device)
        rotary = type(self.inner.rotary_emb)(config=self.model_config).to(device)
        chunks = _chunks(self.batch.mask)
        with torch.no_grad():
            self.prepared = []
            for rows, width in chunks:
                positions = torch.arange(width, device=device).unsqueeze(0).expand(len(rows), -1)
                part = self.hidden[rows.to(device), :width]
                masks = _attention_masks(self.model_config, part, self.batch.mask[rows, :width].to(device), positions)
                self.prepared.append((positions, rotary(part, position_ids=positions), masks))
        self.chunks = [(rows.to(device), width) for rows, width in chunks]

    def run(self, index: int, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run layer `index` (its weights by `layer_names`, emptied here: each is dropped once widened) over every
        prompt; the router's input at each position [prompts, tokens, hidden], in float32 on the CPU."""
        state = {name: _widened(stored.pop(name), self.device) for name in list(stored)}
        return _run_layer(
            self.layers[index], state, self.model_config, index, self.hidden, self.chunks, self.prepared
        ).cpu()

    def close(self) -> None:
        self.hidden = self.prepared = self.chunks = None


def state_bytes(config: dict, batch: PromptBatch) -> int:
    """What a LayerRunner holds from one layer to the next: the hidden states, and each chunk's positions, rotary
    tables and attention masks (counted as float32, the widest transformers makes them)."""
    prompts, width = batch.ids.shape
    hidden = config["hidden_size"]
    head = config.get("head_dim") or hidden // config.get("num_attention_heads", 1)
    kinds = 2 if config.get("sliding_window") else 1
    held = prompts * width * hidden * FLOAT32
    for rows, length in _chunks(batch.mask):
        held += len(rows) * length * (8 + 2 * head * FLOAT32 + kinds * length * FLOAT32)
    return held


def run_bytes(config: dict, batch: PromptBatch, layer_widened: int) -> int:
    """What running one layer holds beyond the weights handed in and the state: `layer_widened` bytes of weights
    widened to float32, the router's inputs (and their copy on the CPU when the layer runs elsewhere), and the
    activations of the widest chunk (projections, MLP, attention scores)."""
    prompts, width = batch.ids.shape
    hidden = config["hidden_size"]
    intermediate = config.get("intermediate_size") or 4 * hidden
    heads = config.get("num_attention_heads", 1)
    widest = max((len(rows) * length, len(rows), length) for rows, length in _chunks(batch.mask))
    activations = (
        widest[0] * (6 * hidden + 3 * intermediate) * FLOAT32 + 2 * widest[1] * heads * widest[2] ** 2 * FLOAT32
    )
    return layer_widened + 2 * prompts * width * hidden * FLOAT32 + activations


def router_inputs(
    source: ModelSource, config: dict, batch: PromptBatch, layer_prefix: str, device: torch.device | str = "cpu"
) -> Iterator[tuple[int, torch.Tensor]]:
    """(layer index, router input [prompts, tokens, hidden]) for each layer in turn, in float32 on the CPU;
    the layers run on `device`, read from `source` one at a time.

    `layer_prefix` is the dense architecture's layer prefix, e.g. 'model.layers.{i}.'. Padding positions
    hold values too; use `batch.mask` to leave them out."""
    runner = LayerRunner(config, batch, source.reference)
    runner.start(source.read(EMBEDDINGS), device)
    count = len(runner.layers)
    with ThreadPoolExecutor(1, thread_name_prefix="composer-gates-read") as reader:
        # the next layer's weights are read in their stored dtype (half float32's bytes for a bf16 model) while this one runs
        def read(index: int):
            return (
                reader.submit(_read_layer, source, layer_prefix.format(i=index), runner.layer_names(index))
                if index < count
                else None
            )

        upcoming = read(0)
        for index in range(count):
            stored = upcoming.result()
            upcoming = read(index + 1)
            yield index, runner.run(index, stored)
    runner.close()


def _widened(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` as float32 on `device`: itself when it already is, else a copy (on the CPU in a buffer from
    `composer.memory.empty`: a large one is a memory map, given back to the system once the layer is done)."""
    if tensor.dtype == torch.float32 and tensor.device == torch.device(device):
        return tensor
    if torch.device(device).type != "cpu":
        return tensor.to(device=device, dtype=torch.float32)
    return empty(tuple(tensor.shape), torch.float32).copy_(tensor)


def _read_layer(source: ModelSource, prefix: str, names: list[str]) -> dict[str, torch.Tensor]:
    return {name: source.read(prefix + name) for name in names}


def _run_layer(
    layer, state: dict[str, torch.Tensor], model_config, index: int, hidden: torch.Tensor, chunks, prepared
) -> torch.Tensor:
    """Run one layer over every prompt chunk (updating `hidden` in place); the router's input for each position."""
    with torch.no_grad():
        layer.load_state_dict(state, assign=True)
        del state
        captured: list[torch.Tensor] = []
        hook = layer.post_attention_layernorm.register_forward_hook(
            lambda module, args, output: captured.append(output)
        )
        kind = _layer_type(model_config, index)
        inputs = torch.zeros_like(hidden)
        try:
            for (rows, width), (positions, rotation, masks) in zip(chunks, prepared):
                hidden[rows, :width] = layer(
                    hidden[rows, :width],
                    attention_mask=masks[kind],
                    position_ids=positions,
                    position_embeddings=rotation,
                )
                inputs[rows, :width] = captured.pop()
        finally:
            hook.remove()
            layer.to_empty(device="meta")  # free this layer's weights before the next one is read
    return inputs


def _chunks(mask: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """Prompts grouped by length (CHUNK at a time), each group cut to its longest prompt: little padding to compute."""
    lengths = mask.sum(1)
    order = torch.argsort(lengths, stable=True)
    groups = [order[start : start + CHUNK] for start in range(0, len(order), CHUNK)]
    return [(rows, int(lengths[rows].max())) for rows in groups]
