"""Evaluation datasets: CounterFact (flat and full ROME format), ZsRE, EasyEdit lists.

:func:`load_dataset` reads a file (``.json``, ``.jsonl``, gzipped or not — the
compression and the format are detected from the *content*, not the name) or a
shipped dataset name, and returns :class:`EvalCase` objects.

Formats (detected from the keys of the first record):

``full``   (CounterFact, ROME)  ``requested_rewrite{prompt with "{}", subject,
           target_new{str}, target_true{str}}``, ``paraphrase_prompts``,
           ``neighborhood_prompts``, ``attribute_prompts``, ``generation_prompts``.
           ``neighborhood_true`` is ``target_true``.
``zsre``   (ZsRE, MEND split)  ``subject, src, pred, rephrase, alt, answers, loc,
           loc_ans``.  The request is ``prompt=src`` (subject verbatim),
           ``target_new=alt`` and ``target_true=pred`` — the unedited model's
           answer, which always differs from ``alt`` (the gold ``answers[0]``
           equals ``alt`` in some records).  ``answers`` and ``portability``
           are kept in ``EvalCase.extra``.  ``rephrase`` → ``paraphrase_prompts``,
           ``loc``/``loc_ans`` → ``loc_prompts``/``loc_answers``.
``flat``   (CounterFact flat, and EasyEdit-style lists of dicts)  ``prompt``
           (subject verbatim or ``"{}"``), ``subject``, ``target_new``, optional
           ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``,
           ``locality_ground_truth`` (→ ``neighborhood_true``), ``case_id``.
           ``rephrase_prompt``/``locality_prompt`` may be a string or a list.

Records whose subject does not occur in the prompt: a case-insensitive match is
accepted (the subject becomes the matched span of the prompt); otherwise the
record is skipped with a :class:`UserWarning` (``on_missing_subject="skip"``,
the default) or raises :class:`DatasetError` (``on_missing_subject="error"``).
Every other problem raises :class:`DatasetError`, whose message names the
source, the record index and the field.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .requests import EditRequest, RequestError, check_request

__all__ = [
    "DATASET_NAMES",
    "DatasetError",
    "EvalCase",
    "cases_from_records",
    "detect_format",
    "load_dataset",
    "load_requests",
    "read_records",
    "resolve_dataset",
]

DATA_DIR = Path(__file__).resolve().parent / "data"

#: Shipped datasets, by name.
DATASET_NAMES: dict[str, str] = {
    "counterfact": "counterfact_flat_1k.json.gz",
    "counterfact-flat": "counterfact_flat_1k.json.gz",
    "counterfact-full": "counterfact_full_239.json.gz",
    "counterfact-10k": "counterfact_flat_10k.json.gz",  # the first 1k are "counterfact"; for scale runs
    "zsre": "zsre_737.json.gz",
}


class DatasetError(ValueError):
    """A dataset that cannot be read: missing, corrupt, truncated or malformed."""


@dataclass
class EvalCase:
    """One edit plus the prompts used to evaluate it."""

    request: EditRequest
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    #: Object that should still be predicted on ``neighborhood_prompts``.
    neighborhood_true: str | None = None
    attribute_prompts: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    #: ZsRE locality questions and the answers of the unedited model.
    loc_prompts: list[str] = field(default_factory=list)
    loc_answers: list[str] = field(default_factory=list)
    case_id: int | str | None = None
    dataset: str = "counterfact"  # "counterfact" | "zsre"
    format: str = "flat"  # "flat" | "full" | "zsre"
    #: Anything else worth keeping (ZsRE answers/portability, relation_id, ...).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.request.prompt

    @property
    def subject(self) -> str:
        return self.request.subject

    @property
    def target_new(self) -> str:
        return self.request.target_new

    @property
    def target_true(self) -> str | None:
        return self.request.target_true


# --------------------------------------------------------------------------- reading


def resolve_dataset(path_or_name: str | os.PathLike[str]) -> Path:
    """A file path, or the shipped file for a name in :data:`DATASET_NAMES` (an existing path wins)."""
    if not isinstance(path_or_name, (str, os.PathLike)):
        raise DatasetError(f"expected a path or dataset name, got {type(path_or_name).__name__}")
    p = Path(path_or_name).expanduser()
    if p.is_file():
        return p
    if p.exists():
        raise DatasetError(f"{p}: not a regular file")
    name = str(path_or_name).strip().lower()
    if name in DATASET_NAMES:
        shipped = DATA_DIR / DATASET_NAMES[name]
        if not shipped.is_file():
            raise DatasetError(f"shipped dataset {name!r} is missing from the package ({shipped})")
        return shipped
    raise DatasetError(f"{path_or_name}: no such file, and not a known dataset name ({', '.join(DATASET_NAMES)})")


def _decode(raw: bytes, src: str) -> str:
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except EOFError as e:
            raise DatasetError(f"{src}: truncated gzip data ({e})") from e
        except (OSError, zlib.error) as e:
            raise DatasetError(f"{src}: corrupt gzip data ({e})") from e
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{src}: not UTF-8 text (byte {e.start}: {e.reason})") from e


def _parse(text: str, src: str) -> list[Any]:
    if not text.strip():
        raise DatasetError(f"{src}: file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as whole:
        data = _parse_lines(text, src, whole)
    except RecursionError as e:
        raise DatasetError(f"{src}: JSON nested too deeply") from e
    if isinstance(data, dict):  # a single record (e.g. a one-line .jsonl)
        return [data]
    if not isinstance(data, list):
        raise DatasetError(
            f"{src}: top-level JSON must be a list of records (or JSON lines), got {type(data).__name__}"
        )
    return data


def _parse_lines(text: str, src: str, whole: json.JSONDecodeError) -> list[Any]:
    """JSON lines, or re-raise the whole-document error as DatasetError."""
    lines = [(n, ln) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    first = None
    if lines:
        try:
            first = json.loads(lines[0][1])
        except (json.JSONDecodeError, RecursionError):
            first = None
    if not isinstance(first, dict) or len(lines) < 2:
        what = "truncated JSON" if whole.pos >= len(text.rstrip()) else "invalid JSON"
        raise DatasetError(f"{src}: {what}: {whole.msg} at line {whole.lineno} column {whole.colno}") from whole
    out = []
    for n, ln in lines:
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError as e:
            what = "truncated" if n == lines[-1][0] else "invalid"
            raise DatasetError(f"{src}: {what} JSON lines: line {n}: {e.msg} at column {e.colno}") from e
        except RecursionError as e:
            raise DatasetError(f"{src}: line {n}: JSON nested too deeply") from e
    return out


def read_records(path_or_name: str | os.PathLike[str]) -> list[Any]:
    """Raw records of a JSON / JSON-lines file, gzipped or not."""
    path = resolve_dataset(path_or_name)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e})") from e
    return _parse(_decode(raw, str(path)), str(path))


# --------------------------------------------------------------------------- formats


def detect_format(record: Any) -> str:
    """``"full"``, ``"zsre"`` or ``"flat"`` from the keys of one record."""
    if not isinstance(record, Mapping):
        raise DatasetError(f"record 0: expected a JSON object, got {type(record).__name__}")
    keys = set(record)
    if "requested_rewrite" in keys:
        return "full"
    if {"src", "alt"} <= keys:
        return "zsre"
    if {"prompt", "target_new"} <= keys or {"prompt", "subject"} <= keys:
        return "flat"
    raise DatasetError(
        f"record 0: unknown dataset format (keys: {sorted(map(str, keys))[:12]}); expected CounterFact flat "
        "(prompt, subject, target_new, ...), CounterFact full (requested_rewrite, ...) or ZsRE (src, subject, alt, ...)"
    )


class _Rec:
    """Typed field access on one record; errors name the record and field."""

    def __init__(self, rec: Any, index: int, src: str, prefix: str = "") -> None:
        if not isinstance(rec, Mapping):
            where = f"record {index}: field '{prefix.rstrip('.')}'" if prefix else f"record {index}"
            raise DatasetError(f"{src}: {where}: expected a JSON object, got {type(rec).__name__}")
        self.rec, self.index, self.src, self.prefix = rec, index, src, prefix

    def err(self, name: str, problem: str) -> DatasetError:
        return DatasetError(f"{self.src}: record {self.index}: field '{self.prefix}{name}': {problem}")

    def get_str(self, name: str, *, optional: bool = False) -> str | None:
        if name not in self.rec or self.rec[name] is None:
            if optional:
                return None
            raise self.err(name, "missing" if name not in self.rec else "is null")
        v = self.rec[name]
        if isinstance(v, Mapping) and "str" in v:  # ROME {"str": ..., "id": ...}
            v = v["str"]
        if not isinstance(v, str):
            raise self.err(name, f"expected a string, got {type(v).__name__}")
        return v

    def strs(self, name: str) -> list[str]:
        """A string or list of strings (missing/null → [])."""
        v = self.rec.get(name)
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        if not isinstance(v, list):
            raise self.err(name, f"expected a list of strings, got {type(v).__name__}")
        for j, x in enumerate(v):
            if not isinstance(x, str):
                raise self.err(f"{name}[{j}]", f"expected a string, got {type(x).__name__}")
        return list(v)

    def sub(self, name: str) -> _Rec:
        if name not in self.rec:
            raise self.err(name, "missing")
        v = self.rec[name]
        if not isinstance(v, Mapping):
            raise self.err(name, f"expected a JSON object, got {type(v).__name__}")
        return _Rec(v, self.index, self.src, prefix=f"{self.prefix}{name}.")


def _case_id(r: _Rec, default: int) -> int | str:
    v = r.rec.get("case_id", default)
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise r.err("case_id", f"expected an int or string, got {type(v).__name__}")
    return v


def _fix_subject(prompt: str, subject: str) -> str:
    """Subject as it occurs in the prompt (case-insensitive fallback)."""
    if "{}" in prompt or subject in prompt:
        return subject
    s = subject.strip()
    if s and s in prompt:
        return s
    pos = prompt.lower().find(s.lower()) if s else -1
    if pos >= 0 and len(prompt.lower()) == len(prompt):  # lower() kept offsets
        return prompt[pos : pos + len(s)]
    return subject


def _case_full(r: _Rec, i: int) -> tuple[dict[str, Any], dict[str, Any]]:
    rw = r.sub("requested_rewrite")
    req = {
        "prompt": rw.get_str("prompt"),
        "subject": rw.get_str("subject"),
        "target_new": rw.get_str("target_new"),
        "target_true": rw.get_str("target_true", optional=True),
    }
    extra = {k: rw.rec[k] for k in ("relation_id",) if k in rw.rec}
    for k in ("pararel_idx",):
        if k in r.rec:
            extra[k] = r.rec[k]
    return req, dict(
        paraphrase_prompts=r.strs("paraphrase_prompts"),
        neighborhood_prompts=r.strs("neighborhood_prompts"),
        neighborhood_true=None,  # = target_true, filled in after checking
        attribute_prompts=r.strs("attribute_prompts"),
        generation_prompts=r.strs("generation_prompts"),
        case_id=_case_id(r, i),
        dataset="counterfact",
        format="full",
        extra=extra,
    )


def _case_zsre(r: _Rec, i: int) -> tuple[dict[str, Any], dict[str, Any]]:
    req = {
        "prompt": r.get_str("src"),
        "subject": r.get_str("subject"),
        "target_new": r.get_str("alt"),
        "target_true": r.get_str("pred", optional=True),
    }
    loc, loc_ans = r.strs("loc"), r.strs("loc_ans")
    if len(loc) != len(loc_ans) and loc_ans:
        raise r.err("loc_ans", f"{len(loc_ans)} answers for {len(loc)} loc prompts")
    extra: dict[str, Any] = {"answers": r.strs("answers")}
    if "portability" in r.rec:
        extra["portability"] = r.rec["portability"]
    return req, dict(
        paraphrase_prompts=r.strs("rephrase"),
        loc_prompts=loc,
        loc_answers=loc_ans,
        case_id=_case_id(r, i),
        dataset="zsre",
        format="zsre",
        extra=extra,
    )


def _case_flat(r: _Rec, i: int) -> tuple[dict[str, Any], dict[str, Any]]:
    req = {
        "prompt": r.get_str("prompt"),
        "subject": r.get_str("subject"),
        "target_new": r.get_str("target_new"),
        "target_true": r.get_str("ground_truth", optional=True)
        if "ground_truth" in r.rec
        else r.get_str("target_true", optional=True),
    }
    return req, dict(
        paraphrase_prompts=r.strs("rephrase_prompt") + r.strs("paraphrase_prompts"),
        neighborhood_prompts=r.strs("locality_prompt") + r.strs("neighborhood_prompts"),
        neighborhood_true=r.get_str("locality_ground_truth", optional=True),
        generation_prompts=r.strs("generation_prompts"),
        case_id=_case_id(r, i),
        dataset="counterfact",
        format="flat",
    )


_BUILDERS = {"full": _case_full, "zsre": _case_zsre, "flat": _case_flat}
# request field -> field name in the file, per format (for error messages)
_FIELD_NAMES = {
    "full": {k: f"requested_rewrite.{k}" for k in ("prompt", "subject", "target_new", "target_true")},
    "zsre": {"prompt": "src", "subject": "subject", "target_new": "alt", "target_true": "pred"},
    "flat": {"prompt": "prompt", "subject": "subject", "target_new": "target_new", "target_true": "ground_truth"},
}


def cases_from_records(
    records: Sequence[Any],
    *,
    n: int | None = None,
    source: str = "<records>",
    on_missing_subject: str = "skip",
) -> list[EvalCase]:
    """:class:`EvalCase` objects from already-parsed records (see the module docstring)."""
    if on_missing_subject not in ("skip", "error"):
        raise ValueError(f"on_missing_subject must be 'skip' or 'error', got {on_missing_subject!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise DatasetError(f"n must be a non-negative int or None, got {n!r}")
    if not isinstance(records, list):
        raise DatasetError(f"{source}: expected a list of records, got {type(records).__name__}")
    if not records or n == 0:
        return []
    try:
        fmt = detect_format(records[0])
    except DatasetError as e:
        raise DatasetError(f"{source}: {e}") from None
    build, names = _BUILDERS[fmt], _FIELD_NAMES[fmt]
    out: list[EvalCase] = []
    skipped: list[int] = []
    for i, rec in enumerate(records):
        if n is not None and len(out) >= n:
            break
        r = _Rec(rec, i, source)
        d, kwargs = build(r, i)
        d["subject"] = _fix_subject(d["prompt"], d["subject"])
        try:
            case = EvalCase(request=check_request(d, i, max_prompt_tokens=None), **kwargs)
        except RequestError as e:
            if e.code == "subject_not_in_prompt" and on_missing_subject == "skip":
                skipped.append(i)
                continue
            name = names.get(e.field or "", e.field or "?")
            raise DatasetError(f"{source}: record {i}: field '{name}': {e.problem}") from None
        if fmt == "full":
            case.neighborhood_true = case.request.target_true
        elif case.neighborhood_true is not None:
            case.neighborhood_true = case.neighborhood_true.strip() or None
        out.append(case)
    if skipped:
        warnings.warn(
            f"{source}: skipped {len(skipped)} record(s) whose subject does not occur in the prompt "
            f"(indices {skipped[:10]}{'...' if len(skipped) > 10 else ''})",
            UserWarning,
            stacklevel=2,
        )
    return out


def load_dataset(
    path_or_name: str | os.PathLike[str],
    n: int | None = None,
    *,
    on_missing_subject: str = "skip",
    skip: int = 0,
) -> list[EvalCase]:
    """Load a dataset file or shipped name (``counterfact``, ``counterfact-full``, ``zsre``).

    ``skip`` drops the first ``skip`` records (a held-out slice: ``skip=100, n=100`` is
    records 100-199); ``n`` limits the result to the first ``n`` cases after them (the first
    ``n`` records unless some are unusable).  Raises :class:`DatasetError` for a missing file,
    bad or truncated JSON / gzip, wrong types or an unknown format.
    """
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        raise DatasetError(f"skip must be a non-negative integer, got {skip!r}")
    records = read_records(path_or_name)
    if skip:
        if skip >= len(records):
            raise DatasetError(f"{path_or_name}: has {len(records)} records, cannot skip {skip}")
        records = records[skip:]
    return cases_from_records(records, n=n, source=str(path_or_name), on_missing_subject=on_missing_subject)


def load_requests(path_or_name: str | os.PathLike[str], n: int | None = None, **kwargs: Any) -> list[EditRequest]:
    """Just the :class:`EditRequest` of each case of :func:`load_dataset`."""
    return [c.request for c in load_dataset(path_or_name, n, **kwargs)]
