"""`compose RECIPE [OUT]` and its sibling commands. Heavy libraries load only inside the commands."""

from __future__ import annotations

import atexit
import gc
import os
import sys
from pathlib import Path
from typing import Optional

import typer

# Before torch loads OpenMP: its threads otherwise spin for a while after every operation, taking
# the cores that the C kernels' threads and the reader and writer threads need (dare_ties on 2 cores:
# 7.7 s of writing against 8.5-10.7 s). A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(
    add_completion=False,
    help="Build new language models out of existing ones, with no training.\n\n"
    "compose RECIPE.yml [OUT] runs a recipe; the commands below inspect, evaluate and demonstrate.",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

COMMANDS = {
    "run",
    "plan",
    "check",
    "eval",
    "demo",
    "extract-lora",
    "extract-expert",
    "route",
    "transplant",
    "trace",
    "tune",
    "export",
}


VALUE_OPTIONS = {
    "--memory-budget",
    "--device",
    "--readers",
    "--shard-size",
    "--limit",
    "--text",
    "--out",
    "--prompts",
    "--png",
    "--tokenizer",
    "--estimator",
    "--k",
    "--pad-to-multiple-of",
    "--base",
    "--rank",
    "--modules",
    "--candidates",
    "--json",
    "--heldout",
    "--trials",
    "--minutes",
    "--optimizer",
    "--seed",
    "--expert",
    "--gguf",
    "--type",
    "--ray",
    "--ray-input-on",
    "--ray-local-disk",
}


def _size(text: str, option: str = "--memory-budget") -> int:
    """'2GB', '512MiB', '1.5g', '1000' -> bytes."""
    from composer.errors import ComposerError

    units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    cleaned = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        value = float(cleaned[:-1]) * units[cleaned[-1]] if cleaned and cleaned[-1] in units else float(cleaned)
    except ValueError:
        raise ComposerError(f"{option} '{text}' is not a size; write it like 2GB, 512MB or 1000000 (bytes).") from None
    if not value > 0 or value == float("inf"):
        raise ComposerError(f"{option} '{text}' must be a positive size, like 2GB or 512MB.")
    return int(value)


def _writing_options(memory_budget: str, shard_size: str, force: bool, progress: bool, ray: str | None = None):
    """ExecutionOptions for a command that writes a model (the budget bounding the whole process, or each worker's
    on a Ray cluster)."""
    budget, shard = _size(memory_budget), _size(shard_size, "--shard-size")
    from composer.execute import ExecutionOptions

    return ExecutionOptions(
        memory_budget=budget,
        whole_process=True,
        shard_size=shard,
        force=force,
        progress=None if progress else False,
        ray=ray,
    )


RAY_HELP = (
    "Compute the tensors on a Ray cluster (pip install 'composer-merge[ray]'): --ray alone starts a local instance, "
    "--ray HOST:PORT (or auto) joins a running cluster. OUT and the inputs must be on storage every node mounts."
)


def with_ray_address(arguments: list[str]) -> list[str]:
    """`--ray` with no address after it (the end, another option, or a word that is no address, such as OUT) is
    `--ray=local`: a local Ray instance."""
    from composer.cluster_address import looks_like_address

    rewritten = []
    for index, argument in enumerate(arguments):
        following = arguments[index + 1] if index + 1 < len(arguments) else None
        if argument == "--ray" and (following is None or not looks_like_address(following)):
            argument = "--ray=local"
        rewritten.append(argument)
    return rewritten


def _cluster_words(report) -> str:
    """' on 2 Ray nodes (12 units, 1 tried again)' for a run on a cluster; '' for one on this machine."""
    if not report.units:
        return ""
    nodes = len(report.nodes)
    retried = f", {report.retried} tried again" if report.retried else ""
    return f" on {nodes} Ray node{'s' if nodes != 1 else ''} ({len(report.units)} units{retried})"


