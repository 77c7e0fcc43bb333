"""Real domain fine-tunes of SmolLM2-135M-Instruct, made on a CPU and cached, for `compose tune`, forensics and
the methods' benches (issue 18, item 5).

- "code": trained on the Python sources of the standard library on disk (its top-level *.py files);
- "pt": trained on Brazilian Portuguese, the translated strings (msgstr) of the system's gettext catalogues in
  /usr/share/locale/pt_BR/LC_MESSAGES/*.mo.

Each corpus is split by file, deterministically (a digest of each file's name): held-out files are never trained
on. A fine-tune is a model folder (safetensors in the base's dtype, config, the base's tokenizer files) cached in
`$COMPOSER_CACHE/finetunes/<name>-<digest of settings, base and training text>/`, written into a temporary sibling
and renamed into place only when complete, and reused when present. Beside the weights: `heldout.txt` (held-out
text, capped), `training-files.txt`, `heldout-files.txt` and `finetune.json` (settings, loss, minutes).

`python bench/finetunes.py` builds both (17 minutes each on 2 cores shared with other work; a few minutes on idle
ones) and prints bits per byte of the base and each fine-tune on both held-out texts and on
/work/shared/eval/{en,pt}.txt where present (bench/RESULTS.md, "Domain fine-tunes"). `--only code` and `--only pt`
build one each, so that the two can be built in parallel. The test suite runs
the same `finetune` on tiny models (tests/conftest.py, `tiny_finetunes`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

FORMAT = 1  # raise when a change to this file changes what the same settings build
PT_BR_CATALOGUES = Path("/usr/share/locale/pt_BR/LC_MESSAGES")
SHARED_EVAL = Path("/work/shared/eval")
COMPLETE_MARK = "finetune.json"  # written last inside the partial folder; the rename publishes it
CHECKPOINT = "checkpoint.pt"  # in the partial folder while training: model, optimiser, step
CHECKPOINT_SECONDS = 600.0  # of training between checkpoints (one is 1.6 GB for SmolLM2-135M in float32)
EXTRA_FILES = ("chat_template.jinja", "special_tokens_map.json", "added_tokens.json", "generation_config.json")


@dataclass(frozen=True)
class Document:
    name: str  # the file it came from, relative to its corpus
    text: str


@dataclass(frozen=True)
class Settings:
    name: str
    steps: int
    learning_rate: float
    batch_size: int = 4
    sequence_length: int = 256
    warmup_steps: int = 10
    final_learning_rate_fraction: float = 0.1
    heldout_fraction: float = 0.15
    heldout_bytes: int = 12_000
    seed: int = 0


# 100 steps of 2 x 256 tokens (51k tokens) at learning rate 1e-4. The first bench fine-tunes (30 steps of 2 x 256
# at 1.5e-4) lowered their domains' held-out bits per byte by only 4% and 7%, too little for the domains to pull a
# merge apart: tuning found nothing better than weights 0.5/0.5. A step of 2 x 256 takes about 5 s on 2 idle cores
# and several times that on the shared ones; a build saves a checkpoint every 10 minutes and resumes from it.
BENCH_SETTINGS = {
    "code": Settings(name="code", steps=100, learning_rate=1e-4, batch_size=2, warmup_steps=8),
    "pt": Settings(name="pt", steps=100, learning_rate=1e-4, batch_size=2, warmup_steps=8),
}


# --- corpora ---------------------------------------------------------------------------------------------------


def text_files(folder: Path, pattern: str) -> list[Document]:
    """Every file of `folder` matching `pattern` (not recursive), sorted by name, as UTF-8 text."""
    paths = sorted(path for path in Path(folder).glob(pattern) if path.is_file())
    documents = [Document(path.name, path.read_text(encoding="utf-8", errors="replace")) for path in paths]
    return [document for document in documents if document.text.strip()]


def python_sources(root: Path | None = None) -> list[Document]:
    """The standard library's top-level *.py files (or those of `root`)."""
    return text_files(Path(root or sysconfig.get_paths()["stdlib"]), "*.py")


