"""Nothing the user owns is overwritten or lost: --force replaces only composer's own outputs, a recipe cannot
aim a run elsewhere, signals and failures leave no debris, and an interrupted swap is repaired.

CLI runs are real subprocesses started together (they spend most of their time importing torch).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from composer.compose import compose_text
from composer.errors import ComposerError, ComposerWarning
from composer.execute import ExecutionOptions
from helpers import load_state, save_tiny_model


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "composer.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def passthrough(model: Path) -> str:
    return f"merge_method: passthrough\nmodels:\n  - model: {model}\n"


def linear(first: Path, second: Path) -> str:
    return f"merge_method: linear\nmodels:\n  - model: {first}\n    parameters: {{weight: 0.5}}\n  - model: {second}\n    parameters: {{weight: 0.5}}\n"


def tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def one_paragraph_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, f"exit {result.returncode}:\n{result.stdout}\n{result.stderr}"
    text = result.stderr.strip()
    assert "Traceback" not in text and text.startswith("error: ") and all(line.strip() for line in text.splitlines()), (
        text
    )
    return " ".join(text.split())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("safety-models")
    return {
        name: save_tiny_model(root / name, layers=2, seed=number) for number, name in enumerate(("first", "second"))
    }


def code_project(folder: Path) -> Path:
    """A project of the user's that happens to hold a config.json: a git repository with sources."""
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "src").mkdir()
    (folder / "src" / "main.py").write_text("print('years of work')\n")
    (folder / "config.json").write_text('{"debug": true}\n')
    return folder


