"""The trace's prescan (composer.trace.prescan): the checksums it takes while torch is imported are the fingerprint
pass's own, it reads only the files a reference reads, it never waits on a pipe or trusts a file changed since, and
it stops when the trace does. And the work split over the trace's threads changes no result."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from composer.trace import fits
from composer.trace.fingerprints import fingerprint_model
from composer.trace.layout import open_traced
from composer.trace.prescan import Prescan, file_checksums, weight_files
from composer.trace.run import TraceOptions, trace_models
from helpers import reshard, save_fine_tune, save_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prescan")
    base = save_tiny_model(root / "base", layers=3, seed=0, dtype=torch.bfloat16)
    found = {"base": base, "a": save_fine_tune(base, root / "a", seed=1), "b": save_fine_tune(base, root / "b", seed=2)}
    sharded = root / "sharded"
    shutil.copytree(base, sharded)
    reshard(sharded, 3)
    found["sharded"] = sharded
    return found


def prints_of(reference: str, prescan: Prescan | None, budget: int = 1 << 30):
    model = open_traced(reference, "SUSPECT")
    try:
        return fingerprint_model(model, budget, None, prescan)
    finally:
        model.close()


def same_prints(first, second) -> bool:
    return first.keys() == second.keys() and all(
        first[n].digest == second[n].digest
        and (first[n].sketch is None) == (second[n].sketch is None)
        and (first[n].sketch is None or torch.equal(first[n].sketch, second[n].sketch))
        for n in first
    )


@pytest.mark.parametrize("which", ["base", "sharded", "file"])
def test_prescanned_prints_are_the_full_pass_prints(models, which):
    reference = str(models["base"] / "model.safetensors") if which == "file" else str(models[which])
    prescan = Prescan([reference])
    try:
        model = open_traced(reference, "SUSPECT")
        try:  # every tensor is served by the prescan, so the pass below reads only sketched rows
            assert all(prescan.checksum(*model.reader.stored_range(name)) for name in model.infos)
        finally:
            model.close()
        assert same_prints(prints_of(reference, prescan), prints_of(reference, None))
        assert same_prints(prints_of(reference, prescan), prints_of(reference, None, budget=16 << 10))
    finally:
        prescan.close()
    assert len(weight_files(reference)) == (3 if which == "sharded" else 1)


def test_the_prescan_reads_only_what_a_reference_reads(models, tmp_path):
    assert weight_files(str(tmp_path / "missing")) == []
    assert weight_files("HuggingFaceTB/SmolLM2-135M-Instruct") == []
    assert weight_files(f"{models['base']}+{models['a']}") == []
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert weight_files(str(gguf)) == []
    escaping = tmp_path / "escaping"
    escaping.mkdir()
    (escaping / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "../elsewhere.safetensors", "y": "model-1.safetensors", "z": 3}})
    )
    (escaping / "stray.safetensors").write_bytes(b"")  # not named by the index: not read
    assert weight_files(str(escaping)) == [escaping / "model-1.safetensors"]


def test_a_hub_id_already_in_the_hub_cache_is_prescanned_from_its_snapshot(models, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from composer.trace.prescan import hub_snapshot

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repository = tmp_path / "models--org--name"
    (repository / "refs").mkdir(parents=True)
    (repository / "refs" / "main").write_text("abc123")
    snapshot = repository / "snapshots" / "abc123"
    shutil.copytree(models["sharded"], snapshot)
    assert hub_snapshot("org/name") == snapshot and hub_snapshot("org/name@abc123") == snapshot
    assert weight_files("org/name") == weight_files(str(snapshot)) and len(weight_files("org/name")) == 3
    for elsewhere in ("org/other", "org/name@v2", "org/../name", "org/name@..", "a/b/c", "org/name+x/y"):
        assert weight_files(elsewhere) == [], elsewhere  # never the hub: not in the cache is not prescanned
    for ref, served in (("abc123", True), ("../../escape", False)):
        (repository / "refs" / "main").write_text(ref)
        prescan = Prescan(["org/name"])
        try:
            assert same_prints(prints_of(str(snapshot), prescan), prints_of(str(snapshot), None))
            model = open_traced(str(snapshot), "SUSPECT")
            try:  # a ref naming no snapshot: nothing prescanned, and the pass read everything itself
                found = [prescan.checksum(*model.reader.stored_range(name)) for name in model.infos]
                assert all(found) if served else not any(found)
            finally:
                model.close()
        finally:
            prescan.close()


def write_safetensors_header(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_files_the_prescan_cannot_vouch_for_are_left_to_the_pass(tmp_path):
    stopping = threading.Event()
    pipe = tmp_path / "pipe.safetensors"
    os.mkfifo(pipe)  # never opened for writing: a read would wait for ever
    assert file_checksums(pipe, stopping) is None
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 5) + b"{oops")
    assert file_checksums(garbage, stopping) is None
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    assert file_checksums(huge, stopping) is None
    entry = {"dtype": "F32", "shape": [4]}
    overlapping = tmp_path / "overlapping.safetensors"
    header = {"a": entry | {"data_offsets": [0, 16]}, "b": entry | {"data_offsets": [8, 24]}}
    write_safetensors_header(overlapping, header, bytes(24))
    assert file_checksums(overlapping, stopping) is None
    outside = tmp_path / "outside.safetensors"
    write_safetensors_header(outside, {"a": entry | {"data_offsets": [0, 1 << 30]}}, bytes(16))
    assert file_checksums(outside, stopping) is None
    boolean = tmp_path / "boolean.safetensors"
    write_safetensors_header(boolean, {"a": entry | {"data_offsets": [False, 16]}}, bytes(16))
    assert file_checksums(boolean, stopping) is None
    good = tmp_path / "good.safetensors"
    write_safetensors_header(
        good, {"__metadata__": {"format": "pt"}, "a": entry | {"data_offsets": [0, 16]}}, bytes(16)
    )
    found = file_checksums(good, stopping)
    (length,) = struct.unpack("<Q", good.read_bytes()[:8])
    assert found is not None and list(found.checksums) == [(8 + length, 16)]
    prescan = Prescan([str(pipe), str(garbage), str(good)])  # finishes: it never waits on the pipe
    prescan.close()
    assert prescan.checksum(pipe, 8, 16) is None and prescan.checksum(tmp_path / "unknown.safetensors", 8, 16) is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's end, simulated
def test_an_unforeseen_failure_in_the_prescan_leaves_the_files_to_the_pass(models, monkeypatch):
    import composer.trace.prescan as prescan_module

    def failing(path, stopping):
        if path.name == "model.safetensors":
            raise SystemExit  # ends the thread at its first file, before the sharded model's
        raise TypeError("unforeseen")

    monkeypatch.setattr(prescan_module, "file_checksums", failing)
    finding = prescan_module.weight_files
    monkeypatch.setattr(  # finding the files fails for one reference, on the prescan's thread
        prescan_module, "weight_files", lambda reference: finding(reference) if reference != "odd" else 1 / 0
    )
    prescan = Prescan(["odd", str(models["a"]), str(models["sharded"])])
    try:  # no wait for ever on a file the thread did not get to, and the prints are the full pass's
        assert same_prints(prints_of(str(models["sharded"]), prescan), prints_of(str(models["sharded"]), None))
    finally:
        prescan.close()


def test_a_file_changed_after_the_prescan_is_read_again(models, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(models["a"], folder)
    prescan = Prescan([str(folder)])
    try:
        before = prints_of(str(folder), prescan)
        model = open_traced(str(folder), "SUSPECT")
        try:
            name = next(n for n in model.infos if n.endswith("q_proj.weight"))
            path, offset, _ = model.reader.stored_range(name)
        finally:
            model.close()
        with open(path, "r+b") as handle:  # one byte of one tensor, in place: same size, new modification time
            handle.seek(offset)
            first = handle.read(1)
            handle.seek(offset)
            handle.write(bytes([first[0] ^ 1]))
        stat = os.stat(path)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        after = prints_of(str(folder), prescan)
        assert after[name].digest != before[name].digest
        assert same_prints(after, prints_of(str(folder), None))
    finally:
        prescan.close()


def test_a_closed_prescan_stops_and_a_failed_trace_closes_its_own(models, monkeypatch):
    prescan = Prescan([str(models["a"]), str(models["b"])])
    prescan.close()
    assert not [thread for thread in threading.enumerate() if thread.name == "composer-prescan"]
    started = []
    original = Prescan.close

    def recording(self):
        started.append(self)
        original(self)

    monkeypatch.setattr(Prescan, "close", recording)
    from composer.errors import ComposerError

    given = Prescan([str(models["a"])])
    with pytest.raises(ComposerError, match="at least one candidate"):
        trace_models(str(models["a"]), [], TraceOptions(), prescan=given)
    assert started == [given]


def test_the_prescan_and_the_checksums_need_no_torch():
    code = "import sys, composer.trace.prescan, composer.native.checksum; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_threads_change_no_result(models, monkeypatch):
    """Fingerprints and fits split over the trace's workers give the report one worker gives."""
    import composer.trace.run as run

    merged = models["a"].parent / "merged"
    if not merged.exists():
        from composer.compose import compose_text
        from composer.execute import ExecutionOptions

        recipe = (
            f"merge_method: linear\nmodels:\n  - {{model: {models['a']}, parameters: {{weight: 0.4}}}}\n"
            f"  - {{model: {models['b']}, parameters: {{weight: 0.6}}}}\ndtype: bfloat16\n"
        )
        compose_text(recipe, merged, ExecutionOptions(progress=False))
    candidates = [str(models["a"]), str(models["b"]), str(models["base"])]
    reports = []
    for workers in (1, 2):
        monkeypatch.setattr(run, "WORKERS", workers)
        reports.append(trace_models(str(merged), candidates, TraceOptions(tokenizers=False)))
    first, second = reports
    assert first.recipe == second.recipe and first.method == second.method
    assert [(c.model, c.verdict, c.p_value, c.contribution) for c in first.candidates] == [
        (c.model, c.verdict, c.p_value, c.contribution) for c in second.candidates
    ]
    assert [(t.name, t.method, t.weights, t.relative_error) for layer in first.layers for t in layer.tensors] == [
        (t.name, t.method, t.weights, t.relative_error) for layer in second.layers for t in layer.tensors
    ]


