"""The executor: every input read once, a memory budget that bounds what is kept, shards, atomic output."""

import os
from pathlib import Path

import pytest
import torch

from composer.compose import compose_text
from composer.execute import ExecutionOptions
from composer.plan import build_plan
from composer.plan.schedule import make_schedule
from composer.recipe import parse_recipe
from helpers import load_state, logits_of, save_tiny_model

UPSCALE = """merge_method: passthrough
slices:
  - sources:
      - model: {model}
        layer_range: [0, 4]
  - sources:
      - model: {model}
        layer_range: [2, 6]
"""
SOURCE_LAYER = [0, 1, 2, 3, 2, 3, 4, 5]


def _layer(state: dict, index: int) -> dict:
    prefix = f"model.layers.{index}."
    return {name[len(prefix) :]: tensor for name, tensor in state.items() if name.startswith(prefix)}


def test_upscale_reads_each_input_tensor_once(tmp_path: Path):
    source = save_tiny_model(tmp_path / "src", layers=6)
    report = compose_text(UPSCALE.format(model=source), tmp_path / "out", ExecutionOptions(copy_files=False))
    assert report.reads and max(report.reads.values()) == 1
    assert len(report.reads) == len(load_state(source))  # every source tensor used (tied head absent)


@pytest.mark.parametrize("overlap", [True, False])
def test_unchanged_tensors_go_file_to_file_with_the_same_bytes(tmp_path: Path, overlap: bool, monkeypatch):
    """An upscale's tensors are its input's bytes: copied from file to file, never read into memory, the
    same output as read and written; and the same where the system cannot copy between the files (that
    run also flushed to the disk, as --fsync does)."""
    source = save_tiny_model(tmp_path / "src", layers=6)
    read = compose_text(
        UPSCALE.format(model=source), tmp_path / "read", ExecutionOptions(progress=False, copy_files=False)
    )
    copied = compose_text(
        UPSCALE.format(model=source), tmp_path / "copied", ExecutionOptions(progress=False, overlap=overlap)
    )
    assert read.reads and not copied.reads
    assert copied.bytes_read == copied.bytes_written  # each output's bytes, copied from its input (shared layers twice)
    if hasattr(os, "copy_file_range"):

        def refuse(*arguments):
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    compose_text(
        UPSCALE.format(model=source),
        tmp_path / "buffered",
        ExecutionOptions(progress=False, overlap=overlap, durable=True),
    )
    for shard in (tmp_path / "read").glob("*.safetensors"):
        assert (
            shard.read_bytes()
            == (tmp_path / "copied" / shard.name).read_bytes()
            == (tmp_path / "buffered" / shard.name).read_bytes()
        )


@pytest.mark.parametrize("overlap", [True, False])
def test_copies_never_go_to_the_device(tmp_path: Path, overlap: bool):
    """An upscale with the device set to torch's meta device (which holds no data, so any tensor sent there
    and back would fail to write): copies run on the CPU where they were read, the same bytes as on the CPU."""
    source = save_tiny_model(tmp_path / "src", layers=6)
    compose_text(UPSCALE.format(model=source), tmp_path / "cpu", ExecutionOptions(progress=False))
    compose_text(
        UPSCALE.format(model=source),
        tmp_path / "meta",
        ExecutionOptions(progress=False, device="meta", overlap=overlap),
    )
    for shard in (tmp_path / "cpu").glob("*.safetensors"):
        assert shard.read_bytes() == (tmp_path / "meta" / shard.name).read_bytes()


def test_tiny_memory_budget_still_gives_exact_layers(tmp_path: Path):
    source = save_tiny_model(tmp_path / "src", layers=6)
    report = compose_text(
        UPSCALE.format(model=source), tmp_path / "out", ExecutionOptions(memory_budget=1, copy_files=False)
    )
    assert max(report.reads.values()) == 2  # nothing can be kept, so shared layers are read again
    source_state, out_state = load_state(source), load_state(tmp_path / "out")
    for index, source_index in enumerate(SOURCE_LAYER):
        expected, got = _layer(source_state, source_index), _layer(out_state, index)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_predicted_peak_respects_budget_and_shared_inputs_run_back_to_back(tmp_path: Path):
    source = save_tiny_model(tmp_path / "src", layers=6)
    text = UPSCALE.format(model=source)
    plan = build_plan(parse_recipe(text), text)
    unbounded = make_schedule(plan)
    bounded = make_schedule(plan, memory_budget=unbounded.largest_step_bytes)
    assert bounded.peak_bytes <= unbounded.peak_bytes
    assert unbounded.largest_step_bytes <= unbounded.peak_bytes
    order = [t.name for t in unbounded.order]
    # output layers 2 and 4 read the same source layer, so they are computed one after the other
    first = order.index("model.layers.2.mlp.up_proj.weight")
    assert order[first + 1] == "model.layers.4.mlp.up_proj.weight"


