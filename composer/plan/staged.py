"""Staged recipes: each stage is planned against the stages before it, then all fuse into one plan.

A stage's output is presented to later stages as a model (`StageSource`), so planning, checks and
config rewriting work exactly as for a model on disk. Fusing then replaces every input that names a
stage by the stage's own inputs, and the operation by a small tree that computes the stage tensor on
the way: the executor sees one plan over real models only, reads each input once and writes nothing
between stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Union

import torch

from composer.errors import ComposerError
from composer.plan.build import model_location, plan_merge
from composer.plan.calibration import refuse_in_stages
from composer.plan.model import Operation, Plan, PlannedTensor, TensorRef
from composer.recipe.load import RecipeKeyError
from composer.recipe.schema import Recipe, Stage
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
    arguments: tuple[Union[int, _Step], ...]
    dtype: torch.dtype  # the stage output's dtype: later stages see exactly what that stage would have written

    def run(self, leaves: list[torch.Tensor]) -> torch.Tensor:
        values = [leaves[a] if isinstance(a, int) else a.run(leaves).to(a.dtype) for a in self.arguments]
        return _apply(self.operation, values)

    def buffers(self, leaf_dtypes: list[torch.dtype]) -> float:
        """Tensor-sized buffers held at most while the tree runs, counted as if all were held at once: each step's own
        (Operation.buffers) and each nested step's result."""
        dtypes = [leaf_dtypes[a] if isinstance(a, int) else a.dtype for a in self.arguments]
        nested = [a for a in self.arguments if not isinstance(a, int)]
        return self.operation.buffers(dtypes) + sum(1 + step.buffers(leaf_dtypes) for step in nested)


def _describe(step: _Step, refs: list[TensorRef], stage_of: dict[int, str]) -> str:
    from composer.plan.show import format_arguments

    parts = []
    for argument in step.arguments:
        if isinstance(argument, int):
            parts.append(f"{refs[argument].model}")
        else:
            arguments = format_arguments(argument.operation.arguments)
            parts.append(
                f"{stage_of[id(argument)]}={argument.operation.label}{'[' + arguments + ']' if arguments else ''}({_describe(argument, refs, stage_of)})"
            )
    return ", ".join(parts)


def _fuse_tensor(
    planned: PlannedTensor, stages: dict[str, StageSource], sources: dict[str, ModelSource]
) -> PlannedTensor:
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
    label = f"{planned.operation.label}({_describe(root, leaves, stage_of)})"
    leaf_dtypes = [sources[ref.model].tensor_infos()[ref.name].dtype for ref in leaves]
    # the fused step converts nothing itself (each nested step converts its own inputs), so its buffers are declared
    # as temporaries of the widest dtype they can take
    operation = replace(
        planned.operation,
        label=label,
        fn=root.run,
        compute_dtype=None,
        temporaries=root.buffers(leaf_dtypes),
        working_dtype=torch.float32,
        verbatim=False,
    )
    return PlannedTensor(planned.name, planned.shape, planned.dtype, tuple(leaves), operation)


def check_stage_references(stages: list[Stage], output_references: list[str], last_is_output: bool) -> None:
    """A stage may use only the stages before it, and every stage must be used by something after it."""
    names = [stage.name for stage in stages]
    used: set[str] = set(output_references)
    for position, stage in enumerate(stages):
        for reference in stage.referenced_models() + stage.module_models() + stage.tokenizer_models():
            if reference in names[position:]:
                what = "itself" if reference == stage.name else f"stage '{reference}', which comes later"
                location = ("stages", position) + model_location(stage, reference)
                raise RecipeKeyError(
                    location, f"stage '{stage.name}' uses {what}; a stage can only use the stages before it."
                )
            used.add(reference)
    for position, name in enumerate(names):
        if name not in used and not (last_is_output and position == len(names) - 1):
            raise RecipeKeyError(
                ("stages", position, "name"),
                f"stage '{name}' is not used by any later stage or by the output; use it or remove it.",
            )


