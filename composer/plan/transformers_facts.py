"""What transformers says about a config, remembered between runs so that most merges never import it.

Importing transformers costs seconds; asking it the same question about the same config always gets
the same answer for one transformers version. Answers are kept in the cache folder, keyed by that
version and the exact question, so a new transformers release asks again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version

from composer.cache import cache_dir
from composer.errors import ComposerError
from composer.files import read_json_object

FILE_NAME = "transformers-facts.json"
MOST_KEPT = 2000


@lru_cache(maxsize=1)
def _transformers_version() -> str:
    try:
        return version("transformers")
    except PackageNotFoundError:
        return "unknown"


def _key(kind: str, payload) -> str:
    text = json.dumps(
        {"transformers": _transformers_version(), "kind": kind, "payload": payload}, sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _path():
    return cache_dir() / FILE_NAME


def _load() -> dict:
    path = _path()
    if not path.is_file():
        return {}
    try:
        return read_json_object(path)
    except ComposerError:  # a damaged cache only costs time
        return {}


def _store(key: str, value) -> None:
    """Best effort: a cache that cannot be written only costs time."""
    try:
        facts = _load()
        facts.pop(key, None)
        facts[key] = value
        if len(facts) > MOST_KEPT:
            facts = dict(list(facts.items())[-MOST_KEPT:])
        partial = _path().with_name(f"{FILE_NAME}.{os.getpid()}.partial")
        partial.write_text(json.dumps(facts))
        partial.replace(_path())
    except OSError:
        pass


def remembered(kind: str, question, answer):
    """`answer()` (a JSON value, not None) for `question` (JSON data), from the cache when this transformers
    version answered it before. An answer that raises is not kept."""
    key = _key(kind, question)
    known = _load().get(key)
    if known is not None:
        return known
    value = answer()
    _store(key, value)
    return value


def config_defaults(config: dict, keys: tuple[str, ...], reference: str = "the model") -> dict:
    """The values transformers gives `keys` for `config` (filling defaults the file leaves out); None where it has none.
    No keys: no question (and no import)."""
    if not keys:
        return {}

    def answer() -> dict:
        from composer.architecture import transformers_config

        effective = transformers_config(config, reference)
        values = {}
        for name in keys:
            value = getattr(effective, name, None)
            value = list(value) if isinstance(value, tuple) else value
            values[name] = value if isinstance(value, (bool, int, float, str, list, type(None))) else None
        return values

    return remembered("defaults", {"config": config, "keys": sorted(keys)}, answer)


def deferred_loadable_check(
    config: dict, planned_shapes: dict[str, tuple[int, ...]], check
) -> Callable[[], None] | None:
    """None when `check(config, planned_shapes)` passed before for exactly this question; otherwise a function that
    runs it (raising what it raises) and remembers a pass. The question is copied now, so later changes to `config`
    do not change it."""
    config, shapes = copy.deepcopy(config), dict(planned_shapes)
    key = _loadable_key(config, shapes)
    if _load().get(key) is not None:
        return None

    def run() -> None:
        check(config, shapes)
        _store(key, True)

    return run


def loadable_check(config: dict, planned_shapes: dict[str, tuple[int, ...]], check) -> Callable[[], None]:
    """A function that runs `check(config, planned_shapes)` unless it passed before for exactly this question, and
    remembers a pass: `deferred_loadable_check` for a check that may never run (only `compose plan` runs it), so the
    cache is read then, not while planning. The question is copied now."""
    config, shapes = copy.deepcopy(config), dict(planned_shapes)

    def run() -> None:
        key = _loadable_key(config, shapes)
        if _load().get(key) is None:
            check(config, shapes)
            _store(key, True)

    return run


def _loadable_key(config: dict, shapes: dict[str, tuple[int, ...]]) -> str:
    return _key("loadable", {"config": config, "shapes": sorted((name, list(shape)) for name, shape in shapes.items())})
