"""Hostile and faulty input against every command of the CLI, as a careful user and an attacker would try it.

    python bench/hostile.py                      # every case (about 10 minutes on 2 cores)
    python bench/hostile.py --only eval --jobs 4 # the cases whose name or category holds 'eval'
    python bench/hostile.py --list               # the cases, without running them

Builds its fixtures (tiny models with tokenizers, a fine-tune, an adapter, an MoE, a larger model for signals)
in a temporary folder, runs each case as a real `python -m composer.cli` subprocess in a folder of its own
with a timeout, and classifies what happened:

    ok            the command did what it was asked and printed no traceback
    clear error   exit 2 (130 for a signal) and stderr is one `error:` paragraph naming the fault
                  (notes and warnings may come first), nothing on stdout, nothing left behind
and the defects:
    traceback     a Python traceback, or composer's "internal error" (a bug it caught)
    unclear       an error that is not one `error:` paragraph, or does not name the file/key at fault
    hang          the command outlived its timeout (it is killed)
    memory        its resident memory passed the case's limit, or it died of a memory limit
    debris        hidden `.OUT.partial-*`/`.replaced-*` folders or other files left where nothing should be
    data loss     a file the user owns (the case folder, outside OUT) changed or vanished
    changed input a model the run read was changed
    security      code from a model or recipe ran, or a file outside a model folder reached an output
    wrong result  the command succeeded but did something other than it says
    unexpected    it succeeded where it must refuse, or refused where it must succeed

Needs no network: HF_HUB_OFFLINE=1 and an empty HF_HOME for every case. Disk-full cases mount a 1 MB tmpfs
(root only; skipped otherwise). Prints a table of every case and the totals per category and outcome.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

DEFECTS = (
    "traceback",
    "unclear",
    "hang",
    "memory",
    "debris",
    "data loss",
    "changed input",
    "security",
    "wrong result",
    "unexpected",
)
OUTCOMES = ("ok", "clear error", *DEFECTS, "skipped")
MiB = 1024**2


@dataclass
class Result:
    returncode: Optional[int]
    stdout: str
    stderr: str
    seconds: float
    peak_rss: int  # bytes, the highest VmHWM seen
    timed_out: bool


@dataclass
class Case:
    name: str
    category: str
    args: list  # after `compose`; str() of each
    setup: Optional[Callable[[Path], None]] = None  # prepares the case folder (the working directory)
    expect: str = "error"  # "error", "ok", "either", "interrupted" (a signal case: ok or exit 130)
    words: tuple = ()  # what an error must name (the file, key, tensor or option at fault)
    outputs: tuple = ("out",)  # names in the case folder the command may create
    env: dict = field(default_factory=dict)
    timeout: float = 180
    rss_limit: int = 3000 * MiB
    address_limit: Optional[int] = None  # RLIMIT_AS in bytes: catches runaway allocation before the machine does
    send: Optional[tuple] = (
        None  # (signal, after): after = seconds, or ("partial", seconds) once the partial folder exists
    )
    check: Optional[Callable[[Path, Result], Optional[tuple[str, str]]]] = None  # -> (defect, detail) or None
    driver: Optional[Callable[[Case, Path], Result]] = None  # runs the case itself (several processes)
    needs: Optional[str] = None  # "tmpfs": skipped where it cannot be mounted


# ---------------------------------------------------------------------------------------------------------------
# fixtures


def build_fixtures(root: Path) -> dict[str, Path]:
    """Every model the cases read, under root/models (none of them may change)."""
    import torch

    from helpers import (
        BYTE_LEVEL_SPECIAL,
        SENTENCEPIECE_SPECIAL,
        byte_level_tokenizer,
        save_fine_tune,
        save_tiny_model,
        sentencepiece_tokenizer,
        tiny_model_with_tokenizer,
    )

    models = root / "models"
    models.mkdir()
    byte_level = byte_level_tokenizer(400)
    m = {}
    # four layers, each family's own tying (the tests' models have two layers, tied)
    model_with_tokenizer = partial(tiny_model_with_tokenizer, tied=None, layers=4)
    m["base"] = model_with_tokenizer(models / "base", byte_level, BYTE_LEVEL_SPECIAL, seed=0)
    m["ft"] = save_fine_tune(m["base"], models / "ft", seed=1)
    m["ft2"] = save_fine_tune(m["base"], models / "ft2", seed=2)
    m["qwen"] = model_with_tokenizer(models / "qwen", byte_level, BYTE_LEVEL_SPECIAL, seed=3, model_type="qwen2")
    m["gpt2"] = model_with_tokenizer(models / "gpt2", byte_level, BYTE_LEVEL_SPECIAL, seed=4, model_type="gpt2")
    m["wide"] = model_with_tokenizer(
        models / "wide", byte_level, BYTE_LEVEL_SPECIAL, seed=5, hidden_size=96, intermediate_size=192
    )
    m["sp"] = model_with_tokenizer(models / "sp", sentencepiece_tokenizer(300), SENTENCEPIECE_SPECIAL, seed=6)
    m["bare"] = save_tiny_model(models / "bare", "llama", layers=4, seed=7)  # no tokenizer
    sizes = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=4, head_dim=64)
    m["big"] = model_with_tokenizer(models / "big", byte_level, BYTE_LEVEL_SPECIAL, layers=8, seed=8, **sizes)
    m["big_ft"] = save_fine_tune(m["big"], models / "big_ft", seed=9)
    # a tokenizer-only donor folder
    donor = models / "sp_tokenizer"
    donor.mkdir()
    for path in m["sp"].iterdir():
        if "token" in path.name:
            shutil.copy(path, donor / path.name)
    m["sp_tokenizer"] = donor

    from composer.compose import compose_moe_text
    from composer.execute import ExecutionOptions
    from composer.extract_lora import extract_lora

    quiet = ExecutionOptions(progress=False)
    m["adapter"] = models / "adapter"
    extract_lora(str(m["ft"]), str(m["base"]), m["adapter"], rank=4, progress=False)
    m["moe"] = models / "moe"
    compose_moe_text(moe_recipe(m, gate_mode="random"), m["moe"], quiet)
    m["gguf_junk"] = models / "junk.gguf"
    m["gguf_junk"].write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 10**12, 10**12) + os.urandom(64))
    torch.manual_seed(0)
    return m


def moe_recipe(m, gate_mode="hidden", experts=None, extra="") -> str:
    experts = (
        experts
        if experts is not None
        else [
            f"  - source_model: {m['ft']}\n    positive_prompts: [\"def main(): return 1\", \"import os\"]\n",
            f"  - source_model: {m['ft2']}\n    positive_prompts: [\"The cat sat on the mat.\", \"We went to the park.\"]\n",
        ]
    )
    return f"base_model: {m['base']}\ngate_mode: {gate_mode}\nexperts_per_token: 1\n{extra}experts:\n" + "".join(
        experts
    )


def digest_tree(folder: Path) -> dict[str, str]:
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = "link:" + os.readlink(path)
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = "special"
    return found


def listing(folder: Path) -> dict[str, tuple]:
    """Every entry below `folder` with its kind, size and modification time (cheap: no contents read)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            try:
                info = path.lstat()
            except OSError:
                continue
            found[str(path.relative_to(folder))] = (
                info.st_mode >> 12,
                info.st_size if not path.is_dir() else 0,
                info.st_mtime_ns if not path.is_dir() else 0,
            )
    return found


# ---------------------------------------------------------------------------------------------------------------
# running


def base_env(case: Case, home: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_HOME=str(home / "hf"), TRANSFORMERS_OFFLINE="1", COLUMNS="100"
    )
    env.pop("COMPOSER_DEBUG", None)
    env.update(case.env)
    return env


def _limits(address_limit: Optional[int]):
    def apply():
        os.setsid()
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # as a terminal gives them, even if the
            signal.signal(number, signal.SIG_DFL)  # bench runs under nohup (children inherit ignored signals)
        if address_limit:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (address_limit, address_limit))

    return apply


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def launch(case: Case, folder: Path, home: Path, args: Optional[list] = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "composer.cli", *map(str, args if args is not None else case.args)]
    return subprocess.Popen(
        command,
        cwd=folder,
        env=base_env(case, home),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        preexec_fn=_limits(case.address_limit),
    )


def watch(process: subprocess.Popen, case: Case, folder: Path, started: float) -> Result:
    """Wait for the process within the case's timeout, sending its signal when due; kill it when it hangs."""
    import threading

    out, err = [], []
    readers = [
        threading.Thread(target=lambda s=s, b=b: b.append(s.read()), daemon=True)
        for s, b in ((process.stdout, out), (process.stderr, err))
    ]
    for reader in readers:
        reader.start()
    peak = 0
    sent = False
    partial_seen: Optional[float] = None
    timed_out = False
    while process.poll() is None:
        peak = max(peak, _rss(process.pid))
        now = time.perf_counter()
        if case.send and not sent:
            number, after = case.send
            if isinstance(after, tuple):
                if partial_seen is None and any(".partial-" in p.name for p in folder.iterdir()):
                    partial_seen = now
                due = partial_seen is not None and now - partial_seen >= after[1]
            else:
                due = now - started >= after
            if due:
                process.send_signal(number)
                sent = True
        if peak > case.rss_limit:
            os.killpg(process.pid, signal.SIGKILL)
            break
        if now - started > case.timeout:
            timed_out = True
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    for reader in readers:
        reader.join(5)
    return Result(process.returncode, "".join(out), "".join(err), time.perf_counter() - started, peak, timed_out)


def run_one(case: Case, folder: Path, home: Path) -> Result:
    if case.driver is not None:
        return case.driver(case, folder, home)
    started = time.perf_counter()
    return watch(launch(case, folder, home), case, folder, started)


