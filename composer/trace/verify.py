"""`--verify`: compose the recovered recipe into a temporary folder with the ordinary plan and executor, and
measure each tensor's relative error against SUSPECT (||out - SUSPECT|| / ||SUSPECT||)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from composer.compose import compose_moe_text, compose_text
from composer.errors import ComposerError
from composer.execute import ExecutionOptions
from composer.memory import release_freed_memory
from composer.sources import open_source
from composer.trace.layout import TracedModel
from composer.trace.reading import RowReader, row_count, rows_within


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
        release_freed_memory()  # the executor's freed buffers
        rebuilt = open_source(str(out))
        reader = RowReader(rebuilt)
        try:
            errors = {}
            for name, info in suspect.infos.items():
                made = rebuilt.tensor_infos().get(name)
                if made is None or tuple(made.shape) != tuple(info.shape):
                    errors[name] = float("nan")
                    continue
                # a block of rows of each at a time, within a small share of the budget (the executor is done)
                block = rows_within(memory_budget // 8, row_count(info.shape)[1], copies=4)
                errors[name] = _relative_error(suspect.reader.blocks(name, block), reader.blocks(name, block))
            return errors
        finally:
            reader.close()
            rebuilt.close()


def _relative_error(originals, mades) -> float:
    """||made - original|| / ||original|| (||made - original|| where the original is 0), from blocks of rows: each
    block's norms in float32, as a tensor read whole had them, combined in float64."""
    difference = norm = 0.0
    for (_, original), (_, made) in zip(originals, mades):
        original = original.float()
        difference += float((made.float() - original).norm()) ** 2
        norm += float(original.norm()) ** 2
    return math.sqrt(difference) / math.sqrt(norm) if norm else math.sqrt(difference)
