"""Tiny domain fine-tunes for the suite, built in seconds by bench/finetunes.py's own `finetune` (the code path of
the real SmolLM2 fine-tunes), from texts in tests/data/finetunes:

- a tiny Llama with a byte-level tokenizer, random, is first trained on tests/data/english.txt: the "base";
- "code" fine-tunes the base on small Python files (tests/data/finetunes/code/*.py);
- "pt" fine-tunes it on Brazilian Portuguese interface messages (tests/data/finetunes/pt/*.txt), written here into
  GNU .mo catalogues first so that the catalogue reader runs as it does on the system's pt_BR catalogues.

The `tiny_finetunes` fixture (tests/conftest.py) builds them once a session.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from pathlib import Path

from bench.finetunes import Document, Settings, finetune, gettext_catalogues, text_files
from helpers import BYTE_LEVEL_SPECIAL, DATA, ENGLISH_TEXT, byte_level_tokenizer, tiny_model_with_tokenizer

FINETUNE_DATA = DATA / "finetunes"
TINY = Settings(
    name="tiny",
    steps=40,
    learning_rate=1e-3,
    batch_size=8,
    sequence_length=128,
    warmup_steps=5,
    heldout_fraction=0.3,
    heldout_bytes=4000,
)
SETTINGS = {
    "base": replace(TINY, name="base", steps=100, learning_rate=3e-3),
    "code": replace(TINY, name="code"),
    "pt": replace(TINY, name="pt"),
}


@dataclass(frozen=True)
class TinyFinetunes:
    base: Path
    code: Path
    pt: Path
    cache: Path  # the folder of cache entries
    corpora: dict[str, list[Document]]


def write_mo(path: Path, pairs: list[tuple[str, str]]) -> Path:
    """A little-endian GNU .mo catalogue of (msgid, msgstr) pairs, with a UTF-8 header entry first."""
    pairs = sorted([("", "Content-Type: text/plain; charset=UTF-8\n"), *pairs])
    originals = [key.encode() for key, _ in pairs]
    translations = [value.encode() for _, value in pairs]
    count = len(pairs)
    tables = 28
    data_start = tables + 16 * count
    blob = b""
    entries = []
    for text in originals + translations:
        entries.append((len(text), data_start + len(blob)))
        blob += text + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, count, tables, tables + 8 * count, 0, 0)
    path.write_bytes(header + b"".join(struct.pack("<2I", *entry) for entry in entries) + blob)
    return path


def portuguese_catalogues(folder: Path) -> Path:
    """One .mo catalogue in `folder` per text file of tests/data/finetunes/pt, a message a line."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in sorted((FINETUNE_DATA / "pt").glob("*.txt")):
        lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        write_mo(folder / f"{source.stem}.mo", [(f"message {number}", line) for number, line in enumerate(lines)])
    return folder


def english_documents() -> list[Document]:
    paragraphs = [
        paragraph for paragraph in ENGLISH_TEXT.read_text(encoding="utf-8").split("\n\n") if paragraph.strip()
    ]
    return [Document(f"{ENGLISH_TEXT.name}#{number}", paragraph + "\n") for number, paragraph in enumerate(paragraphs)]


def build_tiny_finetunes(root: Path, report=lambda line: None) -> TinyFinetunes:
    cache = root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    random_base = root / "random-base"
    if not (random_base / "config.json").is_file():
        tiny_model_with_tokenizer(random_base, byte_level_tokenizer(320), BYTE_LEVEL_SPECIAL, seed=0)
    corpora = {
        "base": english_documents(),
        "code": text_files(FINETUNE_DATA / "code", "*.py"),
        "pt": gettext_catalogues(portuguese_catalogues(root / "pt_BR" / "LC_MESSAGES")),
    }
    base = finetune(random_base, corpora["base"], SETTINGS["base"], cache, report, threads=1)
    code = finetune(base, corpora["code"], SETTINGS["code"], cache, report, threads=1)
    pt = finetune(base, corpora["pt"], SETTINGS["pt"], cache, report, threads=1)
    return TinyFinetunes(base=base, code=code, pt=pt, cache=cache, corpora=corpora)
