"""The domain fine-tunes that `compose tune`, forensics and the methods' tests use (bench/finetunes.py, issue 18):
built by the same code as the real SmolLM2 ones, here on tiny models (tests/tiny_finetunes.py)."""

from __future__ import annotations

import gettext
import json
from dataclasses import replace

import pytest

from bench import finetunes
from bench.finetunes import bits_per_byte, entry_path, finetune, is_complete, mo_strings, split_documents
from tiny_finetunes import SETTINGS, write_mo


def heldout(folder):
    return (folder / "heldout.txt").read_text(encoding="utf-8")


def test_each_finetune_lowers_bits_per_byte_on_its_own_domain(tiny_finetunes):
    texts = {"code": heldout(tiny_finetunes.code), "pt": heldout(tiny_finetunes.pt)}
    scores = {name: bits_per_byte(getattr(tiny_finetunes, name), texts) for name in ("base", "code", "pt")}
    for domain in ("code", "pt"):
        other = "pt" if domain == "code" else "code"
        # better than the base on its own domain, by a clear margin, and better there than the other fine-tune
        assert scores[domain][domain] < 0.9 * scores["base"][domain], scores
        assert scores[domain][domain] < scores[other][domain], scores


def test_training_and_heldout_files_are_disjoint(tiny_finetunes):
    for domain in ("code", "pt"):
        folder = getattr(tiny_finetunes, domain)
        documents = {document.name: document.text for document in tiny_finetunes.corpora[domain]}
        training = (folder / "training-files.txt").read_text(encoding="utf-8").split()
        held = (folder / "heldout-files.txt").read_text(encoding="utf-8").split()
        assert training and held and not set(training) & set(held)
        assert sorted(training + held) == sorted(documents)
        training_text = "\n".join(documents[name] for name in training)
        lines = [line for line in heldout(folder).splitlines() if len(line.strip()) > 30]
        assert lines, "the held-out text has no lines to check"
        assert all(any(line in documents[name] for name in held) for line in lines)
        assert not any(line in training_text for line in lines)
        record = json.loads((folder / "finetune.json").read_text(encoding="utf-8"))
        assert record["training_files"] == len(training) and record["settings"]["name"] == domain


def test_split_depends_only_on_file_names():
    documents = [finetunes.Document(f"file{number}.py", f"x = {number}\n") for number in range(20)]
    training, held = split_documents(documents, 0.15, "code")
    assert len(held) == 3 and len(training) == 17
    reordered = split_documents(list(reversed(documents)), 0.15, "code")[1]
    assert {document.name for document in reordered} == {document.name for document in held}
    changed = [finetunes.Document(document.name, "changed\n") for document in documents]
    assert {document.name for document in split_documents(changed, 0.15, "code")[1]} == {
        document.name for document in held
    }


def test_the_cache_is_reused_without_training(tiny_finetunes, monkeypatch):
    def no_training(*arguments, **options):
        raise AssertionError("a cached fine-tune was trained again")

    monkeypatch.setattr(finetunes, "train", no_training)
    weights = tiny_finetunes.code / "model.safetensors"
    written = weights.stat().st_mtime_ns
    again = finetune(
        tiny_finetunes.base, tiny_finetunes.corpora["code"], SETTINGS["code"], tiny_finetunes.cache, threads=1
    )
    assert again == tiny_finetunes.code and weights.stat().st_mtime_ns == written
    # other settings are another entry
    other = entry_path(
        tiny_finetunes.base,
        tiny_finetunes.corpora["code"],
        replace(SETTINGS["code"], learning_rate=2e-3),
        tiny_finetunes.cache,
    )
    assert other != tiny_finetunes.code and not other.exists()


def test_an_interrupted_build_leaves_no_entry_that_looks_complete(tiny_finetunes, monkeypatch, tmp_path):
    settings = replace(SETTINGS["code"], name="interrupted", steps=2)
    documents = tiny_finetunes.corpora["code"]
    root = tmp_path / "cache"
    root.mkdir()
    save = finetunes.save_finetune

    def save_then_stop(*arguments):
        save(*arguments)  # the weights are written, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(finetunes, "save_finetune", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_finetunes.base, documents, settings, root, threads=1)
    entry = entry_path(tiny_finetunes.base, documents, settings, root)
    assert not entry.exists() and not is_complete(entry)
    assert list(root.iterdir()) == []  # the temporary sibling is gone too
    monkeypatch.setattr(finetunes, "save_finetune", save)
    assert finetune(tiny_finetunes.base, documents, settings, root, threads=1) == entry and is_complete(entry)


def test_a_killed_build_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(
    tiny_finetunes, monkeypatch, tmp_path
):
    import torch
    from safetensors.torch import load_file

    settings = replace(SETTINGS["code"], name="resumed", steps=4)
    documents = tiny_finetunes.corpora["code"]
    whole = finetune(tiny_finetunes.base, documents, settings, tmp_path / "whole", threads=1)
    root = tmp_path / "cache"
    root.mkdir()
    rate = finetunes.learning_rate_at

    def killed_at_the_third_step(step, settings):
        if step == 2:
            raise KeyboardInterrupt  # as a kill would stop it: after the checkpoint of step 2
        return rate(step, settings)

    monkeypatch.setattr(finetunes, "learning_rate_at", killed_at_the_third_step)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_finetunes.base, documents, settings, root, threads=1, checkpoint_seconds=0)
    entry = entry_path(tiny_finetunes.base, documents, settings, root)
    assert not is_complete(entry) and (finetunes.partial_folder(entry) / finetunes.CHECKPOINT).is_file()
    monkeypatch.setattr(finetunes, "learning_rate_at", rate)
    said = []
    assert finetune(tiny_finetunes.base, documents, settings, root, said.append, threads=1) == entry
    assert any("resuming at step 3/4" in line for line in said) and is_complete(entry)
    assert [path.name for path in root.iterdir()] == [entry.name]  # no checkpoint or partial folder is left
    ours, theirs = load_file(entry / "model.safetensors"), load_file(whole / "model.safetensors")
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_partial_folders_no_living_build_holds_are_removed(tmp_path):
    import fcntl
    import os

    for name in (".code-0123.4kd9x.partial", ".pt-4567.partial", ".kept.partial", ".held.partial"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    held = os.open(tmp_path / ".held.partial", os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # a build that is running
    try:
        removed = finetunes.remove_stale_partials(tmp_path, keep={".kept.partial"})
    finally:
        os.close(held)
    assert sorted(path.name for path in removed) == [".code-0123.4kd9x.partial", ".pt-4567.partial"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [".held.partial", ".kept.partial"]


def test_mo_strings_reads_every_translation_as_gettext_does(tmp_path):
    pairs = [("Open", "Abrir"), ("File not found", "Arquivo não encontrado"), ("Ação", "Ação concluída")]
    path = write_mo(tmp_path / "messages.mo", pairs)
    with open(path, "rb") as handle:
        catalogue = gettext.GNUTranslations(handle)
    assert sorted(mo_strings(path)) == sorted(translated for _, translated in pairs)
    assert all(catalogue.gettext(original) == translated for original, translated in pairs)
