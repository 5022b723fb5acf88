"""Text corpora for the key statistics.

:func:`load_corpus` turns what a user passes into a :class:`Corpus`: an
iterable of non-empty texts with a stable fingerprint (used in cache keys).

Accepted sources
    ``None``                      the shipped default (``metake_fast/data/corpus_small.jsonl.gz``)
    ``*.jsonl`` / ``*.jsonl.gz``  JSON lines, one object with a ``text`` field per line
    any other file                plain text (``.gz`` allowed), paragraphs split on blank lines
    an iterable                   of dicts with ``text`` (e.g. a ``datasets.Dataset``) or of strings

Missing, empty and unreadable corpora raise :class:`CorpusError`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from pathlib import Path

__all__ = ["Corpus", "CorpusError", "DEFAULT_CORPUS", "corpus_fingerprint", "default_corpus_path", "load_corpus"]

DEFAULT_CORPUS = "corpus_small.jsonl.gz"
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


class CorpusError(ValueError):
    """A corpus that is missing, empty or cannot be read."""


class Corpus:
    """Re-iterable texts plus a fingerprint.

    ``name``: a human-readable description; ``fingerprint``: a 16-hex-digit hash
    of the content (file bytes and format, or the texts themselves).
    Iterating yields ``str`` documents, empty ones skipped, in a fixed order.
    """

    def __init__(self, name: str, fingerprint: str, texts: Callable[[], Iterator[str]]):
        self.name = name
        self.fingerprint = fingerprint
        self._texts = texts

    def __iter__(self) -> Iterator[str]:
        return self._texts()

    def __repr__(self) -> str:
        return f"Corpus({self.name!r}, fingerprint={self.fingerprint!r})"


def default_corpus_path() -> Path:
    """Path of the shipped default corpus."""
    ref = resources.files("metake_fast") / "data" / DEFAULT_CORPUS
    return Path(str(ref))


# ---------------------------------------------------------------------------
# file readers
# ---------------------------------------------------------------------------


def _is_gzip(path: Path) -> bool:
    return path.suffix == ".gz"


def _file_format(path: Path) -> str:
    name = path.name[: -len(".gz")] if _is_gzip(path) else path.name
    return "jsonl" if name.endswith((".jsonl", ".json", ".ndjson")) else "text"


def _open_text(path: Path):
    if _is_gzip(path):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_jsonl(path: Path) -> Iterator[str]:
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"corpus {path}: line {lineno} is not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise CorpusError(f"corpus {path}: line {lineno} has no string 'text' field")
                if obj["text"].strip():
                    yield obj["text"]
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise CorpusError(f"corpus {path} cannot be read: {e}") from None


def _read_paragraphs(path: Path) -> Iterator[str]:
    """Paragraphs (separated by blank lines), read incrementally."""
    try:
        with _open_text(path) as f:
            buf: list[str] = []
            for line in f:
                if line.strip():
                    buf.append(line)
                elif buf:
                    yield "".join(buf).strip()
                    buf = []
            if buf:
                yield "".join(buf).strip()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise CorpusError(f"corpus {path} cannot be read: {e}") from None


def _hash_file(path: Path, fmt: str) -> str:
    """Hash of the (decompressed) content and its format, so recompression keeps the fingerprint."""
    h = hashlib.sha256(f"{fmt}\0".encode())
    try:
        opener = gzip.open if _is_gzip(path) else open
        with opener(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except (OSError, EOFError) as e:
        raise CorpusError(f"corpus {path} cannot be read: {e}") from None
    return h.hexdigest()[:16]


def _load_file(path: Path) -> Corpus:
    if not path.exists():
        raise CorpusError(f"corpus file not found: {path}")
    if not path.is_file():
        raise CorpusError(f"corpus is not a file: {path}")
    if not os.access(path, os.R_OK):
        raise CorpusError(f"corpus file is not readable: {path}")
    fmt = _file_format(path)
    reader = _read_jsonl if fmt == "jsonl" else _read_paragraphs
    fingerprint = _hash_file(path, fmt)
    first = next(iter(reader(path)), None)
    if first is None:
        raise CorpusError(f"corpus {path} is empty (no non-blank {'text fields' if fmt == 'jsonl' else 'paragraphs'})")
    return Corpus(str(path), fingerprint, lambda: reader(path))


# ---------------------------------------------------------------------------
# in-memory corpora
# ---------------------------------------------------------------------------


def _item_text(item, index: int) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) or hasattr(item, "__getitem__"):
        try:
            text = item["text"]
        except (KeyError, TypeError, IndexError):
            text = None
        if isinstance(text, str):
            return text
    raise CorpusError(f"corpus item {index} is neither a string nor a mapping with a string 'text' field")


def _load_iterable(data: Iterable) -> Corpus:
    # A one-shot iterator (generator) is materialised so that it can be hashed and re-read.
    if iter(data) is data:
        data = list(data)

    def texts() -> Iterator[str]:
        for i, item in enumerate(data):
            text = _item_text(item, i)
            if text.strip():
                yield text

    ds_fingerprint = getattr(data, "_fingerprint", None)  # datasets.Dataset content hash
    if isinstance(ds_fingerprint, str) and ds_fingerprint:
        if next(texts(), None) is None:
            raise CorpusError("corpus is empty (no non-blank texts)")
        digest = hashlib.sha256(f"dataset\0{ds_fingerprint}".encode()).hexdigest()[:16]
        return Corpus(f"{type(data).__name__}[{ds_fingerprint}]", digest, texts)
    h = hashlib.sha256(b"texts\0")
    n = 0
    for text in texts():
        h.update(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
        n += 1
    if n == 0:
        raise CorpusError("corpus is empty (no non-blank texts)")
    name = f"{type(data).__name__}[{n} texts]"
    return Corpus(name, h.hexdigest()[:16], texts)


def load_corpus(corpus=None) -> Corpus:
    """A :class:`Corpus` from ``None`` (shipped default), a path, an iterable, or a :class:`Corpus`."""
    if isinstance(corpus, Corpus):
        return corpus
    if corpus is None:
        return _load_file(default_corpus_path())
    if isinstance(corpus, (str, os.PathLike)):
        if isinstance(corpus, str) and not corpus.strip():
            raise CorpusError("corpus path is empty")
        return _load_file(Path(corpus).expanduser())
    if isinstance(corpus, (bytes, bytearray)):
        raise CorpusError("corpus must be a path, an iterable of texts/dicts, or None; got bytes")
    try:
        iter(corpus)
    except TypeError:
        raise CorpusError(
            f"corpus must be a path, an iterable of texts/dicts, or None; got {type(corpus).__name__}"
        ) from None
    return _load_iterable(corpus)


def corpus_fingerprint(corpus=None) -> str:
    """Stable 16-hex-digit fingerprint of a corpus (see :func:`load_corpus` for accepted sources)."""
    return load_corpus(corpus).fingerprint
