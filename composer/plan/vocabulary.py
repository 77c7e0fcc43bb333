"""Merging models whose vocabularies differ: the output vocabulary, and every model's rows moved into it.

With `tokenizer_source: base | union | MODEL` (or a `tokenizer:` section) each vocabulary-indexed tensor
(embeddings, LM head) of each model is rebuilt in the output vocabulary's id order before blending:

- a token the model has (matched by the text it stands for, as `tokensurgery.align` matches it) keeps
  the model's row bit for bit;
- a token some models lack takes, for those models, a stand-in row: the one a `tokens:` setting names, else
  the base model's row, else the mean of the rows of the models that have it (the one model's own row when
  only one has it). A model without a token thus adds nothing of its own to it: merging a chat fine-tune
  that added `<|im_start|>` with one that did not keeps the first one's row;
- a token no model has (a `tokens:` addition, or a tokenizer from outside the merge) is estimated in each
  model's own space by `tokensurgery`'s estimators (subword composition from that model's pieces);
- rows past the vocabulary (padding) keep a model's own padding rows where its vocabulary is the output's,
  else the model's mean row.

The output vocabulary: `base` is the base model's tokenizer, `MODEL` that model's, `union` the base's with
every added token (special or not) of the other models appended; `tokens:` keys the vocabulary lacks are
added too. Regular vocabulary entries of another tokenizer are not added to a union: without their merge
rules they could only be forced in as added tokens, which would change how every text is split.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from composer.errors import ComposerError, ComposerWarning
from composer.recipe.schema import ModelTokenRow, TokenizerSettings, ZeroRow
from composer.sources import ModelSource
from composer.sources.tokenizer import check_vocabulary_rows, load_source_tokenizer


@dataclass
class ModelRows:
    """One model's rows in the output vocabulary."""

    owned: np.ndarray  # output token -> the model's row for it, -1 where its vocabulary lacks the token
    same_vocabulary: bool  # the model's vocabulary is the output's (so its padding rows are kept as they are)
    row_count: int  # rows of the model's embedding


