"""Fuzzing the parsers of files from strangers (recipes, safetensors and GGUF headers, config.json): any input
ends in a correct result or one ComposerError, quickly. The properties live in fuzz_properties.py; this file
runs each on a small fixed, derandomised budget so CI is quick and reproducible. bench/fuzz.py runs them long.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from fuzz_properties import (
    check_config,
    check_gguf,
    check_recipe,
    check_safetensors,
    config_files,
    gguf_files,
    recipe_texts,
    safetensors_files,
)

# deadline=None: the properties bound each input's time themselves (fuzz_properties.TIME_LIMIT), with a limit
# that a loaded CI machine does not trip but a hang does; hypothesis' own deadline is flaky under load
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def budget(examples: int) -> settings:
    return settings(FUZZ, max_examples=examples)


@budget(200)
@given(recipe_texts())
def test_recipe_parsers_refuse_or_accept_every_text(text):
    check_recipe(text)


@budget(300)
@given(safetensors_files())
def test_safetensors_reader_refuses_or_reads_every_file(data):
    check_safetensors(data)


@budget(300)
@given(gguf_files())
def test_gguf_header_reader_refuses_or_reads_every_file(data):
    check_gguf(data)


@budget(200)
@given(config_files())
def test_config_reader_refuses_or_reads_every_file(data):
    check_config(data)
