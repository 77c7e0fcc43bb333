"""`--verify`: compose the recovered recipe into a temporary folder with the ordinary plan and executor, and
measure each tensor's relative error against SUSPECT (||out - SUSPECT|| / ||SUSPECT||)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from composer.compose import compose_moe_text, compose_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.memory import release_freed_memory
from composer.sources import open_source
from composer.trace.layout import TracedModel


def verify_recipe(text: str, suspect: TracedModel, memory_budget: int, mixture: bool = False) -> dict[str, float]:
    release_freed_memory()  # what the fits freed, before the executor takes its budget
    with tempfile.TemporaryDirectory(prefix="composer-trace-") as scratch:
        out = Path(scratch) / "recovered"
        # the budget bounds the whole process: what the trace still holds (interpreter, tokenizers, sketches) is
        # taken off the executor's share, so a trace with --verify stays within it as a compose does
        options = ExecutionOptions(memory_budget=memory_budget, whole_process=True, progress=False)
        try:
            (compose_moe_text if mixture else compose_text)(text, out, options, base_dir=Path.cwd())
        except ComposerError as error:
            raise ComposerError(f"--verify: the recovered recipe does not compose: {error}") from None
        rebuilt = open_source(str(out))
        try:
            errors = {}
            for name in suspect.infos:
                if name not in rebuilt.tensor_infos():
                    errors[name] = float("nan")
                    continue
                original = suspect.source.read(name).float()
                made = rebuilt.read(name).float()
                if made.shape != original.shape:
                    errors[name] = float("nan")
                    continue
                norm = float(original.norm())
                errors[name] = float((made - original).norm()) / norm if norm else float((made - original).norm())
            return errors
        finally:
            rebuilt.close()
