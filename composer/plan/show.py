"""A plan as text: one line a tensor, then totals and the predicted peak memory."""

from __future__ import annotations

from composer.plan.model import Plan
from composer.plan.schedule import Schedule, describe_dtype


def format_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024
    return str(count)


def format_arguments(arguments: dict) -> str:
    shown = []
    for key, value in arguments.items():
        if key == "seed":
            continue
        if isinstance(value, list) and all(v is None for v in value):
            continue
        if isinstance(value, float):
            value = round(value, 4)
        if isinstance(value, list):
            value = [round(v, 4) if isinstance(v, float) else v for v in value]
        shown.append(f"{key}={value}")
    return " ".join(shown)


def format_plan(plan: Plan, schedule: Schedule, limit: int = 0) -> str:
    how = (
        "stages: " + " -> ".join(f"{name} ({method})" for name, method in plan.stages)
        if plan.stages
        else f"method: {plan.method}"
    )
    lines = [
        f"{how}    output layers: {plan.config.get('num_hidden_layers', plan.config.get('n_layer'))}    tokenizer from: {plan.tokenizer_source}"
    ]
    lines.append(f"{'output tensor':<52} {'shape':<16} {'dtype':<9} operation <- inputs")
    shown = plan.tensors[:limit] if limit else plan.tensors
    for tensor in shown:
        inputs = ", ".join(f"{ref.model}:{ref.name}" for ref in tensor.inputs)
        operation = tensor.operation.label
        arguments = format_arguments(tensor.operation.arguments)
        lines.append(
            f"{tensor.name:<52} {str(list(tensor.shape)):<16} {describe_dtype(tensor.dtype):<9} {operation}{' ' + arguments if arguments else ''} <- {inputs}"
        )
    if limit and len(plan.tensors) > limit:
        lines.append(f"... {len(plan.tensors) - limit} more tensors")
    lines.append("")
    lines.append(
        f"tensors: {len(plan.tensors)}    read: {format_bytes(plan.input_bytes())}    write: {format_bytes(plan.output_bytes())}    predicted peak memory for tensors: {format_bytes(schedule.peak_bytes)}"
    )
    lines += [f"note: {note}" if not note.startswith(" ") else note for note in plan.notes]
    return "\n".join(lines)