def _device(name: str) -> str:
    import re

    from composer.errors import ComposerError

    if not re.fullmatch(r"(cpu|cuda|mps|xpu)(:\d+)?", name.strip()):
        raise ComposerError(f"--device '{name}' is not a device composer can use; use cpu, cuda or cuda:N.")
    kind, _, index = name.strip().partition(":")
    if kind != "cpu":  # torch loads only for another device: a run on the CPU reports its recipe's mistakes sooner
        import torch

        backend = getattr(torch, kind, None) if kind != "mps" else getattr(torch.backends, "mps", None)
        count = 0
        if backend is not None and backend.is_available():
            count = backend.device_count() if hasattr(backend, "device_count") else 1
        if count == 0:
            raise ComposerError(
                f"--device {name.strip()} was asked for, but torch {torch.__version__} sees no {kind} device on this machine; use --device cpu."
            )
        if index and int(index) >= count:
            raise ComposerError(f"--device {name.strip()}: this machine has {count} {kind} device(s), numbered from 0.")
    return name.strip()


def _paragraph(message: str) -> str:
    import textwrap

    # one paragraph; never split a path or a name in the middle
    return "\n".join(textwrap.wrap(f"error: {message}", width=100, break_long_words=False, break_on_hyphens=False))


def _fail(message: str, code: int = 2) -> None:
    typer.echo(_paragraph(message), err=True)
    raise typer.Exit(code=code)


OUT_OF_MEMORY = "composer ran out of memory; lower --memory-budget or free memory, and check that the inputs are what they claim to be."


def _guarded(action):
    from composer.errors import ComposerError
    from composer.signals import Interrupted, ignore_stop_signals

    try:
        return action()
    except ComposerError as error:
        _fail(str(error))
    except Interrupted as error:
        ignore_stop_signals()
        _fail(f"{error}", code=130)
    except KeyboardInterrupt:
        ignore_stop_signals()
        _fail("interrupted before anything was written.", code=130)
    except OSError as error:  # disk full, permission denied, ...: the user's to fix, so no traceback
        where = f"{error.filename}: " if error.filename else ""
        _fail(f"{where}{error.strerror or error}.")
    except RecursionError:
        _fail("the input is nested too deeply to be read (a recipe, config or header built to exhaust the parser).")
    except MemoryError:
        _fail(OUT_OF_MEMORY)
    except Exception as error:  # a bug: one paragraph, the traceback only when asked for
        if os.environ.get("COMPOSER_DEBUG"):
            raise
        if isinstance(error, RuntimeError) and "can't allocate memory" in str(
            error
        ):  # torch's allocator refusing a size
            _fail(OUT_OF_MEMORY)
        where = _innermost_frame(error)
        _fail(
            f"internal error: {type(error).__name__}: {error} (at {where}). This is a bug in composer; please report it with the "
            "command that caused it. Set COMPOSER_DEBUG=1 to see the full traceback.",
            code=3,
        )


