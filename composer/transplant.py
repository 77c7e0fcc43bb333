"""`compose transplant MODEL --tokenizer DONOR OUT`: MODEL speaking DONOR's tokenizer, written as a composer plan.

Every tensor of MODEL is copied, except the vocabulary-indexed ones its architecture names (embeddings, LM
head), which `tokensurgery` rebuilds in DONOR's id order. The plan goes through `write_plan`, so the output
is streamed, appears atomically and gets a model card and DONOR's tokenizer files.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from composer.architecture import WeightDefinition, architecture_for
from composer.errors import ComposerError
from composer.execute import ExecutionOptions, ExecutionReport
from composer.files import read_text_to_score
from composer.plan.model import COPY, Operation, Plan, PlannedTensor, TensorRef
from composer.recipe.schema import LARGEST_PAD
from composer.sources import ModelSource, local_path, open_source
from composer.sources.base import FolderFilesMixin
from composer.sources.built_tokenizer import WeightlessSource
from composer.sources.tokenizer import check_vocabulary_rows, load_source_tokenizer
from tokensurgery.vocabulary import TOKENIZER_FILES

DONOR_EMBEDDING_NAMES = ("embed_tokens", "word_embeddings", "wte", "tok_embeddings", "embeddings")


@dataclass(frozen=True)
class TransplantOptions:
    estimator: str = "mapped"
    k: int = 8
    pad_to_multiple_of: int | None = None


@dataclass
class TransplantSummary:
    """What a transplant did, for `--report`: alignment counts, and rows per estimator (filled in as tensors are built)."""

    model: str
    donor: str
    alignment: dict[str, int]
    estimator: str
    donor_has_weights: bool
    rows: dict[str, Counter] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class TokenizerOnly(FolderFilesMixin, WeightlessSource):
    """A donor folder with a tokenizer and no weights: its tokenizer (and config, if any) is all it gives."""

    def __init__(self, reference: str, folder: Path):
        super().__init__(reference)
        self.folder = folder

    def config(self) -> dict:
        return super().config() if (self.folder / "config.json").is_file() else {}


def _has_weights(folder: Path) -> bool:
    return any(
        any(folder.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.gguf", "*.safetensors.index.json")
    )


def open_donor(reference: str) -> ModelSource:
    """DONOR as a source: with its weights when it has them (for estimators that use them), else its tokenizer only."""
    path = local_path(reference)
    if path.is_dir():
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ComposerError(
                f"Donor '{reference}' has no tokenizer: {path} holds none of {', '.join(TOKENIZER_FILES)}. "
                "The donor must be a model or tokenizer folder with its tokenizer files."
            )
        return open_source(reference) if _has_weights(path) else TokenizerOnly(reference, path)
    source = open_source(reference)
    if not source.has_tokenizer():
        raise ComposerError(f"Donor '{reference}' has no tokenizer, so there is nothing to transplant.")
    return source


def _donor_rows_names(donor: ModelSource, size: int) -> tuple[str | None, str | None]:
    """(input embedding, output head) tensor names of the donor, or None where it has no such tensor."""
    infos = donor.tensor_infos()
    if not infos:
        return None, None
    embedding = head = None
    try:
        architecture = architecture_for(donor.config(), f"donor '{donor.reference}'")
        for weight in architecture.vocab_weights():
            if weight.name in infos and len(infos[weight.name].shape) == 2:
                if weight in architecture.pre and embedding is None:
                    embedding = weight.name
                elif weight in architecture.post and head is None:
                    head = weight.name
    except (
        ComposerError
    ):  # not a causal LM composer knows (a sentence encoder, say): look for its word embeddings by name
        pass
    if embedding is None:
        candidates = [
            name
            for name, info in infos.items()
            if len(info.shape) == 2 and info.shape[0] >= size and any(part in name for part in DONOR_EMBEDDING_NAMES)
        ]
        embedding = min(candidates, key=len) if candidates else None
    return embedding, head or embedding


def _rebuild_operation(transplant, weight: WeightDefinition, with_donor: bool, counts: Counter) -> Operation:
    axis = weight.vocab_axis

    def rebuild(inputs: list[torch.Tensor]) -> torch.Tensor:
        from tokensurgery import TokenSurgeryError

        model_rows = inputs[0].movedim(axis, 0)
        donor_rows = inputs[1] if with_donor else None
        try:
            rebuilt = transplant.rebuild(model_rows, donor_rows)
        except TokenSurgeryError as error:
            raise ComposerError(f"Tensor '{weight.name}': {error}") from None
        counts.update(rebuilt.counts)
        return rebuilt.rows.movedim(0, axis).contiguous()

    arguments = {"estimator": transplant.settings.name, "rows": transplant.size}
    return Operation(label="tokenizer transplant", fn=rebuild, arguments=arguments)


def _config_or_none(source: ModelSource) -> dict | None:
    try:
        return source.config()
    except ComposerError:
        return None


def _tied(config: dict) -> bool:
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.for_model(**config), "tie_word_embeddings", False))


def _recipe_text(model_ref: str, donor_ref: str, options: TransplantOptions, counts: dict[str, int]) -> str:
    lines = [
        "# Written by `compose transplant`: a record of the run, not a recipe to rerun.",
        "transplant:",
        f"  model: {model_ref!r}",
        f"  tokenizer: {donor_ref!r}",
        f"  estimator: {options.estimator}",
    ]
    if options.estimator in ("omp", "knn"):
        lines.append(f"  k: {options.k}")
    if options.pad_to_multiple_of:
        lines.append(f"  pad_to_multiple_of: {options.pad_to_multiple_of}")
    lines.append("  tokens: {" + ", ".join(f"{kind}: {count}" for kind, count in counts.items()) + "}")
    return "\n".join(lines) + "\n"


def plan_transplant(
    model_ref: str, donor_ref: str, options: TransplantOptions = TransplantOptions()
) -> tuple[Plan, TransplantSummary]:
    """Check everything, align the vocabularies and plan every output tensor; no tensor is read yet."""
    from tokensurgery import TokenSurgeryError

    try:
        plan, summary = _plan(model_ref, donor_ref, options)
    except TokenSurgeryError as error:
        raise ComposerError(str(error)) from None
    plan.replay = (transplant_plan, (model_ref, donor_ref, options))
    return plan, summary


def transplant_plan(model_ref: str, donor_ref: str, options: TransplantOptions) -> Plan:
    """The transplant's plan alone (what a cluster's worker builds again)."""
    return plan_transplant(model_ref, donor_ref, options)[0]


def _plan(model_ref: str, donor_ref: str, options: TransplantOptions) -> tuple[Plan, TransplantSummary]:
    from tokensurgery import EstimatorSettings, TokenSurgeryError

    if options.pad_to_multiple_of is not None and not 1 <= options.pad_to_multiple_of <= LARGEST_PAD:
        raise ComposerError(
            f"--pad-to-multiple-of must be a positive number of rows, at most {LARGEST_PAD} (got {options.pad_to_multiple_of})."
        )
    try:
        settings = EstimatorSettings(options.estimator, options.k)
    except TokenSurgeryError as error:
        raise ComposerError(str(error)) from None
    model = open_source(model_ref)
    try:
        donor = model if donor_ref == model_ref else open_donor(donor_ref)
    except ComposerError:
        model.close()
        raise
    try:
        return _plan_sources(model_ref, donor_ref, model, donor, settings, options)
    except (ComposerError, TokenSurgeryError):
        model.close()
        donor.close()
        raise


def _plan_sources(
    model_ref: str, donor_ref: str, model: ModelSource, donor: ModelSource, settings, options: TransplantOptions
) -> tuple[Plan, TransplantSummary]:
    from tokensurgery import Transplant, Vocabulary
    from tokensurgery.transplant import CONFIG_ID_KEYS

    config = model.config()
    architecture = architecture_for(config, model_ref)
    model_vocabulary = Vocabulary.from_tokenizer(
        load_source_tokenizer(model, "a transplant needs the tokenizer of both models"), model_ref
    )
    vocab_weights = [weight for weight in architecture.vocab_weights() if weight.name in model.tensor_infos()]
    if not vocab_weights:
        raise ComposerError(
            f"Model '{model_ref}' has none of the vocabulary-indexed tensors its architecture names ({', '.join(w.name for w in architecture.vocab_weights())})."
        )
    for weight in vocab_weights:
        rows = model.tensor_infos()[weight.name].shape[weight.vocab_axis]
        check_vocabulary_rows(
            model_ref,
            weight.name,
            rows,
            len(model_vocabulary),
            " --pad-to-multiple-of N pads the output's rows to a multiple of N.",
        )
    donor_vocabulary = Vocabulary.from_tokenizer(
        load_source_tokenizer(donor, "a transplant needs the tokenizer of both models"), donor_ref
    )
    transplant = Transplant.between(model_vocabulary, donor_vocabulary, settings, options.pad_to_multiple_of)

    donor_embedding, donor_head = _donor_rows_names(donor, len(donor_vocabulary))
    uses_donor = settings.name != "subword" and donor_embedding is not None
    summary = TransplantSummary(
        model_ref, donor_ref, transplant.alignment.counts(), settings.name, donor_embedding is not None
    )
    if settings.name != "subword" and donor_embedding is None:
        summary.notes.append(
            f"donor '{donor_ref}' has no embedding weights, so new tokens are estimated by subword composition"
        )

    tied = _tied(config)
    embedding_names = {weight.name for weight in architecture.pre}
    tensors = []
    for name, info in model.tensor_infos().items():
        weight = next((w for w in vocab_weights if w.name == name), None)
        if weight is None:
            tensors.append(PlannedTensor(name, info.shape, info.dtype, (TensorRef(model_ref, name),), COPY))
            continue
        source_name = name
        if tied and weight.tied_to and weight.tied_to in model.tensor_infos():
            source_name = (
                weight.tied_to
            )  # a stored copy of a tied head is rebuilt from the embedding, so the two stay equal
        donor_name = donor_embedding if (name in embedding_names or source_name != name) else donor_head
        inputs = (TensorRef(model_ref, source_name),) + ((TensorRef(donor_ref, donor_name),) if uses_donor else ())
        counts = summary.rows.setdefault(name, Counter())
        shape = list(info.shape)
        shape[weight.vocab_axis] = transplant.size
        tensors.append(
            PlannedTensor(
                name, tuple(shape), info.dtype, inputs, _rebuild_operation(transplant, weight, uses_donor, counts)
            )
        )

    output_config = dict(config, vocab_size=transplant.size)
    output_config.update(
        {key: None for key in CONFIG_ID_KEYS if key in config}
    )  # the model's ids mean nothing in the new vocabulary
    output_config.update(transplant.config_ids(_config_or_none(donor)))
    from composer.plan.output_config import validate_against_transformers

    validate_against_transformers(output_config, {t.name: t.shape for t in tensors}, model_ref)
    sources = {model_ref: model, donor_ref: donor}
    plan = Plan(
        tensors=tensors,
        sources=sources,
        config=output_config,
        tokenizer_source=donor_ref,
        recipe_text=_recipe_text(model_ref, donor_ref, options, summary.alignment),
        method="tokenizer-transplant",
        parents=[model_ref] if donor_ref == model_ref else [model_ref, donor_ref],
    )
    return plan, summary


def run_transplant(
    model_ref: str, donor_ref: str, out: Path, options: TransplantOptions, execution: ExecutionOptions
) -> tuple[ExecutionReport, TransplantSummary]:
    from composer.compose import write_plan
    from composer.execute.output_folder import check_output_free

    check_output_free(out, execution.force)
    plan, summary = plan_transplant(model_ref, donor_ref, options)
    name = f"{Path(model_ref).name} with the tokenizer of {Path(donor_ref).name}"
    report = write_plan(plan, out, execution, name)
    return report, summary


def format_summary(summary: TransplantSummary) -> str:
    counts = summary.alignment
    lines = [
        f"tokens of the donor's vocabulary: {sum(counts.values())}",
        f"  copied: {counts['exact']} identical, {counts['normalised']} matched after normalising their spelling, "
        f"{counts['special']} control tokens mapped by role",
        f"  estimated: {counts['new']} new tokens, {counts['split']} whitespace runs composed from the model's pieces",
        f"  filler (never produced as text): {counts['control']} unmatched control tokens, {counts['twin']} twins of copied tokens",
    ]
    for tensor, rows in summary.rows.items():
        lines.append(f"  rows of {tensor}: " + ", ".join(f"{how} {count}" for how, count in sorted(rows.items())))
    lines += [f"  note: {note}" for note in summary.notes]
    return "\n".join(lines)


def scores(model_path: str, texts: list[str]) -> list:
    """composer.evaluate's TextScore (bits per byte, perplexity per token) of each text under the model and its own tokenizer."""
    from composer.evaluate import load_model, score_text

    loaded, tokenizer = load_model(model_path)
    return [score_text(loaded, tokenizer, text) for text in texts]


