"""`compose trace`: open SUSPECT and the candidates, fingerprint them in one pass, match layers, fit each SUSPECT
tensor, test each candidate's independence, and assemble the report and the recovered recipe."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from composer.errors import ComposerError
from composer.memory import release_freed_memory
from composer.trace.experts import is_mixture, moe_layer, moe_recipe_text
from composer.trace.fingerprints import fingerprint_model
from composer.trace.layers import CandidateMatch, Fingerprinted, match_candidate
from composer.trace.layout import TracedModel, open_traced
from composer.trace.prescan import Prescan
from composer.trace.provenance import Provenance, check_provenance
from composer.trace.recipe_text import RecipeInputs, agreed_method, recipe_text
from composer.trace.recover import (
    MIN_SIMILARITY,
    Candidate,
    LayerFit,
    Recovery,
    TensorFit,
    layer_summary,
    partner,
    slerp_throughout,
)
from composer.trace.tokenizers import (
    TokenizerComparison,
    TokenizerFacts,
    compare_tokenizers,
    tokenizer_facts,
    tokenizer_key,
)
from composer.trace.verdict import ALPHA, IndependenceTest, independence_tests, verdict
from composer.trace.vocabulary_rows import is_vocabulary_matrix, row_map, vocabulary_pairs


@dataclass
class TraceOptions:
    base: str | None = None
    verify: bool = False
    memory_budget: int = 1 << 30
    tokenizers: bool = True


@dataclass
class CandidateVerdict:
    model: str
    verdict: str
    p_value: float
    contribution: float
    test: IndependenceTest
    note: str = ""


@dataclass
class TraceReport:
    suspect: str
    suspect_layers: list[int]
    tokenizers: list[TokenizerComparison]
    candidates: list[CandidateVerdict]
    layers: list[LayerFit]
    outer: list[TensorFit]
    matches: dict[str, CandidateMatch]
    candidate_layers: dict[str, list[int]]
    recipe: str
    method: str
    notes: list[str] = field(default_factory=list)
    verification: dict[str, float] | None = None
    alpha: float = ALPHA
    provenance: Provenance = field(default_factory=lambda: Provenance(False))


def _same_model(first: str, second: str) -> bool:
    return first == second or (
        os.path.exists(first) and os.path.exists(second) and Path(first).resolve() == Path(second).resolve()
    )


def check_references(suspect: str, candidates: list[str], base: str | None) -> list[str]:
    if not candidates:
        raise ComposerError(
            "compose trace needs at least one candidate: name the models SUSPECT may be built from with --candidates A B ..."
        )
    for reference in candidates:
        if _same_model(reference, suspect):
            raise ComposerError(
                f"The candidate '{reference}' is SUSPECT itself; a model trivially matches itself. Remove it from --candidates "
                "and name the models SUSPECT may have been built from."
            )
    if base is not None and _same_model(base, suspect):
        raise ComposerError(f"--base '{base}' is SUSPECT itself; name the model the candidates were fine-tuned from.")
    unique: list[str] = []
    for reference in candidates + ([base] if base else []):
        if reference not in unique:
            unique.append(reference)
    return unique


def _source_layers(
    suspect: Fingerprinted, position: int, candidates: list[Candidate], base: str | None
) -> list[tuple[Candidate, int]]:
    """The candidate layers SUSPECT's layer at `position` is made of: one layer all of whose tensors it copies byte
    for byte, else each candidate's most similar layer where that is similar enough (and the base's)."""
    layer = list(suspect.model.layers)[position]
    names = list(suspect.model.layers[layer].values())
    for candidate in candidates:
        copied = {
            candidate.fingerprinted.model.layer_of(candidate.match.identical[n])
            for n in names
            if n in candidate.match.identical
        }
        if len(copied) == 1 and all(n in candidate.match.identical for n in names) and None not in copied:
            return [(candidate, copied.pop())]
    chosen = []
    for candidate in candidates:
        best, similarity = candidate.match.best_layer(position)
        if best >= 0 and (similarity >= MIN_SIMILARITY or candidate.reference == base):
            chosen.append((candidate, list(candidate.fingerprinted.model.layers)[best]))
    return chosen


def _contributions(layers: list[LayerFit], references: list[str]) -> dict[str, float]:
    """Each candidate's mean share of SUSPECT's layers, by the layers' weights (slerp: 1 - t and t)."""
    totals = dict.fromkeys(references, 0.0)
    for layer in layers:
        shares = {reference: abs(weight) for reference, _, weight in layer.sources}
        if layer.method == "slerp" and len(layer.sources) == 2:
            ts = [fit.t for fit in layer.tensors if fit.t is not None]
            t = sorted(ts)[len(ts) // 2] if ts else 0.5
            shares = {layer.sources[0][0]: 1 - t, layer.sources[1][0]: t}
        total = sum(shares.values())
        for reference, share in shares.items():
            if reference in totals and total:
                totals[reference] += share / total / len(layers)
    return totals


def trace_models(
    suspect_reference: str,
    candidate_references: list[str],
    options: TraceOptions,
    progress=None,
    prescan: Prescan | None = None,
) -> TraceReport:
    """`prescan`: one the caller started on these references before importing torch (composer.cli); when None, one
    is started here. It is stopped when the trace ends. `progress`: a bar (tqdm's `reset(total=)` and `update(n)`)
    that counts the bytes of every model's tensors as the fingerprint pass vouches for them, then those of SUSPECT's
    tensors as they are fitted."""
    opened: list[TracedModel] = []
    try:
        references = check_references(suspect_reference, candidate_references, options.base)
        if prescan is None:
            prescan = Prescan([suspect_reference, *references])
        suspect_model = open_traced(suspect_reference, "SUSPECT")
        opened.append(suspect_model)
        for reference in references:
            opened.append(open_traced(reference, "candidate"))
        return _trace(opened[0], opened[1:], options, progress, prescan)
    finally:
        if prescan is not None:
            prescan.close()
        for model in opened:
            model.close()


def _trace(
    suspect_model: TracedModel, candidate_models: list[TracedModel], options: TraceOptions, progress, prescan: Prescan
) -> TraceReport:
    """The tokenizers are read, and the independence tests run, on a helper thread beside the passes over the
    weights (reads and torch work, which release the interpreter's lock): on two cores they cost little wall time.

    The models are fingerprinted, and then the tensors fitted, on WORKERS threads, each within its share of the
    memory budget; each result is the one a single thread gives, and they are gathered in order.

    torch works on one thread meanwhile (the helper's too, which takes the setting when it first runs torch work):
    the passes are many element-wise steps over a sample of 2^18 entries, too small to gain from torch's thread
    pool, and on a loaded machine its threads' waits for each other cost several times the work (a single-mover
    test on one tensor: 146 ms of CPU with two threads, 2.3 ms with one). --verify composes with the usual threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="composer-trace")
    workers = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="composer-trace-work")
    try:
        report = _trace_with(suspect_model, candidate_models, options, progress, Threads(helper, workers), prescan)
    finally:
        workers.shutdown(wait=True, cancel_futures=True)
        helper.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(previous)
    if options.verify and not report.recipe:
        report.notes.append("--verify: nothing to compose (no recipe was recovered).")
    elif options.verify:
        from composer.trace.verify import verify_recipe

        mixture = report.method == "moe"
        report.verification = verify_recipe(report.recipe, suspect_model, options.memory_budget, mixture)
    return report


WORKERS = 2  # threads that fingerprint the models and fit the tensors, each within its share of the memory budget


@dataclass
class Threads:
    helper: ThreadPoolExecutor  # the tokenizers, then the independence tests, beside the passes
    workers: ThreadPoolExecutor  # the fingerprint passes (a model each), then the fits (a tensor each)


class ProgressCounter:
    """The trace's progress on a bar, in bytes: every model's tensors as the fingerprint pass vouches for them (on the
    workers' threads, hence the lock), then SUSPECT's as they are fitted."""

    def __init__(self, bar, models: list[TracedModel]):
        self.bar = bar
        self.lock = threading.Lock()
        self.sizes = {model.reference: model.infos for model in models}
        self.suspect = models[0].infos
        if bar is not None:
            fitted = sum(info.nbytes for info in self.suspect.values())
            bar.reset(total=sum(info.nbytes for infos in self.sizes.values() for info in infos.values()) + fitted)

    def _advance(self, nbytes: int) -> None:
        if self.bar is not None:
            with self.lock:
                self.bar.update(nbytes)

    def fingerprinted(self, reference: str, name: str) -> None:
        self._advance(self.sizes[reference][name].nbytes)

    def fitted(self, fit: TensorFit) -> TensorFit:
        self._advance(self.suspect[fit.name].nbytes)
        return fit


def _halves(model: TracedModel) -> list[list[str]]:
    """A model's tensor names in two runs, so that the workers share out three models as evenly as two."""
    names = list(model.infos)
    return [names[: len(names) // 2], names[len(names) // 2 :]]


def _joined(parts) -> dict:
    """The prints of a model's parts, in its tensors' order."""
    prints = {}
    for part in parts:
        prints.update(part.result())
    return prints


def _independence_tests(suspect: Fingerprinted, candidates: list[Candidate]) -> list[IndependenceTest]:
    return independence_tests(suspect, [candidate.fingerprinted for candidate in candidates])


def _trace_with(
    suspect_model: TracedModel,
    candidate_models: list[TracedModel],
    options: TraceOptions,
    progress,
    threads: Threads,
    prescan: Prescan,
) -> TraceReport:
    notes = []
    facts_later = threads.helper.submit(_facts, suspect_model, candidate_models) if options.tokenizers else None
    share = options.memory_budget // WORKERS  # each worker's: they run at once
    models = [suspect_model, *candidate_models]
    counter = ProgressCounter(progress, models)
    parts_later = [
        [
            threads.workers.submit(fingerprint_model, model, share, counter.fingerprinted, prescan, part)
            for part in _halves(model)
        ]
        for model in models
    ]
    suspect = Fingerprinted(suspect_model, _joined(parts_later[0]))
    candidates = []
    for model, parts in zip(candidate_models, parts_later[1:]):
        fingerprinted = Fingerprinted(model, _joined(parts))
        match = match_candidate(suspect, fingerprinted)
        if model.architecture != suspect_model.architecture:
            notes.append(
                f"'{model.reference}' is a {model.architecture} model and SUSPECT a {suspect_model.architecture} model; "
                "only tensors of the same shape are compared."
            )
        candidates.append(Candidate(fingerprinted, match))
    if not any(candidate.match.shared_shapes for candidate in candidates):
        raise ComposerError(
            f"No candidate has a tensor of the same shape as any of SUSPECT's ('{suspect_model.reference}', a {suspect_model.architecture} "
            f"model): {', '.join(c.reference + ' (' + c.fingerprinted.model.architecture + ')' for c in candidates)}. Models of other "
            "sizes or architectures cannot be its parents; name candidates of SUSPECT's shape."
        )
    tests_later = threads.helper.submit(_independence_tests, suspect, candidates)
    recovery = Recovery(suspect, candidates, options.base, share)
    layer_fits = []
    planned = []
    for position, layer in enumerate(suspect_model.layers):
        chosen = _source_layers(suspect, position, candidates, options.base)
        source_layers = {candidate.reference: c_layer for candidate, c_layer in chosen}
        matrices = {name for name in suspect_model.layers[layer].values() if suspect.prints[name].sketch is not None}
        tensors = []
        for suffix, name in suspect_model.layers[layer].items():
            partners = []
            for candidate, c_layer in chosen:
                found = partner(candidate, suspect, name, suffix, c_layer)
                if found is not None:
                    partners.append((candidate, found))
            tensors.append((name, partners))
        planned.append((layer, tensors, source_layers, matrices))
    fits_later = [
        [threads.workers.submit(recovery.fit_tensor, name, partners) for name, partners in tensors]
        for _, tensors, _, _ in planned
    ]
    for (layer, _, source_layers, matrices), fits in zip(planned, fits_later):
        layer_fits.append(layer_summary(layer, [counter.fitted(fit.result()) for fit in fits], source_layers, matrices))
    outer_fits = []
    facts = facts_later.result() if facts_later is not None else None
    alignments = _alignments(facts, candidates)
    for name in suspect_model.outer:
        outer_fits.append(
            counter.fitted(recovery.fit_tensor(name, *_outer_partners(suspect, name, candidates, alignments)))
        )
    release_freed_memory()
    mixture = is_mixture(suspect.prints)
    if mixture:
        layer_fits = [moe_layer(layer) for layer in layer_fits]
    else:
        layer_fits = slerp_throughout(layer_fits)
    references = [candidate.reference for candidate in candidates]
    contributions = _contributions(layer_fits, references)
    method = "moe" if mixture else agreed_method(layer_fits)
    recipe_base = options.base
    if method in ("ties", "dare_ties", "dare_linear", "task_arithmetic", "mixed") and recipe_base is None:
        recipe_base = next((fit.base for layer in layer_fits for fit in layer.tensors if fit.base), None)
    if method == "slerp" and recipe_base is None:
        recipe_base = next((fit.base for layer in layer_fits for fit in layer.tensors if fit.method == "slerp"), None)
    dtype = next(iter(suspect.prints.values())).dtype
    unmatched = [layer.layer for layer in layer_fits if layer.method == "unmatched"]
    if unmatched:
        notes.append(f"SUSPECT's layers {unmatched} match no candidate layer; the recipe cannot rebuild them.")
    if len(unmatched) == len(layer_fits):
        text = ""
        notes.append("No layer of SUSPECT comes from a candidate: there is no recipe to recover.")
    elif mixture:
        text = moe_recipe_text(layer_fits, suspect_model.config, dtype)
        recipe_base = yaml_value(text, "base_model")
    else:
        layer_counts = {c.reference: c.fingerprinted.model.layer_count for c in candidates}
        text = recipe_text(RecipeInputs(dtype, layer_fits, method, recipe_base), "", layer_counts)
    verdicts = []
    for candidate, test in zip(candidates, tests_later.result()):
        is_base = candidate.reference == recipe_base and method not in ("linear", "passthrough")
        is_base = is_base or (mixture and candidate.reference in text and contributions[candidate.reference] > 0)
        note = "" if candidate.match.shared_shapes else "no tensor of SUSPECT's shapes"
        verdicts.append(
            CandidateVerdict(
                candidate.reference,
                verdict(test, contributions[candidate.reference], is_base),
                test.p_value,
                contributions[candidate.reference],
                test,
                note,
            )
        )
    tokenizers = (
        [compare_tokenizers(model.reference, facts[0], theirs) for model, theirs in zip(candidate_models, facts[1:])]
        if facts
        else []
    )
    report = TraceReport(
        suspect_model.reference,
        list(suspect_model.layers),
        tokenizers,
        verdicts,
        layer_fits,
        outer_fits,
        {c.reference: c.match for c in candidates},
        {c.reference: list(c.fingerprinted.model.layers) for c in candidates},
        text,
        method,
        notes,
    )
    report.provenance = check_provenance(
        suspect_model, candidate_models, {v.model for v in verdicts if v.verdict == "parent"}
    )
    return report


def yaml_value(text: str, key: str):
    import yaml

    return (yaml.safe_load(text) or {}).get(key)


def _facts(suspect: TracedModel, candidates: list[TracedModel]) -> list[TokenizerFacts | None]:
    """SUSPECT's tokenizer facts, then each candidate's; models with the same tokenizer files share theirs."""
    found: dict[str, TokenizerFacts | None] = {}
    facts = []
    for model in [suspect, *candidates]:
        key = tokenizer_key(model.source)
        if key is None:
            facts.append(tokenizer_facts(model.source))
            continue
        if key not in found:
            found[key] = tokenizer_facts(model.source)
        facts.append(found[key])
    return facts


def _alignments(facts: list[TokenizerFacts | None] | None, candidates: list[Candidate]) -> dict[str, tuple]:
    """Candidate -> (SUSPECT ids, candidate ids) of the tokens both have, for candidates whose vocabulary differs."""
    if not facts or facts[0] is None or facts[0].vocabulary is None:
        return {}
    found = {}
    for candidate, theirs in zip(candidates, facts[1:]):
        if theirs is not None and theirs.vocabulary is not None:
            pairs = vocabulary_pairs(facts[0].vocabulary, theirs.vocabulary)
            if pairs is not None:
                found[candidate.reference] = (pairs, len(facts[0].vocabulary), len(theirs.vocabulary))
    return found


def _outer_partners(suspect: Fingerprinted, name: str, candidates: list[Candidate], alignments: dict[str, tuple]):
    """The candidate tensors SUSPECT's tensor `name` (outside the layers) is compared with, and, where a vocabulary
    differs and `name` is an embedding or head, each one's row map (None when every partner pairs rows by place)."""
    partners, maps, aligned = [], [], False
    rows = suspect.prints[name].shape[0] if suspect.prints[name].shape else 1
    for candidate in candidates:
        model = candidate.fingerprinted.model
        alignment = alignments.get(candidate.reference)
        if alignment is not None:
            pairs, mine, theirs = alignment
            fits = (
                name in model.infos
                and is_vocabulary_matrix(suspect.model, name, mine)
                and is_vocabulary_matrix(model, name, theirs)
                and model.infos[name].shape[1:] == suspect.prints[name].shape[1:]
            )
            if fits:
                partners.append((candidate, name))
                maps.append(row_map(pairs, rows, model.infos[name].shape[0]))
                aligned = True
                continue
        found = partner(candidate, suspect, name, None, None)
        if found is not None:
            partners.append((candidate, found))
            maps.append(row_map(None, rows, rows))
    return partners, (maps if aligned else None)
