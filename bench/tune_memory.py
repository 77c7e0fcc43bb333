"""Where the resident memory of a `compose tune` command peaks: the CLI run in this process, with the peak RSS
(VmHWM) printed and reset at the edges of each stage (each scoring pass of the trials and of the report, the release
of the parents' cache, the write of the best model). Linux only (/proc/self/status, /proc/self/clear_refs).

    python bench/tune_memory.py tune RECIPE.yml --text A --heldout B --trials 3 --memory-budget 2GB OUT

The arguments are `compose`'s. bench/tune.py makes the recipe and texts it measures (in its temporary folder).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def status() -> dict[str, float]:
    """The process's memory figures in GB."""
    figures = {}
    with open("/proc/self/status") as lines:
        for line in lines:
            key, _, value = line.partition(":")
            if key in STATUS_KEYS:
                figures[key] = int(value.split()[0]) * 1024 / 1e9
    return figures


def mark(label: str) -> None:
    """Print the memory now and the peak since the last mark, then start a new peak."""
    now = status()
    print(
        f"[rss] {label}: now {now['VmRSS']:.2f} GB (anonymous {now['RssAnon']:.2f}, files {now['RssFile']:.2f}), "
        f"peak since the last mark {now['VmHWM']:.2f} GB",
        flush=True,
    )
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS


def staged(function, label):
    @functools.wraps(function)
    def wrapper(*arguments, **keywords):
        mark(f"before {label(*arguments)}")
        try:
            return function(*arguments, **keywords)
        finally:
            mark(f"after {label(*arguments)}")

    return wrapper


def main() -> None:
    import composer.tune.output as output
    import composer.tune.run as run
    import composer.tune.streamed as streamed

    run.tune_recipe = staged(run.tune_recipe, lambda *_: "the trials")
    run.Trials.score_text = staged(
        run.Trials.score_text,
        lambda trials, text, texts: (
            f"a scoring pass over {len(texts)} file(s) (cache {trials.scorer.cache.resident / 1e9:.2f} GB of "
            f"{trials.scorer.cache.budget / 1e9:.2f})"
        ),
    )
    streamed.StreamedScorer.release = staged(streamed.StreamedScorer.release, lambda *_: "release")
    output.compose_text = staged(output.compose_text, lambda *_: "writing the best model")
    from composer.cli import main as compose

    sys.argv = ["compose", *sys.argv[1:]]
    try:
        compose()
    finally:
        mark("end")


if __name__ == "__main__":
    main()