@dataclass
class VocabularyMerge:
    """How to rebuild every model's vocabulary-indexed tensors in the output vocabulary (see the module doc)."""

    size: int  # rows of every vocabulary-indexed output tensor
    token_count: int  # tokens of the output vocabulary; rows past it are padding
    rows: dict[str, ModelRows]  # of the models this merge blends
    forced: np.ndarray  # output tokens whose stand-in row every model takes (`force: true`)
    stand_in_tokens: np.ndarray  # output tokens with a stand-in row (some model lacks them, or forced)
    stand_in_from: dict[
        str, tuple[np.ndarray, np.ndarray]
    ]  # model -> (positions in stand_in_tokens, that model's rows)
    stand_in_mean: np.ndarray  # positions in stand_in_tokens averaged over the models that have the token
    estimated: np.ndarray  # output tokens no model has: each model estimates its own row
    transplants: dict = field(default_factory=dict)  # model -> tokensurgery.Transplant, for the estimated rows

    def is_identity(self) -> bool:
        return not len(self.forced) and all(
            rows.same_vocabulary and rows.row_count == self.size for rows in self.rows.values()
        )

    def _lacking(self, model: str) -> np.ndarray:
        owned = self.rows[model].owned[: self.token_count]
        lacking = owned < 0
        lacking[self.forced] = True
        return lacking

    def rebuild(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each model's tensor (vocabulary along axis 0) in the output vocabulary's order, in its own dtype."""
        stand_ins = self._stand_ins(tensors)
        return {model: self._rebuild_one(model, tensor, stand_ins) for model, tensor in tensors.items()}

    def _stand_ins(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        first = next(iter(tensors.values()))
        rows = torch.zeros(
            (len(self.stand_in_tokens),) + tuple(first.shape[1:]), dtype=torch.float32, device=first.device
        )
        for model, (positions, model_rows) in self.stand_in_from.items():
            rows[torch.from_numpy(positions)] = tensors[model][torch.from_numpy(model_rows)].float()
        if len(self.stand_in_mean):
            tokens = self.stand_in_tokens[self.stand_in_mean]
            total = torch.zeros((len(tokens),) + tuple(first.shape[1:]), dtype=torch.float32, device=first.device)
            count = torch.zeros(len(tokens), dtype=torch.float32, device=first.device)
            for model, tensor in tensors.items():
                owned = self.rows[model].owned[tokens]
                has = np.flatnonzero(owned >= 0)
                total[torch.from_numpy(has)] += tensor[torch.from_numpy(owned[has])].float()
                count[torch.from_numpy(has)] += 1
            rows[torch.from_numpy(self.stand_in_mean)] = total / count.clamp(min=1).view(
                (-1,) + (1,) * (total.dim() - 1)
            )
        return rows

    def _rebuild_one(self, model: str, tensor: torch.Tensor, stand_ins: torch.Tensor) -> torch.Tensor:
        rows = self.rows[model]
        out = torch.empty((self.size,) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        lacking = self._lacking(model)
        kept = np.flatnonzero(~lacking)
        out[torch.from_numpy(kept)] = tensor[torch.from_numpy(rows.owned[kept])]
        needs_stand_in = np.flatnonzero(lacking[self.stand_in_tokens])
        if len(needs_stand_in):
            out[torch.from_numpy(self.stand_in_tokens[needs_stand_in])] = stand_ins[
                torch.from_numpy(needs_stand_in)
            ].to(tensor.dtype)
        if len(self.estimated):
            rebuilt = self.transplants[model].rebuild(tensor)
            out[torch.from_numpy(self.estimated)] = rebuilt.rows[torch.from_numpy(self.estimated)].to(tensor.dtype)
        if self.size > self.token_count:
            start = self.token_count
            if rows.same_vocabulary and len(tensor) > start:
                stop = min(len(tensor), self.size)
                out[start:stop] = tensor[start:stop]
                start = stop
            if start < self.size:
                out[start:] = out[: self.token_count].float().mean(dim=0).to(tensor.dtype)
        return out


# --- planning ----------------------------------------------------------------------------------------


@dataclass
class VocabularyRequest:
    """What the recipe asks for: the output tokenizer's source, per-token settings and padding."""

    source: str  # "base", "union" or a model reference
    tokens: dict = field(default_factory=dict)  # token -> TokenRowSettings
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_recipe(cls, tokenizer_source: str | None, settings: TokenizerSettings | None) -> VocabularyRequest | None:
        if settings is not None:
            return cls(settings.source, dict(settings.tokens or {}), settings.pad_to_multiple_of)
        return cls(tokenizer_source) if tokenizer_source is not None else None


class VocabularyKeyError(ComposerError):
    """A vocabulary problem at a recipe key (a tuple under `tokenizer`), for the planner to locate."""

    def __init__(self, location: tuple, detail: str):
        super().__init__(detail)
        self.location = location
        self.detail = detail


def _same_ids(tokenizer, output_vocab: dict[str, int]) -> bool:
    """Whether every token of `tokenizer` has the same id in `output_vocab`."""
    return all(output_vocab.get(token) == index for token, index in tokenizer.get_vocab().items())


def _union(base_tokenizer, others: list):
    """The base tokenizer with every added token of `others` it lacks appended, in order, settings kept."""
    import copy

    union = copy.deepcopy(base_tokenizer)
    known = set(union.get_vocab())
    for tokenizer in others:
        for _, added in sorted(tokenizer.added_tokens_decoder.items()):
            if added.content not in known:
                union.add_tokens([added], special_tokens=added.special)
                known.add(added.content)
    return union


@dataclass
class OutputVocabulary:
    """The output tokenizer and where each model's tokens sit in it; `for_models` gives the rules for one set of models."""

    request: VocabularyRequest
    tokenizers: dict  # model -> its transformers tokenizer
    output: object  # the output's transformers tokenizer
    files_of: str | None  # the model whose tokenizer files the output takes as they are; None: `output` is written
    base: str
    size: int
    rows: dict[str, ModelRows]
    _vocabularies: dict = field(default_factory=dict)
    _merges: dict = field(default_factory=dict)

    @property
    def token_count(self) -> int:
        return len(self.output)

    def vocabulary(self, model: str | None):
        """tokensurgery's Vocabulary of a model (None: of the output)."""
        from tokensurgery import Vocabulary

        if model not in self._vocabularies:
            tokenizer = self.output if model is None else self.tokenizers[model]
            self._vocabularies[model] = Vocabulary.from_tokenizer(tokenizer, model or "the output tokenizer")
        return self._vocabularies[model]

    def for_models(self, models: list[str], check: bool = False) -> VocabularyMerge | None:
        """How to rebuild the tensors of `models` (those one output tensor blends); None when nothing moves.
        With `check`, a `tokens:` setting naming a model outside `models` is an error (else it is passed over)."""
        key = tuple(dict.fromkeys(models))
        if key not in self._merges:
            merge = _stand_in_rules(
                self.request,
                list(key),
                self.base,
                self.rows,
                self.token_count,
                self.output.get_vocab(),
                self.tokenizers,
                check,
            )
            merge.size = self.size
            if len(merge.estimated):
                from tokensurgery import Transplant

                for model in key:
                    merge.transplants[model] = Transplant.between(self.vocabulary(model), self.vocabulary(None))
            self._merges[key] = None if merge.is_identity() else merge
        return self._merges[key]

    def summary(self) -> list[str]:
        request, base_count = self.request, len(self.tokenizers[self.base])
        what = {"base": "the base model's", "union": "the union of the models'"}.get(
            request.source, f"'{request.source}''s"
        )
        added = (
            f" ({self.token_count - base_count} added to the base's {base_count})" if request.source == "union" else ""
        )
        lines = [
            f"vocabulary: {what} tokenizer, {self.token_count} tokens{added}"
            + (f", {self.size} rows" if self.size != self.token_count else "")
        ]
        merge = self.for_models(list(self.rows))
        if merge is None:
            return lines
        for model in self.rows:
            lacking = int(merge._lacking(model).sum())
            if lacking:
                lines.append(
                    f"  {model} lacks {lacking} of them: it takes stand-in rows (from the models that have them"
                    + (", estimated where none has)" if len(merge.estimated) else ")")
                )
        if len(merge.estimated):
            lines.append(
                f"  {len(merge.estimated)} tokens no model has: estimated in each model's space (subword composition)"
            )
        return lines


def plan_vocabulary(
    request: VocabularyRequest,
    models: list[str],
    base: str,
    sources: dict[str, ModelSource],
    vocab_rows: dict[str, tuple[str, int]],
    outside_source: ModelSource | None = None,
) -> OutputVocabulary:
    """Load every model's tokenizer, build the output tokenizer and place each model's tokens in it.
    `vocab_rows`: each model's embedding (tensor name, rows); `outside_source`: the tokenizer source when it is not merged."""
    from tokensurgery import align, padded

    tokenizers = {}
    for model in models:
        if sources[model].has_tokenizer():
            tokenizers[model] = load_source_tokenizer(
                sources[model], "merging vocabularies needs every model's tokenizer"
            )
    if base not in tokenizers and request.source in ("base", "union"):
        raise VocabularyKeyError(
            ("source",),
            f"the base model '{base}' has no tokenizer files, so '{request.source}' has nothing to start from; name a model that has one.",
        )
    stand_in = (
        base
        if base in tokenizers
        else next((model for model in (request.source, *models) if model in tokenizers), None)
    )
    for model in models:
        if model not in tokenizers:
            if stand_in is None:
                raise VocabularyKeyError(
                    ("source",),
                    f"no model of this merge has tokenizer files ('{model}' among them), so there is no vocabulary to merge; give the models their tokenizers or leave the tokenizer settings out.",
                )
            warnings.warn(
                f"model '{model}' has no tokenizer files; its vocabulary is taken to be that of '{stand_in}'.",
                ComposerWarning,
                stacklevel=2,
            )
            tokenizers[model] = tokenizers[stand_in]

    if request.source == "base":
        output, files_of = tokenizers[base], base
    elif request.source == "union":
        output = _union(tokenizers[base], [tokenizers[m] for m in models if m != base])
        files_of = base if len(output) == len(tokenizers[base]) else None
    else:
        files_of = request.source
        output = (
            tokenizers[files_of]
            if files_of in tokenizers
            else load_source_tokenizer(outside_source, "it cannot be the tokenizer source")
        )
    missing = [token for token in request.tokens if token not in output.get_vocab()]
    if missing:
        import copy

        output = copy.deepcopy(output)
        output.add_tokens(missing)
        files_of = None
    output_vocab = output.get_vocab()
    token_count = len(output)

    vocabulary = OutputVocabulary(request, tokenizers, output, files_of, base, token_count, {})
    for model in models:
        tokenizer = tokenizers[model]
        check_vocabulary_rows(
            model,
            vocab_rows[model][0],
            vocab_rows[model][1],
            len(tokenizer),
            " `tokenizer: {pad_to_multiple_of: N}` pads the output's rows.",
        )
        if _same_ids(tokenizer, output_vocab):
            owned = np.full(token_count, -1, dtype=np.int64)
            owned[: len(tokenizer)] = np.arange(len(tokenizer))
            vocabulary.rows[model] = ModelRows(owned, len(tokenizer) == token_count, vocab_rows[model][1])
        else:
            alignment = align(vocabulary.vocabulary(model), vocabulary.vocabulary(None))
            vocabulary.rows[model] = ModelRows(alignment.source_ids.copy(), False, vocab_rows[model][1])

    size = token_count
    keeper = files_of if files_of in models else (base if request.source == "union" else None)
    if keeper is not None:
        size = max(
            size, vocab_rows[keeper][1]
        )  # keep the padding rows of the model whose vocabulary the output extends
    vocabulary.size = padded(size, request.pad_to_multiple_of)
    vocabulary.for_models(models, check=True)  # the `tokens:` settings are checked here, before any work
    return vocabulary


def _token_row(model: str, setting, tokenizers: dict, token: str) -> int:
    where = ("tokens", token, "source")
    vocab = tokenizers[model].get_vocab()
    if isinstance(setting, ModelTokenRow):
        if setting.token_id is not None:
            if setting.token_id >= len(tokenizers[model]):
                raise VocabularyKeyError(
                    where + ("token_id",),
                    f"model '{model}' has no token id {setting.token_id} (its vocabulary has {len(tokenizers[model])} tokens).",
                )
            return setting.token_id
        if setting.token not in vocab:
            raise VocabularyKeyError(where + ("token",), f"model '{model}' has no token {setting.token!r}.")
        return vocab[setting.token]
    if token not in vocab:
        raise VocabularyKeyError(
            where,
            f"model '{model}' has no token {token!r}, so its row cannot stand in; name a model that has it, or use {{kind: model_token, model: ..., token: ...}}.",
        )
    return vocab[token]


def _stand_in_rules(request, models, base, rows, token_count, output_vocab, tokenizers, check) -> VocabularyMerge:
    owned = np.stack([rows[m].owned[:token_count] for m in models])  # (models, tokens)
    has = owned >= 0
    forced = np.zeros(token_count, dtype=bool)
    chosen: dict[int, tuple[str | None, int | None]] = {}  # token id -> (model, its row) or (None, None) for zero
    for token, setting in request.tokens.items():
        token_id = output_vocab[token]
        forced[token_id] = setting.force
        source = setting.source
        if source is None:
            continue
        if isinstance(source, ZeroRow):
            chosen[token_id] = (None, None)
            continue
        model = source.model if isinstance(source, ModelTokenRow) else source
        if model not in models and not check:
            continue
        if model not in models:
            raise VocabularyKeyError(
                ("tokens", token, "source"),
                f"'{model}' is not one of the merged models ({', '.join(models)}); a row can only come from one of them.",
            )
        chosen[token_id] = (model, _token_row(model, source, tokenizers, token))
    someone_has = has.any(axis=0)
    needs = (~has).any(axis=0) | forced
    has_setting = np.isin(np.arange(token_count), list(chosen))
    stand_in_tokens = np.flatnonzero(needs & (someone_has | has_setting))
    estimated = np.flatnonzero(needs & ~someone_has & ~has_setting)
    from_model: dict[str, tuple[list, list]] = {}
    mean = []
    base_position = models.index(base) if base in models else None
    for position, token_id in enumerate(stand_in_tokens.tolist()):
        if token_id in chosen:
            model, row = chosen[token_id]
            if model is not None:
                from_model.setdefault(model, ([], []))[0].append(position)
                from_model[model][1].append(row)
            continue
        if base_position is not None and has[base_position, token_id]:
            from_model.setdefault(base, ([], []))[0].append(position)
            from_model[base][1].append(int(owned[base_position, token_id]))
            continue
        mean.append(position)
    return VocabularyMerge(
        size=token_count,
        token_count=token_count,
        rows={m: rows[m] for m in models},
        forced=np.flatnonzero(forced),
        stand_in_tokens=stand_in_tokens,
        stand_in_from={
            m: (np.array(p, dtype=np.int64), np.array(r, dtype=np.int64)) for m, (p, r) in from_model.items()
        },
        stand_in_mean=np.array(mean, dtype=np.int64),
        estimated=estimated,
    )