def mo_strings(path: Path) -> list[str]:
    """The translations (msgstr) of a GNU .mo catalogue, every plural form, without the header entry.

    The format: a magic number (which also gives the byte order), a revision, the count N, then the offsets of two
    tables of N (length, offset) pairs, the originals and their translations."""
    data = Path(path).read_bytes()
    if len(data) < 20:
        raise ValueError(f"{path} is too short to be a .mo catalogue")
    magic = struct.unpack("<I", data[:4])[0]
    order = {0x950412DE: "<", 0xDE120495: ">"}.get(magic)
    if order is None:
        raise ValueError(f"{path} is not a .mo catalogue (magic {magic:#x})")
    count, originals, translations = struct.unpack(order + "3I", data[8:20])
    charset = "utf-8"
    strings = []
    for index in range(count):
        original_length = struct.unpack(order + "I", data[originals + 8 * index : originals + 8 * index + 4])[0]
        length, offset = struct.unpack(order + "2I", data[translations + 8 * index : translations + 8 * index + 8])
        translated = data[offset : offset + length]
        if original_length == 0:  # the header: "Content-Type: text/plain; charset=..."
            for line in translated.decode("ascii", errors="replace").splitlines():
                if line.lower().startswith("content-type:") and "charset=" in line:
                    charset = line.split("charset=", 1)[1].strip() or charset
            continue
        strings += [form.decode(charset, errors="replace") for form in translated.split(b"\0") if form.strip()]
    return strings


def gettext_catalogues(folder: Path = PT_BR_CATALOGUES) -> list[Document]:
    """One document per .mo catalogue of `folder`: its translations, one a line."""
    documents = []
    for path in sorted(Path(folder).glob("*.mo")):
        strings = mo_strings(path)
        if strings:
            documents.append(Document(path.name, "\n".join(strings) + "\n"))
    return documents


def split_documents(documents: list[Document], fraction: float, salt: str) -> tuple[list[Document], list[Document]]:
    """(training, held-out): the held-out files are the `fraction` (at least one) whose salted name digests sort
    first, so the split depends only on the files' names, never on their order or on the training settings."""
    if len(documents) < 2:
        raise ValueError(
            f"a fine-tune needs at least two files to split into training and held-out text, not {len(documents)}"
        )
    ranked = sorted(documents, key=lambda document: hashlib.sha256(f"{salt}\0{document.name}".encode()).hexdigest())
    count = min(max(1, round(fraction * len(documents))), len(documents) - 1)
    heldout_names = {document.name for document in ranked[:count]}
    training = [document for document in documents if document.name not in heldout_names]
    heldout = [document for document in documents if document.name in heldout_names]
    return training, heldout


def heldout_text(heldout: list[Document], limit: int) -> str:
    """An equal share of `limit` bytes from each held-out file (so that every one is represented), each share cut
    at its last line break."""
    share = max(limit // len(heldout), 1)
    pieces = []
    for document in heldout:
        encoded = document.text.encode("utf-8")
        if len(encoded) > share:
            cut = encoded[:share].decode("utf-8", errors="ignore")
            piece = cut[: cut.rfind("\n") + 1] or cut
        else:
            piece = document.text if document.text.endswith("\n") else document.text + "\n"
        pieces.append(piece)
    return "".join(pieces)


# --- the cache ---------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    from composer.cache import cache_dir, make_private_dirs

    root = cache_dir() / "finetunes"
    make_private_dirs(root)
    return root


def base_identity(base: Path) -> dict:
    """What names the base: its config and its weight files' place, size and modification time."""
    files = sorted(Path(base).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{base} holds no *.safetensors weights")
    weights = [[str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns] for path in files]
    return {"config": (Path(base) / "config.json").read_text(encoding="utf-8"), "weights": weights}


def settings_digest(base: Path, documents: list[Document], settings: Settings) -> str:
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            {"format": FORMAT, "settings": asdict(settings), "base": base_identity(base)}, sort_keys=True
        ).encode()
    )
    for document in documents:
        digest.update(hashlib.sha256(document.name.encode()).digest())
        digest.update(hashlib.sha256(document.text.encode()).digest())
    return digest.hexdigest()[:16]


