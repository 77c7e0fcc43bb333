"""`compose tune`: trials of a recipe's tune ranges, each scored layer by layer on the --text files, then the best
recipe written as a model with its report."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from composer.errors import ComposerError
from composer.evaluate import TextScore
from composer.files import YAML_FILE_LIMIT, read_text
from composer.plan import Plan, build_plan
from composer.recipe import parse_recipe
from composer.recipe.load import RecipeKeyError
from composer.tune.ranges import HOW_TO_MARK, TuneRange, find_ranges, mark_everything, with_values
from composer.tune.search import make_search
from composer.tune.streamed import StreamedScorer
from composer.tune.tensor_cache import TensorCache
from composer.tune.texts import NamedText


@dataclass
class TuneSettings:
    texts: list[NamedText]
    heldout: list[NamedText]
    trials: int | None = None
    minutes: float | None = None
    optimizer: str = "cma"
    tune_all: bool = False
    memory_budget: int = 2 * 1024**3
    seed: int = 0
    progress: bool | None = None
    device: str = "cpu"
    ray: str | None = None  # the best model is written on a Ray cluster (composer.execute.cluster)
    whole_process: bool = False  # memory_budget bounds the whole process (the CLI's), not only the tune's tensors


@dataclass
class Trial:
    values: list[float]
    objective: float
    scores: list[TextScore]
    problem: str | None = None  # why a trial has no score (a recipe these values make cannot be planned)


@dataclass
class TuneResult:
    recipe_name: str
    recipe_dir: Path | None
    marked_text: str
    ranges: list[TuneRange]
    trials: list[Trial] = field(default_factory=list)
    stopped: str = "trials"
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # the process's CPU time over the trials, all threads (on a busy machine, beside seconds)

    @property
    def best(self) -> Trial:
        return min(self.trials, key=lambda trial: trial.objective)

    def text_for(self, trial: Trial) -> str:
        return with_values(self.marked_text, self.ranges, trial.values)


def objective_of(scores: list[TextScore]) -> float:
    """The mean of the texts' bits per byte (each text counts the same, whatever its length)."""
    values = [score.bits_per_byte for score in scores]
    return sum(values) / len(values) if all(map(math.isfinite, values)) else math.inf


def plan_text(text: str, recipe_dir: Path | None, source_name: str) -> Plan:
    """The plan of a concrete recipe text, with a recipe key's problem given its line."""
    recipe = parse_recipe(text, source_name, recipe_dir)
    try:
        return build_plan(recipe, text, recipe_dir)
    except RecipeKeyError as error:
        raise error.located(text, source_name) from None


def marked_recipe(recipe_path: Path, tune_all: bool) -> tuple[str, list[TuneRange]]:
    from composer.recipe_files import is_moe_file

    if is_moe_file(recipe_path):
        raise ComposerError(
            f"{recipe_path} is a mixture-of-experts recipe; compose tune tunes merge recipes (merge_method with models or slices)."
        )
    text = read_text(recipe_path, "Recipe file", YAML_FILE_LIMIT)
    if tune_all:
        text = mark_everything(text, str(recipe_path))
    ranges = find_ranges(text, str(recipe_path))
    if not ranges:
        every = " (--tune-all found no weight, density, t or scale written as a number either)" if tune_all else ""
        raise ComposerError(f"{recipe_path} has nothing to tune{every}: {HOW_TO_MARK}")
    return text, ranges


