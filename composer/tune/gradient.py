"""`--optimizer gradient`: Adam on the tuned numbers, with the gradient of the bits-per-byte objective
back-propagated through the layer-streamed forward pass.

Which output tensors depend on which tuned numbers, and how, comes from the planner itself: the recipe is planned
at the start point and once more with each number moved, and the operations' arguments compared. Every number the
merge is differentiable in (weights, lambda, t, scale, a LiNeS alpha or beta) enters the arguments linearly (as
itself, or through a gradient's interpolation over depth), so the comparison gives the exact dependence.

A step is a manual two-pass activation checkpoint, one layer in memory at a time:
1. forward: each layer merged (no graph) and run over the windows' hidden states; only each layer's input
   hidden states are kept;
2. the loss of each window, back-propagated to the final hidden states and the head and final norm;
3. backward, last layer first: the layer merged again, now with a graph from the tuned numbers, run again on its
   kept input and back-propagated with the gradient of its output; its tensors' gradients flow on into the
   numbers;
4. the embeddings, through the model's own forward that made the first layer's input.

Each number is searched unconstrained, x = low + (high - low) sigmoid(u), so a step never leaves its range."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from composer.architecture import tied_parameter_names
from composer.errors import ComposerError
from composer.evaluate import TextScore
from composer.plan import Plan, PlannedTensor
from composer.plan.lines import LINES_SCALE
from composer.tune import differentiable
from composer.tune.ranges import TuneRange, with_values
from composer.tune.streamed import Layout, StreamedScorer, init_buffers, layers_replaced, record_calls
from composer.tune.texts import NamedText

DIFFERENTIABLE_NAMES = ("weight", "lambda", "t", "scale", "alpha", "beta")
LEARNING_RATE = (
    0.2  # Adam's step on the unconstrained numbers: a sigmoid's slope is at most 1/4, so at most ~5% of a range
)
EDGE = 1e-3  # a start at a range's end is searched from just inside it (the sigmoid never reaches its ends)


def parameter_name(mark: TuneRange) -> str:
    for key in ("parameters", "lines"):
        if key in mark.location:
            at = len(mark.location) - 1 - mark.location[::-1].index(key)
            if at + 1 < len(mark.location):
                return str(mark.location[at + 1])
    return "a slice bound"


def check_differentiable(ranges: list[TuneRange], source_name: str) -> None:
    for mark in ranges:
        name = parameter_name(mark)
        if mark.integer or name not in DIFFERENTIABLE_NAMES:
            what = "a slice bound, a whole number," if mark.integer else f"'{name}', which chooses what is kept,"
            raise ComposerError(
                f"{source_name}, line {mark.line}: recipe key '{mark.key}' tunes {what} and the merge is not differentiable in it, so "
                f"--optimizer gradient cannot tune it; use --optimizer cma, or give gradient only {', '.join(DIFFERENTIABLE_NAMES)} ranges."
            )


@dataclass
class Dependence:
    """How one output tensor's operation arguments move with the tuned numbers: argument (name, index in its list or
    None) -> [(range number, slope)]."""

    label: str
    start: dict
    slopes: dict[tuple, list[tuple[int, float]]] = field(default_factory=dict)

    def arguments(self, shift: torch.Tensor) -> dict:
        """The arguments at `shift` (the tuned numbers minus their start values), tensors where they move."""
        moved = {key: list(value) if isinstance(value, list) else value for key, value in self.start.items()}
        for (name, index), terms in self.slopes.items():
            start = self.start[name] if index is None else self.start[name][index]
            value = float(start) + sum(slope * shift[k] for k, slope in terms)
            if index is None:
                moved[name] = value
            else:
                moved[name][index] = value
        return moved


def _numbers(arguments: dict) -> dict[tuple, object]:
    flat = {}
    for key, value in arguments.items():
        for index, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
            flat[(key, index)] = item
    return flat


def dependences(
    start: Plan, moved: list[Plan], steps: list[float], ranges: list[TuneRange], source_name: str
) -> dict[str, Dependence]:
    """Each output tensor whose arguments move with a tuned number, and how (`moved[k]`: the plan with number k moved
    by `steps[k]`); an error for a number that moves something composer cannot differentiate."""
    found: dict[str, Dependence] = {}
    by_name = {planned.name: planned for planned in start.tensors}
    for k, (plan, step) in enumerate(zip(moved, steps)):
        mark = ranges[k]
        where = f"{source_name}, line {mark.line}: recipe key '{mark.key}'"
        if [planned.name for planned in plan.tensors] != list(by_name):
            raise ComposerError(
                f"{where} changes which tensors the merged model has, so --optimizer gradient cannot tune it; use --optimizer cma."
            )
        for planned in plan.tensors:
            before, after = _numbers(by_name[planned.name].operation.arguments), _numbers(planned.operation.arguments)
            for key in before.keys() | after.keys():
                if before.get(key) == after.get(key):
                    continue
                label = planned.operation.label
                allowed = differentiable.DIFFERENTIABLE.get(label, set()) | {LINES_SCALE}
                numeric = all(
                    isinstance(value, (int, float)) and not isinstance(value, bool)
                    for value in (before.get(key), after.get(key))
                )
                if key[0] not in allowed or not numeric or "vocabulary" in planned.operation.arguments:
                    raise ComposerError(
                        f"{where} changes '{key[0]}' of output tensor '{planned.name}' (an operation '{label}'), through which composer cannot "
                        "back-propagate (--optimizer gradient takes the weights, lambda and t of linear, slerp, passthrough and the "
                        "task-arithmetic family, and LiNeS scales, on models that share a vocabulary); use --optimizer cma."
                    )
                dependence = found.setdefault(
                    planned.name, Dependence(label, by_name[planned.name].operation.arguments)
                )
                dependence.slopes.setdefault(key, []).append((k, (after[key] - before[key]) / step))
    return found


@dataclass
class Pass:
    """One evaluation: the objective, each text's score, and d objective / d number."""

    objective: float
    scores: list[TextScore]
    gradient: list[float]


