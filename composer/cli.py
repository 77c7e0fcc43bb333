"""`compose RECIPE [OUT]` and its sibling commands. Heavy libraries load only inside the commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Build new language models out of existing ones, with no training.\n\n"
    "compose RECIPE.yml [OUT] runs a recipe; the commands below inspect, evaluate and demonstrate.",
    pretty_exceptions_enable=False,
)

COMMANDS = {"run", "plan", "eval", "demo"}


def _size(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    cleaned = text.strip().lower().removesuffix("b").removesuffix("i")
    if cleaned and cleaned[-1] in units:
        return int(float(cleaned[:-1]) * units[cleaned[-1]])
    return int(float(cleaned))


def _fail(message: str) -> None:
    import textwrap

    typer.echo("\n".join(textwrap.wrap(f"error: {message}", width=100)), err=True)
    raise typer.Exit(code=2)


def _guarded(action):
    from composer.errors import ComposerError

    try:
        return action()
    except ComposerError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        _fail("interrupted; no output was left behind.")


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML (native or a mergekit config)."),
    out: Optional[Path] = typer.Argument(None, help="Output folder (default: the recipe's 'output:' key)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    memory_budget: str = typer.Option("2GB", "--memory-budget", help="Most memory held for tensors, e.g. 2GB, 512MB."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest output shard."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on a terminal."),
) -> None:
    """Run a recipe and write the model into OUT."""

    def action():
        from composer.compose import compose_file
        from composer.execute import ExecutionOptions

        options = ExecutionOptions(memory_budget=_size(memory_budget), shard_size=_size(shard_size), device=device, force=force,
                                   progress=None if progress else False)
        report = compose_file(recipe, out, options)
        typer.echo(f"wrote {report.tensors} tensors ({report.bytes_written / 1e6:.1f} MB) to {report.out} in {report.seconds:.1f} s")

    _guarded(action)


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    memory_budget: str = typer.Option("2GB", "--memory-budget"),
    limit: int = typer.Option(0, "--limit", help="Show only the first N tensors (0: all)."),
) -> None:
    """Dry run: every output tensor with its inputs and operation, bytes to read and write, predicted peak memory."""

    def action():
        from composer.compose import plan_from_file
        from composer.execute import make_schedule
        from composer.plan.show import format_plan

        _, built = plan_from_file(recipe)
        schedule = make_schedule(built, _size(memory_budget))
        typer.echo(format_plan(built, schedule, limit))
        built.close()

    _guarded(action)


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="Model folder or .gguf file."),
    text: list[Path] = typer.Option(..., "--text", help="Text file(s) to score."),
) -> None:
    """Perplexity, token count and bits per byte of MODEL on text files."""

    def action():
        from composer.errors import ComposerError
        from composer.evaluate import load_model, score_text

        loaded, tokenizer = load_model(model)
        typer.echo(f"{'text':<40} {'tokens':>8} {'bytes':>8} {'perplexity':>11} {'bits/byte':>10}")
        for path in text:
            if not path.is_file():
                raise ComposerError(f"Text file {path} does not exist.")
            score = score_text(loaded, tokenizer, path.read_text())
            typer.echo(f"{str(path):<40} {score.tokens:>8} {score.bytes:>8} {score.perplexity:>11.3f} {score.bits_per_byte:>10.4f}")

    _guarded(action)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Where to write the upscaled model."),
    force: bool = typer.Option(True, "--force/--no-force", help="Replace an earlier demo output."),
) -> None:
    """SOLAR-style depth upscale of the real SmolLM2-135M-Instruct (30 -> 44 layers), then compare it with its source."""

    def action():
        from composer.demo import run_demo

        run_demo(out, force, echo=typer.echo)

    _guarded(action)


def main() -> None:
    arguments = sys.argv[1:]
    if arguments and not arguments[0].startswith("-") and arguments[0] not in COMMANDS:
        arguments = ["run", *arguments]
    app(args=arguments, prog_name="compose")


if __name__ == "__main__":
    main()