@pytest.fixture(scope="module")
def refusals(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("safety-cases")
    setups = {
        "force_onto_code_project": lambda f: (code_project(f / "project"), ["recipe.yml", "project", "--force"]),
        "demo_onto_a_model": lambda f: (save_tiny_model(f / "mine", layers=2), ["demo", "--out", "mine"]),
        "demo_forced_onto_a_model": lambda f: (
            save_tiny_model(f / "mine", layers=2),
            ["demo", "--out", "mine", "--force"],
        ),
        "output_key_absolute": lambda f: (
            f.joinpath("recipe.yml").write_text(passthrough(models["first"]) + f"output: {f / 'elsewhere'}\n"),
            ["recipe.yml"],
        ),
        "output_key_climbs_out": lambda f: (
            f.joinpath("recipe.yml").write_text(passthrough(models["first"]) + "output: ../../victim\n"),
            ["recipe.yml", "--force"],
        ),
        "out_inside_an_input": lambda f: (None, ["recipe.yml", models["first"] / "merged"]),
    }
    futures = {}
    with ThreadPoolExecutor(max_workers=len(setups)) as pool:
        for name, setup in setups.items():
            folder = root / name
            folder.mkdir()
            (folder / "recipe.yml").write_text(linear(models["first"], models["second"]))
            arguments = setup(folder)[1]
            futures[name] = (folder, tree(folder), pool.submit(run_cli, *arguments, cwd=folder))
        yield {name: (folder, before, future.result()) for name, (folder, before, future) in futures.items()}


def test_force_never_deletes_a_code_project_that_holds_a_config_json(refusals):
    folder, before, result = refusals["force_onto_code_project"]
    message = one_paragraph_error(result)
    assert "project" in message and "folders" in message and ".git" in message
    assert tree(folder) == before


@pytest.mark.parametrize("case", ["demo_onto_a_model", "demo_forced_onto_a_model"])
def test_the_demo_never_replaces_a_model_it_did_not_write(refusals, case):
    folder, before, result = refusals[case]
    message = one_paragraph_error(result)
    assert "mine" in message
    assert tree(folder) == before


@pytest.mark.parametrize("case", ["output_key_absolute", "output_key_climbs_out"])
def test_a_recipe_output_key_cannot_point_outside_the_recipe_folder(refusals, case):
    folder, before, result = refusals[case]
    message = one_paragraph_error(result)
    assert "outside the recipe's folder" in message and "recipe.yml" in message
    assert tree(folder) == before and not (folder / "elsewhere").exists()


def test_out_inside_an_input_model_is_refused(refusals, models):
    folder, before, result = refusals["out_inside_an_input"]
    message = one_paragraph_error(result)
    assert "inside" in message and str(models["first"]) in message
    assert not (models["first"] / "merged").exists() and not list(models["first"].glob(".merged*"))


def test_only_composer_outputs_or_empty_folders_are_replaced(tmp_path, models):
    from composer.execute.output_folder import foreign_contents

    out = tmp_path / "out"
    compose_text(passthrough(models["first"]), out, ExecutionOptions(progress=False))
    assert foreign_contents(out) is None
    (tmp_path / "empty").mkdir()
    assert foreign_contents(tmp_path / "empty") is None
    assert "no composer card" in foreign_contents(models["first"])  # a model composer did not write
    (out / "notes.txt").write_text("mine")
    assert "notes.txt" in foreign_contents(out)
    with pytest.raises(ComposerError, match="notes.txt"):
        compose_text(passthrough(models["second"]), out, ExecutionOptions(progress=False, force=True))
    assert (out / "notes.txt").read_text() == "mine"


def test_an_earlier_demo_output_is_recognised(tmp_path):
    from composer.demo import DEMO_NAME, DEMO_RECIPE, is_demo_output

    (tmp_path / "composer-recipe.yml").write_text(DEMO_RECIPE.format(model="x", name=DEMO_NAME))
    assert is_demo_output(tmp_path)
    (tmp_path / "composer-recipe.yml").write_text("name: another merge\n")
    assert not is_demo_output(tmp_path)


# --- interrupted swaps, signals, inputs that change, numbers that are not finite ------------------------


def test_an_old_output_left_aside_by_a_killed_swap_is_put_back_or_removed(tmp_path, models):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "out"
    compose_text(passthrough(models["first"]), out, ExecutionOptions(progress=False))
    aside = tmp_path / f".out.replaced-{dead.pid}"
    out.rename(aside)  # killed between its two renames: the old OUT is aside and OUT is missing
    expected = load_state(aside)
    compose_text(passthrough(models["second"]), tmp_path / "other", ExecutionOptions(progress=False))
    from composer.execute.output_folder import OutputFolder

    OutputFolder(out, force=True).discard()  # any run towards OUT repairs it first
    assert not aside.exists() and all(torch.equal(load_state(out)[k], v) for k, v in expected.items())
    (tmp_path / "other").rename(aside)  # and with OUT in place, the copy aside is only debris
    OutputFolder(out, force=True).discard()
    assert not aside.exists() and out.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_signal_during_the_final_swap_waits_and_then_says_the_output_is_complete(tmp_path, models, monkeypatch):
    from composer.execute import output_folder
    from composer.signals import Interrupted, stop_on_signals

    out = tmp_path / "out"
    compose_text(passthrough(models["first"]), out, ExecutionOptions(progress=False))
    real_remove = output_folder._remove

    def remove_after_a_signal(path):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the swap
        real_remove(path)

    monkeypatch.setattr(output_folder, "_remove", remove_after_a_signal)
    previous = stop_on_signals()
    try:
        with pytest.raises(Interrupted, match="just after the output was complete"):
            compose_text(passthrough(models["second"]), out, ExecutionOptions(progress=False, force=True))
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    second = load_state(models["second"])
    assert all(torch.equal(load_state(out)[name], tensor) for name, tensor in second.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


SLOW_FIRST_READ = (
    "import sys, time\n"
    "from composer.sources.folder import SafetensorsFolder\n"
    "real = SafetensorsFolder.read\n"
    "def slow(self, name):\n"
    "    print('reading', flush=True); time.sleep(5); return real(self, name)\n"
    "SafetensorsFolder.read = slow\n"
    "from composer.cli import main\n"
    "sys.argv = ['compose', 'recipe.yml', 'out', '--no-progress']\n"
    "main()\n"
)


def default_signal_actions() -> None:
    """In the child before it starts: a test run in the background (`pytest ... &`, `nohup`) has SIGINT and SIGHUP
    ignored, and children inherit ignored signals; a user's terminal gives compose the default actions."""
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_DFL)


@pytest.fixture(scope="module")
def signalled(models, tmp_path_factory) -> dict[str, tuple[Path, int, str]]:
    """A run per signal, each held inside its first read (a slow disk) so that the signal lands while the partial
    folder exists; the runs go at once."""
    runs = {}
    for name in ("SIGTERM", "SIGHUP", "SIGINT"):
        folder = tmp_path_factory.mktemp(name.lower())
        (folder / "recipe.yml").write_text(linear(models["first"], models["second"]))
        runs[name] = (
            folder,
            subprocess.Popen(
                [sys.executable, "-c", SLOW_FIRST_READ],
                cwd=folder,
                preexec_fn=default_signal_actions,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    results = {}
    for name, (folder, process) in runs.items():
        assert process.stdout.readline().strip() == "reading"
        assert list(folder.glob(".out.partial-*"))
        process.send_signal(getattr(signal, name))
    for name, (folder, process) in runs.items():
        results[name] = (folder, process.wait(timeout=120), process.stderr.read())
    return results


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_mid_run_leaves_nothing_behind(signalled, signal_name):
    folder, returncode, stderr = signalled[signal_name]
    assert returncode == 130 and "Traceback" not in stderr, stderr
    assert "no output was left behind" in " ".join(stderr.split())
    assert sorted(p.name for p in folder.iterdir()) == ["recipe.yml"]


def test_stop_signals_stop_the_run_until_a_stop_is_reported_and_an_ignored_one_stays_ignored():
    from composer.signals import ignore_stop_signals, signals_held, stop_on_signals

    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under `nohup`: logging out must not stop the run
    try:
        replaced = stop_on_signals()
        assert signal.SIGHUP not in replaced and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        for _ in range(2):  # one swallowed where Python ignores exceptions (a __del__) must not disarm the next
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            with signals_held():  # the clean-up of a run already stopping: a second Ctrl-C adds nothing
                os.kill(os.getpid(), signal.SIGINT)
            ignore_stop_signals()  # the stop is being reported: the process is on its way out
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert all(signal.getsignal(number) == signal.SIG_IGN for number in replaced)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


SECOND_CTRL_C_AT_EXIT = (
    "import os, signal, threading, time, typer\n"
    "from composer import cli\n"
    "def second():\n"
    "    time.sleep(0.2); os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2)\n"
    "def work():\n"
    "    threading.Thread(target=second).start()  # the second Ctrl-C lands while the process exits\n"
    "    os.kill(os.getpid(), signal.SIGINT); time.sleep(1)\n"
    "def run():\n"
    "    try:\n"
    "        cli._guarded(work)\n"
    "    except typer.Exit as stop:\n"
    "        return stop.exit_code\n"
    "cli._main = run\n"
    "cli.main()\n"
)


def test_a_second_ctrl_c_as_the_run_exits_keeps_its_exit_code():
    """Seen by bench/hostile.py (sigint_twice): the second Ctrl-C, 20 ms after the first, landed after the clean-up
    and its message, and the process ended by SIGINT (-2) instead of with 130; here, landing while the
    interpreter waits for a thread on its way out, it printed a traceback."""
    done = subprocess.run(
        [sys.executable, "-c", SECOND_CTRL_C_AT_EXIT],
        preexec_fn=default_signal_actions,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 130 and b"Traceback" not in done.stderr, done.stderr.decode()


def test_an_input_truncated_while_it_is_copied_is_an_error_naming_the_file(tmp_path, models, monkeypatch, capsys):
    """Seen as "Aborted." and nothing else: the end of the file came as an EOFError, which the CLI library
    takes for a closed terminal."""
    import shutil

    from composer import cli
    from composer.execute.writer import ShardedWriter

    source = Path(shutil.copytree(models["first"], tmp_path / "source"))
    (tmp_path / "recipe.yml").write_text(passthrough(source))
    real_copy = ShardedWriter.copy_range
    copies = []

    def truncate_then_copy(writer, name, path, offset, length):
        copies.append(name)
        if len(copies) == 3:
            os.truncate(path, offset)  # another program cuts the file short
        return real_copy(writer, name, path, offset, length)

    monkeypatch.setattr(ShardedWriter, "copy_range", truncate_then_copy)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["compose", "recipe.yml", "out", "--no-progress"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    message = " ".join(capsys.readouterr().err.split())
    assert exited.value.code == 2 and "Traceback" not in message and "Aborted" not in message
    assert (
        message.startswith("error: ")
        and "model.safetensors" in message
        and f"'{copies[2]}'" in message
        and "truncated" in message
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yml", "source"]


def test_an_internal_error_is_one_paragraph_that_asks_for_a_report(tmp_path, models, monkeypatch, capsys):
    from composer import cli
    from composer.methods import linear as linear_module

    def broken(*args, **kwargs):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(linear_module, "linear", broken)
    (tmp_path / "recipe.yml").write_text(linear(models["first"], models["second"]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["compose", "recipe.yml", "out", "--no-progress"])
    monkeypatch.delenv("COMPOSER_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    message = " ".join(capsys.readouterr().err.split())
    assert exited.value.code == 3 and "Traceback" not in message
    assert message.startswith("error: internal error: TypeError: unsupported operand") and "COMPOSER_DEBUG=1" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yml"]


def test_non_finite_values_are_warned_about_once_naming_the_tensors(tmp_path, models):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = Path(shutil.copytree(models["first"], tmp_path / "broken"))
    state = load_file(str(broken / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    state["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("inf")
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(ComposerWarning) as caught:
        report = compose_text(linear(broken, models["second"]), tmp_path / "out", ExecutionOptions(progress=False))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "2 output tensors hold NaN or infinite values" in message
    assert (
        "'model.layers.1.mlp.up_proj.weight' (from 'model.layers.1.mlp.up_proj.weight' of" in message
        and str(broken) in message
    )
    assert report.nonfinite == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]


def test_finite_outputs_give_no_warning(tmp_path, models, recwarn):
    compose_text(linear(models["first"], models["second"]), tmp_path / "out", ExecutionOptions(progress=False))
    assert not [w for w in recwarn if issubclass(w.category, ComposerWarning)]


def test_the_scan_sees_nan_and_both_infinities_in_every_float_dtype_and_sums_the_same_bytes_on_both_paths():
    from composer.native.checksum import numpy_scan
    from composer.native.scan import EXPONENTS, holds_nonfinite, scan

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        clean = torch.randn(10_001).to(dtype)
        assert not holds_nonfinite(clean)
        for bad in (float("nan"), float("inf"), float("-inf")):
            spoiled = clean.clone()
            spoiled[7777] = bad
            assert holds_nonfinite(spoiled), (dtype, bad)
    assert not holds_nonfinite(torch.arange(5)) and not holds_nonfinite(torch.empty(0))
    for size in (0, 1, 7, 4095, 4096, 4097, 100_003):  # partial words and blocks
        data = torch.randint(0, 256, (size,), dtype=torch.uint8)
        data[: size // 3] = 0x7F  # some exponent patterns of every width
        view = memoryview(data.numpy()).cast("B")
        for dtype in (torch.uint8, torch.bfloat16, torch.float32, torch.float64):
            assert scan(view, dtype) == numpy_scan(view, *EXPONENTS.get(dtype, (0, 0))), (size, dtype)


def test_the_checksum_of_pieces_is_the_checksum_of_the_whole():
    from composer.native.checksum import SCAN_BLOCK, checksum_of_pieces, checksum_text
    from composer.native.scan import scan

    data = torch.randint(0, 256, (5 * SCAN_BLOCK + 123,), dtype=torch.uint8).numpy()
    whole = memoryview(data).cast("B")
    first, second, _ = scan(whole, torch.uint8)
    cuts = [0, SCAN_BLOCK, 3 * SCAN_BLOCK, len(data)]
    assert checksum_of_pieces(whole[a:b] for a, b in zip(cuts, cuts[1:])) == checksum_text(first, second)
    changed = data.copy()
    changed[[2 * SCAN_BLOCK, 4 * SCAN_BLOCK]] = changed[[4 * SCAN_BLOCK, 2 * SCAN_BLOCK]]  # two blocks' bytes swapped
    assert (
        scan(memoryview(changed).cast("B"), torch.uint8)[:2] != (first, second)
        or data[2 * SCAN_BLOCK] == data[4 * SCAN_BLOCK]
    )


def test_a_stop_signal_that_lands_in_a_finaliser_is_sent_again_to_stop_the_run():
    """Seen by bench/hostile.py (sigint_moe_gates, 1 run in 6): Ctrl-C landed in a regex object's __del__ during a
    garbage collection; Python printed it as an ignored exception and the run went on to the end."""
    import time

    from composer.signals import stop_on_signals

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the signal arrives while the finaliser runs

    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    replaced = stop_on_signals()
    try:
        with pytest.raises(KeyboardInterrupt):
            Finalised()  # freed at once: its __del__ runs here
            time.sleep(2)  # the signal, sent again, stops this
    finally:
        for number, handler in replaced.items():
            signal.signal(number, handler)
        signal.signal(signal.SIGINT, previous)


def test_a_stop_signal_that_lands_in_an_import_waits_for_the_import_to_finish(tmp_path, monkeypatch):
    """Seen with a tiny merge (1 Ctrl-C in 5 in the half-second of torch's import): Ctrl-C landed in numpy's import,
    which torch runs from C++ and whose error it clears, so the run went on to the end (exit 0); or the import was
    cut halfway and a later one failed ("cannot load module more than once per process"). Held until the import is
    done, the signal then stops the run, with the module whole."""
    import time

    from composer.signals import stop_on_signals

    (tmp_path / "slow_module_for_signals.py").write_text(
        "import os, signal, time\n"
        "os.kill(os.getpid(), signal.SIGINT)  # the signal arrives while this module is imported\n"
        "time.sleep(0.2)\n"
        "whole = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    replaced = stop_on_signals()
    try:
        with pytest.raises(KeyboardInterrupt):
            import slow_module_for_signals  # noqa: F401

            time.sleep(2)  # the signal, sent again once the import is done, stops this
        assert sys.modules["slow_module_for_signals"].whole
    finally:
        sys.modules.pop("slow_module_for_signals", None)
        for number, handler in replaced.items():
            signal.signal(number, handler)
        signal.signal(signal.SIGINT, previous)


CTRL_C_AFTER_A_FINISHED_RUN = (
    "import os, signal, threading, time\n"
    "from composer import cli\n"
    "def late():\n"
    "    time.sleep(0.3); os.kill(os.getpid(), signal.SIGINT)  # lands while the interpreter shuts down\n"
    "def run():\n"
    "    threading.Thread(target=late).start()\n"
    "    return 0\n"
    "cli._main = run\n"
    "cli.main()\n"
)

CTRL_C_WHILE_THE_CLI_IMPORTS = (
    "import sys\n"
    "class Interrupting:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'composer.cli':\n"
    "            raise KeyboardInterrupt  # as a Ctrl-C in the first tenth of a second would\n"
    "sys.meta_path.insert(0, Interrupting())\n"
    "from composer.launch import main\n"
    "main()\n"
)


@pytest.mark.parametrize(
    "script, code, said",
    [
        (CTRL_C_AFTER_A_FINISHED_RUN, 0, ""),
        (CTRL_C_WHILE_THE_CLI_IMPORTS, 130, "error: interrupted while starting; nothing was written.\n"),
    ],
    ids=["after-a-finished-run", "while-the-cli-imports"],
)
def test_a_ctrl_c_at_either_end_of_the_process_is_no_traceback(script, code, said):
    """A Ctrl-C after the run finished, while the interpreter shuts down, left its exit code to the signal (-2, as if
    the run had failed); one while the CLI's modules import printed Python's traceback."""
    done = subprocess.run(
        [sys.executable, "-c", script], preexec_fn=default_signal_actions, capture_output=True, timeout=60
    )
    assert (done.returncode, done.stderr.decode()) == (code, said)