def masked_zero_can_count(tau, y_delta, step) -> bool:
    """The bound as first written, picking entries out with masks (the reference for the `where` form)."""
    zeros = (y_delta == 0) & (tau != 0)
    if not bool(zeros.any()):
        return False
    widest = float((tau[zeros].abs() / step[zeros]).max())
    large = (tau.abs() >= 4 * step) & (y_delta != 0)
    if int(large.sum()) < fits.SLACK_ENTRIES:
        return False
    bound = float((y_delta[large] / tau[large]).abs().topk(fits.SLACK_ENTRIES).values[-1]) + fits.SLACK_BOUND + 2e-3
    return bound * widest * (1 + 1e-3) >= fits.MIN_MARGIN


def test_the_zero_bound_with_where_is_the_masked_bound():
    generator = torch.Generator().manual_seed(0)
    answers = set()
    for case in range(60):
        size = 4096
        base = torch.randn(size, generator=generator).to(torch.bfloat16).float()
        tau = (torch.randn(size, generator=generator) * 10 ** (-1 - case % 3)).to(torch.bfloat16).float()
        kept = torch.rand(size, generator=generator) < (case % 5) / 4
        coefficient = 0.2 + 0.8 * float(torch.rand(1, generator=generator))
        y = (base + coefficient * tau * kept).to(torch.bfloat16).float()
        if case % 7 == 0:
            tau[:3] = 0.0
        if case % 11 == 0:
            tau[5] = float("nan")
        y_delta = y - base
        step = fits.rounding_steps(base, torch.bfloat16)
        expected = masked_zero_can_count(tau, y_delta, step)
        assert fits.zero_can_count(tau, y_delta, step) == expected, case
        answers.add(expected)
    assert answers == {True, False}


