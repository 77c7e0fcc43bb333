"""`compose check RECIPE`: the recipe planned against its models' configs and safetensors headers alone.

Hub models are opened headers-only (composer.sources.hub_headers): config.json, the index and each weights file's
header are fetched, no tensor data. The plan is the one `compose` would run, made by the same planner with every
check it makes before reading a tensor (architectures, layer ranges, shapes, parameters, vocabularies, the output
config built by transformers on the meta device), so a recipe that passes fails a run only on what headers cannot
show: the data itself, the disk, the network. The report says what a run would download, read and write.
"""

from __future__ import annotations

import reprlib
from collections import Counter
from pathlib import Path

from composer.compose import plan_from_file
from composer.errors import ComposerError
from composer.plan import Plan
from composer.plan.schedule import make_schedule
from composer.plan.show import format_bytes
from composer.sources import ModelSource, open_source
from composer.sources.hub_headers import HubHeaders
from composer.sources.model_files import hub_repository

CONFIG_FACTS = ("architectures", "model_type", "num_hidden_layers", "hidden_size", "vocab_size", "torch_dtype", "dtype")
SHOWN_CHANGES = 12


def open_headers_only(references: list[str], recipe_dir: Path) -> dict[str, ModelSource]:
    """Every model the recipe reads, hub models from their headers; every model that cannot be opened is reported."""
    opened: dict[str, ModelSource] = {}
    problems: list[str] = []
    for reference in references:
        try:
            opened[reference] = open_source(reference, recipe_dir, headers_only=True)
        except ComposerError as error:
            problems.append(str(error))
    if problems:
        for source in opened.values():
            source.close()
        if len(problems) == 1:
            raise ComposerError(problems[0])
        listed = " ".join(f"({number}) {problem}" for number, problem in enumerate(problems, 1))
        raise ComposerError(f"{len(problems)} of the recipe's models cannot be used: {listed}")
    return opened


def _short(value: object) -> str:
    shortener = reprlib.Repr()
    shortener.maxstring, shortener.maxlist, shortener.maxdict, shortener.maxother = 40, 4, 3, 40
    return shortener.repr(value)


def config_changes(before: dict, after: dict, prefix: str = "") -> list[str]:
    """What differs from `before` in `after`, a key a line (one level into nested configs such as text_config)."""
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict) and not prefix:
            changes += config_changes(old, new, f"{key}.")
        elif key not in after:
            changes.append(f"{prefix}{key} removed")
        elif key not in before:
            changes.append(f"{prefix}{key}: {_short(new)} (new)")
        else:
            changes.append(f"{prefix}{key}: {_short(old)} -> {_short(new)}")
    return changes


def _where(source: ModelSource) -> str:
    if isinstance(source, HubHeaders):
        files = len(source.file_sizes)
        return (
            f"hub, commit {source.commit[:12]}: only the headers of its {files} weights file{'s' if files != 1 else ''} "
            f"were fetched ({format_bytes(source.header_bytes)}); a run downloads {format_bytes(sum(source.file_sizes.values()))}"
        )
    folder = getattr(source, "folder", None) or getattr(source, "path", None)
    if isinstance(folder, Path) and hub_repository(folder) is not None:
        return f"in the hub cache ({folder})"
    return f"local, {folder}" if folder is not None else type(source).__name__


def _input_lines(plan: Plan) -> list[str]:
    read: dict[str, dict[str, int]] = {}
    for tensor in plan.tensors:
        for ref in tensor.inputs:
            read.setdefault(ref.model, {})[ref.name] = plan.sources[ref.model].tensor_infos()[ref.name].nbytes
    lines = []
    for reference, source in plan.sources.items():
        names = read.get(reference, {})
        lines.append(f"  {reference}: {_where(source)}")
        lines.append(
            f"    the merge reads {len(names)} of its {len(source.tensor_infos())} tensors ({format_bytes(sum(names.values()))})"
        )
        fp8 = getattr(source, "fp8", None)
        if fp8 is not None:
            dtype = str(fp8.dtype).removeprefix("torch.")
            lines.append(
                f"    {len(fp8.scales)} block-scaled FP8 weights (blocks of {list(fp8.block)}) are dequantised to {dtype} as they are read"
            )
        mxfp4 = getattr(source, "mxfp4", None)
        if mxfp4 is not None:
            lines.append(f"    {len(mxfp4.pairs)} MXFP4 expert tensors are dequantised to bfloat16 as they are read")
    return lines


def _output_lines(plan: Plan) -> list[str]:
    dtypes = Counter(str(tensor.dtype).removeprefix("torch.") for tensor in plan.tensors)
    lines = [
        f"  {len(plan.tensors)} tensors, {format_bytes(plan.output_bytes())} "
        f"({', '.join(f'{count} {dtype}' for dtype, count in dtypes.most_common())})"
    ]
    facts = [f"{key} {_short(plan.config[key])}" for key in CONFIG_FACTS if key in plan.config]
    lines.append(f"  config: {', '.join(facts)}")
    parent = next((reference for reference in plan.parents if reference in plan.sources), None)
    if parent is not None:
        changes = config_changes(plan.sources[parent].config(), plan.config)
        more = f"; {len(changes) - SHOWN_CHANGES} more" if len(changes) > SHOWN_CHANGES else ""
        shown = "; ".join(changes[:SHOWN_CHANGES]) if changes else "none"
        lines.append(f"  config changes from '{parent}': {shown}{more}")
    lines.append(f"  tokenizer from: {plan.tokenizer_source}")
    return lines


def check_recipe(recipe_path: Path, memory_budget: int) -> str:
    """The report of a recipe checked from its models' configs and headers; a ComposerError for what is wrong."""
    _, plan = plan_from_file(recipe_path, open_headers_only)
    try:
        plan.run_deferred_checks()  # transformers' build of the output, which a run makes beside its first writes
        schedule = make_schedule(plan, memory_budget)
        how = (
            "stages " + " -> ".join(f"{name} ({method})" for name, method in plan.stages)
            if plan.stages
            else f"method {plan.method}"
        )
        downloads = sum(
            sum(source.file_sizes.values()) for source in plan.sources.values() if isinstance(source, HubHeaders)
        )
        lines = [f"{recipe_path}: {how}", "inputs:", *_input_lines(plan), "output:", *_output_lines(plan)]
        lines += [f"note: {note}" if not note.startswith(" ") else note for note in plan.notes]
        lines.append(
            f"ok: a run would download {format_bytes(downloads)} from the hub, read {format_bytes(plan.input_bytes())} and "
            f"write {format_bytes(plan.output_bytes())}, holding at most {format_bytes(schedule.peak_bytes)} of tensors "
            f"with a memory budget of {format_bytes(memory_budget)}."
        )
        return "\n".join(lines)
    finally:
        plan.close()