# ---------------------------------------------------------------------------------------------------------------
# judging


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs; a line starting `error:`, `note:` or `warning:` starts a new one."""
    found, current = [], []
    for line in text.splitlines():
        if line.strip() and not line.startswith(("error:", "note:", "warning:")):
            current.append(line)
            continue
        if current:
            found.append("\n".join(current))
        current = [line] if line.strip() else []
    if current:
        found.append("\n".join(current))
    return found


def error_paragraph(stderr: str) -> tuple[Optional[str], list[str]]:
    """(the one `error:` paragraph, the other lines that are not notes or warnings)."""
    notes, error, stray = ("note:", "warning:"), None, []
    for paragraph in paragraphs(stderr):
        if paragraph.startswith(("error: ", "error:\n")) and error is None:
            error = paragraph
        elif not paragraph.startswith(notes):
            stray.append(paragraph)
    return error, stray


def classify(case: Case, result: Result, folder: Path, before: dict) -> tuple[str, str]:
    output = result.stdout + result.stderr
    if result.timed_out:
        return "hang", f"still running after {case.timeout:.0f} s"
    if result.peak_rss > case.rss_limit:
        return "memory", f"resident memory reached {result.peak_rss / MiB:.0f} MB (limit {case.rss_limit / MiB:.0f} MB)"
    if "Traceback (most recent call last)" in output:
        last = [line for line in output.splitlines() if line.strip()][-1]
        return "traceback", last[:200]
    if result.returncode == 3 or "internal error:" in output:
        return "traceback", " ".join(result.stderr.split())[:240]
    if result.returncode is not None and result.returncode < 0 and not case.send:
        return (
            "memory" if result.returncode == -signal.SIGKILL else "traceback",
            f"killed by signal {-result.returncode}",
        )
    if "MemoryError" in output or "Cannot allocate memory" in output or "out of memory" in output.lower():
        return "memory", " ".join(result.stderr.split())[:200]
    # the case folder: nothing the user owns may change, nothing but the outputs may appear
    after = listing(folder)
    allowed = set(case.outputs)
    lost = [
        name
        for name, info in before.items()
        if name.split("/")[0] not in allowed and after.get(name) != info and info[0] != 4
    ]
    lost += [
        name
        for name, info in before.items()
        if info[0] == 4 and name not in after and name.split("/")[0] not in allowed
    ]
    if lost:
        return "data loss", f"changed or removed: {', '.join(sorted(lost)[:4])}"
    stray = [name for name in after if name not in before and name.split("/")[0] not in allowed]
    hidden = [name for name in stray if ".partial-" in name or ".replaced-" in name]
    if hidden or stray:
        return "debris", f"left behind: {', '.join(sorted(hidden or stray)[:4])}"
    if case.check is not None:
        found = case.check(folder, result)
        if found is not None:
            return found
    error, noise = error_paragraph(result.stderr)
    succeeded = result.returncode == 0
    if case.expect == "interrupted":
        killed = result.returncode in (
            -signal.SIGINT,
            -signal.SIGTERM,
            -signal.SIGHUP,
        )  # before composer set its handlers
        if not (succeeded or result.returncode == 130 or (killed and not result.stderr.strip())):
            return "unexpected", f"exit {result.returncode}: {' '.join(result.stderr.split())[:200]}"
        if not succeeded and not result.stderr.strip() and not any(".partial-" in name for name in after):
            return "ok", "stopped while starting, before it wrote anything"
        if result.returncode == 130:
            out = folder / "out"
            if out.exists():
                return "wrong result", "interrupted, yet OUT exists"
            return (
                ("clear error", "interrupted")
                if error and not noise
                else ("unclear", f"stderr: {' '.join(result.stderr.split())[:200]}")
            )
        return "ok", "finished before the signal"
    if succeeded:
        if case.expect == "error":
            return "unexpected", f"succeeded: {' '.join(result.stdout.split())[:160]}"
        if noise:
            return "unclear", f"stray output on stderr: {' '.join(noise[0].split())[:160]}"
        return "ok", " ".join(result.stdout.split())[:120]
    if case.expect == "ok":
        return "unexpected", f"exit {result.returncode}: {' '.join(result.stderr.split())[:200]}"
    if error is None or noise or result.stdout.strip():
        shown = noise[0] if noise else result.stdout or result.stderr
        return "unclear", f"exit {result.returncode}, not one error paragraph: {' '.join(shown.split())[:200]}"
    message = " ".join(error.split())
    missing = [word for word in case.words if str(word) not in message]
    if missing:
        return "unclear", f"does not name {missing[0]!r}: {message[:200]}"
    return "clear error", message[7:200]


# ---------------------------------------------------------------------------------------------------------------
# helpers for the cases


def write(name: str, text: str | bytes) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)

    return setup


def steps(*setups) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        for step in setups:
            step(folder)

    return setup


def passthrough(model, layer_range="[0, 4]") -> str:
    return f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {model}\n        layer_range: {layer_range}\n"


def linear(first, second, w1="0.5", w2="0.5", extra="") -> str:
    return (
        f"merge_method: linear\nmodels:\n  - model: {first}\n    parameters: {{weight: {w1}}}\n"
        f"  - model: {second}\n    parameters: {{weight: {w2}}}\n{extra}"
    )


def copy_model(source: Path, name: str, edit: Optional[Callable[[Path], None]] = None) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        target = Path(shutil.copytree(source, folder / name))
        if edit is not None:
            edit(target)

    return setup


def edit_config(**changes) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        for key, value in changes.items():
            if value is ...:
                config.pop(key, None)
            else:
                config[key] = value
        (model / "config.json").write_text(json.dumps(config))

    return edit


def raw_config(text: str) -> Callable[[Path], None]:
    return lambda model: (model / "config.json").write_text(text)


def edit_state(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(str(model / "model.safetensors"))
        change(state)
        save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})

    return edit


def edit_header(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        path = model / "model.safetensors"
        data = path.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        change(header)
        encoded = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])

    return edit


def loads_like(
    out_name: str, expected: Callable[[dict], Optional[str]]
) -> Callable[[Path, Result], Optional[tuple[str, str]]]:
    """A check on a successful output: `expected(state)` returns what is wrong, or None."""

    def check(folder: Path, result: Result):
        if result.returncode != 0:
            return None
        from helpers import load_state

        try:
            state = load_state(folder / out_name)
        except Exception as error:  # noqa: BLE001
            return "wrong result", f"the output does not load: {type(error).__name__}: {error}"
        problem = expected(state)
        return ("wrong result", problem) if problem else None

    return check


def no_file(name: str, defect: str = "security") -> Callable[[Path, Result], Optional[tuple[str, str]]]:
    def check(folder: Path, result: Result):
        marker = Path(name) if Path(name).is_absolute() else folder / name
        return (defect, f"{marker} was created") if marker.exists() else None

    return check


def two_at_once(force: bool) -> Callable[[Case, Path, Path], Result]:
    """Two runs of one recipe into one OUT, started together: one output, no debris, the other a clear error or ok."""

    def drive(case: Case, folder: Path, home: Path) -> Result:
        started = time.perf_counter()
        args = [*case.args, *(["--force"] if force else [])]
        first, second = launch(case, folder, home, args), launch(case, folder, home, args)
        results = [watch(first, case, folder, started), watch(second, case, folder, started)]
        codes = sorted(r.returncode for r in results)
        failed = [r for r in results if r.returncode != 0]
        stderr = failed[0].stderr if failed else ""
        # both may succeed (the second replaces the first with --force, or finished after the first committed)
        if codes == [0, 0] or codes == [0, 2]:
            return Result(
                0,
                results[0].stdout,
                "" if not failed else "",
                max(r.seconds for r in results),
                max(r.peak_rss for r in results),
                any(r.timed_out for r in results),
            )
        return Result(
            codes[-1],
            "",
            stderr,
            max(r.seconds for r in results),
            max(r.peak_rss for r in results),
            any(r.timed_out for r in results),
        )

    return drive


def rerun_after_kill(case: Case, folder: Path, home: Path) -> Result:
    """SIGKILL a run once it writes, then run another recipe into the same OUT: the dead run's folder must go."""
    started = time.perf_counter()
    first = launch(case, folder, home)
    while not any(".partial-" in p.name for p in folder.iterdir()) and first.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    first.kill()
    first.wait()
    (folder / "recipe.yml").write_text((folder / "other.yml").read_text())
    second = launch(case, folder, home)
    return watch(second, case, folder, started)


def interrupt_then_resume(case: Case, folder: Path, home: Path) -> Result:
    """Ctrl-C a run with --keep-partial once it writes, then run it again: it resumes and leaves nothing behind."""
    started = time.perf_counter()
    first = launch(case, folder, home)
    while not any(".partial-" in p.name for p in folder.iterdir()) and first.poll() is None:
        time.sleep(0.02)
    time.sleep(0.1)  # a run of the heavy recipe now ends ~0.5 s after its partial folder appears
    first.send_signal(signal.SIGINT)
    first.wait()
    second = watch(launch(case, folder, home), case, folder, started)
    if second.returncode == 0 and "kept from the interrupted run" not in second.stdout and first.returncode == 130:
        second.stderr += "\nwarning: the second run did not resume the first"
    return second


def double_interrupt(case: Case, folder: Path, home: Path) -> Result:
    """Ctrl-C twice, 20 ms apart, once the run writes: the second lands while the first is being cleaned up."""
    started = time.perf_counter()
    process = launch(case, folder, home)
    while not any(".partial-" in p.name for p in folder.iterdir()) and process.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    return watch(process, Case(case.name, case.category, case.args, timeout=case.timeout), folder, started)


TMPFS = Path(tempfile.gettempdir()) / "composer-hostile-tmpfs"


def mount_tmpfs() -> bool:
    TMPFS.mkdir(exist_ok=True)
    if os.path.ismount(TMPFS):
        return True
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(TMPFS)], capture_output=True).returncode
        == 0
    )


def on_tmpfs(name: str) -> Callable[[Path], None]:
    """A fresh folder on the 1 MB tmpfs, linked from the case folder as `name`'s parent: disk full mid-write."""

    def setup(folder: Path) -> None:
        place = TMPFS / folder.name
        shutil.rmtree(place, ignore_errors=True)
        place.mkdir()
        (folder / "full").symlink_to(place)

    return setup


def tmpfs_clean(folder: Path, result: Result):
    place = TMPFS / folder.name
    left = sorted(p.name for p in place.iterdir()) if place.exists() else []
    if left:
        return "debris", f"left on the full disk: {', '.join(left[:4])}"
    return None


def pickle_bomb(marker: Path) -> bytes:
    """A torch checkpoint (zip) whose pickle calls os.system: weights_only must refuse to run it."""
    import io
    import zipfile

    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# the cases