def _innermost_frame(error: BaseException) -> str:
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "unknown place"


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML (native or a mergekit config)."),
    out: Optional[Path] = typer.Argument(None, help="Output folder (default: the recipe's 'output:' key)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    memory_budget: str = typer.Option(
        "1GB",
        "--memory-budget",
        help="Most memory the process holds, e.g. 1GB, 8GB (never less than one tensor's inputs and result).",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest output shard."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on a terminal."),
    seed: Optional[int] = typer.Option(
        None, "--seed", help="Seed for random methods (DARE, DELLA, ...); overrides the recipe's random_seed."
    ),
    fsync: bool = typer.Option(
        False,
        "--fsync",
        help="Flush the output to the disk before it appears (survives a power loss; waits for the disk).",
    ),
    readers: Optional[int] = typer.Option(
        None, "--readers", min=1, help="Threads reading inputs ahead (default: one per four cores, at most four)."
    ),
    resume: Optional[bool] = typer.Option(
        None,
        "--resume/--no-resume",
        help="Continue a run that was killed (default: whenever its partial output matches this recipe and these inputs); --no-resume starts over.",
    ),
    keep_partial: bool = typer.Option(
        False,
        "--keep-partial",
        help="If the run is interrupted or fails, keep its finished tensors for a later run to resume.",
    ),
    gguf: Optional[str] = typer.Option(
        None, "--gguf", help="Also write the model as OUT.gguf, beside OUT, for llama.cpp: f16, bf16 or q8_0."
    ),
    ray: Optional[str] = typer.Option(None, "--ray", help=RAY_HELP),
    ray_input_on: Optional[list[str]] = typer.Option(
        None,
        "--ray-input-on",
        help="With --ray: MODEL=NAME says that MODEL is only on the nodes started with the Ray label or custom "
        "resource NAME; units reading it run there, and the other nodes never read it. Once per model.",
    ),
    ray_local_disk: Optional[str] = typer.Option(
        None,
        "--ray-local-disk",
        help="With --ray: a folder on each node's own disk; a node that cannot reach OUT writes its units there and "
        "the driver gathers them into OUT.",
    ),
    as_lora: bool = typer.Option(
        False, "--as-lora", help="For a knots merge: write the merged LoRA adapter (PEFT) instead of the merged model."
    ),
) -> None:
    """Run a recipe and write the model into OUT."""

    def action():
        from composer.recipe_files import check_recipe_file

        # mistakes in the options and the recipe are reported before torch and transformers load (seconds)
        gguf_type = _gguf_type(gguf, out, force)
        budget, shard, target = _size(memory_budget), _size(shard_size, "--shard-size"), _device(device)
        check_recipe_file(recipe)
        from composer.compose import compose_file
        from composer.execute import ExecutionOptions
        from composer.execute.placement import parse_placement

        if ray is None and (ray_input_on or ray_local_disk):
            from composer.errors import ComposerError

            given = "--ray-input-on" if ray_input_on else "--ray-local-disk"
            raise ComposerError(f"{given} applies to a run on a Ray cluster: add --ray (or --ray ADDRESS).")

        options = ExecutionOptions(
            memory_budget=budget,
            whole_process=True,
            shard_size=shard,
            device=target,
            force=force,
            progress=None if progress else False,
            durable=fsync,
            readers=readers,
            resume={None: "auto", True: "require", False: "never"}[resume],
            keep_partial=keep_partial,
            ray=ray,
            ray_inputs=parse_placement(ray_input_on or []),
            ray_local_disk=ray_local_disk,
        )
        check_plan = _gguf_plan_check(recipe, force) if gguf_type else None
        report = compose_file(recipe, out, options, seed=seed, check_plan=check_plan, as_lora=as_lora)
        on_device = (
            f"; at most {report.device_peak_bytes / 1e9:.2f} GB of {target} memory" if report.device_peak_bytes else ""
        )
        resumed = f" ({report.resumed} of them kept from the interrupted run)" if report.resumed else ""
        typer.echo(
            f"wrote {report.tensors} tensors{resumed} ({report.bytes_written / 1e6:.1f} MB) to {report.out} in {report.seconds:.1f} s{_cluster_words(report)}{on_device}"
        )
        if gguf_type:
            _export_beside(report.out, gguf_type, force, progress, fsync)

    _guarded(action)


def _gguf_type(gguf: str | None, out: Path | None, force: bool) -> str | None:
    """--gguf's type, and OUT.gguf free to write, checked before any work."""
    if gguf is None:
        return None
    from composer.export import check_gguf_output_free, check_gguf_type, gguf_beside

    wanted = check_gguf_type(gguf)
    if out is not None:
        check_gguf_output_free(gguf_beside(out), force)
    return wanted


def _gguf_plan_check(recipe: Path, force: bool):
    """Refuses, once the plan is known and before any tensor is read, an output that cannot be written as GGUF."""

    def check(plan, target: Path) -> None:
        from composer.export import check_exportable, check_gguf_output_free, gguf_beside

        check_exportable(plan.config, f"The output of {recipe}")
        check_gguf_output_free(gguf_beside(target), force)

    return check


