"""Staged recipes: each stage is planned against the stages before it, then all fuse into one plan.

A stage's output is presented to later stages as a model (`StageSource`), so planning, checks and
config rewriting work exactly as for a model on disk. Fusing then replaces every input that names a
stage by the stage's own inputs, and the operation by a small tree that computes the stage tensor on
the way: the executor sees one plan over real models only, reads each input once and writes nothing
between stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch

from composer.errors import ComposerError
from composer.plan.build import model_location, plan_merge
from composer.plan.model import Operation, Plan, PlannedTensor, TensorRef
from composer.recipe.load import RecipeKeyError
from composer.recipe.schema import Recipe
from composer.sources import ModelSource, TensorInfo


class StageSource(ModelSource):
    """An earlier stage's output, seen as a model: its config, tensor shapes and tokenizer, computed on read."""

    def __init__(self, name: str, plan: Plan):
        super().__init__(name)
        self.plan = plan
        self.planned = {tensor.name: tensor for tensor in plan.tensors}
        self.infos = {tensor.name: TensorInfo(tensor.name, tensor.shape, tensor.dtype) for tensor in plan.tensors}

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return self.infos

    def read(self, name: str) -> torch.Tensor:
        planned = self.planned[name]
        inputs = [self.plan.sources[ref.model].read(ref.name) for ref in planned.inputs]
        return _apply(planned.operation, inputs).to(planned.dtype)

    def config(self) -> dict:
        return dict(self.plan.config)

    def has_tokenizer(self) -> bool:
        source = self.plan.tokenizer_source
        return source is not None and self.plan.sources[source].has_tokenizer()

    def save_tokenizer(self, destination: Path) -> list[str]:
        if self.plan.tokenizer_source is None:
            return []
        return self.plan.sources[self.plan.tokenizer_source].save_tokenizer(destination)

    def close(self) -> None:
        pass  # the sources it reads belong to the fused plan, which closes them once


def _apply(operation: Operation, inputs: list[torch.Tensor]) -> torch.Tensor:
    compute = operation.compute_dtype
    return operation.fn([x.to(compute) if compute is not None and x.dtype != compute else x for x in inputs])


@dataclass(frozen=True)
class _Step:
    """One operation in a fused tensor's tree; an argument is a leaf input's position or a nested step."""

    operation: Operation
    arguments: tuple[Union[int, "_Step"], ...]
    dtype: torch.dtype  # the stage output's dtype: later stages see exactly what that stage would have written

    def run(self, leaves: list[torch.Tensor]) -> torch.Tensor:
        values = [leaves[a] if isinstance(a, int) else a.run(leaves).to(a.dtype) for a in self.arguments]
        return _apply(self.operation, values)


def _describe(step: _Step, refs: list[TensorRef], stage_of: dict[int, str]) -> str:
    from composer.plan.show import format_arguments

    parts = []
    for argument in step.arguments:
        if isinstance(argument, int):
            parts.append(f"{refs[argument].model}")
        else:
            arguments = format_arguments(argument.operation.arguments)
            parts.append(f"{stage_of[id(argument)]}={argument.operation.label}{'[' + arguments + ']' if arguments else ''}({_describe(argument, refs, stage_of)})")
    return ", ".join(parts)


def _fuse_tensor(planned: PlannedTensor, stages: dict[str, StageSource]) -> PlannedTensor:
    leaves: list[TensorRef] = []
    stage_of: dict[int, str] = {}

    def expand(tensor: PlannedTensor) -> _Step:
        arguments: list[Union[int, _Step]] = []
        for ref in tensor.inputs:
            stage = stages.get(ref.model)
            if stage is None:
                if ref not in leaves:
                    leaves.append(ref)
                arguments.append(leaves.index(ref))
            else:
                nested = expand(stage.planned[ref.name])
                stage_of[id(nested)] = ref.model
                arguments.append(nested)
        return _Step(tensor.operation, tuple(arguments), tensor.dtype)

    root = expand(planned)
    if all(isinstance(argument, int) for argument in root.arguments):
        return planned
    arguments = dict(planned.operation.arguments)
    label = f"{planned.operation.label}({_describe(root, leaves, stage_of)})"
    operation = Operation(label, root.run, arguments, None)
    return PlannedTensor(planned.name, planned.shape, planned.dtype, tuple(leaves), operation)


def _check_references(recipe: Recipe) -> None:
    """A merge may use only stages defined before it, and every stage must be used by something after it."""
    merges = recipe.merges()
    names = [name for name, _ in merges if name is not None]
    used: set[str] = set()
    for position, (name, merge) in enumerate(merges):
        prefix = ("stages", position) if name is not None else ()
        for reference in merge.referenced_models() + ([merge.tokenizer_source] if merge.tokenizer_source else []):
            if reference in names[position:]:
                what = "itself" if reference == name else f"stage '{reference}', which comes later"
                raise RecipeKeyError(prefix + model_location(merge, reference), f"stage '{name or 'output'}' uses {what}; a stage can only use the stages before it.")
            used.add(reference)
    final_name = merges[-1][0]
    for position, name in enumerate(names):
        if name not in used and name != final_name:
            raise RecipeKeyError(("stages", position, "name"), f"stage '{name}' is not used by any later stage or by the output; use it or remove it.")


def build_plan(recipe: Recipe, recipe_text: str = "", recipe_dir: Path | None = None, sources: dict[str, ModelSource] | None = None) -> Plan:
    """The plan of a whole recipe: its one merge, or its stages fused into one plan."""
    if not recipe.stages:
        return plan_merge(recipe, recipe_text, recipe_dir, sources)
    _check_references(recipe)
    sources = sources if sources is not None else {}
    stages: dict[str, StageSource] = {}
    methods: list[tuple[str, str]] = []
    merges = recipe.merges()
    plan: Plan | None = None
    try:
        for position, (name, merge) in enumerate(merges):
            if merge.random_seed is None and recipe.random_seed is not None:
                merge = merge.model_copy(update={"random_seed": recipe.random_seed})
            last = position == len(merges) - 1
            try:
                # an intermediate stage's random masks differ from the output's for the same tensor name
                prefix = ("stages", position) if name is not None else ()
                plan = plan_merge(merge, recipe_text, recipe_dir, sources, seed_namespace=None if last else name, key_prefix=prefix)
            except RecipeKeyError as error:
                raise RecipeKeyError(prefix + error.location, error.detail) from None
            methods.append((name or "output", plan.method))
            if not last:
                stages[name] = StageSource(name, plan)
                sources[name] = stages[name]
    except ComposerError:
        for source in sources.values():
            source.close()
        raise
    assert plan is not None
    leaves = {reference: source for reference, source in sources.items() if reference not in stages}
    fused = [_fuse_tensor(tensor, stages) for tensor in plan.tensors]
    tokenizer_source = plan.tokenizer_source
    if tokenizer_source in stages:
        # the output's tokenizer comes from the stage's own tokenizer source
        tokenizer_source = _tokenizer_root(tokenizer_source, stages)
    return Plan(
        tensors=fused, sources=leaves, config=plan.config, tokenizer_source=tokenizer_source, recipe_text=recipe_text,
        method=" -> ".join(f"{name}: {method}" for name, method in methods), parents=recipe.input_models(),
        chat_template=plan.chat_template, notes=plan.notes, stages=methods,
    )


def _tokenizer_root(reference: str | None, stages: dict[str, StageSource]) -> str | None:
    while reference in stages:
        reference = stages[reference].plan.tokenizer_source
    return reference
