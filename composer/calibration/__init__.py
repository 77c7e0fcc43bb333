"""Calibration methods' pass (RegMean, RegMean++), attached to their plan.

The planner leaves each linear layer's weight as a step awaiting its Gram matrices and says in `plan.calibration`
what to run. `attach_calibration` tokenizes the calibration text into windows of at most CONTEXT tokens (nothing
runs yet) and turns those steps into one chain (`composer.calibration.run`): the first step of each layer reads
every model's whole layer, runs it over the windows and solves the layer's linear weights; the layer's other steps
hand them out. The chain's state and each step's working memory are declared, so `compose plan` shows them and the
executor keeps them inside --memory-budget.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch

from composer.calibration.run import CalibrationPass, batches_of
from composer.errors import ComposerError
from composer.plan import Plan, TensorRef
from composer.plan.model import Chain

CONTEXT = 512  # tokens a calibration window holds at most (each token's inputs count once: windows do not overlap)
LINK_STRIDE = 1 << 16  # chain places per layer: the layer's first step, then its other linear weights


def calibration_windows(texts: list[tuple[str, str]], tokenizer, context: int, model_name: str) -> list[torch.Tensor]:
    """Each text tokenized as `compose eval` tokenizes it, cut into consecutive windows of at most `context` token ids."""
    windows = []
    for name, text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"][0]
        if len(ids) == 0:
            raise ComposerError(f"Calibration text file {name} has no tokens for the tokenizer of '{model_name}'.")
        windows += [ids[start : start + context] for start in range(0, len(ids), context)]
    return windows


def attach_calibration(plan: Plan) -> None:
    """Replace the plan's linear-weight steps awaiting calibration with the calibration pass's chain (in place)."""
    request = plan.calibration
    if request is None:
        return
    from composer.sources.tokenizer import load_source_tokenizer

    tokenizer = load_source_tokenizer(plan.sources[plan.tokenizer_source], "the calibration text is tokenized with it")
    positions = plan.config.get("max_position_embeddings") or CONTEXT
    context = max(2, min(CONTEXT, positions if isinstance(positions, int) else CONTEXT))
    windows = calibration_windows(request.texts, tokenizer, context, plan.tokenizer_source)
    run = CalibrationPass(plan, request, batches_of(windows))
    tokens = sum(len(window) for window in windows)
    streams = "the merged model" if run.merged else f"{len(request.models)} models"
    chain = Chain(
        label=f"{request.method}: {tokens} calibration tokens through {streams}, one layer at a time",
        state_bytes=run.state_bytes(plan.config),
    )
    tensors = []
    for planned in plan.tensors:
        position = run.positions.get(planned.name)
        if position is None:
            tensors.append(planned)
            continue
        layer, index = position
        refs = run.first_inputs(layer) if index == 0 else [TensorRef(model, planned.name) for model in request.models]
        operation = replace(
            planned.operation,
            label=f"{request.method} (calibration text {request.digest})",
            fn=partial(run.step, layer, planned.name, refs),
            compute_dtype=None,
            temporaries=0.0,
            working_bytes=run.working_bytes(layer, plan.config) if index == 0 else 0,
            chain=chain,
            link=layer * LINK_STRIDE + index,
        )
        tensors.append(replace(planned, inputs=tuple(refs), operation=operation))
    plan.tensors = tensors
    plan.calibration = None