def test_small_shards_get_an_index_and_load(tmp_path: Path):
    source = save_tiny_model(tmp_path / "src", layers=4)
    recipe = f"merge_method: passthrough\nmodels:\n  - model: {source}\n"
    compose_text(recipe, tmp_path / "out", ExecutionOptions(shard_size=40_000))
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 2
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert torch.equal(logits_of(source), logits_of(tmp_path / "out"))


def test_output_folder_has_card_recipe_and_config(tmp_path: Path):
    source = save_tiny_model(tmp_path / "src", layers=6)
    text = UPSCALE.format(model=source)
    compose_text(text, tmp_path / "out", ExecutionOptions())
    out = tmp_path / "out"
    card = (out / "README.md").read_text()
    assert str(source) in card and "passthrough" in card and "layer_range: [2, 6]" in card
    assert (out / "composer-recipe.yml").read_text() == text
    assert '"num_hidden_layers": 8' in (out / "config.json").read_text()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_an_error_inside_a_method_names_the_output_tensor_and_leaves_nothing(tmp_path: Path, monkeypatch):
    import pytest

    from composer.errors import ComposerError
    from composer.methods import METHODS, MergeMethod, Parameter, register

    def fail(tensors, base, params):
        raise ComposerError("the directions cancel")

    monkeypatch.setitem(METHODS, "failing", METHODS["linear"])
    register(MergeMethod(name="failing", apply=fail, parameters=(Parameter("weight", default=1.0, per_model=True),)))
    source = save_tiny_model(tmp_path / "src", layers=2)
    with pytest.raises(ComposerError, match=r"Output tensor '\S+' \(failing\): the directions cancel"):
        compose_text(f"merge_method: failing\nmodels:\n  - model: {source}\n", tmp_path / "out", ExecutionOptions())
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("readers", [1, 3])
def test_overlapped_path_writes_the_same_bytes_as_one_thing_at_a_time(tmp_path: Path, readers: int):
    """Read-ahead (by one thread or several) and background writes change when things happen, never what is written."""
    models = {
        name: save_tiny_model(tmp_path / name, layers=6, seed=number) for number, name in enumerate(("base", "a", "b"))
    }
    recipe = f"""merge_method: dare_ties
base_model: {models['base']}
slices:
  - sources:
      - {{model: {models['base']}, layer_range: [0, 4]}}
      - {{model: {models['a']}, layer_range: [0, 4], parameters: {{weight: 0.6, density: 0.5}}}}
      - {{model: {models['b']}, layer_range: [0, 4], parameters: {{weight: 0.4, density: 0.7}}}}
  - sources:
      - {{model: {models['base']}, layer_range: [2, 6]}}
      - {{model: {models['a']}, layer_range: [2, 6], parameters: {{weight: 0.6, density: 0.5}}}}
      - {{model: {models['b']}, layer_range: [2, 6], parameters: {{weight: 0.4, density: 0.7}}}}
dtype: bfloat16
random_seed: 3
"""
    simple = compose_text(
        recipe, tmp_path / "simple", ExecutionOptions(overlap=False, shard_size=100_000, durable=True)
    )  # fsynced
    fast = compose_text(recipe, tmp_path / "fast", ExecutionOptions(overlap=True, shard_size=100_000, readers=readers))
    assert fast.reads == simple.reads and max(fast.reads.values()) == 1
    files = sorted(p.name for p in (tmp_path / "simple").iterdir())
    assert (
        files == sorted(p.name for p in (tmp_path / "fast").iterdir())
        and len([f for f in files if f.endswith(".safetensors")]) > 1
    )
    for name in files:
        assert (tmp_path / "simple" / name).read_bytes() == (tmp_path / "fast" / name).read_bytes(), name


