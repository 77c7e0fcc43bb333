"""Fused CPU kernels (kernels.c), compiled on first use with the machine's C compiler and loaded
with ctypes; `library()` is None where there is no compiler or `COMPOSER_NATIVE=0`, and callers then
take their torch path, which computes the same bits (tests/test_native.py).

Why C: a bf16 task-arithmetic merge is a dozen elementwise torch operations per entry, each a pass
over memory that rounds to bf16; one fused pass that rounds at the same steps is several times
faster. The compiled library is cached in composer's cache folder, keyed by the source, the
compiler's flags and the CPU (it is built for the CPU it runs on); ctypes releases the GIL while a
kernel runs, so the reader and writer threads go on beside it.

Loading a library runs its code, so a cached one is trusted only in a folder no other user can write
to, and only when its bytes have the SHA-256 written beside it (`kernels-<key>.so.sha256`) when it was
built: a library planted in a shared COMPOSER_CACHE, or changed since, is never loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

from composer.cache import cache_dir, make_private_dirs, replacing, unsafe_reason
from composer.errors import ComposerWarning

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-fPIC", "-shared")
TUNING = ("-march=native",)  # dropped where the compiler refuses it
_POINTER = ctypes.c_void_p
_INT64 = ctypes.c_int64
_SIGNATURES = {
    "task_arithmetic_bf16": [
        _INT64,
        _INT64,
        ctypes.c_int,
        _POINTER,
        _POINTER,
        _POINTER,
        _POINTER,
        _POINTER,
        _POINTER,
        _POINTER,
        _POINTER,
        _POINTER,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_float,
        ctypes.c_int,
        ctypes.c_float,
        _POINTER,
    ],
    "dare_select_bf16": [
        _INT64,
        _INT64,
        ctypes.c_uint64,
        ctypes.c_int,
        _POINTER,
        _POINTER,
        _POINTER,
        _POINTER,
        _POINTER,
    ],
    "magnitude_sums_bf16": [_INT64, _POINTER, _POINTER],
    "model_stock_blend_bf16": [
        _INT64,
        _INT64,
        ctypes.c_int,
        _POINTER,
        _POINTER,
        ctypes.c_float,
        ctypes.c_float,
        _POINTER,
    ],
    "sce_variances_bf16": [_INT64, _INT64, ctypes.c_int, _POINTER, _POINTER, _POINTER],
    "sce_square_sums_bf16": [_INT64, _INT64, _POINTER, _POINTER, _POINTER, _POINTER],
    "sce_merge_bf16": [_INT64, _INT64, ctypes.c_int, _POINTER, _POINTER, _POINTER, _POINTER, _POINTER],
    "delta_pattern_counts_bf16": [_INT64, _INT64, _POINTER, _POINTER, _POINTER],
    "nth_delta_pattern_bf16": [_INT64, _INT64, _POINTER, _POINTER, ctypes.c_uint16, _INT64, _POINTER],
    "scan_bytes": [_INT64, _POINTER, ctypes.c_int, ctypes.c_uint64, _POINTER, _POINTER],
    "della_select_bf16": [
        _INT64,
        _INT64,
        _INT64,
        ctypes.c_uint64,
        _POINTER,
        _POINTER,
        _POINTER,
        _POINTER,
        _POINTER,
        _POINTER,
    ],
}


def enabled() -> bool:
    return os.environ.get("COMPOSER_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (disabled, no compiler, or the build failed)."""
    return load_library() if enabled() else None


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _compiler() -> str | None:
    return next(
        (found for name in (os.environ.get("CC"), "cc", "gcc", "clang") if name and (found := shutil.which(name))), None
    )


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The kernels, built once per source, flags and CPU into composer's cache folder, or None where they cannot
    be built. A cached library is loaded only from a folder no other user can write to, and only when its bytes
    have the SHA-256 recorded beside it when it was built; where the cache folder is not safe, the kernels are
    built into a private temporary folder for this process instead (and a warning says why)."""
    compiler = _compiler()
    if compiler is None or platform.system() == "Windows":
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, " ".join(FLAGS + TUNING).encode(), compiler.encode(), _cpu_signature().encode()])
    ).hexdigest()[:20]
    name = f"kernels-{key}.so"
    folder = Path(os.path.realpath(cache_dir() / "native"))  # resolved once: what is checked is what is read
    with contextlib.suppress(OSError):  # a folder that cannot be made is reported by unsafe_reason
        make_private_dirs(folder)
    why = unsafe_reason(folder)
    if why is None:
        kernels = _load_verified(folder / name, _recorded_digest(folder / name))
        if kernels is None:
            digest = _build(compiler, folder / name)
            kernels = _load_verified(folder / name, digest) if digest else None
        return _declared(kernels) if kernels is not None else None
    warnings.warn(
        f"composer's kernel cache {folder} is {why}, so a compiled library in it could have been put there by someone "
        "else; the kernels are built for this process in a private temporary folder instead (each run compiles them "
        "again). Make the folder yours and private (chmod 700), or point COMPOSER_CACHE at one that is.",
        ComposerWarning,
        stacklevel=2,
    )
    with tempfile.TemporaryDirectory(prefix="composer-native-") as private:  # mkdtemp makes it 0o700
        built = Path(private) / name
        digest = _build(compiler, built)
        kernels = _load_verified(built, digest) if digest else None  # loaded: the mapping outlives the file
    return _declared(kernels) if kernels is not None else None


def _declared(kernels: ctypes.CDLL) -> ctypes.CDLL:
    for name, arguments in _SIGNATURES.items():
        function = getattr(kernels, name)
        function.argtypes, function.restype = arguments, None
    return kernels


def _sidecar(built: Path) -> Path:
    return built.with_name(built.name + ".sha256")


def _recorded_digest(built: Path) -> str | None:
    try:
        return _sidecar(built).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _load_verified(built: Path, digest: str | None) -> ctypes.CDLL | None:
    """The library at `built` when it is a regular file of this user's, writable by nobody else, whose bytes have
    SHA-256 `digest`; the bytes hashed are those of the file loaded (through its open descriptor where the system
    shows one as a path)."""
    if digest is None:
        return None
    try:
        descriptor = os.open(built, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        status = os.fstat(descriptor)
        if (
            not stat.S_ISREG(status.st_mode)
            or status.st_uid != os.geteuid()
            or status.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        ):
            return None
        with os.fdopen(os.dup(descriptor), "rb") as handle:
            if hashlib.sha256(handle.read()).hexdigest() != digest:
                return None
        by_descriptor = f"/proc/self/fd/{descriptor}"
        return ctypes.CDLL(by_descriptor if os.path.exists(by_descriptor) else str(built))
    except OSError:
        return None
    finally:
        os.close(descriptor)


def _build(compiler: str, built: Path) -> str | None:
    """Compile into a temporary file beside `built`, record its SHA-256 in `built`'s sidecar and move both into
    place, each atomically (another process may be building the same library at the same time); the digest, or
    None when the compiler fails."""
    try:
        descriptor, partial = tempfile.mkstemp(suffix=".so.partial", dir=built.parent)
        os.close(descriptor)
    except OSError:
        return None
    try:
        for tuning in (TUNING, ()):
            finished = subprocess.run(
                [compiler, *FLAGS, *tuning, "-o", partial, str(SOURCE)], check=False, capture_output=True, timeout=120
            )
            if finished.returncode == 0:
                os.chmod(partial, 0o700)  # the linker made it as the umask allows; only its owner may change it
                digest = hashlib.sha256(Path(partial).read_bytes()).hexdigest()
                os.replace(partial, built)
                with replacing(_sidecar(built)) as sidecar:
                    sidecar.write(digest.encode() + b"\n")
                return digest
        return None
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