class RecordingBar:
    """A stand-in for tqdm that records what the trace tells it (from several threads)."""

    def __init__(self):
        self.total = None
        self.done = 0
        self.updates = 0

    def reset(self, total):
        self.total, self.done = total, 0

    def update(self, count):
        self.done += count
        self.updates += 1


def test_the_progress_counts_every_models_bytes_then_suspects_fits(models, monkeypatch, capsys):
    from helpers import compose_in_process

    bar = RecordingBar()
    candidates = [str(models["a"]), str(models["base"])]
    trace_models(str(models["b"]), candidates, TraceOptions(tokenizers=False), progress=bar)
    sizes = {}
    for reference in [str(models["b"]), *candidates]:
        model = open_traced(reference, "candidate")
        try:
            sizes[reference] = sum(info.nbytes for info in model.infos.values())
        finally:
            model.close()
    tensors = len(open_source_names(models["b"]))
    assert bar.total == sum(sizes.values()) + sizes[str(models["b"])] and bar.done == bar.total
    assert bar.updates == 3 * tensors + tensors  # each model's tensors fingerprinted, then SUSPECT's fitted
    capsys.readouterr()
    code = compose_in_process(monkeypatch, "trace", models["b"], "--candidates", *candidates, "--no-progress")
    output = capsys.readouterr()
    assert code == 0 and "parent" in output.out and "trace" not in output.err


def open_source_names(folder: Path) -> list[str]:
    model = open_traced(str(folder), "SUSPECT")
    try:
        return list(model.infos)
    finally:
        model.close()