class GradientPass:
    """The objective and its gradient at given numbers, for a recipe planned at its start numbers."""

    def __init__(self, scorer: StreamedScorer, plan: Plan, start: list[float], found: dict[str, Dependence]):
        self.scorer = scorer
        self.plan = plan
        self.start = torch.tensor(start, dtype=torch.float64)
        self.found = found
        self.by_name = {planned.name: planned for planned in plan.tensors}

    def merged(self, planned: PlannedTensor, shift: torch.Tensor, graph: bool) -> torch.Tensor:
        dependence = self.found.get(planned.name)
        if dependence is None:
            return self.scorer.merged(self.plan, planned)
        inputs = [
            self.scorer.to_device(self.scorer.cache.get(self.plan, ref)).to(torch.float32) for ref in planned.inputs
        ]
        with torch.set_grad_enabled(graph):
            result = differentiable.merge(
                dependence.label, inputs, dependence.start, dependence.arguments(shift if graph else shift.detach())
            )
            return result.to(planned.dtype).to(torch.float32)

    def _load(
        self, model, module, names: list[str], planned_of, shift: torch.Tensor, graph: bool
    ) -> dict[str, torch.Tensor]:
        """Merge `module`'s tensors and load them into it as parameters that gather gradients; the merged tensors
        (with their graphs, when `graph`) by planned name."""
        made: dict[str, torch.Tensor] = {}
        for name in names:
            planned = planned_of(name)
            if planned.name not in made:
                made[planned.name] = self.merged(planned, shift, graph)
        module.to_empty(device=self.scorer.device)
        init_buffers(model, module.modules())
        module.load_state_dict({name: made[planned_of(name).name].detach() for name in names}, assign=True)
        for parameter in module.parameters():
            parameter.requires_grad_(True)
            parameter.grad = None
        return made

    @staticmethod
    def _push(module, names: list[str], planned_of, made: dict[str, torch.Tensor]) -> None:
        """Send the gradients the module's parameters gathered on through the merge that made them."""
        gradients: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        parameters = dict(module.named_parameters(remove_duplicate=False))
        for name in names:
            parameter = parameters.get(name)
            if parameter is None or id(parameter) in seen or parameter.grad is None:
                continue
            seen.add(id(parameter))
            key = planned_of(name).name
            gradients[key] = gradients[key] + parameter.grad if key in gradients else parameter.grad
        pairs = [(made[key], gradient) for key, gradient in gradients.items() if made[key].requires_grad]
        if pairs:
            torch.autograd.backward([tensor for tensor, _ in pairs], [gradient for _, gradient in pairs])

    def run(self, values: list[float], texts: list[NamedText]) -> Pass:
        shift = (torch.tensor(values, dtype=torch.float64) - self.start).requires_grad_(True)
        layout: Layout = self.scorer.layout(self.plan, texts)
        model, layers, batches = layout.model, layout.layers, layout.batches
        self.scorer.fit_budget(
            layout, self.plan, kept_states=len(layers) + 3, graph=True
        )  # every layer's input, the graph to the embeddings, gradients
        tied = tied_parameter_names(model)

        def planned_of(prefix: str):
            return lambda name: self.by_name.get(prefix + name) or self.by_name[tied.get(prefix + name, prefix + name)]

        with layers_replaced(model, layout.path, torch.nn.ModuleList()):
            outside_names = list(model.state_dict())
            outside = self._load(model, model, outside_names, planned_of(""), shift, graph=True)
        firsts = []
        for batch in batches:  # with a graph back to the embeddings
            record_calls(layout, batch, model.base_model)
            firsts.append(batch.hidden)
            batch.calls = [(_detached(arguments), _detached(keywords)) for arguments, keywords in batch.calls]
        kept = [[first.detach()] for first in firsts]
        with torch.no_grad():
            for index, layer in enumerate(layers):
                names = list(layer.state_dict())
                self._load(model, layer, names, planned_of(layout.prefix.format(i=index)), shift, graph=False)
                for batch, inputs in zip(batches, kept):
                    arguments, keywords = batch.calls[index]
                    inputs.append(_hidden(layer(inputs[-1], *arguments, **keywords)))
                layer.to_empty(device="meta")
        nats, tokens, gradients = self._losses(layout, batches, kept, texts)
        for index in reversed(range(len(layers))):
            layer = layers[index]
            names = list(layer.state_dict())
            planned = planned_of(layout.prefix.format(i=index))
            made = self._load(model, layer, names, planned, shift, graph=True)
            for number, (batch, inputs) in enumerate(zip(batches, kept)):
                arguments, keywords = batch.calls[index]
                hidden = inputs[index].requires_grad_(True)
                torch.autograd.backward(_hidden(layer(hidden, *arguments, **keywords)), gradients[number])
                gradients[number] = hidden.grad
                inputs[index] = None
            self._push(layer, names, planned, made)
            layer.to_empty(device="meta")
        for first, gradient in zip(firsts, gradients):
            torch.autograd.backward(first, gradient)
        with layers_replaced(model, layout.path, torch.nn.ModuleList()):
            self._push(model, outside_names, planned_of(""), outside)
            for parameter in model.parameters():
                parameter.grad = None
                parameter.requires_grad_(False)
        for batch in batches:
            batch.hidden = batch.calls = None
        scores = [
            TextScore(tokens=count, bytes=text.bytes, nats=total) for text, count, total in zip(texts, tokens, nats)
        ]
        objective = sum(score.bits_per_byte for score in scores) / len(scores)
        gradient = shift.grad if shift.grad is not None else torch.zeros_like(shift)
        return Pass(objective if math.isfinite(objective) else math.inf, scores, [float(x) for x in gradient])

    def _losses(self, layout: Layout, batches, kept, texts: list[NamedText]):
        """Each window's loss back-propagated to its final hidden states (and the final norm and head)."""
        nats, tokens, gradients = [0.0] * len(texts), [0] * len(texts), []
        for batch, inputs in zip(batches, kept):
            final = inputs.pop().requires_grad_(True)
            for row, window in enumerate(batch.windows):
                losses = self.scorer.window_losses(layout, final[row : row + 1], window)
                nats[window.text] += float(losses.detach().sum())
                tokens[window.text] += losses.numel()
                (losses.sum() / (math.log(2) * texts[window.text].bytes * len(texts))).backward()
            gradients.append(final.grad)
        return nats, tokens, gradients


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(item) for item in value)
    if isinstance(value, dict):
        return {key: _detached(item) for key, item in value.items()}
    return value


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