def test_a_failing_operation_stops_the_threads_and_leaves_nothing(tmp_path: Path, monkeypatch):
    from composer.methods import linear as linear_module

    source = save_tiny_model(tmp_path / "src", layers=2)
    calls = []

    def failing_linear(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    real = linear_module.linear
    monkeypatch.setattr(linear_module, "linear", failing_linear)
    recipe = f"merge_method: linear\nmodels:\n  - model: {source}\n    parameters: {{weight: 1.0}}\n"
    with pytest.raises(RuntimeError, match="boom"):
        compose_text(recipe, tmp_path / "out", ExecutionOptions())
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_the_partial_folder_of_a_killed_run_is_cleared_by_the_next_run(tmp_path: Path):
    """A partial folder nobody holds the lock on belongs to a dead run (whatever its name says); one whose lock a
    live process holds is another run at work and is left alone."""
    import subprocess
    import sys

    source = save_tiny_model(tmp_path / "src", layers=2)
    abandoned = tmp_path / ".out.partial-999999999"
    abandoned.mkdir()
    (abandoned / "model.safetensors").write_bytes(b"half written")
    alive = tmp_path / ".out.partial-1"
    alive.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; d = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(d, fcntl.LOCK_EX); print(1, flush=True); sys.stdin.read()",
            str(alive),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "1"  # the lock is held
        compose_text(f"merge_method: passthrough\nmodels:\n  - model: {source}\n", tmp_path / "out", ExecutionOptions())
    finally:
        holder.communicate("")
    assert not abandoned.exists() and alive.exists() and (tmp_path / "out" / "config.json").is_file()


def test_whole_tensor_methods_declare_their_temporaries_to_the_schedule(tmp_path: Path):
    """A method that holds several tensor-sized buffers says so, and the step estimate that sizes the
    input cache grows with it: karcher over three models holds six, linear (chunked) the default two."""
    from composer.plan.schedule import step_bytes

    models = [save_tiny_model(tmp_path / f"m{i}", layers=2, seed=i) for i in range(3)]
    listed = "".join(f"  - model: {model}\n" for model in models)
    steps = {}
    for method in ("karcher", "linear"):
        text = (
            f"merge_method: {method}\nmodels:\n{listed}"
            + ("parameters: {weight: 1.0}\n" if method == "linear" else "")
            + "dtype: float32\n"
        )
        plan = build_plan(parse_recipe(text), text)
        tensor = next(t for t in plan.tensors if t.name.endswith("mlp.up_proj.weight"))
        steps[method] = (tensor.operation.temporaries, step_bytes(plan, tensor), tensor.nbytes)
    assert steps["karcher"][0] == 6 and steps["linear"][0] == 2
    assert steps["karcher"][1] - steps["linear"][1] == 4 * steps["karcher"][2]


def chained_plan(source: Path, ran: list[int], fail_at: int | None = None):
    """Each layer's up projection plus one for every chain step run so far (state the steps hand on), beside plain copies
    of the down projections. Twelve layers: the file's order (layers.10 before layers.2) is not the chain's."""
    from composer.plan.model import COPY, Chain, Operation, Plan, PlannedTensor, TensorRef
    from composer.sources import open_source

    model = open_source(str(source))
    chain = Chain(label="counting", state_bytes=1000)

    def step(link: int, inputs: list[torch.Tensor]) -> torch.Tensor:
        if link == fail_at:
            raise OSError("the disk went away")
        ran.append(link)
        return inputs[0] + len(ran)

    tensors = []
    for layer in range(12):
        for role, operation in (
            ("up", Operation(label="count", fn=lambda inputs, link=layer: step(link, inputs), chain=chain, link=layer)),
            ("down", COPY),
        ):
            info = model.tensor_infos()[f"model.layers.{layer}.mlp.{role}_proj.weight"]
            tensors.append(PlannedTensor(info.name, info.shape, info.dtype, (TensorRef("m", info.name),), operation))
    return Plan(
        tensors=tensors,
        sources={"m": model},
        config={},
        tokenizer_source=None,
        recipe_text="chain",
        method="test",
        parents=[],
    )


def test_a_chain_runs_in_its_order_holds_its_state_and_is_redone_whole_on_resume(tmp_path: Path):
    from composer.execute.executor import execute

    source = save_tiny_model(tmp_path / "src", layers=12)
    plan = chained_plan(source, [])
    schedule = make_schedule(plan)
    links = [t.operation.link for t in schedule.order if t.operation.chain is not None]
    assert links == list(range(12)) and schedule.carried_bytes == 1000
    assert schedule.peak_bytes >= 1000 + max(t.nbytes for t in plan.tensors)

    ran: list[int] = []
    execute(chained_plan(source, ran), tmp_path / "whole", ExecutionOptions(progress=False))
    assert ran == list(range(12))
    with pytest.raises(OSError):
        execute(
            chained_plan(source, [], fail_at=7), tmp_path / "out", ExecutionOptions(progress=False, keep_partial=True)
        )
    ran.clear()
    report = execute(chained_plan(source, ran), tmp_path / "out", ExecutionOptions(progress=False))
    assert (
        ran == list(range(12)) and report.resumed > 0
    )  # the copies were kept, the chain's seven finished steps done again
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        tmp_path / "whole" / "model.safetensors"
    ).read_bytes()
