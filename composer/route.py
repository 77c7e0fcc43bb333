"""`compose route MODEL --prompts FILE`: which experts an MoE model's routers pick, token by token, per layer.

The model is loaded with transformers and every router is hooked; a token counts once per expert among its
top-k in each layer. Shares are over real tokens (each prompt runs alone, so there is no padding)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from composer.errors import ComposerError

PROMPT_LABEL = 48


@dataclass
class PromptRouting:
    group: str
    text: str
    tokens: int
    counts: torch.Tensor  # [layers, experts]: token choices per expert (top-k: k per token)

    def shares(self) -> torch.Tensor:
        return self.counts / self.counts.sum(-1, keepdim=True).clamp(min=1)


@dataclass
class Routing:
    experts: int
    top_k: int
    labels: list[str]
    prompts: list[PromptRouting]

    def counts(self, group: str | None = None) -> torch.Tensor:
        chosen = [p.counts for p in self.prompts if group is None or p.group == group]
        return torch.stack(chosen).sum(0)

    def shares(self, group: str | None = None) -> torch.Tensor:
        """[layers, experts] for a group (None: every prompt)."""
        counts = self.counts(group)
        return counts / counts.sum(-1, keepdim=True).clamp(min=1)

    def groups(self) -> list[str]:
        return list(dict.fromkeys(p.group for p in self.prompts))


def expert_labels(model_dir: Path, experts: int) -> list[str]:
    """Expert names from the recipe composer saved with the model (name, else description's first words, else index)."""
    labels = [f"expert {i}" for i in range(experts)]
    recipe = model_dir / "composer-recipe.yml"
    if recipe.is_file():
        from composer.files import YAML_FILE_LIMIT, read_text
        from composer.moe.schema import parse_moe_config

        try:
            config = parse_moe_config(read_text(recipe, "", YAML_FILE_LIMIT), str(recipe))
        except ComposerError:
            return labels
        if len(config.experts) == experts:
            for i, expert in enumerate(config.experts):
                name = expert.name or (" ".join(expert.description.split()[:2]) if expert.description else None)
                labels[i] = name or labels[i]
    if len(set(labels)) < len(labels):
        labels = [f"{i}:{label}" for i, label in enumerate(labels)]
    return labels


def _routers(model) -> list[torch.nn.Module]:
    """The router of each MoE layer: the `gate` of each layer's MLP block."""
    routers = []
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ComposerError(
            f"{type(model).__name__} has no decoder layers with routers; `compose route` reads MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE)."
        )
    for layer in layers:
        block = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        gate = getattr(block, "gate", None)
        if gate is None or not hasattr(gate, "weight") or gate.weight.ndim != 2:
            raise ComposerError(
                f"{type(model).__name__} has a layer without a router; `compose route` reads MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE)."
            )
        routers.append(gate)
    return routers


def measure_routing(model_dir: Path, groups: dict[str, list[str]], device: str = "cpu") -> Routing:
    import logging

    from composer.evaluate import load_model
    from composer.moe.hidden import MAX_PROMPT_TOKENS

    if not model_dir.is_dir():
        raise ComposerError(
            f"{model_dir} is not a model folder." if model_dir.exists() else f"Model folder {model_dir} does not exist."
        )
    # composer's own readers check the weights, config and tokenizer first; a damaged model is one error naming the file
    model, tokenizer = load_model(str(model_dir))
    model = model.to(device)
    routers = _routers(model)
    experts = routers[0].weight.shape[0]
    top_k = int(getattr(model.config, "num_experts_per_tok", 1))
    captured: list[torch.Tensor] = []

    def keep_logits(module, args, output):
        # routers hand back the logits (older transformers) or (logits, scores, indices)
        logits = output[0] if isinstance(output, tuple) else output
        captured.append(logits.reshape(-1, experts).detach().float())

    hooks = [router.register_forward_hook(keep_logits) for router in routers]
    results = []
    try:
        for group, prompts in groups.items():
            for text in prompts:
                ids = tokenizer(text, return_tensors="pt")["input_ids"]
                if (
                    ids.shape[1] > MAX_PROMPT_TOKENS
                ):  # as the gates read prompts: attention over a whole book would not end
                    logging.getLogger("composer").info(
                        "prompt %r of group '%s' has %d tokens; its first %d are routed",
                        text[:40],
                        group,
                        ids.shape[1],
                        MAX_PROMPT_TOKENS,
                    )
                    ids = ids[:, :MAX_PROMPT_TOKENS]
                ids = ids.to(device)
                captured.clear()
                with torch.no_grad():
                    model(ids)
                counts = torch.zeros(len(routers), experts)
                for layer, logits in enumerate(captured):
                    chosen = logits.topk(top_k, dim=-1).indices.flatten().cpu()
                    counts[layer] = torch.bincount(chosen, minlength=experts).float()
                results.append(PromptRouting(group, text, ids.shape[1], counts))
    finally:
        for hook in hooks:
            hook.remove()
    return Routing(experts, top_k, expert_labels(model_dir, experts), results)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def format_routing(routing: Routing, per_prompt: bool = True) -> str:
    labels = routing.labels
    width = max(10, *(len(label) for label in labels))
    layers = routing.prompts[0].counts.shape[0]
    lines = [
        f"routing of {len(routing.prompts)} prompt(s) through {layers} layers, top-{routing.top_k} of {routing.experts} experts; "
        "shares of token choices, over all layers"
    ]
    header = f"{'group':<16} {'prompts':>7} {'tokens':>7}  " + "  ".join(f"{label:>{width}}" for label in labels)
    lines += ["", header]
    groups = routing.groups()
    for group in groups + ([None] if len(groups) > 1 else []):
        members = [p for p in routing.prompts if group is None or p.group == group]
        overall = routing.counts(group).sum(0)
        overall = overall / overall.sum().clamp(min=1)
        name = "all" if group is None else group
        lines.append(
            f"{name:<16} {len(members):>7} {sum(p.tokens for p in members):>7}  "
            + "  ".join(f"{_percent(v):>{width}}" for v in overall.tolist())
        )
    lines += [
        "",
        "per layer: share of each group's token choices per expert" if len(groups) > 1 else f"per layer ({groups[0]})",
    ]
    columns = [f"{group}>{label}" if len(groups) > 1 else label for group in groups for label in labels]
    column_width = max(8, *(len(column) for column in columns))
    lines.append(f"{'layer':>5}  " + "  ".join(f"{column:>{column_width}}" for column in columns))
    shares = {group: routing.shares(group) for group in groups}
    for layer in range(layers):
        cells = [_percent(shares[group][layer, e].item()) for group in groups for e in range(routing.experts)]
        lines.append(f"{layer:>5}  " + "  ".join(f"{cell:>{column_width}}" for cell in cells))
    if per_prompt:
        lines += [
            "",
            "per prompt",
            f"{'group':<16} {'prompt':<{PROMPT_LABEL}} {'tokens':>6}  "
            + "  ".join(f"{label:>{width}}" for label in labels),
        ]
        for prompt in routing.prompts:
            overall = prompt.counts.sum(0) / prompt.counts.sum().clamp(min=1)
            text = " ".join(prompt.text.split())
            text = text if len(text) <= PROMPT_LABEL else text[: PROMPT_LABEL - 3] + "..."
            lines.append(
                f"{prompt.group:<16} {text:<{PROMPT_LABEL}} {prompt.tokens:>6}  "
                + "  ".join(f"{_percent(v):>{width}}" for v in overall.tolist())
            )
    return "\n".join(lines)


def draw_heat_map(routing: Routing, path: Path) -> None:
    """One panel per prompt group: a row per layer, a column per expert, darker where more token choices go."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    groups = routing.groups()
    layers = routing.prompts[0].counts.shape[0]
    cell_w, cell_h = max(48, 320 // routing.experts), max(6, min(20, 600 // layers))
    margin, title_h, label_h, gap, legend_w = 30, 16, 16, 24, 70
    panel_w = cell_w * routing.experts
    grid_top = title_h + label_h
    legend_h = 11 * 12
    width = margin + len(groups) * (panel_w + gap) + legend_w
    height = grid_top + max(cell_h * layers, legend_h) + 22
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    chars = max(3, cell_w // 6)
    for g, group in enumerate(groups):
        shares = routing.shares(group)
        left = margin + g * (panel_w + gap)
        draw.text(
            (left, 2), f"{group} ({sum(p.group == group for p in routing.prompts)} prompts)", fill="black", font=font
        )
        for e, label in enumerate(routing.labels):
            draw.text((left + e * cell_w + 2, title_h), label[:chars], fill="black", font=font)
        for layer in range(layers):
            top = grid_top + layer * cell_h
            if g == 0 and (cell_h >= 10 or layer % 5 == 0):
                draw.text((4, top), str(layer), fill="black", font=font)
            for e in range(routing.experts):
                shade = int(255 * (1 - float(shares[layer, e])))
                draw.rectangle(
                    [left + e * cell_w, top, left + (e + 1) * cell_w - 1, top + cell_h - 1],
                    fill=(shade, shade, 255),
                    outline=(225, 225, 225),
                )
    legend_left = width - legend_w + 10
    for step in range(11):
        shade = int(255 * (1 - step / 10))
        top = grid_top + step * 12
        draw.rectangle(
            [legend_left, top, legend_left + 12, top + 11], fill=(shade, shade, 255), outline=(225, 225, 225)
        )
        if step in (0, 5, 10):
            draw.text((legend_left + 16, top), f"{step * 10}%", fill="black", font=font)
    draw.text(
        (4, height - 16),
        "rows: layers, columns: experts, colour: share of the group's token choices",
        fill="black",
        font=font,
    )
    image.save(path)


def preview_routing(
    source,
    config: dict,
    layer_prefix: str,
    tokenizer,
    rows: dict[int, torch.Tensor],
    groups: dict[str, list[str]],
    top_k: int,
    labels: list[str],
) -> Routing:
    """The routing an MoE whose experts all equal `source` would show, without writing it: the dense model's
    router inputs (run one layer at a time) against each layer's gate `rows`."""
    from composer.moe.hidden import router_inputs, tokenize

    texts = [(group, text) for group, prompts in groups.items() for text in prompts]
    batch = tokenize(tokenizer, [text for _, text in texts])
    experts = next(iter(rows.values())).shape[0]
    counts = torch.zeros(len(texts), len(rows), experts)
    for layer, states in router_inputs(source, config, batch, layer_prefix):
        chosen = (states.double() @ rows[layer].double().T).topk(top_k, dim=-1).indices  # [prompts, tokens, k]
        for p in range(len(texts)):
            real = chosen[p][batch.mask[p]].flatten()
            counts[p, layer] = torch.bincount(real, minlength=experts).float()
    prompts = [PromptRouting(group, text, int(batch.mask[p].sum()), counts[p]) for p, (group, text) in enumerate(texts)]
    return Routing(experts, top_k, labels, prompts)