class GradientDescent:
    """Adam on the unconstrained numbers; `step()` evaluates the current point (objective and gradient) and moves."""

    def __init__(
        self,
        scorer: StreamedScorer,
        marked_text: str,
        ranges: list[TuneRange],
        plan_text,
        source_name: str,
        start: list[float],
    ):
        check_differentiable(ranges, source_name)
        self.ranges = ranges
        steps = [
            (mark.high - mark.low) / 4 * (1 if value + (mark.high - mark.low) / 4 <= mark.high else -1)
            for mark, value in zip(ranges, start)
        ]
        plan = plan_text(with_values(marked_text, ranges, start))
        moved = []
        try:
            for k, step in enumerate(steps):
                values = list(start)
                values[k] += step
                moved.append(plan_text(with_values(marked_text, ranges, values)))
            found = dependences(plan, moved, steps, ranges, source_name)
        except BaseException:
            plan.close()
            raise
        finally:
            for other in moved:
                other.close()
        self.plan = plan
        self.evaluator = GradientPass(scorer, plan, start, found)
        shares = [min(max(mark.share_of(value), EDGE), 1 - EDGE) for mark, value in zip(ranges, start)]
        self.unconstrained = torch.tensor(
            [math.log(share / (1 - share)) for share in shares], dtype=torch.float64, requires_grad=True
        )
        self.optimiser = torch.optim.Adam([self.unconstrained], lr=LEARNING_RATE)

    def values(self) -> torch.Tensor:
        lows = torch.tensor([mark.low for mark in self.ranges], dtype=torch.float64)
        highs = torch.tensor([mark.high for mark in self.ranges], dtype=torch.float64)
        return lows + (highs - lows) * torch.sigmoid(self.unconstrained)

    def step(self, texts: list[NamedText]) -> tuple[list[float], Pass]:
        values = self.values()
        point = [float(x) for x in values.detach()]
        evaluated = self.evaluator.run(point, texts)
        self.optimiser.zero_grad()
        values.backward(torch.tensor(evaluated.gradient, dtype=torch.float64))
        if math.isfinite(evaluated.objective):
            self.optimiser.step()
        return point, evaluated

    def close(self) -> None:
        self.plan.close()