def _export_beside(folder: Path, gguf_type: str, force: bool, progress: bool, fsync: bool) -> None:
    from composer.errors import ComposerError
    from composer.export import export_gguf, gguf_beside

    try:
        report = export_gguf(str(folder), gguf_beside(folder), gguf_type, force, None if progress else False, fsync)
    except ComposerError as error:
        raise ComposerError(
            f"The model folder {folder} was written, but its GGUF was not: {error} (once that is mended, "
            f"`compose export {folder} {gguf_beside(folder)} --type {gguf_type}` writes it from the folder)."
        ) from None
    typer.echo(f"wrote {report.tensors} tensors ({report.bytes_written / 1e6:.1f} MB, {gguf_type}) to {report.out}")


@app.command("export")
def export(
    model: str = typer.Argument(..., help="The model: a folder, a .gguf file, a hub id or BASE+ADAPTER."),
    out: Path = typer.Argument(..., help="The GGUF file to write, e.g. model-q8_0.gguf."),
    gguf_type: str = typer.Option("f16", "--type", help="How the matrices are stored: f16, bf16 or q8_0."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is a GGUF file composer wrote."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on a terminal."),
    fsync: bool = typer.Option(
        False, "--fsync", help="Flush the file to the disk before it appears (survives a power loss)."
    ),
) -> None:
    """Write MODEL as one GGUF file for llama.cpp and Ollama, a tensor at a time."""

    def action():
        from composer.export import check_gguf_output_free, check_gguf_type, export_gguf

        wanted = check_gguf_type(gguf_type)
        check_gguf_output_free(out, force)
        report = export_gguf(model, out, wanted, force, None if progress else False, fsync)
        typer.echo(
            f"wrote {report.tensors} tensors ({report.bytes_written / 1e6:.1f} MB, {wanted}) to {report.out} in {report.seconds:.1f} s"
        )

    _guarded(action)


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    memory_budget: str = typer.Option("1GB", "--memory-budget"),
    limit: int = typer.Option(0, "--limit", help="Show only the first N tensors (0: all)."),
) -> None:
    """Dry run: every output tensor with its inputs and operation, bytes to read and write, predicted peak memory."""

    def action():
        from composer.recipe_files import check_recipe_file

        budget = _size(memory_budget)
        check_recipe_file(recipe)  # fast feedback on the recipe itself (merge or MoE), before the heavy imports
        from composer.compose import plan_from_file
        from composer.plan.schedule import make_schedule
        from composer.plan.show import format_plan

        _, built = plan_from_file(recipe)
        try:
            built.run_deferred_checks()  # a dry run checks everything up front (a real run overlaps this with its writes)
            typer.echo(format_plan(built, make_schedule(built, budget), limit))
        finally:
            built.close()

    _guarded(action)


@app.command()
def check(
    recipe: Path = typer.Argument(..., help="Recipe YAML (native or a mergekit config)."),
    memory_budget: str = typer.Option("1GB", "--memory-budget", help="The budget a run would have, for its peak."),
) -> None:
    """Validate a recipe against its models' configs and safetensors headers only (for hub models: config.json, the
    index and each shard's header, no weights), and say what a run would download, read and write."""

    def action():
        from composer.recipe_files import check_recipe_file

        budget = _size(memory_budget)
        check_recipe_file(recipe)
        from composer.check import check_recipe

        typer.echo(check_recipe(recipe, budget))

    _guarded(action)


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="Model folder or .gguf file."),
    text: list[Path] = typer.Option(..., "--text", help="Text file(s) to score."),
) -> None:
    """Perplexity, token count and bits per byte of MODEL on text files."""

    def action():
        from composer.evaluate import load_model, score_text
        from composer.files import read_text_to_score

        texts = [read_text_to_score(path) for path in text]  # every text is checked before the (slow) model load
        loaded, tokenizer = load_model(model)
        scores = [
            score_text(loaded, tokenizer, content, text_name=str(path), model_name=model)
            for path, content in zip(text, texts)
        ]
        typer.echo(f"{'text':<40} {'tokens':>8} {'bytes':>8} {'perplexity':>11} {'bits/byte':>10}")
        for path, score in zip(text, scores):
            typer.echo(
                f"{str(path):<40} {score.tokens:>8} {score.bytes:>8} {score.perplexity:>11.3f} {score.bits_per_byte:>10.4f}"
            )

    _guarded(action)