def transplant_command(
    model_ref: str,
    donor_ref: str,
    out: Path,
    options: TransplantOptions,
    execution: ExecutionOptions,
    report: bool,
    text_paths: list[Path],
    echo,
) -> TransplantSummary:
    """What `compose transplant` does: write OUT, then (with `report`) print the counts and bits per byte before and after."""
    texts = [read_text_to_score(path) for path in text_paths]  # each checked before any slow work
    written, summary = run_transplant(model_ref, donor_ref, out, options, execution)
    echo(
        f"wrote {written.tensors} tensors ({written.bytes_written / 1e6:.1f} MB) to {written.out} in {written.seconds:.1f} s"
    )
    if report:
        echo(format_summary(summary))
        if texts:
            before, after = scores(model_ref, texts), scores(str(out), texts)
            echo(f"{'text':<40} {'bits/byte before':>17} {'after':>8} {'perplexity before':>18} {'after':>10}")
            for path, old, new in zip(text_paths, before, after):
                echo(
                    f"{str(path):<40} {old.bits_per_byte:>17.4f} {new.bits_per_byte:>8.4f} {old.perplexity:>18.2f} {new.perplexity:>10.2f}"
                )
            echo("(perplexity is per token of each tokenizer, so only bits per byte compare across tokenizers)")
    return summary