class Trials:
    """Scores the recipe at given values of its ranges; parents' tensors stay cached from one trial to the next."""

    def __init__(self, result: TuneResult, settings: TuneSettings):
        self.result = result
        # parents' tensors are cached in what the budget leaves beside a scoring pass's working set (StreamedScorer.fit_budget)
        self.scorer = StreamedScorer(
            TensorCache(settings.memory_budget // 2), settings.device, settings.memory_budget, settings.whole_process
        )
        self.seen: dict[tuple, Trial] = {}  # whole-number searches (slice bounds) propose the same point again

    def score_text(self, text: str, texts: list[NamedText]) -> list[TextScore]:
        plan = plan_text(text, self.result.recipe_dir, self.result.recipe_name)
        try:
            return self.scorer.score(plan, texts)
        finally:
            plan.close()

    def run(self, values: list[float], texts: list[NamedText]) -> Trial:
        known = self.seen.get(tuple(values))
        if known is not None:
            return known
        self.seen[tuple(values)] = trial = self.score(values, texts)
        return trial

    def score(self, values: list[float], texts: list[NamedText]) -> Trial:
        try:
            scores = self.score_text(with_values(self.result.marked_text, self.result.ranges, values), texts)
        except ComposerError as error:
            return Trial(values, math.inf, [], problem=str(error))
        return Trial(values, objective_of(scores), scores)


def _bar(settings: TuneSettings):
    from tqdm import tqdm

    total = settings.trials
    return tqdm(
        total=total,
        unit="trial",
        desc="tuning",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=(not sys.stderr.isatty()) if settings.progress is None else not settings.progress,
    )


def _done(settings: TuneSettings, result: TuneResult, deadline: float) -> bool:
    if settings.trials is not None and len(result.trials) >= settings.trials:
        return True
    if time.monotonic() >= deadline:
        result.stopped = "minutes"
        return True
    return False


def descend(result: TuneResult, trials: Trials, settings: TuneSettings, done) -> None:
    """--optimizer gradient: Adam steps from the start recipe, each a trial (its objective comes with the gradient).
    The best point is scored again by the exact scorer at the end (the gradient pass merges in float32)."""
    from composer.tune.gradient import GradientDescent

    start = result.trials[0]
    descent = GradientDescent(
        trials.scorer,
        result.marked_text,
        result.ranges,
        lambda text: plan_text(text, result.recipe_dir, result.recipe_name),
        result.recipe_name,
        start.values,
    )
    try:
        with _bar(settings) as bar:
            bar.update(1)
            try:
                while not done():
                    values, evaluated = descent.step(settings.texts)
                    if not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(values, start.values)):
                        # (the first step evaluates the start recipe, scored already)
                        result.trials.append(Trial(values, evaluated.objective, evaluated.scores))
                        bar.update(1)
                    bar.set_postfix_str(f"best {result.best.objective:.4f} bits/byte", refresh=False)
                    if not math.isfinite(evaluated.objective):
                        break
            except KeyboardInterrupt:
                result.stopped = "interrupted"
    finally:
        descent.close()
    best = result.best
    if best is not start:
        exact = trials.score(best.values, settings.texts)
        best.objective, best.scores, best.problem = exact.objective, exact.scores, exact.problem


def tune_recipe(recipe_path: Path, settings: TuneSettings) -> tuple[TuneResult, Trials]:
    """Run the trials; Ctrl-C (or SIGTERM) stops them and keeps what was found."""
    if settings.trials is None and settings.minutes is None:
        settings.trials = 50
    text, ranges = marked_recipe(recipe_path, settings.tune_all)
    result = TuneResult(str(recipe_path), recipe_path.parent, text, ranges)
    trials = Trials(result, settings)
    began, cpu_began = time.monotonic(), time.process_time()
    deadline = began + settings.minutes * 60 if settings.minutes is not None else math.inf
    start = [mark.start for mark in ranges]
    # the start recipe must work: its mistakes are the user's, reported as they are
    first = Trial(start, math.inf, trials.score_text(with_values(text, ranges, start), settings.texts))
    first.objective = objective_of(first.scores)
    result.trials.append(first)
    if settings.optimizer == "gradient":
        descend(result, trials, settings, done=lambda: _done(settings, result, deadline))
        result.seconds, result.cpu_seconds = time.monotonic() - began, time.process_time() - cpu_began
        return result, trials
    search = make_search(
        settings.optimizer, [mark.share_of(value) for mark, value in zip(ranges, start)], settings.seed
    )

    def done() -> bool:
        return _done(settings, result, deadline)

    with _bar(settings) as bar:
        bar.update(1)
        bar.set_postfix_str(f"best {result.best.objective:.4f} bits/byte", refresh=False)
        try:
            while not done():
                points = search.ask()
                objectives = []
                for point in points:
                    if done():
                        break
                    trial = trials.run([mark.value_at(share) for mark, share in zip(ranges, point)], settings.texts)
                    result.trials.append(trial)
                    objectives.append(trial.objective)
                    bar.update(1)
                    bar.set_postfix_str(f"best {result.best.objective:.4f} bits/byte", refresh=False)
                if len(objectives) == len(points):
                    search.tell(points, objectives)
        except KeyboardInterrupt:
            result.stopped = "interrupted"
    result.seconds, result.cpu_seconds = time.monotonic() - began, time.process_time() - cpu_began
    return result, trials