def plan_stages(
    stages: list[Stage],
    random_seed: int | None,
    recipe_text: str,
    recipe_dir: Path | None,
    sources: dict[str, ModelSource],
) -> tuple[dict[str, StageSource], list[tuple[str, str]]]:
    """Plan each intermediate stage against the ones before it; each becomes a source named after it."""
    planned: dict[str, StageSource] = {}
    methods: list[tuple[str, str]] = []
    for position, stage in enumerate(stages):
        if stage.random_seed is None and random_seed is not None:
            stage = stage.model_copy(update={"random_seed": random_seed})
        prefix = ("stages", position)
        try:
            # a stage's random masks differ from the output's for the same tensor name
            plan = plan_merge(stage, recipe_text, recipe_dir, sources, seed_namespace=stage.name, key_prefix=prefix)
        except RecipeKeyError as error:
            raise RecipeKeyError(prefix + error.location, error.detail) from None
        methods.append((stage.name, plan.method))
        planned[stage.name] = sources[stage.name] = StageSource(stage.name, plan)
    return planned, methods


def plan_with_stages(
    stages: list[Stage],
    random_seed: int | None,
    recipe_text: str,
    recipe_dir: Path | None,
    sources: dict[str, ModelSource] | None,
    build_output: Callable[[dict[str, ModelSource]], Plan],
    output_name: str,
    parents: list[str],
) -> Plan:
    """Plan `stages`, then the output with `build_output(sources)` (sources holding the stages), fused into one plan."""
    sources = sources if sources is not None else {}
    try:
        planned, methods = plan_stages(stages, random_seed, recipe_text, recipe_dir, sources)
        output = build_output(sources)
    except ComposerError:
        for source in sources.values():
            source.close()
        raise
    methods.append((output_name, output.method))
    leaves = {reference: source for reference, source in sources.items() if reference not in planned}
    return Plan(
        tensors=[_fuse_tensor(tensor, planned, leaves) for tensor in output.tensors],
        sources=leaves,
        config=output.config,
        tokenizer_source=_tokenizer_root(output.tokenizer_source, planned),
        recipe_text=recipe_text,
        method=" -> ".join(f"{name}: {method}" for name, method in methods),
        parents=parents,
        chat_template=output.chat_template,
        notes=output.notes,
        stages=methods,
        deferred_checks=[check for stage in planned.values() for check in stage.plan.deferred_checks]
        + output.deferred_checks,
        plan_checks=[check for stage in planned.values() for check in stage.plan.plan_checks] + output.plan_checks,
    )


def build_plan(
    recipe: Recipe, recipe_text: str = "", recipe_dir: Path | None = None, sources: dict[str, ModelSource] | None = None
) -> Plan:
    """The plan of a whole recipe: its one merge, or its stages fused into one plan."""
    if not recipe.stages:
        return plan_merge(recipe, recipe_text, recipe_dir, sources)
    refuse_in_stages(recipe)
    if recipe.merge_method is not None:  # the top-level merge is the output
        intermediate, output, prefix, output_name = recipe.stages, recipe, (), "output"
    else:  # the last stage is
        intermediate, output = recipe.stages[:-1], recipe.stages[-1]
        prefix, output_name = ("stages", len(recipe.stages) - 1), output.name
        if output.random_seed is None and recipe.random_seed is not None:
            output = output.model_copy(update={"random_seed": recipe.random_seed})
    check_stage_references(
        list(recipe.stages),
        output.referenced_models() + output.module_models() + output.tokenizer_models() if output is recipe else [],
        recipe.merge_method is None,
    )

    def build_output(sources: dict[str, ModelSource]) -> Plan:
        try:
            return plan_merge(output, recipe_text, recipe_dir, sources, key_prefix=prefix)
        except RecipeKeyError as error:
            raise RecipeKeyError(prefix + error.location, error.detail) from None

    return plan_with_stages(
        intermediate,
        recipe.random_seed,
        recipe_text,
        recipe_dir,
        sources,
        build_output,
        output_name,
        recipe.input_models(),
    )


def _tokenizer_root(reference: str | None, stages: dict[str, StageSource]) -> str | None:
    """The model whose tokenizer files a reference ends at, through stages."""
    while reference in stages:
        reference = stages[reference].plan.tokenizer_source
    return reference
