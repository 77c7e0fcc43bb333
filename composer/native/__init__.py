"""Fused CPU kernels (kernels.c), compiled on first use with the machine's C compiler and loaded
with ctypes; `library()` is None where there is no compiler or `COMPOSER_NATIVE=0`, and callers then
take their torch path, which computes the same bits (tests/test_native.py).

Why C: a bf16 task-arithmetic merge is a dozen elementwise torch operations per entry, each a pass
over memory that rounds to bf16; one fused pass that rounds at the same steps is several times
faster. The compiled library is cached in composer's cache folder, keyed by the source, the
compiler's flags and the CPU (it is built for the CPU it runs on); ctypes releases the GIL while a
kernel runs, so the reader and writer threads go on beside it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from composer.cache import cache_dir

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared")
TUNING = ("-march=native",)  # dropped where the compiler refuses it
_POINTER = ctypes.c_void_p
_INT64 = ctypes.c_int64
_SIGNATURES = {
    "task_arithmetic_bf16": [
        _INT64, _INT64, ctypes.c_int, _POINTER, _POINTER, _POINTER, _POINTER, _POINTER, _POINTER,
        _POINTER, _POINTER, _POINTER, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_float, _POINTER,
    ],
    "dare_select_bf16": [_INT64, _INT64, ctypes.c_uint64, ctypes.c_int, _POINTER, _POINTER, _POINTER, _POINTER, _POINTER],
    "magnitude_sums_bf16": [_INT64, _POINTER, _POINTER],
    "model_stock_blend_bf16": [_INT64, _INT64, ctypes.c_int, _POINTER, _POINTER, ctypes.c_float, ctypes.c_float, _POINTER],
    "sce_variances_bf16": [_INT64, _INT64, ctypes.c_int, _POINTER, _POINTER, _POINTER],
    "sce_square_sums_bf16": [_INT64, _INT64, _POINTER, _POINTER, _POINTER, _POINTER],
    "sce_merge_bf16": [_INT64, _INT64, ctypes.c_int, _POINTER, _POINTER, _POINTER, _POINTER, _POINTER],
    "delta_pattern_counts_bf16": [_INT64, _INT64, _POINTER, _POINTER, _POINTER],
    "della_select_bf16": [_INT64, _INT64, _INT64, ctypes.c_uint64, _POINTER, _POINTER, _POINTER, _POINTER, _POINTER, _POINTER],
}


def enabled() -> bool:
    return os.environ.get("COMPOSER_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (disabled, no compiler, or the build failed)."""
    return _load() if enabled() else None


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _compiler() -> str | None:
    return next((found for name in (os.environ.get("CC"), "cc", "gcc", "clang") if name and (found := shutil.which(name))), None)


@functools.cache
def _load() -> ctypes.CDLL | None:
    compiler = _compiler()
    if compiler is None or platform.system() == "Windows":
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS + TUNING).encode(), compiler.encode(), _cpu_signature().encode()])).hexdigest()[:20]
    built = cache_dir() / "native" / f"kernels-{key}.so"
    if not built.exists() and not _build(compiler, built):
        return None
    try:
        kernels = ctypes.CDLL(str(built))
    except OSError:
        return None
    for name, arguments in _SIGNATURES.items():
        function = getattr(kernels, name)
        function.argtypes, function.restype = arguments, None
    return kernels


def _build(compiler: str, built: Path) -> bool:
    """Compile into a temporary file beside `built` and move it into place (another process may be
    building the same library at the same time); False when the compiler fails."""
    try:
        built.parent.mkdir(parents=True, exist_ok=True)
        descriptor, partial = tempfile.mkstemp(suffix=".so.partial", dir=built.parent)
        os.close(descriptor)
    except OSError:
        return False
    try:
        for tuning in (TUNING, ()):
            finished = subprocess.run([compiler, *FLAGS, *tuning, "-o", partial, str(SOURCE)], capture_output=True, timeout=120)
            if finished.returncode == 0:
                os.replace(partial, built)
                return True
        return False
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