@app.command()
def tune(
    recipe: Path = typer.Argument(
        ..., help="Recipe YAML with numbers to tune written as {tune: [lo, hi]} (or --tune-all)."
    ),
    out: Path = typer.Argument(
        ..., help="Output folder: the best recipe's model, tuned-recipe.yml, tune-report.json, tune.png."
    ),
    text: list[Path] = typer.Option(
        ..., "--text", help="Text file(s) to tune on: the objective is their mean bits per byte."
    ),
    heldout: Optional[list[Path]] = typer.Option(
        None, "--heldout", help="Text file(s) only reported, never tuned on (over-fitting shows there)."
    ),
    trials: Optional[int] = typer.Option(
        None, "--trials", help="Trials to run (default 50 unless --minutes is given)."
    ),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="Stop starting trials after this many minutes."),
    optimizer: str = typer.Option(
        "cma", "--optimizer", help="cma (CMA-ES, needs the cma package), gradient (Adam, back-propagated) or random."
    ),
    tune_all: bool = typer.Option(
        False, "--tune-all", help="Tune every weight, density, t and scale of the recipe around its value."
    ),
    memory_budget: str = typer.Option(
        "2GB",
        "--memory-budget",
        help="Most memory the process holds; what a trial's pass leaves of it caches parents' tensors between trials.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the optimiser."),
    device: str = typer.Option(
        "cpu", "--device", help="cpu or cuda: where the layers run (parents' tensors are cached in host memory)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on a terminal."),
    ray: Optional[str] = typer.Option(
        None, "--ray", help=RAY_HELP.replace("Compute the tensors", "Write the best model")
    ),
) -> None:
    """Fit a recipe's numbers to text: each trial's model is scored layer by layer (bits per byte), none is written
    until the best is known."""

    def action():
        from composer.errors import ComposerError

        if trials is not None and trials < 1:
            raise ComposerError(f"--trials {trials}: give at least 1 trial.")
        if minutes is not None and not minutes > 0:
            raise ComposerError(
                f"--minutes {minutes:g}: give a positive number of minutes (e.g. --minutes 5), or use --trials N."
            )
        if optimizer not in ("cma", "gradient", "random"):
            raise ComposerError(f"--optimizer '{optimizer}' is not one composer has; use cma, gradient or random.")
        budget, target = _size(memory_budget), _device(device)
        from composer.execute.output_folder import check_output_free
        from composer.tune.texts import read_texts

        check_output_free(out, force)
        texts, held_out = read_texts(text, "--text"), read_texts(heldout, "--heldout") if heldout else []
        from composer.tune.output import write_output
        from composer.tune.run import TuneSettings, tune_recipe

        settings = TuneSettings(
            texts=texts,
            heldout=held_out,
            trials=trials,
            minutes=minutes,
            optimizer=optimizer,
            tune_all=tune_all,
            memory_budget=budget,
            seed=seed,
            progress=None if progress else False,
            device=target,
            ray=ray,
            whole_process=True,
        )
        result, runner = tune_recipe(recipe, settings)
        report = write_output(result, runner, settings, out, force)
        stopped = {"interrupted": " (stopped by Ctrl-C)", "minutes": f" (stopped after {minutes} minutes)"}.get(
            result.stopped, ""
        )
        start, tuned = report["history"][0]["objective"], result.best.objective
        typer.echo(
            f"{len(result.trials)} trials in {result.seconds:.1f} s{stopped}: mean bits per byte {start:.4f} -> {tuned:.4f}"
        )
        for item in report["parameters"]:
            typer.echo(f"  {item['key']}: {item['start']:.4g} -> {item['tuned']:.4g}")
        typer.echo(f"wrote the tuned model, tuned-recipe.yml and tune-report.json to {out}")

    _guarded(action)


@app.command()
def demo(
    out: Path = typer.Option(
        Path("demo-out"), "--out", help="Where to write the upscaled model (an earlier demo output there is replaced)."
    ),
    force: bool = typer.Option(False, "--force", help="Also replace another of composer's outputs at OUT."),
) -> None:
    """SOLAR-style depth upscale of the real SmolLM2-135M-Instruct (30 -> 44 layers), then compare it with its source."""

    def action():
        from composer.demo import run_demo

        run_demo(out, force, echo=typer.echo)

    _guarded(action)


