"""composer's cache folder is made private, and a compiled kernel library in it is loaded only from a folder no
other user can write to and only when its bytes have the digest recorded when it was built; files written into
the cache never go through a name a planted link could redirect."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import warnings
from pathlib import Path

import pytest

from composer import native
from composer.cache import cache_dir, unsafe_reason
from composer.errors import ComposerWarning


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_cache_folders_are_made_private_even_under_umask_0(tmp_path: Path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    monkeypatch.setenv("COMPOSER_CACHE", str(shared / "a" / "b" / "composer"))
    previous = os.umask(0)
    try:
        folder = cache_dir()
    finally:
        os.umask(previous)
    assert folder.is_dir()
    assert [mode(level) for level in (shared / "a", shared / "a" / "b", folder)] == [0o700] * 3
    assert mode(shared) == 0o777  # a folder the user already had is not changed
    assert unsafe_reason(folder) is not None and str(shared) in unsafe_reason(folder)
    assert unsafe_reason(shared / "a") is not None  # the folder above it is writable by all, and not sticky
    os.chmod(shared, 0o700)
    assert unsafe_reason(folder) is None


def has_compiler() -> bool:
    return os.name == "posix" and any(shutil.which(name) for name in (os.environ.get("CC") or "cc", "gcc", "clang"))


needs_compiler = pytest.mark.skipif(not has_compiler(), reason="no C compiler here")


@pytest.fixture
def own_cache(monkeypatch):
    """Point COMPOSER_CACHE at a folder of the test's and load the kernels afresh (and afresh again after it)."""

    def use(folder: Path) -> Path:
        monkeypatch.setenv("COMPOSER_CACHE", str(folder))
        monkeypatch.setenv("COMPOSER_NATIVE", "1")
        native.load_library.cache_clear()
        return folder / "native"

    yield use
    native.load_library.cache_clear()


@pytest.fixture(scope="module")
def pristine_cache(tmp_path_factory) -> Path:
    """A cache with the kernels built once, under umask 0 (copied by each test that needs one)."""
    cache = tmp_path_factory.mktemp("pristine") / "composer"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPOSER_CACHE", str(cache))
        patch.setenv("COMPOSER_NATIVE", "1")
        native.load_library.cache_clear()
        previous = os.umask(0)
        try:
            assert native.library() is not None
        finally:
            os.umask(previous)
            native.load_library.cache_clear()
    return cache


def plant(tmp_path: Path, mark: Path) -> bytes:
    """A library whose constructor writes `mark` when it is loaded: what someone else could put in a cache."""
    source = tmp_path / "planted.c"
    source.write_text(
        '#include <stdio.h>\n__attribute__((constructor)) static void planted(void) {\n'
        '  FILE *f = fopen(MARK, "w"); if (f) { fputs("ran", f); fclose(f); }\n}\n'
    )
    compiler = next(found for name in (os.environ.get("CC") or "cc", "gcc", "clang") if (found := shutil.which(name)))
    subprocess.run(
        [compiler, "-shared", "-fPIC", f'-DMARK="{mark}"', "-o", str(tmp_path / "planted.so"), str(source)], check=True
    )
    return (tmp_path / "planted.so").read_bytes()


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@needs_compiler
def test_kernels_are_built_private_with_their_digest_beside_them(pristine_cache: Path):
    folder = pristine_cache / "native"
    (library,) = folder.glob("kernels-*.so")
    assert mode(pristine_cache) == mode(folder) == 0o700
    assert not mode(library) & 0o022
    assert (folder / (library.name + ".sha256")).read_text().strip() == digest_of(library.read_bytes())


@pytest.fixture
def copied_cache(tmp_path: Path, pristine_cache: Path, own_cache) -> tuple[Path, Path, Path]:
    """(the kernels' folder in a copy of the pristine cache, now in use; the library there; the file a planted
    library's code would write)."""
    folder = own_cache(shutil.copytree(pristine_cache, tmp_path / "cache"))
    (library,) = folder.glob("kernels-*.so")
    return folder, library, tmp_path / "planted-code-ran"


@needs_compiler
def test_a_library_planted_in_a_world_writable_cache_is_not_loaded(tmp_path: Path, copied_cache):
    folder, library, mark = copied_cache
    planted = plant(tmp_path, mark)
    library.write_bytes(planted)
    (folder / (library.name + ".sha256")).write_text(digest_of(planted))  # whoever can write there can write both
    os.chmod(folder, 0o777)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernels = native.library()
    assert not mark.exists()
    assert kernels is not None and kernels.task_arithmetic_bf16  # built in a private folder of this process instead
    (message,) = [str(warning.message) for warning in caught if warning.category is ComposerWarning]
    assert str(folder) in message and "writable by other users" in message
    assert library.read_bytes() == planted  # the shared folder is left alone


@needs_compiler
def test_a_library_whose_bytes_differ_from_its_digest_is_rebuilt(tmp_path: Path, pristine_cache: Path, copied_cache):
    folder, library, mark = copied_cache
    recorded = (folder / (library.name + ".sha256")).read_text().strip()
    library.write_bytes(plant(tmp_path, mark))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ComposerWarning)  # the folder is private: no warning
        kernels = native.library()
    assert not mark.exists()
    assert kernels is not None and kernels.task_arithmetic_bf16
    assert digest_of(library.read_bytes()) == (folder / (library.name + ".sha256")).read_text().strip()
    assert recorded == digest_of((pristine_cache / "native" / library.name).read_bytes())


def test_joining_the_bundled_gguf_never_writes_through_a_planted_link(tmp_path: Path, monkeypatch):
    """The cached Gemma GGUF was joined into a fixed name (`.partial`), which a link in a shared cache could send
    onto any file of the user's."""
    from composer import bundled

    for number in range(1, 5):
        (tmp_path / f"part{number}" / "data").mkdir(parents=True)
        (tmp_path / f"part{number}" / "data" / f"gemma.gguf.part{number}").write_bytes(bytes([number]) * 3)
    monkeypatch.setattr(bundled, "package_dir", lambda package, hint: tmp_path / f"part{package[-1]}")
    monkeypatch.setenv("COMPOSER_CACHE", str(tmp_path / "cache"))
    victim = tmp_path / "victim"
    victim.write_text("the user's file")
    (tmp_path / "cache" / "gguf").mkdir(parents=True)
    (tmp_path / "cache" / "gguf" / "gemma-3-270m-q4_k_m.partial").symlink_to(victim)
    joined = bundled.gemma3_gguf()
    assert joined.read_bytes() == b"\1\1\1\2\2\2\3\3\3\4\4\4" and not joined.is_symlink()
    assert victim.read_text() == "the user's file"