def entry_path(base: Path, documents: list[Document], settings: Settings, root: Path | None = None) -> Path:
    return (root or cache_root()) / f"{settings.name}-{settings_digest(base, documents, settings)}"


def is_complete(entry: Path) -> bool:
    return (entry / COMPLETE_MARK).is_file() and (entry / "config.json").is_file()


# --- training ----------------------------------------------------------------------------------------------------


def token_stream(tokenizer, documents: list[Document]):
    """The training documents' tokens end to end, an end-of-text token after each (1-D int64 tensor)."""
    import torch

    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for document in documents:
        ids += tokenizer(document.text, add_special_tokens=False)["input_ids"] + separator
    return torch.tensor(ids, dtype=torch.long)


def learning_rate_at(step: int, settings: Settings) -> float:
    """Linear warm-up, then cosine decay to `final_learning_rate_fraction` of the peak."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(settings.steps - settings.warmup_steps, 1)
    floor = settings.final_learning_rate_fraction
    return settings.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model,
    stream,
    settings: Settings,
    report: Callable[[str], None] = print,
    checkpoint: Path | None = None,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
) -> tuple[list[float], float]:
    """Full fine-tune with AdamW in float32 on random windows of `stream`: (the loss of each step, seconds trained).

    With `checkpoint`, the model, the optimiser, the step and the losses are saved there every `checkpoint_seconds`
    of training, and a run that finds one resumes from it: the windows of the steps already taken are drawn again
    (and skipped), so a resumed run trains on the batches an uninterrupted one does and ends with the same weights."""
    import torch

    length = settings.sequence_length
    if len(stream) <= length + 1:
        raise ValueError(f"the training text is {len(stream)} tokens; it needs more than one window of {length}")
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    done, losses, earlier = 0, [], 0.0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        done, losses, earlier = state["step"], list(state["losses"]), state["seconds"]
        report(f"  {settings.name}: resuming at step {done + 1}/{settings.steps} from {checkpoint}")
    model.train()
    started = saved = time.monotonic()
    for step in range(settings.steps):
        starts = torch.randint(0, len(stream) - length, (settings.batch_size,), generator=generator)
        if step < done:
            continue
        batch = torch.stack([stream[start : start + length] for start in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, settings)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        seconds = earlier + time.monotonic() - started
        if step % 10 == 0 or step == settings.steps - 1:
            report(f"  {settings.name} step {step + 1}/{settings.steps} loss {losses[-1]:.3f} ({seconds:.0f} s)")
        if checkpoint is not None and step + 1 < settings.steps and time.monotonic() - saved >= checkpoint_seconds:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1}
            torch.save({**state, "losses": losses, "seconds": seconds}, checkpoint.with_suffix(".tmp"))
            os.replace(checkpoint.with_suffix(".tmp"), checkpoint)  # a kill while saving leaves the last one whole
            saved = time.monotonic()
    model.eval()
    return losses, earlier + time.monotonic() - started


@contextlib.contextmanager
def torch_threads(count: int | None):
    import torch

    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def save_finetune(model, base: Path, folder: Path, dtype) -> None:
    """The weights (in the base's dtype), config and the base's tokenizer files."""
    from composer.model_checks import TOKENIZER_FILES

    model.to(dtype).save_pretrained(str(folder))
    for name in (*TOKENIZER_FILES, *EXTRA_FILES):
        if (Path(base) / name).is_file() and not (folder / name).exists():
            shutil.copy(Path(base) / name, folder / name)


def base_dtype(base: Path):
    import torch

    config = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)


def partial_folder(entry: Path) -> Path:
    """Where `entry` is built: renamed to `entry` when complete; a build that dies leaves its checkpoint here."""
    return entry.parent / f".{entry.name}.partial"


def locked(folder: Path, wait: bool) -> int | None:
    """A descriptor holding an exclusive lock on the folder (released by the kernel when its process dies, however
    it dies), or None when it is gone, was renamed meanwhile, or (without `wait`) another process holds it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(folder).st_ino == os.fstat(descriptor).st_ino:
            return descriptor
    except OSError:
        pass
    os.close(descriptor)
    return None


def remove_stale_partials(root: Path, keep: set[str] = frozenset()) -> list[Path]:
    """Remove the build folders in `root` that no living process holds, except those named in `keep` (the partial
    folders of fine-tunes that a later build may resume): the debris of builds killed before they could clean up."""
    removed = []
    for folder in sorted(root.glob(".*.partial")):
        if folder.name in keep or not folder.is_dir():
            continue
        descriptor = locked(folder, wait=False)
        if descriptor is None:
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(descriptor)
    return removed


@contextlib.contextmanager
def building(entry: Path):
    """The partial folder of `entry`, locked by this process, or None when `entry` is complete (built meanwhile by
    another process, which this one waited for)."""
    scratch = partial_folder(entry)
    while True:
        if is_complete(entry):
            yield None
            return
        scratch.parent.mkdir(parents=True, exist_ok=True)
        scratch.mkdir(mode=0o700, exist_ok=True)
        descriptor = locked(scratch, wait=True)
        if descriptor is not None:
            break
    try:
        if is_complete(entry):  # finished by another process between the check above and the lock
            shutil.rmtree(scratch, ignore_errors=True)
            scratch = None
        yield scratch
    finally:
        os.close(descriptor)


def finetune(
    base: Path,
    documents: list[Document],
    settings: Settings,
    root: Path | None = None,
    report: Callable[[str], None] = print,
    threads: int | None = None,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
) -> Path:
    """The cached fine-tune of `base` on the training split of `documents`, built first when absent.

    The build happens in a locked partial folder beside the entry, renamed into place when complete. It saves a
    checkpoint there every `checkpoint_seconds` of training; a build killed in any way (SIGKILL included) is resumed
    from its checkpoint by the next call, and one that stops with an exception before any checkpoint leaves nothing.
    A second process asking for the same entry waits for the first. Other partial folders no living process holds
    (left by builds of older versions, or of settings no longer asked for) are removed by `main`.

    `threads` sets torch's CPU threads while training (tiny models train several times faster on one thread on a
    busy machine); it changes no result beyond float rounding, so it is not part of the cache key."""
    training, heldout = split_documents(documents, settings.heldout_fraction, settings.name)
    entry = entry_path(base, documents, settings, root)
    if is_complete(entry):
        return entry
    with building(entry) as scratch:
        if scratch is not None:
            build(base, training, heldout, settings, entry, scratch, report, threads, checkpoint_seconds)
    return entry


def build(
    base: Path,
    training: list[Document],
    heldout: list[Document],
    settings: Settings,
    entry: Path,
    scratch: Path,
    report: Callable[[str], None],
    threads: int | None,
    checkpoint_seconds: float,
) -> None:
    from composer.evaluate import load_model

    report(f"fine-tuning {settings.name}: {len(training)} training files, {len(heldout)} held out -> {entry}")
    checkpoint = scratch / CHECKPOINT
    try:
        model, tokenizer = load_model(str(base))
        stream = token_stream(tokenizer, training)
        with torch_threads(threads):
            losses, seconds = train(model, stream, settings, report, checkpoint, checkpoint_seconds)
        save_finetune(model, base, scratch, base_dtype(base))
        (scratch / "heldout.txt").write_text(heldout_text(heldout, settings.heldout_bytes), encoding="utf-8")
        (scratch / "training-files.txt").write_text(
            "".join(f"{document.name}\n" for document in training), encoding="utf-8"
        )
        (scratch / "heldout-files.txt").write_text(
            "".join(f"{document.name}\n" for document in heldout), encoding="utf-8"
        )
        record = {
            "format": FORMAT,
            "settings": asdict(settings),
            "base": str(base),
            "training_files": len(training),
            "heldout_files": len(heldout),
            "training_tokens": len(stream),
            "tokens_seen": settings.steps * settings.batch_size * settings.sequence_length,
            "first_losses": losses[:5],
            "last_losses": losses[-5:],
            "training_minutes": round(seconds / 60, 2),
        }
        checkpoint.unlink(missing_ok=True)
        (scratch / COMPLETE_MARK).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.rename(scratch, entry)
    except BaseException:
        if not checkpoint.is_file():  # nothing to resume from
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            report(f"  {settings.name}: stopped; the next build resumes from {checkpoint}")
        raise


# --- scoring and the bench ---------------------------------------------------------------------------------------


def bits_per_byte(folder: Path, texts: dict[str, str], window: int = 1024) -> dict[str, float]:
    """Bits per byte of the model in `folder` on each named text (composer.evaluate.score_text, in windows that do
    share one token: each token is scored once, which halves the cost on a CPU; a stride of the whole window would
    make score_text skip all but the last token of each later window)."""
    from composer.evaluate import load_model, score_text

    model, tokenizer = load_model(str(folder))
    window = min(window, getattr(model.config, "max_position_embeddings", None) or window)  # as score_text does
    return {
        name: score_text(model, tokenizer, text, window=window, stride=window - 1, text_name=name).bits_per_byte
        for name, text in texts.items()
    }


def bench_corpora() -> dict[str, list[Document]]:
    return {"code": python_sources(), "pt": gettext_catalogues()}


def main(arguments: list[str] | None = None) -> None:
    import argparse

    import torch

    from composer.bundled import smollm2_dir

    parser = argparse.ArgumentParser(
        description="Build (or find cached) the code and pt fine-tunes of SmolLM2-135M-Instruct and print their bits per byte."
    )
    parser.add_argument(
        "--only",
        choices=sorted(BENCH_SETTINGS),
        help="build this fine-tune only, and print no table (run the two in parallel)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (one trains faster on a busy machine)")
    options = parser.parse_args(arguments)
    if options.threads:
        torch.set_num_threads(options.threads)
    base = smollm2_dir()
    corpora = bench_corpora()
    entries = [entry_path(base, corpora[name], settings) for name, settings in BENCH_SETTINGS.items()]
    for folder in remove_stale_partials(cache_root(), keep={partial_folder(entry).name for entry in entries}):
        print(f"removed {folder}, left by a build that no longer runs")
    if options.only:
        print(finetune(base, corpora[options.only], BENCH_SETTINGS[options.only]))
        return
    folders = {name: finetune(base, corpora[name], settings) for name, settings in BENCH_SETTINGS.items()}
    texts = {
        f"{name} held-out": (folder / "heldout.txt").read_text(encoding="utf-8") for name, folder in folders.items()
    }
    for name in ("en", "pt"):
        if (SHARED_EVAL / f"{name}.txt").is_file():
            texts[f"{name}.txt"] = (SHARED_EVAL / f"{name}.txt").read_text(encoding="utf-8")
    rows = [("SmolLM2-135M-Instruct (base)", base, "-")]
    for name, folder in folders.items():
        minutes = json.loads((folder / COMPLETE_MARK).read_text(encoding="utf-8"))["training_minutes"]
        rows.append((f"{name} fine-tune", folder, f"{minutes:.1f}"))
    print("\n| model | " + " | ".join(f"bits/byte, {name}" for name in texts) + " | training minutes |")
    print("|---|" + "---|" * len(texts) + "---|")
    for label, folder, minutes in rows:
        scores = bits_per_byte(folder, texts)
        print(f"| {label} | " + " | ".join(f"{scores[name]:.4f}" for name in texts) + f" | {minutes} |", flush=True)
    print()
    for label, folder, _ in rows:
        print(f"{label}: {folder}")
    print("held-out bytes: " + ", ".join(f"{name} {len(text.encode('utf-8'))}" for name, text in texts.items()))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's composer
    sys.exit(main())