def cases(m: dict[str, Path], root: Path) -> list[Case]:
    base, ft, ft2, qwen, gpt2, wide, sp, bare, big, big_ft = (
        m[k] for k in ("base", "ft", "ft2", "qwen", "gpt2", "wide", "sp", "bare", "big", "big_ft")
    )
    R = ["recipe.yml", "out", "--no-progress"]
    recipe = lambda text: write("recipe.yml", text)  # noqa: E731
    ok_linear = linear(base, ft)
    found: list[Case] = []

    def add(name, category, args, setup=None, **kw):
        found.append(Case(name, category, list(args), setup, **kw))

    # --- recipe values of the wrong type or range --------------------------------------------------------------
    c = "recipe"
    add(
        "merge_method_list",
        c,
        R,
        recipe(ok_linear.replace("merge_method: linear", "merge_method: [linear]")),
        words=("merge_method",),
    )
    add(
        "merge_method_number",
        c,
        R,
        recipe(ok_linear.replace("merge_method: linear", "merge_method: 5")),
        words=("merge_method",),
    )
    add(
        "merge_method_null",
        c,
        R,
        recipe(ok_linear.replace("merge_method: linear", "merge_method: null")),
        words=("merge_method",),
    )
    add(
        "merge_method_unicode_lookalike",
        c,
        R,
        recipe(ok_linear.replace("merge_method: linear", "merge_method: lіnear")),
        words=("merge_method",),
    )
    add("layer_range_floats", c, R, recipe(passthrough(base, "[0.5, 2.5]")), words=("layer_range",))
    add("layer_range_whole_floats", c, R, recipe(passthrough(base, "[0.0, 4.0]")), expect="either")
    add("layer_range_negative", c, R, recipe(passthrough(base, "[-2, 2]")), words=("layer_range",))
    add(
        "layer_range_huge",
        c,
        R,
        recipe(passthrough(base, "[0, 1000000000000000000000000000000]")),
        words=("layer_range",),
    )
    add("layer_range_reversed", c, R, recipe(passthrough(base, "[3, 1]")), words=("layer_range",))
    add("layer_range_empty_span", c, R, recipe(passthrough(base, "[2, 2]")), words=("layer_range",))
    add("layer_range_three_numbers", c, R, recipe(passthrough(base, "[0, 1, 2]")), words=("layer_range",))
    add("layer_range_string", c, R, recipe(passthrough(base, "'0-4'")), words=("layer_range",))
    add("layer_range_bools", c, R, recipe(passthrough(base, "[false, true]")), words=("layer_range",))
    add("weight_word", c, R, recipe(linear(base, ft, w1="abc")), words=("weight",))
    add("weight_number_as_string", c, R, recipe(linear(base, ft, w1="'0.5'")), expect="ok")
    add("weight_list_of_lists", c, R, recipe(linear(base, ft, w1="[[1, 2], [3]]")), words=("weight",))
    add("weight_empty_list", c, R, recipe(linear(base, ft, w1="[]")), words=("weight",))
    add("weight_dict", c, R, recipe(linear(base, ft, w1="{a: 1}")), words=("weight",))
    add("weights_sum_to_zero", c, R, recipe(linear(base, ft, w1="1", w2="-1")), words=("weight",))
    add("weights_all_zero", c, R, recipe(linear(base, ft, w1="0", w2="0")), words=("weight",))
    add("weight_huge", c, R, recipe(linear(base, ft, w1="1e308", w2="1e308")), expect="either")
    add(
        "weight_gradient_of_90k",
        c,
        R,
        recipe(linear(base, ft, w1="[" + ", ".join(["0.5"] * 90_000) + "]")),
        expect="ok",
        timeout=240,
    )
    add("dtype_unknown", c, R, recipe(ok_linear + "dtype: float99\n"), words=("dtype", "float99"))
    add("dtype_int8", c, R, recipe(ok_linear + "dtype: int8\n"), words=("dtype",))
    add("dtype_number", c, R, recipe(ok_linear + "dtype: 16\n"), words=("dtype",))
    add("out_dtype_bool", c, R, recipe(ok_linear + "out_dtype: bool\n"), words=("out_dtype",))
    add("models_empty", c, R, recipe("merge_method: linear\nmodels: []\n"), words=("models",))
    add("slices_empty", c, R, recipe("merge_method: passthrough\nslices: []\n"), words=("slices",))
    add(
        "slice_sources_empty",
        c,
        R,
        recipe("merge_method: passthrough\nslices:\n  - sources: []\n"),
        words=("slices[0]",),
    )
    add("model_empty_string", c, R, recipe(linear("''", ft)), words=("model",))
    add("model_number", c, R, recipe(linear("42", ft)), words=("models[0].model",))
    add("model_list", c, R, recipe(linear("[a, b]", ft)), words=("model",))
    add("model_null", c, R, recipe(linear("null", ft)), words=("model",))
    add("model_is_etc_passwd", c, R, recipe(linear("/etc/passwd", ft)), words=("/etc/passwd",))
    add("model_is_etc", c, R, recipe(linear("/etc", ft)), words=("/etc",))
    add("model_is_dev_zero", c, R, recipe(linear("/dev/zero", ft)), words=("/dev/zero",))
    add("model_is_proc_self", c, R, recipe(linear("/proc/self", ft)), words=("/proc/self",))
    add("model_home_missing", c, R, recipe(linear("~/no-such-model-here", ft)), words=("no-such-model-here",))
    add("model_hub_offline", c, R, recipe(linear("nobody/no-such-model", ft)), words=("nobody/no-such-model",))
    add("model_hub_bad_revision", c, R, recipe(linear("nobody/model@../../etc", ft)), words=("nobody/model",))
    add("unicode_key", c, R, recipe(ok_linear.replace("merge_method", "mérge_method")), words=("mérge_method",))
    add("dotted_parameter_key", c, R, recipe(linear(base, ft, w1="0.5, weight.x: 1")), words=("weight.x",))
    add("unicode_model_path", c, R, recipe(linear(base, "./modèle-ü-😀")), words=("modèle",))
    add("tab_indentation", c, R, recipe(ok_linear.replace("  - model", "\t- model")), words=("recipe.yml",))
    add("bom_at_start", c, R, recipe("\ufeff" + ok_linear), expect="either")
    add("utf16_recipe", c, R, write("recipe.yml", ok_linear.encode("utf-16")), words=("recipe.yml",))
    add(
        "python_tag_runs_nothing",
        c,
        R,
        recipe(ok_linear + "name: !!python/object/apply:os.system ['touch pwned']\n"),
        words=("recipe.yml",),
        check=no_file("pwned"),
    )
    add("binary_tag", c, R, recipe(ok_linear + "name: !!binary aGVsbG8=\n"), expect="either")
    add(
        "random_seed_negative",
        c,
        R,
        recipe(
            ok_linear.replace("linear", "dare_linear", 1).replace("{weight: 0.5}", "{weight: 0.5, density: 0.5}")
            + "base_model: "
            + str(base)
            + "\nrandom_seed: -1\n"
        ),
        expect="either",
    )
    add(
        "random_seed_huge",
        c,
        R,
        recipe(
            ok_linear.replace("linear", "dare_linear", 1).replace("{weight: 0.5}", "{weight: 0.5, density: 0.5}")
            + "base_model: "
            + str(base)
            + "\nrandom_seed: 100000000000000000000000000000\n"
        ),
        expect="ok",
    )  # reduced to 64 bits, as documented
    add("random_seed_word", c, R, recipe(ok_linear + "random_seed: abc\n"), words=("random_seed",))
    add(
        "density_above_one",
        c,
        R,
        recipe(
            f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft}\n    parameters: {{weight: 1, density: 7}}\n"
        ),
        words=("density",),
    )
    add(
        "density_negative",
        c,
        R,
        recipe(
            f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft}\n    parameters: {{weight: 1, density: -0.5}}\n"
        ),
        words=("density",),
    )
    add(
        "t_out_of_range",
        c,
        R,
        recipe(
            f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {ft}\nparameters: {{t: 5}}\n"
        ),
        expect="either",
    )
    add("filter_list_without_value", c, R, recipe(linear(base, ft, w1="[{filter: mlp}]")), words=("weight",))
    add(
        "twenty_thousand_models",
        c,
        R,
        recipe("merge_method: linear\nmodels:\n" + f"  - model: {base}\n    parameters: {{weight: 1}}\n" * 20000),
        expect="either",
        timeout=240,
    )
    add(
        "multi_module_config",
        c,
        R,
        recipe(
            f"modules:\n  text:\n    slices:\n      - sources: [{{model: {base}, layer_range: [0, 4]}}]\nmerge_method: passthrough\n"
        ),
        words=("modules",),
    )
    add(
        "stage_cycle",
        c,
        R,
        recipe(
            "stages:\n  - name: a\n    merge_method: linear\n    models: [{model: b, parameters: {weight: 1}}]\n  - name: b\n    merge_method: linear\n    models: [{model: a, parameters: {weight: 1}}]\n"
        ),
        words=("stage",),
    )
    add(
        "stage_uses_itself",
        c,
        R,
        recipe(
            f"stages:\n  - name: a\n    merge_method: linear\n    models: [{{model: a, parameters: {{weight: 1}}}}, {{model: {base}, parameters: {{weight: 1}}}}]\n"
        ),
        words=("a",),
    )
    add("tokenizer_source_missing", c, R, recipe(ok_linear + "tokenizer_source: ./nowhere\n"), words=("nowhere",))
    add("tokenizer_source_etc", c, R, recipe(ok_linear + "tokenizer_source: /etc\n"), words=("/etc",))
    add(
        "tokenizer_pad_zero",
        c,
        R,
        recipe(ok_linear + "tokenizer:\n  source: base\n  pad_to_multiple_of: 0\n"),
        words=("pad_to_multiple_of",),
    )
    add(
        "tokenizer_pad_huge",
        c,
        R,
        recipe(ok_linear + "tokenizer:\n  source: base\n  pad_to_multiple_of: 1000000000\n"),
        expect="either",
        address_limit=8 * 1024**3,
        words=("pad_to_multiple_of",),
    )
    add(
        "token_id_huge",
        c,
        R,
        recipe(
            ok_linear
            + f"tokenizer:\n  source: base\n  tokens:\n    <|im_end|>:\n      source: {{kind: model_token, model: {base}, token_id: 1000000000}}\n      force: true\n"
        ),
        words=("1000000000",),
    )
    add(
        "chat_template_broken_jinja",
        c,
        R,
        recipe(ok_linear + "chat_template: '{% for x in %}'\n"),
        words=("chat_template",),
    )
    add(
        "name_injects_front_matter",
        c,
        R,
        recipe(ok_linear + "name: \"x\\n---\\nlicense: mit\\ntags: [evil]\"\n"),
        expect="either",
        check=lambda f, r: (
            ("wrong result", "the name forged the card's front matter")
            if (f / "out" / "README.md").exists()
            and "tags: [evil]" in (f / "out" / "README.md").read_text().split("# ", 1)[0]
            else None
        ),
    )
    add("recipe_is_a_folder", c, ["recipe.yml", "out"], lambda f: (f / "recipe.yml").mkdir(), words=("recipe.yml",))
    add(
        "recipe_link_loop",
        c,
        ["recipe.yml", "out"],
        lambda f: (f / "recipe.yml").symlink_to(f / "recipe.yml"),
        words=("recipe.yml",),
    )
    add("recipe_too_large", c, R, recipe(ok_linear + "#" * (4 * MiB) + "\n"), words=("recipe.yml",))
    add("recipe_only_comments", c, R, recipe("# nothing\n"), words=("recipe.yml",))
    add("recipe_null_bytes", c, R, write("recipe.yml", ok_linear.encode() + b"\x00\x00"), words=("recipe.yml",))
    add("mergekit_dict_model_bad", c, R, recipe(linear("{path: 5}", ft)), words=("model",))
    add(
        "chat_template_custom_jinja",
        c,
        R,
        recipe(ok_linear + "chat_template: '{% for m in messages %}{{ m.content }}{% endfor %}'\n"),
        expect="ok",
    )
    add(
        "chat_template_broken_in_moe",
        c,
        R,
        recipe(moe_recipe(m, gate_mode="random", extra="chat_template: '{{ oops'\n")),
        words=("chat_template",),
    )
    add(
        "layers_huge_whole_model",
        c,
        R,
        steps(
            copy_model(base, "m", edit_config(num_hidden_layers=10**12)),
            recipe("merge_method: linear\nmodels:\n  - model: m\n    parameters: {weight: 1}\n"),
        ),
        words=("num_hidden_layers",),
        timeout=90,
    )
    add(
        "out_is_tokenizer_source",
        c,
        ["recipe.yml", "tok", "--force", "--no-progress"],
        steps(copy_model(m["sp_tokenizer"], "tok"), recipe(ok_linear + "tokenizer_source: tok\n")),
        words=("tok",),
    )
    add(
        "output_key_link_inside",
        c,
        ["recipe.yml", "--no-progress"],
        steps(
            lambda f: (f / "sub").mkdir(),
            lambda f: (f / "inside").symlink_to(f / "sub"),
            recipe(ok_linear + "output: inside/out\n"),
        ),
        outputs=("sub",),
        expect="ok",
    )
    add(
        "relative_model_from_recipe_folder",
        c,
        ["sub/recipe.yml", "out", "--no-progress"],
        steps(copy_model(base, "sub/m"), write("sub/recipe.yml", linear("m", "m")), copy_model(ft, "m")),
        outputs=("out",),
        expect="ok",
        check=loads_like("out", lambda s: None),
    )

    # --- options --------------------------------------------------------------------------------------------
    c = "options"
    same = loads_like("out", lambda state: None if len(state) == 39 else f"{len(state)} tensors")
    add("shard_size_1", c, [*R, "--shard-size", "1"], recipe(ok_linear), expect="ok", check=same)
    add("shard_size_0", c, [*R, "--shard-size", "0"], recipe(ok_linear), words=("--shard-size",))
    add("shard_size_negative", c, [*R, "--shard-size", "-5GB"], recipe(ok_linear), words=("--shard-size",))
    add("shard_size_huge", c, [*R, "--shard-size", "1e30"], recipe(ok_linear), expect="ok", check=same)
    add(
        "memory_budget_1",
        c,
        [*R, "--memory-budget", "1"],
        recipe(ok_linear),
        expect="either",
        words=("--memory-budget",),
    )
    add("memory_budget_1e30", c, [*R, "--memory-budget", "1e30"], recipe(ok_linear), expect="ok")
    add("memory_budget_negative", c, [*R, "--memory-budget", "-1GB"], recipe(ok_linear), words=("--memory-budget",))
    add("memory_budget_nan", c, [*R, "--memory-budget", "nan"], recipe(ok_linear), words=("--memory-budget",))
    add("memory_budget_empty", c, [*R, "--memory-budget", ""], recipe(ok_linear), words=("--memory-budget",))
    add("device_cuda_without_cuda", c, [*R, "--device", "cuda"], recipe(ok_linear), words=("cuda",))
    add("device_cuda_99", c, [*R, "--device", "cuda:99"], recipe(ok_linear), words=("cuda",))
    add("device_mps", c, [*R, "--device", "mps"], recipe(ok_linear), words=("mps",))
    dare = f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {ft}\n    parameters: {{weight: 1, density: 0.5}}\n"
    add("seed_negative", c, [*R, "--seed", "-1"], recipe(dare), expect="either", words=("--seed",))
    add("seed_huge", c, [*R, "--seed", str(10**30)], recipe(dare), expect="ok")  # reduced to 64 bits, as documented
    add("readers_1000", c, [*R, "--readers", "1000"], recipe(ok_linear), expect="ok")
    add("readers_0", c, [*R, "--readers", "0"], recipe(ok_linear), words=("--readers",))
    add("unknown_option", c, [*R, "--frobnicate"], recipe(ok_linear), words=("--frobnicate",))
    add("extra_argument", c, [*R, "again"], recipe(ok_linear), words=("again",))
    add("no_out_no_output_key", c, ["recipe.yml"], recipe(ok_linear), words=("output",))
    add("resume_with_nothing", c, [*R, "--resume"], recipe(ok_linear), words=("resume",))

    # --- OUT paths ------------------------------------------------------------------------------------------
    c = "out path"
    add(
        "out_is_a_file",
        c,
        ["recipe.yml", "notes.txt", "--no-progress"],
        steps(recipe(ok_linear), write("notes.txt", "mine")),
        words=("notes.txt",),
    )
    add(
        "out_is_a_file_force",
        c,
        ["recipe.yml", "notes.txt", "--force", "--no-progress"],
        steps(recipe(ok_linear), write("notes.txt", "mine")),
        words=("notes.txt",),
    )
    add("out_dev_null", c, ["recipe.yml", "/dev/null", "--no-progress"], recipe(ok_linear), words=("/dev/null",))
    add(
        "out_dev_null_force",
        c,
        ["recipe.yml", "/dev/null", "--force", "--no-progress"],
        recipe(ok_linear),
        words=("/dev/null",),
    )
    add("out_dot", c, ["recipe.yml", ".", "--no-progress"], recipe(ok_linear), words=(".",))
    add("out_dot_force", c, ["recipe.yml", ".", "--force", "--no-progress"], recipe(ok_linear), words=(".",))
    add(
        "out_dotdot_force",
        c,
        ["sub/recipe.yml", "..", "--force", "--no-progress"],
        write("sub/recipe.yml", ok_linear),
        words=("..",),
    )
    add("out_root", c, ["recipe.yml", "/", "--force", "--no-progress"], recipe(ok_linear), words=("/",))
    add(
        "out_recipe_folder",
        c,
        ["sub/recipe.yml", "sub", "--force", "--no-progress"],
        write("sub/recipe.yml", ok_linear),
        words=("sub",),
    )
    add(
        "out_is_recipe_file",
        c,
        ["recipe.yml", "recipe.yml", "--force", "--no-progress"],
        recipe(ok_linear),
        words=("recipe.yml",),
    )
    add(
        "out_symlink_to_folder",
        c,
        ["recipe.yml", "link", "--force", "--no-progress"],
        steps(recipe(ok_linear), lambda f: (f / "real").mkdir(), lambda f: (f / "link").symlink_to(f / "real")),
        words=("link",),
    )
    add(
        "out_dangling_symlink",
        c,
        ["recipe.yml", "link", "--no-progress"],
        steps(recipe(ok_linear), lambda f: (f / "link").symlink_to(f / "gone")),
        words=("link",),
    )
    add(
        "out_name_255",
        c,
        ["recipe.yml", "x" * 255, "--no-progress"],
        recipe(ok_linear),
        outputs=("x" * 255,),
        expect="either",
        words=("x" * 40,),
    )
    add(
        "out_name_256",
        c,
        ["recipe.yml", "x" * 256, "--no-progress"],
        recipe(ok_linear),
        outputs=("x" * 256,),
        words=("x" * 40,),
    )
    add(
        "out_name_240",
        c,
        ["recipe.yml", "y" * 240, "--no-progress"],
        recipe(ok_linear),
        outputs=("y" * 240,),
        expect="ok",
    )
    add(
        "out_deep_new_parents",
        c,
        ["recipe.yml", "a/b/c/out", "--no-progress"],
        recipe(ok_linear),
        outputs=("a",),
        expect="ok",
    )
    add(
        "out_parent_is_file",
        c,
        ["recipe.yml", "notes.txt/out", "--no-progress"],
        steps(recipe(ok_linear), write("notes.txt", "mine")),
        words=("notes.txt",),
    )
    add("out_in_proc", c, ["recipe.yml", "/proc/self/out", "--no-progress"], recipe(ok_linear), words=("/proc",))
    add(
        "out_readonly_parent",
        c,
        ["recipe.yml", "locked/out", "--no-progress"],
        steps(recipe(ok_linear), lambda f: (f / "locked").mkdir(), lambda f: os.chmod(f / "locked", 0o555)),
        outputs=("locked",),
        expect="either",
    )
    add(
        "out_newline_in_name",
        c,
        ["recipe.yml", "two\nlines", "--no-progress"],
        recipe(ok_linear),
        outputs=("two\nlines",),
        expect="ok",
    )
    add(
        "out_dash_name",
        c,
        ["recipe.yml", "--", "-out", "--no-progress"],
        recipe(ok_linear),
        outputs=("-out",),
        expect="either",
    )
    add(
        "out_glob_name_spares_others",
        c,
        ["recipe.yml", "o*", "--no-progress"],
        steps(
            recipe(ok_linear),
            write(".other.partial-4194000-0badf00d/model.safetensors", b"kept work"),
            write(".other.replaced-4194000/config.json", "{}"),
        ),
        outputs=("o*",),
        expect="ok",
    )
    add(
        "out_bracket_name_resumes",
        c,
        ["recipe.yml", "o[1]", "--no-progress", "--resume"],
        recipe(ok_linear),
        outputs=("o[1]",),
        words=("resume",),
    )
    add(
        "out_inside_input_model",
        c,
        ["recipe.yml", str(base / "merged"), "--no-progress"],
        recipe(ok_linear),
        words=(str(base),),
    )
    add(
        "out_is_input_model_via_link",
        c,
        ["recipe.yml", "link", "--force", "--no-progress"],
        steps(recipe(ok_linear), lambda f: (f / "link").symlink_to(base)),
        words=("link",),
    )
    add(
        "out_is_parent_of_input",
        c,
        ["recipe.yml", str(root / "models"), "--force", "--no-progress"],
        recipe(ok_linear),
        words=("models",),
    )
    add(
        "output_key_dot",
        c,
        ["recipe.yml", "--force", "--no-progress"],
        recipe(ok_linear + "output: .\n"),
        words=("output",),
    )
    add("output_key_empty", c, ["recipe.yml", "--no-progress"], recipe(ok_linear + "output: ''\n"), words=("output",))
    add(
        "output_key_through_link",
        c,
        ["recipe.yml", "--no-progress"],
        steps(recipe(ok_linear + "output: escape/out\n"), lambda f: (f / "escape").symlink_to(root)),
        words=("output",),
        check=no_file(str(root / "out")),
    )

    # --- model config.json --------------------------------------------------------------------------------------
    c = "config.json"
    for name, edit, words in [
        ("layers_word", edit_config(num_hidden_layers="abc"), ("num_hidden_layers",)),
        ("layers_negative", edit_config(num_hidden_layers=-1), ("num_hidden_layers",)),
        ("layers_huge", edit_config(num_hidden_layers=10**12), ("num_hidden_layers",)),
        ("layers_missing", edit_config(num_hidden_layers=...), ("num_hidden_layers",)),
        ("layers_float", edit_config(num_hidden_layers=4.5), ("num_hidden_layers",)),
        ("layers_bool", edit_config(num_hidden_layers=True), ("num_hidden_layers",)),
        ("layers_fewer_than_weights", edit_config(num_hidden_layers=2), ("layer_range",)),
        ("hidden_size_mismatch", edit_config(hidden_size=96), ("config.json",)),
        ("hidden_size_zero", edit_config(hidden_size=0), ("config.json",)),
        ("vocab_size_zero", edit_config(vocab_size=0), ("vocab_size",)),
        ("torch_dtype_weird", edit_config(torch_dtype="float99", dtype="float99"), ("float99",)),
        ("architectures_missing", edit_config(architectures=...), ()),
        ("architectures_unknown", edit_config(architectures=["FlibForCausalLM"]), ()),
        ("architectures_string", edit_config(architectures="LlamaForCausalLM"), ()),
        ("model_type_unknown", edit_config(model_type="flib", architectures=["FlibForCausalLM"]), ("flib",)),
        ("model_type_and_architectures_missing", edit_config(model_type=..., architectures=...), ("model_type",)),
        ("model_type_number", edit_config(model_type=7), ("7",)),
        ("tie_word_embeddings_string", edit_config(tie_word_embeddings="yes"), ("tie_word_embeddings",)),
        ("heads_not_dividing", edit_config(num_attention_heads=5), ("config.json",)),
        (
            "rms_norm_eps_nan",
            raw_config(
                json.dumps(
                    dict(
                        model_type="llama",
                        architectures=["LlamaForCausalLM"],
                        hidden_size=64,
                        intermediate_size=128,
                        num_attention_heads=4,
                        num_key_value_heads=2,
                        num_hidden_layers=4,
                        vocab_size=400,
                        head_dim=16,
                    )
                ).replace("}", ', "rms_norm_eps": NaN}')
            ),
            (),
        ),
        ("config_empty_file", raw_config(""), ("config.json",)),
        ("config_empty_object", raw_config("{}"), ("config.json",)),
        ("config_huge_key", raw_config(json.dumps({"model_type": "llama", "k" * 5_000_000: 1})), ("config.json",)),
        (
            "config_utf16",
            lambda mdl: (mdl / "config.json").write_bytes((mdl / "config.json").read_text().encode("utf-16")),
            ("config.json",),
        ),
        (
            "config_links_out",
            lambda mdl: ((mdl / "config.json").unlink(), (mdl / "config.json").symlink_to("/etc/passwd")),
            ("config.json",),
        ),
        (
            "config_is_folder",
            lambda mdl: ((mdl / "config.json").unlink(), (mdl / "config.json").mkdir()),
            ("config.json",),
        ),
    ]:
        add(
            f"config_{name}" if not name.startswith("config") else name,
            c,
            R,
            steps(copy_model(base, "m", edit), recipe(passthrough("m"))),
            words=words,
            expect="either"
            if name in ("architectures_missing", "architectures_unknown", "architectures_string", "rms_norm_eps_nan")
            else "error",
            outputs=("out",),
        )

    # --- weights files ------------------------------------------------------------------------------------------
    c = "weights"

    def replace_weights(data: bytes | Callable[[], bytes], name: str = "model.safetensors"):
        def edit(mdl: Path) -> None:
            (mdl / "model.safetensors").unlink()
            (mdl / name).write_bytes(data() if callable(data) else data)

        return edit

    import torch

    add(
        "weights_are_etc_passwd",
        c,
        R,
        steps(copy_model(base, "m", replace_weights(Path("/etc/passwd").read_bytes())), recipe(passthrough("m"))),
        words=("model.safetensors",),
    )
    add(
        "weights_random_junk",
        c,
        R,
        steps(copy_model(base, "m", replace_weights(os.urandom(4096))), recipe(passthrough("m"))),
        words=("model.safetensors",),
    )
    add(
        "weights_zero_length",
        c,
        R,
        steps(copy_model(base, "m", replace_weights(b"")), recipe(passthrough("m"))),
        words=("model.safetensors",),
    )
    add(
        "weights_header_huge_claim",
        c,
        R,
        steps(copy_model(base, "m", replace_weights(struct.pack("<Q", 2**63) + b"{}")), recipe(passthrough("m"))),
        words=("model.safetensors",),
    )
    add(
        "weights_folder_of_junk_shards",
        c,
        R,
        steps(
            copy_model(
                base,
                "m",
                lambda mdl: (
                    (mdl / "model.safetensors").unlink(),
                    [(mdl / f"model-0000{i}-of-00003.safetensors").write_bytes(os.urandom(100)) for i in (1, 2, 3)],
                ),
            ),
            recipe(passthrough("m")),
        ),
        words=("safetensors",),
    )
    add(
        "weights_link_to_etc_passwd",
        c,
        R,
        steps(
            copy_model(
                base,
                "m",
                lambda mdl: (
                    (mdl / "model.safetensors").unlink(),
                    (mdl / "model.safetensors").symlink_to("/etc/passwd"),
                ),
            ),
            recipe(passthrough("m")),
        ),
        words=("model.safetensors",),
    )
    add(
        "weights_link_to_dev_zero",
        c,
        R,
        steps(
            copy_model(
                base,
                "m",
                lambda mdl: ((mdl / "model.safetensors").unlink(), (mdl / "model.safetensors").symlink_to("/dev/zero")),
            ),
            recipe(passthrough("m")),
        ),
        words=("model.safetensors",),
    )
    add("gguf_junk", c, R, recipe(passthrough(m["gguf_junk"])), words=("junk.gguf",))
    add("gguf_empty", c, R, steps(write("e.gguf", b""), recipe(passthrough("e.gguf"))), words=("e.gguf",))
    add(
        "gguf_tensor_count_huge",
        c,
        R,
        steps(write("t.gguf", b"GGUF" + struct.pack("<IQQ", 3, 2**62, 0)), recipe(passthrough("t.gguf"))),
        words=("t.gguf",),
    )

    def retype(dtype):
        return edit_state(
            lambda s: s.update(
                {k: (v * 100).to(dtype) if dtype != torch.bool else v > 0 for k, v in s.items() if "mlp" in k}
            )
        )

    add(
        "int8_tensors_linear",
        c,
        R,
        steps(copy_model(ft, "m", retype(torch.int8)), recipe(linear(base, "m"))),
        words=("mlp",),
    )
    add(
        "int8_tensors_passthrough",
        c,
        R,
        steps(copy_model(base, "m", retype(torch.int8)), recipe(passthrough("m"))),
        expect="either",
    )
    add(
        "bool_tensors_linear",
        c,
        R,
        steps(copy_model(ft, "m", retype(torch.bool)), recipe(linear(base, "m"))),
        words=("mlp",),
    )
    add(
        "f8_tensors_linear",
        c,
        R,
        steps(copy_model(ft, "m", retype(torch.float8_e4m3fn)), recipe(linear(base, "m"))),
        expect="either",
        words=("mlp",),
    )
    add(
        "int8_model_ties",
        c,
        R,
        steps(
            copy_model(ft, "m", retype(torch.int8)),
            recipe(
                f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: m\n    parameters: {{weight: 1, density: 0.5}}\n"
            ),
        ),
        words=("mlp",),
    )
    add(
        "scalar_tensor_extra",
        c,
        R,
        steps(
            copy_model(ft, "m", edit_state(lambda s: s.update({"model.scale": torch.tensor(2.0)}))),
            copy_model(base, "b", edit_state(lambda s: s.update({"model.scale": torch.tensor(1.0)}))),
            recipe(linear("b", "m")),
        ),
        expect="either",
    )
    add(
        "empty_tensor_extra",
        c,
        R,
        steps(
            copy_model(ft, "m", edit_state(lambda s: s.update({"model.nothing": torch.zeros(0, 64)}))),
            copy_model(base, "b", edit_state(lambda s: s.update({"model.nothing": torch.zeros(0, 64)}))),
            recipe(linear("b", "m")),
        ),
        expect="either",
    )
    add(
        "tensor_missing_in_one",
        c,
        R,
        steps(
            copy_model(ft, "m", edit_state(lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))),
            recipe(linear(base, "m")),
        ),
        words=("model.layers.1.mlp.up_proj.weight",),
    )
    add(
        "tensor_extra_in_one",
        c,
        R,
        steps(
            copy_model(ft, "m", edit_state(lambda s: s.update({"model.layers.1.mlp.extra.weight": torch.zeros(4, 4)}))),
            recipe(linear(base, "m")),
        ),
        expect="either",
    )
    add(
        "tensor_names_differ",
        c,
        R,
        steps(
            copy_model(
                ft,
                "m",
                edit_state(lambda s: s.update({k.replace("model.", "transformer."): s.pop(k) for k in list(s)})),
            ),
            recipe(linear(base, "m")),
        ),
        words=("m",),
    )
    add(
        "tensor_nan_in_input",
        c,
        R,
        steps(
            copy_model(ft, "m", edit_state(lambda s: s["model.norm.weight"].fill_(float("nan")))),
            recipe(linear(base, "m")),
        ),
        expect="ok",
        check=lambda f, r: None if "model.norm.weight" in r.stderr else ("unclear", "NaN output not warned about"),
    )
    add(
        "tensor_shape_3d_norm",
        c,
        R,
        steps(
            copy_model(
                ft, "m", edit_state(lambda s: s.update({"model.norm.weight": s["model.norm.weight"].reshape(1, 64, 1)}))
            ),
            recipe(linear(base, "m")),
        ),
        words=("model.norm.weight",),
    )
    add(
        "header_many_entries",
        c,
        R,
        steps(
            copy_model(
                base,
                "m",
                edit_header(
                    lambda h: h.update(
                        {f"junk.{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(200_000)}
                    )
                ),
            ),
            recipe(passthrough("m")),
        ),
        expect="either",
        timeout=240,
    )
    add(
        "index_names_itself",
        c,
        R,
        steps(
            copy_model(
                base,
                "m",
                lambda mdl: (mdl / "model.safetensors.index.json").write_text(
                    json.dumps({"weight_map": {"model.norm.weight": "model.safetensors.index.json"}})
                ),
            ),
            recipe(passthrough("m")),
        ),
        words=("model.safetensors.index.json",),
    )
    add(
        "index_weight_map_list",
        c,
        R,
        steps(
            copy_model(
                base,
                "m",
                lambda mdl: (mdl / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [1, 2]})),
            ),
            recipe(passthrough("m")),
        ),
        words=("index",),
    )
    add(
        "index_absolute_shard",
        c,
        R,
        steps(
            copy_model(
                base,
                "m",
                lambda mdl: (mdl / "model.safetensors.index.json").write_text(
                    json.dumps({"weight_map": {"model.norm.weight": "/etc/passwd"}})
                ),
            ),
            recipe(passthrough("m")),
        ),
        words=("/etc/passwd",),
    )
    marker = root / "pwned-by-pickle"
    add(
        "bin_pickle_runs_no_code",
        c,
        R,
        steps(
            copy_model(base, "m", replace_weights(lambda: pickle_bomb(marker), "pytorch_model.bin")),
            recipe(passthrough("m")),
        ),
        words=("pytorch_model.bin",),
        check=no_file(str(marker)),
    )
    add(
        "bin_junk",
        c,
        R,
        steps(copy_model(base, "m", replace_weights(os.urandom(1000), "pytorch_model.bin")), recipe(passthrough("m"))),
        words=("pytorch_model.bin",),
    )
    add(
        "weights_fifo",
        c,
        ["recipe.yml", "out"],
        steps(
            copy_model(
                base, "m", lambda mdl: ((mdl / "model.safetensors").unlink(), os.mkfifo(mdl / "model.safetensors"))
            ),
            recipe(passthrough("m")),
        ),
        words=("model.safetensors",),
        timeout=60,
    )
    add(
        "tokenizer_links_to_secret",
        c,
        R,
        steps(
            write("secret.txt", "hunter2"),
            copy_model(base, "m", lambda mdl: (mdl / "vocab.json").symlink_to(mdl.parent / "secret.txt")),
            recipe(passthrough("m")),
        ),
        words=("vocab.json",),
        check=lambda f, r: ("security", "the secret reached OUT") if (f / "out" / "vocab.json").exists() else None,
    )
    add(
        "generation_config_fifo",
        c,
        ["recipe.yml", "out"],
        steps(
            copy_model(
                base,
                "m",
                lambda mdl: ((mdl / "generation_config.json").unlink(), os.mkfifo(mdl / "generation_config.json")),
            ),
            recipe(passthrough("m")),
        ),
        words=("generation_config.json",),
        timeout=60,
    )
    add(
        "model_card_license_bomb",
        c,
        R,
        steps(
            copy_model(
                base,
                "m",
                lambda mdl: (mdl / "README.md").write_text(
                    "---\nlicense: &a ["
                    + ",".join(["*a"] * 0)
                    + "x]\n"
                    + "\n".join(
                        f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" if i else "l0: &l0 [1,1,1,1,1,1,1,1,1]"
                        for i in range(9)
                    )
                    + "\n---\n"
                ),
            ),
            recipe(passthrough("m")),
        ),
        expect="ok",
    )

    # --- eval ---------------------------------------------------------------------------------------------------
    c = "eval"
    E = ["eval", str(base), "--text", "t.txt"]
    add("eval_empty_text", c, E, write("t.txt", ""), words=("t.txt",))
    add("eval_whitespace_text", c, E, write("t.txt", " \n\t \n"), words=("t.txt",))
    add("eval_binary_text", c, ["eval", str(base), "--text", sys.executable], words=(sys.executable,))
    add(
        "eval_text_too_large",
        c,
        E,
        lambda f: ((f / "t.txt").write_bytes(b"a"), os.truncate(f / "t.txt", 300 * MiB)),
        words=("t.txt",),
    )
    add("eval_text_dev_zero", c, ["eval", str(base), "--text", "/dev/zero"], words=("/dev/zero",))
    add("eval_text_fifo", c, E, lambda f: os.mkfifo(f / "t.txt"), words=("t.txt",), timeout=60)
    add("eval_text_missing", c, E, None, words=("t.txt",))
    add("eval_text_one_character", c, E, write("t.txt", "a"), words=("t.txt",))
    add("eval_text_folder", c, E, lambda f: (f / "t.txt").mkdir(), words=("t.txt",))
    add(
        "eval_model_missing",
        c,
        ["eval", "nowhere", "--text", "t.txt"],
        write("t.txt", "hello there"),
        words=("nowhere",),
    )
    add(
        "eval_model_etc_passwd",
        c,
        ["eval", "/etc/passwd", "--text", "t.txt"],
        write("t.txt", "hello there"),
        words=("/etc/passwd",),
    )
    add(
        "eval_model_gguf_junk",
        c,
        ["eval", str(m["gguf_junk"]), "--text", "t.txt"],
        write("t.txt", "hello there"),
        words=("junk.gguf",),
    )
    add(
        "eval_model_without_tokenizer",
        c,
        ["eval", str(bare), "--text", "t.txt"],
        write("t.txt", "hello there"),
        words=("tokenizer",),
    )
    add(
        "eval_max_positions_1",
        c,
        ["eval", "m", "--text", "t.txt"],
        steps(
            copy_model(base, "m", edit_config(max_position_embeddings=1)), write("t.txt", "hello there, general kenobi")
        ),
        words=("max_position_embeddings",),
        timeout=90,
    )
    add(
        "eval_max_positions_negative",
        c,
        ["eval", "m", "--text", "t.txt"],
        steps(
            copy_model(base, "m", edit_config(max_position_embeddings=-5)),
            write("t.txt", "hello there, general kenobi"),
        ),
        words=("max_position_embeddings",),
        timeout=90,
    )
    add(
        "eval_moe_model",
        c,
        ["eval", str(m["moe"]), "--text", "t.txt"],
        write("t.txt", "hello there, general kenobi"),
        expect="ok",
    )
    add(
        "eval_tokenizer_config_bad_class",
        c,
        ["eval", "m", "--text", "t.txt"],
        steps(
            copy_model(
                base,
                "m",
                lambda mdl: (mdl / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "os.system"})),
            ),
            write("t.txt", "hello"),
        ),
        expect="either",
    )
    add(
        "eval_tokenizer_json_is_list",
        c,
        ["eval", "m", "--text", "t.txt"],
        steps(
            copy_model(base, "m", lambda mdl: (mdl / "tokenizer.json").write_text("[1, 2]")), write("t.txt", "hello")
        ),
        words=("tokenizer.json",),
    )
    add(
        "eval_config_links_out",
        c,
        ["eval", "m", "--text", "t.txt"],
        steps(
            copy_model(
                base, "m", lambda mdl: ((mdl / "config.json").unlink(), (mdl / "config.json").symlink_to("/etc/passwd"))
            ),
            write("t.txt", "hello"),
        ),
        words=("config.json",),
    )
    add(
        "eval_tokenizer_links_out",
        c,
        ["eval", "m", "--text", "t.txt"],
        steps(
            write("secret.json", '{"version": "1.0"}'),
            copy_model(
                base,
                "m",
                lambda mdl: (
                    (mdl / "tokenizer.json").unlink(),
                    (mdl / "tokenizer.json").symlink_to(mdl.parent / "secret.json"),
                ),
            ),
            write("t.txt", "hello"),
        ),
        words=("tokenizer.json",),
    )
    add(
        "eval_custom_code_not_run",
        c,
        ["eval", "m", "--text", "t.txt"],
        steps(
            copy_model(
                base,
                "m",
                lambda mdl: (
                    (mdl / "evil.py").write_text(f"open({str(root / 'pwned-by-remote-code')!r}, 'w')\n"),
                    edit_config(auto_map={"AutoModelForCausalLM": "evil.Evil", "AutoConfig": "evil.EvilConfig"})(mdl),
                ),
            ),
            write("t.txt", "hello"),
        ),
        expect="either",
        check=no_file(str(root / "pwned-by-remote-code")),
    )
    add("eval_no_text_option", c, ["eval", str(base)], None, words=("--text",))

    # --- route --------------------------------------------------------------------------------------------------
    c = "route"
    P = ["--prompts", "p.txt", "--png", "map.png"]
    good_prompts = write("p.txt", "def main(): pass\nThe cat sat on the mat.\n")
    add("route_ok", c, ["route", str(m["moe"]), *P], good_prompts, expect="ok", outputs=("map.png",))
    add("route_dense_model", c, ["route", str(base), *P], good_prompts, words=("route",), outputs=("map.png",))
    add("route_gpt2", c, ["route", str(gpt2), *P], good_prompts, words=("route",), outputs=("map.png",))
    add(
        "route_prompts_empty",
        c,
        ["route", str(m["moe"]), *P],
        write("p.txt", ""),
        words=("p.txt",),
        outputs=("map.png",),
    )
    add(
        "route_prompts_binary",
        c,
        ["route", str(m["moe"]), "--prompts", sys.executable],
        None,
        words=(sys.executable,),
        outputs=("map.png",),
    )
    add(
        "route_prompts_yaml_nested",
        c,
        ["route", str(m["moe"]), "--prompts", "p.yml"],
        write("p.yml", "a: {b: [c]}\n"),
        words=("p.yml",),
        outputs=("routing.png",),
    )
    add(
        "route_prompts_json_number",
        c,
        ["route", str(m["moe"]), "--prompts", "p.json"],
        write("p.json", "5"),
        words=("p.json",),
        outputs=("routing.png",),
    )
    add(
        "route_prompts_yaml_numbers",
        c,
        ["route", str(m["moe"]), "--prompts", "p.yml"],
        write("p.yml", "[1, 2, 3]\n"),
        words=("p.yml",),
        outputs=("routing.png",),
    )
    add(
        "route_prompts_yaml_group_keys_numbers",
        c,
        ["route", str(m["moe"]), "--prompts", "p.yml"],
        write("p.yml", "1: [hello]\n2: [world]\n"),
        expect="ok",
        outputs=("routing.png",),
    )
    add("route_prompts_missing", c, ["route", str(m["moe"]), *P], None, words=("p.txt",), outputs=("map.png",))
    add(
        "route_png_bad_extension",
        c,
        ["route", str(m["moe"]), "--prompts", "p.txt", "--png", "map.txt"],
        good_prompts,
        words=("map.txt",),
        outputs=("map.txt",),
    )
    add(
        "route_png_no_extension",
        c,
        ["route", str(m["moe"]), "--prompts", "p.txt", "--png", "map"],
        good_prompts,
        words=("map",),
        outputs=("map",),
    )
    add(
        "route_png_is_folder",
        c,
        ["route", str(m["moe"]), "--prompts", "p.txt", "--png", "d"],
        steps(good_prompts, lambda f: (f / "d").mkdir()),
        words=("d",),
    )
    add(
        "route_png_in_missing_folder",
        c,
        ["route", str(m["moe"]), "--prompts", "p.txt", "--png", "no/such/map.png"],
        good_prompts,
        words=("no/such",),
    )
    add(
        "route_png_overwrites_user_file",
        c,
        ["route", str(m["moe"]), "--prompts", "p.txt", "--png", "p.txt"],
        good_prompts,
        words=("p.txt",),
    )
    add(
        "route_png_into_model",
        c,
        ["route", "moe", "--prompts", "p.txt", "--png", "moe/config.png"],
        steps(good_prompts, copy_model(m["moe"], "moe")),
        expect="either",
        outputs=("moe",),
    )
    add(
        "route_model_is_file",
        c,
        ["route", "/etc/passwd", *P],
        good_prompts,
        words=("/etc/passwd",),
        outputs=("map.png",),
    )
    add("route_model_missing", c, ["route", "nowhere", *P], good_prompts, words=("nowhere",), outputs=("map.png",))
    add(
        "route_model_truncated",
        c,
        ["route", "moe", *P],
        steps(
            good_prompts,
            copy_model(
                m["moe"],
                "moe",
                lambda mdl: (mdl / "model.safetensors").write_bytes((mdl / "model.safetensors").read_bytes()[:5000]),
            ),
        ),
        words=("model.safetensors",),
        outputs=("map.png",),
    )
    add(
        "route_model_broken_tokenizer",
        c,
        ["route", "moe", *P],
        steps(
            good_prompts, copy_model(m["moe"], "moe", lambda mdl: (mdl / "tokenizer.json").write_text("{\"model\": 5}"))
        ),
        words=("tokenizer",),
        outputs=("map.png",),
    )
    add(
        "route_model_config_junk",
        c,
        ["route", "moe", *P],
        steps(good_prompts, copy_model(m["moe"], "moe", raw_config("{junk"))),
        words=("config.json",),
        outputs=("map.png",),
    )
    add(
        "route_model_no_tokenizer",
        c,
        ["route", "moe", *P],
        steps(
            good_prompts,
            copy_model(m["moe"], "moe", lambda mdl: [p.unlink() for p in mdl.iterdir() if "token" in p.name]),
        ),
        words=("tokenizer",),
        outputs=("map.png",),
    )
    add(
        "route_device_cuda",
        c,
        ["route", str(m["moe"]), *P, "--device", "cuda"],
        good_prompts,
        words=("cuda",),
        outputs=("map.png",),
    )
    add(
        "route_prompt_huge_line",
        c,
        ["route", str(m["moe"]), *P],
        write("p.txt", "word " * 200_000),
        expect="either",
        outputs=("map.png",),
        rss_limit=4000 * MiB,
        timeout=240,
    )

    # --- transplant ------------------------------------------------------------------------------------------
    c = "transplant"
    T = ["transplant", str(base), "out", "--no-progress", "--tokenizer"]
    add("transplant_ok", c, [*T, str(m["sp_tokenizer"])], None, expect="ok")
    add("transplant_donor_without_tokenizer", c, [*T, str(bare)], None, words=("tokenizer",))
    add(
        "transplant_donor_broken_tokenizer_json",
        c,
        [*T, "d"],
        copy_model(m["sp_tokenizer"], "d", lambda d: (d / "tokenizer.json").write_text("{not json")),
        words=("tokenizer.json",),
    )
    add(
        "transplant_donor_tokenizer_json_empty_object",
        c,
        [*T, "d"],
        copy_model(m["sp_tokenizer"], "d", lambda d: (d / "tokenizer.json").write_text("{}")),
        words=("tokenizer",),
    )
    add(
        "transplant_donor_only_tokenizer_config",
        c,
        [*T, "d"],
        lambda f: ((f / "d").mkdir(), shutil.copy(m["sp"] / "tokenizer_config.json", f / "d")),
        words=("d",),
    )
    add(
        "transplant_donor_vocab_huge_id",
        c,
        [*T, "d"],
        copy_model(
            m["sp_tokenizer"],
            "d",
            lambda d: (d / "tokenizer.json").write_text(
                json.dumps(
                    {
                        **json.loads((d / "tokenizer.json").read_text()),
                        "added_tokens": [
                            {
                                "id": 1_000_000_000,
                                "content": "<huge>",
                                "single_word": False,
                                "lstrip": False,
                                "rstrip": False,
                                "normalized": False,
                                "special": True,
                            }
                        ],
                    }
                )
            ),
        ),
        expect="either",
        address_limit=8 * 1024**3,
        words=("tokenizer",),
    )
    add("transplant_donor_missing", c, [*T, "nowhere"], None, words=("nowhere",))
    add("transplant_donor_hub_offline", c, [*T, "nobody/tokenizer"], None, words=("nobody/tokenizer",))
    add("transplant_donor_is_self", c, [*T, str(base)], None, expect="either")
    add(
        "transplant_model_without_tokenizer",
        c,
        ["transplant", str(bare), "out", "--no-progress", "--tokenizer", str(m["sp_tokenizer"])],
        None,
        words=("tokenizer",),
    )
    add("transplant_estimator_unknown", c, [*T, str(m["sp_tokenizer"]), "--estimator", "magic"], None, words=("magic",))
    add("transplant_k_zero", c, [*T, str(sp), "--estimator", "omp", "--k", "0"], None, words=("k",))
    add(
        "transplant_k_huge",
        c,
        [*T, str(sp), "--estimator", "knn", "--k", "1000000000"],
        None,
        expect="either",
        words=("k",),
    )
    add(
        "transplant_pad_zero",
        c,
        [*T, str(m["sp_tokenizer"]), "--pad-to-multiple-of", "0"],
        None,
        words=("--pad-to-multiple-of",),
    )
    add(
        "transplant_pad_huge",
        c,
        [*T, str(m["sp_tokenizer"]), "--pad-to-multiple-of", "1000000000"],
        None,
        words=("--pad-to-multiple-of",),
        address_limit=8 * 1024**3,
    )
    add(
        "transplant_report_text_missing",
        c,
        [*T, str(m["sp_tokenizer"]), "--report", "--text", "t.txt"],
        None,
        words=("t.txt",),
    )
    add(
        "transplant_report_text_binary",
        c,
        [*T, str(m["sp_tokenizer"]), "--report", "--text", sys.executable],
        None,
        words=(sys.executable,),
    )
    add("transplant_out_exists", c, [*T, str(m["sp_tokenizer"])], lambda f: (f / "out").mkdir(), words=("out",))
    add(
        "transplant_out_is_model",
        c,
        ["transplant", str(base), str(base), "--force", "--no-progress", "--tokenizer", str(m["sp_tokenizer"])],
        None,
        words=(str(base),),
    )
    add(
        "transplant_out_is_donor",
        c,
        ["transplant", str(base), "d", "--force", "--no-progress", "--tokenizer", "d"],
        copy_model(m["sp_tokenizer"], "d"),
        words=("d",),
    )
    add(
        "transplant_model_gguf_junk",
        c,
        ["transplant", str(m["gguf_junk"]), "out", "--no-progress", "--tokenizer", str(sp)],
        None,
        words=("junk.gguf",),
    )
    add("transplant_memory_budget_bad", c, [*T, str(sp), "--memory-budget", "0"], None, words=("--memory-budget",))

    # --- compose trace: its prescan reads the weight files before anything else has checked them -------------------
    c = "trace"

    def traced(suspect, *candidates) -> list[str]:
        return ["trace", str(suspect), "--candidates", *map(str, candidates)]

    def overlapping_tensors(mdl: Path) -> None:
        """The second tensor's bytes moved onto the first's (a header composer refuses)."""
        path = mdl / "model.safetensors"
        raw = path.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + length])
        first, second = [name for name in header if name != "__metadata__"][:2]
        header[second]["data_offsets"] = header[first]["data_offsets"]
        text = json.dumps(header, separators=(",", ":")).encode().ljust(length)
        path.write_bytes(raw[:8] + text + raw[8 + length :])

    def truncated(mdl: Path) -> None:
        path = mdl / "model.safetensors"
        os.truncate(path, path.stat().st_size // 2)

    def escaping_index(mdl: Path) -> None:
        (mdl / "model.safetensors").rename(mdl.parent / "elsewhere.safetensors")
        (mdl / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.embed_tokens.weight": "../elsewhere.safetensors"}})
        )

    add("trace_ok", c, traced(ft, base, ft2), None, expect="ok")
    add("trace_candidate_is_suspect", c, traced(ft, base, ft), None, words=("SUSPECT",))
    add("trace_candidate_missing", c, traced(ft, "nowhere"), None, words=("nowhere",))
    add(
        "trace_suspect_weights_junk",
        c,
        traced("s", base),
        copy_model(ft, "s", replace_weights(os.urandom(4096))),
        words=("model.safetensors",),
    )
    add(
        "trace_suspect_weights_fifo",
        c,
        traced("s", base),
        copy_model(ft, "s", lambda mdl: ((mdl / "model.safetensors").unlink(), os.mkfifo(mdl / "model.safetensors"))),
        words=("model.safetensors",),
        timeout=60,
    )
    add(
        "trace_candidate_link_to_dev_zero",
        c,
        traced(ft, "d"),
        copy_model(
            base,
            "d",
            lambda mdl: ((mdl / "model.safetensors").unlink(), (mdl / "model.safetensors").symlink_to("/dev/zero")),
        ),
        words=("model.safetensors",),
        timeout=60,
    )
    add(
        "trace_candidate_header_huge_claim",
        c,
        traced(ft, "d"),
        copy_model(base, "d", replace_weights(struct.pack("<Q", 2**63) + b"{}")),
        words=("model.safetensors",),
    )
    add(
        "trace_candidate_overlapping_tensors",
        c,
        traced(ft, "d"),
        copy_model(base, "d", overlapping_tensors),
        words=("model.safetensors",),
    )
    add("trace_candidate_truncated", c, traced(ft, "d"), copy_model(base, "d", truncated), words=("model.safetensors",))
    add(
        "trace_candidate_index_escapes",
        c,
        traced(ft, "d"),
        copy_model(base, "d", escaping_index),
        words=("elsewhere.safetensors",),
        outputs=("out", "elsewhere.safetensors"),
    )
    add("trace_suspect_gguf_junk", c, traced(m["gguf_junk"], base), None, words=("junk.gguf",))
    add("trace_other_architecture_only", c, traced(ft, wide), None, words=("SUSPECT",))
    add(
        "trace_json_is_a_folder",
        c,
        [*traced(ft, base), "--json", "d"],
        lambda f: (f / "d").mkdir(),
        words=("d",),
        outputs=("d",),
    )
    add("trace_memory_budget_bad", c, [*traced(ft, base), "--memory-budget", "lots"], None, words=("--memory-budget",))

    # --- extract-lora ------------------------------------------------------------------------------------------
    c = "extract-lora"
    X = ["extract-lora", str(ft), "out", "--base", str(base), "--no-progress", "--rank"]
    add("lora_ok", c, [*X, "4"], None, expect="ok")
    add("lora_rank_zero", c, [*X, "0"], None, words=("--rank",))
    add("lora_rank_negative", c, [*X, "-3"], None, words=("--rank",))
    add("lora_rank_larger_than_matrix", c, [*X, "1000"], None, words=("rank",))
    add("lora_rank_huge", c, [*X, str(10**20)], None, words=("rank",))
    add(
        "lora_architectures_differ",
        c,
        ["extract-lora", str(qwen), "out", "--base", str(base), "--rank", "4", "--no-progress"],
        None,
        words=(str(qwen),),
    )
    add(
        "lora_shapes_differ",
        c,
        ["extract-lora", str(wide), "out", "--base", str(base), "--rank", "4", "--no-progress"],
        None,
        words=(str(wide),),
    )
    add("lora_modules_unknown", c, [*X, "4", "--modules", "nonsense"], None, words=("nonsense",))
    add("lora_modules_empty", c, [*X, "4", "--modules", ","], None, expect="either")
    add(
        "lora_same_model",
        c,
        ["extract-lora", str(base), "out", "--base", str(base), "--rank", "4", "--no-progress"],
        None,
        expect="either",
    )
    add(
        "lora_nan_finetune",
        c,
        ["extract-lora", "m", "out", "--base", str(base), "--rank", "4", "--no-progress"],
        copy_model(ft, "m", edit_state(lambda s: s["model.layers.0.mlp.up_proj.weight"].fill_(float("nan")))),
        words=("model.layers.0.mlp.up_proj.weight",),
    )
    add(
        "lora_out_in_base",
        c,
        ["extract-lora", str(ft), str(base / "adapter"), "--base", str(base), "--rank", "4", "--no-progress"],
        None,
        words=(str(base),),
    )
    add("lora_out_exists", c, [*X, "4"], write("out/notes.txt", "mine"), words=("out",))
    add(
        "lora_base_junk_gguf",
        c,
        ["extract-lora", str(ft), "out", "--base", str(m["gguf_junk"]), "--rank", "4", "--no-progress"],
        None,
        words=("junk.gguf",),
    )
    add(
        "lora_finetune_missing_tensor",
        c,
        ["extract-lora", "m", "out", "--base", str(base), "--rank", "4", "--no-progress"],
        copy_model(ft, "m", edit_state(lambda s: s.pop("model.layers.0.mlp.up_proj.weight"))),
        words=("model.layers.0.mlp.up_proj.weight",),
    )
    add(
        "lora_int8_finetune",
        c,
        ["extract-lora", "m", "out", "--base", str(base), "--rank", "4", "--no-progress"],
        copy_model(ft, "m", retype(torch.int8)),
        words=("mlp",),
    )
    add(
        "lora_from_broken_adapter",
        c,
        ["extract-lora", f"{base}+a", "out", "--base", str(base), "--rank", "4", "--no-progress"],
        copy_model(m["adapter"], "a", lambda a: (a / "adapter_config.json").write_text("{broken")),
        words=("adapter_config.json",),
    )

    # --- adapters (BASE+ADAPTER) ------------------------------------------------------------------------------
    c = "adapter"

    def adapter_case(name, edit, words=(), expect="error"):
        add(
            name,
            c,
            R,
            steps(copy_model(m["adapter"], "a", edit), recipe(linear(f"{base}+a", ft))),
            words=words,
            expect=expect,
        )

    def adapter_config_edit(**changes):
        def edit(a: Path) -> None:
            config = json.loads((a / "adapter_config.json").read_text())
            config.update(changes)
            (a / "adapter_config.json").write_text(json.dumps(config))

        return edit

    add("adapter_ok", c, R, steps(copy_model(m["adapter"], "a"), recipe(linear(f"{base}+a", ft))), expect="ok")
    adapter_case(
        "adapter_config_not_json", lambda a: (a / "adapter_config.json").write_text("{nope"), ("adapter_config.json",)
    )
    adapter_case("adapter_config_missing", lambda a: (a / "adapter_config.json").unlink(), ("adapter_config.json",))
    adapter_case("adapter_r_zero", adapter_config_edit(r=0), ("adapter_config.json",))
    adapter_case("adapter_r_word", adapter_config_edit(r="abc"), ("adapter_config.json",))
    adapter_case("adapter_r_negative", adapter_config_edit(r=-4), ("adapter_config.json",))
    adapter_case("adapter_alpha_word", adapter_config_edit(lora_alpha="lots"), ("adapter_config.json",))
    adapter_case(
        "adapter_alpha_nan",
        lambda a: (a / "adapter_config.json").write_text(
            (a / "adapter_config.json").read_text().replace('"lora_alpha": 4', '"lora_alpha": NaN')
        ),
        ("adapter_config.json",),
    )
    adapter_case("adapter_target_modules_number", adapter_config_edit(target_modules=5), expect="either")
    adapter_case(
        "adapter_rank_pattern_word", adapter_config_edit(rank_pattern={"q_proj": "x"}), ("adapter_config.json",)
    )
    adapter_case("adapter_rank_pattern_list", adapter_config_edit(rank_pattern=[1, 2]), ("adapter_config.json",))
    adapter_case("adapter_peft_type_number", adapter_config_edit(peft_type=5), ("adapter_config.json",))
    adapter_case("adapter_use_rslora_string", adapter_config_edit(use_rslora="no"), expect="either")
    adapter_case("adapter_weights_missing", lambda a: (a / "adapter_model.safetensors").unlink(), ("adapter",))
    adapter_case(
        "adapter_weights_junk",
        lambda a: (a / "adapter_model.safetensors").write_bytes(os.urandom(500)),
        ("adapter_model.safetensors",),
    )
    adapter_case("adapter_fan_in_fan_out_wrong", adapter_config_edit(fan_in_fan_out=True), ("adapter",))
    adapter_case("adapter_modules_to_save_word", adapter_config_edit(modules_to_save="lm_head"), expect="either")
    add("adapter_is_etc", c, R, recipe(linear(f"{base}+/etc", ft)), words=("/etc",))
    add("adapter_empty", c, R, recipe(linear(f"{base}+", ft)), words=("+",))
    add("adapter_no_base", c, R, steps(copy_model(m["adapter"], "a"), recipe(linear("+a", ft))), words=("+a",))
    add(
        "adapter_rank_too_large_for_matrix",
        c,
        R,
        steps(copy_model(m["adapter"], "a", lambda a: None), recipe(linear(f"{base}+a", ft))),
        expect="ok",
    )

    # --- MoE ----------------------------------------------------------------------------------------------------
    c = "moe"
    add("moe_ok_hidden", c, R, recipe(moe_recipe(m)), expect="ok")
    add(
        "moe_zero_experts",
        c,
        R,
        recipe(moe_recipe(m, experts=[]).replace("experts:\n", "experts: []\n")),
        words=("experts",),
    )
    add(
        "moe_expert_other_architecture",
        c,
        R,
        recipe(
            moe_recipe(
                m,
                experts=[
                    f"  - source_model: {qwen}\n    positive_prompts: [a]\n",
                    f"  - source_model: {ft}\n    positive_prompts: [b]\n",
                ],
            )
        ),
        words=(str(qwen),),
    )
    add(
        "moe_expert_gpt2",
        c,
        R,
        recipe(
            moe_recipe(
                m,
                experts=[
                    f"  - source_model: {gpt2}\n    positive_prompts: [a]\n",
                    f"  - source_model: {ft}\n    positive_prompts: [b]\n",
                ],
            )
        ),
        words=(str(gpt2),),
    )
    add(
        "moe_expert_wide",
        c,
        R,
        recipe(
            moe_recipe(
                m,
                experts=[
                    f"  - source_model: {wide}\n    positive_prompts: [a]\n",
                    f"  - source_model: {ft}\n    positive_prompts: [b]\n",
                ],
            )
        ),
        words=(str(wide),),
    )
    add(
        "moe_prompts_empty_list",
        c,
        R,
        recipe(
            moe_recipe(
                m,
                experts=[
                    f"  - source_model: {ft}\n    positive_prompts: []\n",
                    f"  - source_model: {ft2}\n    positive_prompts: [b]\n",
                ],
            )
        ),
        words=("prompts",),
    )
    add(
        "moe_prompt_empty_string",
        c,
        R,
        recipe(
            moe_recipe(
                m,
                experts=[
                    f"  - source_model: {ft}\n    positive_prompts: ['']\n",
                    f"  - source_model: {ft2}\n    positive_prompts: [b]\n",
                ],
            )
        ),
        words=("prompt",),
    )
    add(
        "moe_prompt_whitespace",
        c,
        R,
        recipe(
            moe_recipe(
                m,
                experts=[
                    f"  - source_model: {ft}\n    positive_prompts: ['   ']\n",
                    f"  - source_model: {ft2}\n    positive_prompts: [b]\n",
                ],
            )
        ),
        words=("prompt",),
    )
    add(
        "moe_prompts_missing",
        c,
        R,
        recipe(
            moe_recipe(
                m, experts=[f"  - source_model: {ft}\n", f"  - source_model: {ft2}\n    positive_prompts: [b]\n"]
            )
        ),
        words=("prompt",),
    )
    add(
        "moe_same_prompts",
        c,
        R,
        recipe(
            moe_recipe(
                m,
                experts=[
                    f"  - source_model: {ft}\n    positive_prompts: [a]\n",
                    f"  - source_model: {ft2}\n    positive_prompts: [a]\n",
                ],
            )
        ),
        words=("prompt",),
    )
    add(
        "moe_experts_per_token_zero",
        c,
        R,
        recipe(moe_recipe(m).replace("experts_per_token: 1", "experts_per_token: 0")),
        words=("experts_per_token",),
    )
    add(
        "moe_experts_per_token_negative",
        c,
        R,
        recipe(moe_recipe(m).replace("experts_per_token: 1", "experts_per_token: -1")),
        words=("experts_per_token",),
    )
    add(
        "moe_experts_per_token_too_many",
        c,
        R,
        recipe(moe_recipe(m).replace("experts_per_token: 1", "experts_per_token: 9")),
        words=("experts_per_token",),
    )
    add("moe_gate_mode_unknown", c, R, recipe(moe_recipe(m, gate_mode="psychic")), words=("gate_mode",))
    add(
        "moe_expert_missing_model",
        c,
        R,
        recipe(
            moe_recipe(
                m,
                experts=[
                    "  - source_model: ./nowhere\n    positive_prompts: [a]\n",
                    f"  - source_model: {ft}\n    positive_prompts: [b]\n",
                ],
            )
        ),
        words=("nowhere",),
    )
    add(
        "moe_noise_scale_negative",
        c,
        R,
        recipe(
            moe_recipe(
                m,
                gate_mode="random",
                experts=[f"  - source_model: {ft}\n    noise_scale: -1\n", f"  - source_model: {ft2}\n"],
            )
        ),
        expect="either",
        words=("noise_scale",),
    )
    add(
        "moe_residual_scale_huge",
        c,
        R,
        recipe(
            moe_recipe(
                m,
                gate_mode="random",
                experts=[f"  - source_model: {ft}\n    residual_scale: 1e300\n", f"  - source_model: {ft2}\n"],
            )
        ),
        expect="either",
        words=("residual_scale",),
    )
    add(
        "moe_many_experts",
        c,
        R,
        recipe(moe_recipe(m, gate_mode="random", experts=[f"  - source_model: {ft}\n"] * 300)),
        expect="either",
        timeout=300,
    )
    add(
        "moe_two_shared_experts",
        c,
        R,
        recipe(
            moe_recipe(
                m, extra=f"architecture: qwen\nshared_experts:\n  - source_model: {ft}\n  - source_model: {ft2}\n"
            )
        ),
        words=("shared_experts",),
    )
    add(
        "moe_shared_expert_weight_one",
        c,
        R,
        recipe(moe_recipe(m, extra="shared_expert_weight: 1\n")),
        words=("shared_expert_weight",),
    )
    add("moe_architecture_gpt2", c, R, recipe(moe_recipe(m, extra="architecture: gpt2\n")), words=("architecture",))
    add(
        "moe_base_gpt2",
        c,
        R,
        recipe(moe_recipe(m).replace(f"base_model: {base}", f"base_model: {gpt2}")),
        words=(str(gpt2),),
    )
    add(
        "moe_base_without_tokenizer",
        c,
        R,
        recipe(moe_recipe(m).replace(f"base_model: {base}", f"base_model: {bare}")),
        words=("tokenizer",),
    )
    add("moe_dtype_int8", c, R, recipe(moe_recipe(m, extra="dtype: int8\n")), words=("dtype",))
    add(
        "moe_prompt_corpus_missing",
        c,
        R,
        recipe(
            moe_recipe(
                m,
                extra="prompt_corpus: ./corpus.txt\n",
                experts=[
                    f"  - source_model: {ft}\n    description: code\n",
                    f"  - source_model: {ft2}\n    description: stories\n",
                ],
            )
        ),
        words=("corpus.txt",),
    )
    add(
        "moe_prompt_corpus_dev_zero",
        c,
        R,
        recipe(
            moe_recipe(
                m,
                extra="prompt_corpus: /dev/zero\n",
                experts=[
                    f"  - source_model: {ft}\n    description: code\n",
                    f"  - source_model: {ft2}\n    description: stories\n",
                ],
            )
        ),
        words=("/dev/zero",),
    )
    add(
        "moe_prompts_are_numbers",
        c,
        R,
        recipe(
            moe_recipe(
                m,
                experts=[
                    f"  - source_model: {ft}\n    positive_prompts: [1, 2]\n",
                    f"  - source_model: {ft2}\n    positive_prompts: [b]\n",
                ],
            )
        ),
        words=("positive_prompts",),
    )
    add(
        "moe_extra_key_beside_moe",
        c,
        R,
        recipe("moe:\n  " + moe_recipe(m).replace("\n", "\n  ") + "\nmerge_method: linear\n"),
        words=("merge_method",),
    )
    add(
        "moe_prompt_huge",
        c,
        R,
        recipe(
            moe_recipe(
                m,
                experts=[
                    f"  - source_model: {ft}\n    positive_prompts: ['{'word ' * 300_000}']\n",
                    f"  - source_model: {ft2}\n    positive_prompts: [b]\n",
                ],
            )
        ),
        expect="either",
        timeout=240,
    )
    add("plan_moe", c, ["plan", "recipe.yml"], recipe(moe_recipe(m)), expect="ok")

    # --- plan ---------------------------------------------------------------------------------------------------
    c = "plan"
    add("plan_ok", c, ["plan", "recipe.yml"], recipe(ok_linear), expect="ok")
    add(
        "plan_limit_negative",
        c,
        ["plan", "recipe.yml", "--limit", "-5"],
        recipe(ok_linear),
        expect="either",
        words=("--limit",),
    )
    add("plan_limit_huge", c, ["plan", "recipe.yml", "--limit", str(10**30)], recipe(ok_linear), expect="either")
    add(
        "plan_budget_bad",
        c,
        ["plan", "recipe.yml", "--memory-budget", "x"],
        recipe(ok_linear),
        words=("--memory-budget",),
    )
    add("plan_recipe_missing", c, ["plan", "nope.yml"], None, words=("nope.yml",))
    add("plan_recipe_folder", c, ["plan", "."], None, words=(".",))
    add(
        "plan_model_junk",
        c,
        ["plan", "recipe.yml"],
        steps(copy_model(base, "m", replace_weights(os.urandom(300))), recipe(passthrough("m"))),
        words=("model.safetensors",),
    )

    # --- demo and help --------------------------------------------------------------------------------------------
    c = "demo/help"
    add("demo_out_is_file", c, ["demo", "--out", "notes.txt"], write("notes.txt", "mine"), words=("notes.txt",))
    add(
        "demo_out_user_folder",
        c,
        ["demo", "--out", "mine", "--force"],
        write("mine/thesis.txt", "years"),
        words=("mine",),
    )
    add("demo_out_dev_null", c, ["demo", "--out", "/dev/null"], None, words=("/dev/null",))
    add("demo_out_root", c, ["demo", "--out", "/", "--force"], None, words=("/",))
    add("help", c, ["--help"], None, expect="ok")
    add("help_short", c, ["-h"], None, expect="ok")
    add("no_arguments", c, [], None, expect="either")
    add("run_help", c, ["run", "--help"], None, expect="ok")
    add("eval_help", c, ["eval", "--help"], None, expect="ok")
    add("help_after_recipe", c, ["recipe.yml", "--help"], None, expect="ok")
    add("version", c, ["--version"], None, words=("--version",))
    add("empty_argument", c, [""], None, words=("Recipe file",))
    add("command_typo", c, ["evl", str(base)], None, words=("evl",))

    # --- signals, concurrency, disk full -------------------------------------------------------------------------
    c = "signals"
    heavy = f"merge_method: ties\nbase_model: {big}\nmodels:\n  - model: {big_ft}\n    parameters: {{weight: 1, density: 0.5}}\ndtype: float32\n"
    H = ["recipe.yml", "out", "--no-progress", "--shard-size", "20MB"]
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        name = signal.Signals(number).name
        add(f"{name.lower()}_while_importing", c, H, recipe(heavy), expect="interrupted", send=(number, 0.4))
        add(f"{name.lower()}_while_planning", c, H, recipe(heavy), expect="interrupted", send=(number, 2.5))
        for delay in (0.0, 0.5, 1.5):
            add(
                f"{name.lower()}_while_writing_{delay}",
                c,
                H,
                recipe(heavy),
                expect="interrupted",
                send=(number, ("partial", delay)),
            )
    add("sigint_moe_gates", c, R, recipe(moe_recipe(m)), expect="interrupted", send=(signal.SIGINT, 3.0))
    add(
        "sigterm_extract_lora",
        c,
        ["extract-lora", str(big_ft), "out", "--base", str(big), "--rank", "8", "--no-progress"],
        None,
        expect="interrupted",
        send=(signal.SIGTERM, ("partial", 0.2)),
    )
    add(
        "sigint_transplant",
        c,
        ["transplant", str(big), "out", "--no-progress", "--tokenizer", str(m["sp_tokenizer"])],
        None,
        expect="interrupted",
        send=(signal.SIGINT, ("partial", 0.0)),
    )
    add(
        "sigint_keep_partial_then_resume",
        c,
        [*H, "--keep-partial"],
        recipe(heavy),
        expect="ok",
        driver=interrupt_then_resume,
        timeout=300,
    )
    add("sigint_twice", c, H, recipe(heavy), expect="interrupted", driver=double_interrupt)
    add("two_runs_one_out", c, H, recipe(heavy), expect="either", driver=two_at_once(False), timeout=300)
    add("two_runs_one_out_force", c, H, recipe(heavy), expect="either", driver=two_at_once(True), timeout=300)
    add(
        "kill_then_other_recipe",
        c,
        H,
        steps(recipe(heavy), write("other.yml", ok_linear)),
        expect="ok",
        outputs=("out", "recipe.yml"),
        driver=rerun_after_kill,
        check=loads_like(
            "out", lambda state: None if state["model.norm.weight"].shape == (64,) else "the dead run's output was kept"
        ),
    )
    c = "disk full"
    add(
        "disk_full_run",
        c,
        ["recipe.yml", "full/out", "--no-progress"],
        steps(recipe(heavy), on_tmpfs("out")),
        outputs=("full",),
        needs="tmpfs",
        check=tmpfs_clean,
        words=("full/out",),
    )
    add(
        "disk_full_extract_lora",
        c,
        ["extract-lora", str(big_ft), "full/out", "--base", str(big), "--rank", "256", "--no-progress"],
        on_tmpfs("out"),
        outputs=("full",),
        needs="tmpfs",
        check=tmpfs_clean,
        words=("full/out",),
    )
    add(
        "disk_full_transplant",
        c,
        ["transplant", str(big), "full/out", "--no-progress", "--tokenizer", str(m["sp_tokenizer"])],
        on_tmpfs("out"),
        outputs=("full",),
        needs="tmpfs",
        check=tmpfs_clean,
        words=("full/out",),
    )
    add(
        "disk_full_small_merge",
        c,
        ["recipe.yml", "full/out", "--no-progress"],
        steps(recipe(linear(big, big_ft)), on_tmpfs("out")),
        outputs=("full",),
        needs="tmpfs",
        check=tmpfs_clean,
        words=("full/out",),
    )
    return found


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", action="append", help="run only cases whose name or category contains this (repeatable)"
    )
    parser.add_argument("--jobs", type=int, default=max(2, (os.cpu_count() or 2)), help="cases run at once")
    parser.add_argument("--list", action="store_true", help="list the cases and stop")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    parser.add_argument("--json", type=Path, help="also write the outcomes to this JSON file")
    arguments = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="composer-hostile-"))
    try:
        started = time.perf_counter()
        if arguments.list:
            models = {
                key: root / "models" / key
                for key in (
                    "base",
                    "ft",
                    "ft2",
                    "qwen",
                    "gpt2",
                    "wide",
                    "sp",
                    "bare",
                    "big",
                    "big_ft",
                    "sp_tokenizer",
                    "adapter",
                    "moe",
                    "gguf_junk",
                )
            }
            for case in cases(models, root):
                print(f"{case.category:<14} {case.name}")
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        models = build_fixtures(root)
        chosen = [
            case
            for case in cases(models, root)
            if not arguments.only or any(word in case.name or word in case.category for word in arguments.only)
        ]
        print(
            f"fixtures built in {time.perf_counter() - started:.0f} s; {len(chosen)} cases, {arguments.jobs} at a time",
            flush=True,
        )
        before_models = digest_tree(root / "models")
        tmpfs = mount_tmpfs() if any(case.needs == "tmpfs" for case in chosen) else False
        home = root / "home"
        home.mkdir()
        outcomes: dict[str, tuple[str, str, float]] = {}

        def one(case: Case) -> None:
            folder = root / "cases" / case.name
            folder.mkdir(parents=True)
            if case.needs == "tmpfs" and not tmpfs:
                outcomes[case.name] = ("skipped", "a 1 MB tmpfs cannot be mounted here (needs root)", 0.0)
                return
            try:
                if case.setup is not None:
                    case.setup(folder)
                before = listing(folder)
                result = run_one(case, folder, home)
                outcome, detail = classify(case, result, folder, before)
            except Exception as error:  # noqa: BLE001  (a harness failure is reported, not raised)
                outcome, detail, result = "skipped", f"harness: {type(error).__name__}: {error}", None
            outcomes[case.name] = (outcome, detail, result.seconds if result else 0.0)
            mark = "  " if outcome in ("ok", "clear error", "skipped") else "!!"
            print(f"{mark} {case.category:<13} {case.name:<44} {outcome:<12} {detail[:150]}", flush=True)

        with ThreadPoolExecutor(max_workers=arguments.jobs) as pool:
            list(pool.map(one, chosen))
        after_models = digest_tree(root / "models")
        changed = sorted(set(before_models.items()) ^ set(after_models.items()))
        if tmpfs:
            subprocess.run(["umount", str(TMPFS)], capture_output=True)

        print("\n" + "=" * 110)
        totals: dict[str, Counter] = defaultdict(Counter)
        for case in chosen:
            totals[case.category][outcomes[case.name][0]] += 1
        shown = [outcome for outcome in OUTCOMES if any(totals[c][outcome] for c in totals)]
        print(f"{'category':<14}" + "".join(f"{o:>14}" for o in shown) + f"{'cases':>8}")
        for category, counts in totals.items():
            print(f"{category:<14}" + "".join(f"{counts[o]:>14}" for o in shown) + f"{sum(counts.values()):>8}")
        grand = sum(totals.values(), Counter())
        print(f"{'all':<14}" + "".join(f"{grand[o]:>14}" for o in shown) + f"{sum(grand.values()):>8}")
        defects = sum(grand[o] for o in DEFECTS)
        print(
            f"\n{len(chosen)} cases, {defects} defects; input models changed: {len(changed) or 'none'}"
            + (f" ({', '.join(name for name, _ in changed[:4])})" if changed else "")
            + f"; {time.perf_counter() - started:.0f} s"
        )
        if arguments.json:
            arguments.json.write_text(
                json.dumps(
                    {name: {"outcome": o, "detail": d, "seconds": s} for name, (o, d, s) in outcomes.items()}, indent=1
                )
            )
        if defects or changed:
            print("defects:")
            for case in chosen:
                outcome, detail, _ = outcomes[case.name]
                if outcome in DEFECTS:
                    print(f"  {case.name}: {outcome}: {detail}")
    finally:
        if arguments.keep:
            print(f"kept {root}")
        else:
            if os.path.ismount(TMPFS):
                subprocess.run(["umount", str(TMPFS)], capture_output=True)
            for path in root.rglob("*"):  # read-only folders made by the cases
                if path.is_dir() and not path.is_symlink():
                    path.chmod(0o755)
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