@app.command("extract-lora")
def extract_lora(
    finetune: str = typer.Argument(..., help="The fine-tuned model (folder, .gguf, hub id or BASE+ADAPTER)."),
    out: Path = typer.Argument(..., help="Folder to write the PEFT adapter into."),
    base: str = typer.Option(..., "--base", help="The model FINETUNE was fine-tuned from."),
    rank: int = typer.Option(..., "--rank", help="LoRA rank r (> 0)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    modules: Optional[list[str]] = typer.Option(
        None, "--modules", help="Only these modules, e.g. q_proj,v_proj (default: every linear layer weight)."
    ),
    embeddings: bool = typer.Option(
        False, "--embeddings", help="Also save the embeddings / output head whole (modules_to_save) when they differ."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on a terminal."),
) -> None:
    """Write a PEFT LoRA adapter (rank R) for BASE that approximates FINETUNE - BASE, by truncated SVD."""

    def action():
        from composer.extract_lora import extract_lora as extract

        names = [name.strip() for entry in modules or [] for name in entry.split(",") if name.strip()]
        report = extract(finetune, base, out, rank, force, names or None, embeddings, None if progress else False)
        worst_name, worst_error = report.worst
        saved = f"; whole tensors: {', '.join(report.modules_to_save)}" if report.modules_to_save else ""
        typer.echo(
            f"wrote a rank-{rank} LoRA of {len(report.errors)} tensors to {report.out} in {report.seconds:.1f} s{saved}"
        )
        typer.echo(f"relative Frobenius error: mean {report.mean_error:.4f}, worst {worst_error:.4f} ({worst_name})")

    _guarded(action)


@app.command("extract-expert")
def extract_expert(
    model: str = typer.Argument(
        ..., help="A mixture-of-experts model: Mixtral, Qwen2-MoE, Qwen3-MoE or DeepSeek-V2/V3."
    ),
    out: Path = typer.Argument(..., help="Folder to write the dense model into."),
    expert: int = typer.Option(..., "--expert", help="The expert to take out, numbered from 0."),
    shared: bool = typer.Option(
        True,
        "--shared/--no-shared",
        help="Keep the layer's shared experts beside the expert (default) or leave them out.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    memory_budget: str = typer.Option("1GB", "--memory-budget", help="Most memory the process holds, e.g. 1GB."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest output shard."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on a terminal."),
) -> None:
    """Write expert N of an MoE model as a dense model of the matching family (Mixtral -> Mistral, Qwen2/3-MoE -> Qwen2/3)."""

    def action():
        options = _writing_options(memory_budget, shard_size, force, progress)
        from composer.extract_expert import extract_expert as extract

        report = extract(model, expert, out, options, shared)
        typer.echo(f"wrote expert {expert} of {model} as a dense model ({report.tensors} tensors) to {report.out}")

    _guarded(action)


@app.command()
def route(
    model: Path = typer.Argument(..., help="An MoE model folder (Mixtral, Qwen2-MoE, Qwen3-MoE)."),
    prompts: Path = typer.Option(
        ..., "--prompts", help="Prompts: a .txt file (one a line) or YAML/JSON (a list, or group name -> list)."
    ),
    png: Path = typer.Option(Path("routing.png"), "--png", help="Where to write the heat map."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    per_prompt: bool = typer.Option(True, "--per-prompt/--totals", help="Also list each prompt's shares."),
) -> None:
    """Share of tokens each router sends to each expert, per layer, per prompt and in total: a table and a PNG heat map."""

    def action():
        from composer.moe.prompts import read_prompt_file

        groups = read_prompt_file(prompts)
        target = _device(device)
        from composer.files import check_report_path
        from composer.route import draw_heat_map, format_routing, measure_routing

        check_report_path(png, "--png", image=True)  # before the (slow) routing is measured

        routing = measure_routing(model, groups, target)
        typer.echo(format_routing(routing, per_prompt))
        draw_heat_map(routing, png)
        typer.echo(f"heat map: {png}")

    _guarded(action)


@app.command()
def transplant(
    model: str = typer.Argument(..., help="The model to give another tokenizer (folder, .gguf or hub id)."),
    out: Path = typer.Argument(..., help="Output folder."),
    tokenizer: str = typer.Option(
        ..., "--tokenizer", help="DONOR: the model or tokenizer folder whose tokenizer MODEL is to speak."
    ),
    estimator: str = typer.Option(
        "mapped", "--estimator", help="Rows of new tokens: mapped (default), subword, omp or knn."
    ),
    k: int = typer.Option(8, "--k", help="Anchor tokens per new token for omp and knn."),
    pad_to_multiple_of: Optional[int] = typer.Option(
        None, "--pad-to-multiple-of", help="Pad the vocabulary rows to a multiple of N."
    ),
    report: bool = typer.Option(
        False,
        "--report",
        help="Print how tokens were handled, and bits per byte and perplexity before and after on each --text.",
    ),
    text: Optional[list[Path]] = typer.Option(None, "--text", help="Text file(s) to score with --report."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    memory_budget: str = typer.Option(
        "2GB", "--memory-budget", help="Most memory the process holds, e.g. 2GB (the rows being estimated come on top)."
    ),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest output shard."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on a terminal."),
    ray: Optional[str] = typer.Option(None, "--ray", help=RAY_HELP),
) -> None:
    """MODEL with DONOR's tokenizer: embeddings and head rebuilt in DONOR's id order, new tokens estimated."""

    def action():
        execution = _writing_options(memory_budget, shard_size, force, progress, ray)
        from composer.transplant import TransplantOptions, transplant_command

        transplant_command(
            model,
            tokenizer,
            out,
            TransplantOptions(estimator, k, pad_to_multiple_of),
            execution,
            report,
            text or [],
            typer.echo,
        )

    _guarded(action)


@app.command()
def trace(
    suspect: str = typer.Argument(..., help="The model to examine (folder, .gguf, hub id or BASE+ADAPTER)."),
    candidates: list[str] = typer.Option(
        ...,
        "--candidates",
        help="Models SUSPECT may be built from; give the option once per model, or list them after it.",
    ),
    base: Optional[str] = typer.Option(
        None, "--base", help="The model the candidates were fine-tuned from (task vectors are taken against it)."
    ),
    json_path: Optional[Path] = typer.Option(
        None, "--json", help="Write the report as JSON (schema in docs/trace.md)."
    ),
    png: Optional[Path] = typer.Option(
        None, "--png", help="Write a heat map of SUSPECT's layers against each candidate's."
    ),
    verify: bool = typer.Option(
        False,
        "--verify",
        help="Compose the recovered recipe into a temporary folder and report each tensor's relative error.",
    ),
    memory_budget: str = typer.Option(
        "1GB",
        "--memory-budget",
        help="Most memory the trace holds besides its fingerprints (reads, fits, --verify), e.g. 1GB.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on a terminal."),
) -> None:
    """Whether SUSPECT was built from the candidates, from which, and how: tokenizer, layer provenance, verdicts, recipe."""

    def action():
        from composer.files import check_report_path

        budget = _size(memory_budget)
        for path, option in ((json_path, "--json"), (png, "--png")):
            if path is not None:
                check_report_path(path, option, image=option == "--png")
        from composer.trace.prescan import Prescan

        # the weights' checksums are read on a thread while torch is imported (about as long as a read)
        listed = _listed(candidates)
        prescan = Prescan([suspect, *listed, *([base] if base else [])])
        from composer.progress import progress_bar
        from composer.trace.heatmap import draw_heat_map
        from composer.trace.report import format_report, write_json
        from composer.trace.run import TraceOptions, trace_models

        options = TraceOptions(base=base, verify=verify, memory_budget=budget)
        with progress_bar(0, "trace", None if progress else False) as bar:
            report = trace_models(suspect, listed, options, progress=bar, prescan=prescan)
        typer.echo(format_report(report))
        if json_path is not None:
            write_json(report, json_path)
            typer.echo(f"json: {json_path}")
        if png is not None:
            draw_heat_map(report, png)
            typer.echo(f"heat map: {png}")

    _guarded(action)


def _listed(values: list[str]) -> list[str]:
    """--candidates A B C arrives as A and the rest as stray arguments: main() gathers them (see _gather_candidates)."""
    return [value for entry in values for value in entry.split("\0") if value]


def _gather_candidates(arguments: list[str]) -> list[str]:
    """`--candidates A B C` as typer needs it (one value per option): the words after --candidates up to the next
    option are joined into its one value."""
    gathered: list[str] = []
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        if argument == "--candidates":
            values = []
            index += 1
            while index < len(arguments) and not arguments[index].startswith("-"):
                values.append(arguments[index])
                index += 1
            gathered += ["--candidates", "\0".join(values)] if values else ["--candidates"]
            continue
        gathered.append(argument)
        index += 1
    return gathered


def _first_positional(arguments: list[str]) -> str | None:
    skip = False
    for argument in arguments:
        if skip:
            skip = False
        elif argument.startswith("-"):
            skip = argument in VALUE_OPTIONS
        else:
            return argument
    return None


def _show_notes() -> None:
    import logging
    import textwrap

    class Notes(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines = textwrap.wrap(
                f"note: {record.getMessage()}", width=100, break_long_words=False, break_on_hyphens=False
            )
            typer.echo("\n".join(lines), err=True)

    logger = logging.getLogger("composer")
    logger.setLevel(logging.INFO)
    logger.handlers = [handler for handler in logger.handlers if type(handler).__name__ != "Notes"] + [Notes()]
    logger.propagate = False


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    import textwrap

    text = str(message) if issubclass(category, UserWarning) else f"{category.__name__}: {message}"
    typer.echo(
        "\n".join(textwrap.wrap(f"warning: {text}", width=100, break_long_words=False, break_on_hyphens=False)),
        err=True,
    )


def main() -> None:
    from composer.signals import ignore_stop_signals, stop_on_signals

    stop_on_signals()  # SIGTERM and SIGHUP unwind like Ctrl-C, so the partial output folder is removed
    # The interpreter's last collections walk every object left, and torch's import leaves hundreds of thousands
    # (a quarter of a second or more on exit); frozen, they are skipped. Frozen at exit, not now, so that a
    # process that calls main() and goes on (the tests) keeps collecting.
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    try:
        code = _main()
    except KeyboardInterrupt as error:  # while starting up, before a command's own handling
        ignore_stop_signals()
        typer.echo(_paragraph(f"{error or 'interrupted'}; nothing was written."), err=True)
        code = 130
    # the run is over and its exit code decided: a stop signal landing while the interpreter shuts down (when it
    # no longer runs Python handlers) would end the process by the signal, as if the run had not finished
    ignore_stop_signals()
    sys.exit(code)


def _main() -> int:
    import warnings

    _show_notes()
    warnings.showwarning = _show_warning
    arguments = with_ray_address(sys.argv[1:])
    first = _first_positional(arguments)
    if (
        first is not None
        and first not in COMMANDS
        and not (set(arguments) & {"-h", "--help"} and arguments[0].startswith("-"))
    ):
        arguments = ["run", *arguments]  # `compose RECIPE [OUT]` is `compose run RECIPE [OUT]`
    if first == "trace":
        arguments = _gather_candidates(arguments)
    return _run_app(arguments or ["--help"])


def _run_app(arguments: list[str]) -> int:
    """The app's exit code; a mistake on the command line (an unknown option, a missing value) is one `error:`
    paragraph like every other error, not the command-line library's framed box."""
    from typer import TyperException

    try:
        code = app(args=arguments, prog_name="compose", standalone_mode=False)
    except TyperException as error:
        context = getattr(error, "ctx", None)
        where = f" (see '{context.command_path} -h')" if context is not None else ""
        message = error.format_message() if hasattr(error, "format_message") else str(error)
        typer.echo(_paragraph(f"{message.rstrip('.')}{where}."), err=True)
        return getattr(error, "exit_code", 2)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    main()
