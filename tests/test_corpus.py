"""Corpus readers and fingerprints (no model needed)."""

from __future__ import annotations

import gzip
import json

import pytest

from metake_fast.corpus import Corpus, CorpusError, corpus_fingerprint, default_corpus_path, load_corpus

TEXTS = ["The first document.\nStill the first.", "Second document.", "Third, with ünïcode."]


def write_jsonl(path, texts, gz=False):
    data = "".join(json.dumps({"text": t, "source": "x"}) + "\n" for t in texts)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def test_plain_text_paragraphs(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("\n\n".join(TEXTS) + "\n\n  \n\n", encoding="utf-8")
    assert list(load_corpus(p)) == TEXTS
    assert list(load_corpus(str(p))) == TEXTS  # re-iterable, str paths


def test_plain_text_blank_lines_with_spaces(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("a\nb\n   \nc\n\n\n\nd", encoding="utf-8")
    assert list(load_corpus(p)) == ["a\nb", "c", "d"]


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl(tmp_path, gz):
    p = write_jsonl(tmp_path / ("c.jsonl.gz" if gz else "c.jsonl"), TEXTS + ["   "], gz=gz)
    corpus = load_corpus(p)
    assert list(corpus) == TEXTS
    assert list(corpus) == TEXTS


def test_jsonl_and_gz_same_fingerprint(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    b = write_jsonl(tmp_path / "b.jsonl.gz", TEXTS, gz=True)
    assert corpus_fingerprint(a) == corpus_fingerprint(b)


def test_list_of_dicts_strings_and_generators():
    dicts = [{"text": t} for t in TEXTS]
    assert list(load_corpus(dicts)) == TEXTS
    assert list(load_corpus(TEXTS)) == TEXTS
    gen = load_corpus(d for d in dicts)
    assert list(gen) == TEXTS and list(gen) == TEXTS  # generators are materialised
    assert load_corpus(dicts).fingerprint == load_corpus(TEXTS).fingerprint


def test_dataset_like_object():
    class FakeDataset:  # iterable of dicts with a content hash, like datasets.Dataset
        _fingerprint = "abc123"

        def __iter__(self):
            return iter({"text": t, "id": i} for i, t in enumerate(TEXTS))

    corpus = load_corpus(FakeDataset())
    assert list(corpus) == TEXTS
    assert corpus.fingerprint != load_corpus(TEXTS).fingerprint


def test_fingerprint_stable_and_sensitive(tmp_path):
    assert corpus_fingerprint(TEXTS) == corpus_fingerprint(list(TEXTS))
    assert corpus_fingerprint(TEXTS) != corpus_fingerprint(TEXTS[:2])
    assert corpus_fingerprint(TEXTS) != corpus_fingerprint(TEXTS[::-1])
    p = tmp_path / "c.txt"
    p.write_text("\n\n".join(TEXTS), encoding="utf-8")
    fp = corpus_fingerprint(p)
    assert fp == corpus_fingerprint(p)
    p.write_text("\n\n".join(TEXTS) + "\n\nmore", encoding="utf-8")
    assert corpus_fingerprint(p) != fp


def test_default_corpus():
    assert default_corpus_path().is_file()
    corpus = load_corpus(None)
    assert isinstance(corpus, Corpus)
    first = next(iter(corpus))
    assert isinstance(first, str) and len(first) > 20
    assert load_corpus(corpus) is corpus
    assert corpus_fingerprint() == corpus.fingerprint


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: d / "missing.jsonl", "not found"),
        (lambda d: d, "not a file"),
        (lambda d: (d / "e.txt").write_text("\n\n  \n") and d / "e.txt", "empty"),
        (lambda d: (d / "e.jsonl").write_text("") or d / "e.jsonl", "empty"),
        (lambda d: (d / "b.jsonl").write_text('{"text": "ok"}\n{oops\n') and d / "b.jsonl", "line 2"),
        (lambda d: (d / "n.jsonl").write_text('{"title": "x"}\n') and d / "n.jsonl", "text"),
        (lambda d: (d / "z.jsonl.gz").write_bytes(b"not gzip at all") and d / "z.jsonl.gz", "cannot be read"),
        (lambda d: (d / "u.txt").write_bytes(b"\xff\xfe\xfa bad utf8") and d / "u.txt", "cannot be read"),
        (lambda d: [], "empty"),
        (lambda d: [{"text": " "}], "empty"),
        (lambda d: [{"title": "x"}], "text"),
        (lambda d: 42, "iterable"),
        (lambda d: "", "empty"),
    ],
)
def test_errors(tmp_path, make, match):
    with pytest.raises(CorpusError, match=match):
        list(load_corpus(make(tmp_path)))


def test_corpus_error_is_value_error():
    assert issubclass(CorpusError, ValueError)
