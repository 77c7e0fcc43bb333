"""Honest evaluation: perplexity per token and bits per byte (comparable across tokenizers)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from composer.errors import ComposerError
from composer.model_checks import TOKENIZER_FILES, check_loaded, check_model, model_label, one_line, quiet_transformers


@dataclass
class TextScore:
    tokens: int
    bytes: int
    nats: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats / max(self.tokens, 1))

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / max(self.bytes, 1)


def load_model(reference: str):
    """(model, tokenizer) from a model folder or a .gguf file, in float32 on the CPU.

    A .gguf file is first dequantised by composer into a cached safetensors folder (once per file), so
    loading it needs neither `accelerate` nor transformers' in-memory GGUF conversion.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(reference).expanduser()
    if not path.exists():
        raise ComposerError(f"Model path '{reference}' does not exist.")
    check_model(reference, path)
    if path.is_file() and path.suffix == ".gguf":
        from composer.bundled import converted

        path = converted(path, gguf_cache_name(path))
    folder = path if path.is_dir() else path.parent
    # transformers raises many exception types for a damaged file (SafetensorError, UnpicklingError,
    # RuntimeError from torch's zip reader, KeyError, EOFError, ...); check_model names the file for most
    # of them first, and this turns whatever is left into one paragraph naming the folder
    with quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except Exception as error:  # noqa: BLE001  (any type: see above)
            files = ", ".join(str(folder / name) for name in TOKENIZER_FILES if (folder / name).is_file())
            raise ComposerError(
                f"The tokenizer of model '{reference}' ({files}) could not be loaded with transformers: {one_line(error)}"
            ) from None
        try:
            # mismatched sizes are reported by check_loaded, by name, rather than raised with a pointer to a logged table
            model, loading = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True
            )
        except Exception as error:  # noqa: BLE001
            raise ComposerError(
                f"{model_label(reference, folder)} could not be built from {folder / 'config.json'} and loaded with transformers: {one_line(error)}"
            ) from None
    check_loaded(reference, folder, loading)
    model.eval()
    return model, tokenizer


def gguf_cache_name(path: Path) -> str:
    """A cache folder name for a GGUF file's converted copy: its stem plus a digest of where it is, its size and its mtime."""
    import hashlib
    import re

    resolved = path.resolve()
    stat = resolved.stat()
    digest = hashlib.sha256(f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", resolved.stem)[:80]
    return f"gguf-{stem}-{digest}"


def score_text(
    model,
    tokenizer,
    text: str,
    window: int = 1024,
    stride: int | None = None,
    text_name: str = "the text",
    model_name: str | None = None,
) -> TextScore:
    """Negative log-likelihood of every token of `text` after the first, in windows with overlapping context.

    Logits that are NaN or infinite are an error naming the model, the text and the first token position
    where they appear: a NaN perplexity would read as a score."""
    import torch

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"][0]
    name = model_name or model.config.name_or_path
    if len(ids) < 2:
        raise ComposerError(
            f"{text_name} is {len(ids)} token(s) long for model '{name}'; a score needs at least two tokens (each token after the first is scored)."
        )
    limit = getattr(model.config, "max_position_embeddings", window) or window
    if not isinstance(limit, int) or limit < 2:  # a window of one token scores nothing and never moves on
        raise ComposerError(
            f"Model '{name}': its config.json gives max_position_embeddings {limit!r}; scoring text needs a context of at least 2 tokens."
        )
    from composer.cpu import linears_through_onednn

    total = 0.0
    scored = 0
    with torch.no_grad(), linears_through_onednn():
        for start, end, first_new in scoring_windows(len(ids), limit, window, stride):
            chunk = ids[start:end].unsqueeze(0)
            logits = model(chunk).logits[0, :-1].float()
            finite = torch.isfinite(logits).all(dim=-1)
            if not bool(finite.all()):
                position = start + int((~finite).nonzero()[0, 0])
                bad = logits[position - start]
                kind = "NaN" if bool(torch.isnan(bad).any()) else "infinite"
                raise ComposerError(
                    f"Model '{name}' gives {kind} logits on {text_name}, first at token position "
                    f"{position} of {len(ids)} (after {tokenizer.decode(ids[max(position - 4, 0) : position + 1])!r}), so it has no score. "
                    "Its weights hold NaN or infinite values, or its activations overflow in float32; check the model (or the merge that made it)."
                )
            targets = chunk[0, 1:]
            losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            new_losses = losses[first_new:]
            total += float(new_losses.sum())
            scored += new_losses.numel()
    return TextScore(tokens=scored, bytes=len(text.encode("utf-8")), nats=total)


def scoring_windows(
    tokens: int, limit: int, window: int = 1024, stride: int | None = None
) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) of each window `score_text` runs over `tokens` tokens, for a model whose
    context is `limit` tokens: windows of min(window, limit) tokens every `stride` (default half a window) tokens,
    each scoring only the positions the window before it did not (the first scores them all)."""
    window = min(window, limit)
    # a window must overlap the one before by a token at least: its first token has no context inside it to be scored from
    stride = max(1, min(stride or window // 2, window - 1))
    windows = []
    start = 0
    while True:
        end = min(start + window, tokens)
        windows.append((start, end, 0 if start == 0 else (window - stride) - 1))
        if end == tokens:
            return windows
        start += stride


def greedy_generate(model, tokenizer, prompt: str, new_tokens: int = 24) -> str:
    import torch

    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        output = model.generate(
            ids,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()
