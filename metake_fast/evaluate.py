"""Evaluation of edits: the metrics of ROME / MEMIT / AlphaEdit and the field's protocol.

Metrics (all in percent, 0-100, macro-averaged: a per-case mean first, then the mean over cases,
as in ROME's ``summarize.py``):

CounterFact (flat and full format)
    ``efficacy``        share of rewrite prompts (``request.text()``) with P(new) > P(true);
    ``generalization``  the same on ``paraphrase_prompts``;
    ``specificity``     share of ``neighborhood_prompts`` where P(true) > P(new) with
                        true = ``neighborhood_true``.
    ``efficacy_magnitude``, ``generalization_magnitude``, ``specificity_magnitude`` (ROME's
    EM / PM / NM): the mean of P(new) − P(true) over the same prompts (P(true) − P(new) for
    the neighbourhood), in points. A score flips on prompts whose two probabilities are both
    tiny; the magnitude weighs each prompt by how far it moved.
    P(object | prompt) is the probability of the whole object string with a leading space
    (:func:`metake_fast.scoring.score_objects`); comparisons use log-probabilities.
    Cases without a true object (flat files without ``ground_truth``) have no efficacy /
    generalization entry; cases without neighbourhood prompts or object have no specificity.
    ``fluency`` (full format only, when asked): ROME's generation entropy — the weighted mean
    of the 2-gram and 3-gram entropies (bits, weights 2/3 and 4/3) of the words of each greedy
    generation (prompt included, as in ROME), averaged over a case's generations and then over
    cases, reported ×100 like the published tables (e.g. ~620). Generations are greedy
    (deterministic), ``fluency_tokens`` (30) new tokens each, from the first ``fluency_prompts``
    (2) ``generation_prompts`` of each case — far cheaper than ROME's 10 × 100 sampled tokens,
    so values are comparable across methods here, not to the papers digit for digit.
    Words are ``\\w+`` runs and single punctuation marks (ROME uses ``nltk.word_tokenize``).
    ``consistency`` (ROME's reference score) needs TF-IDF vectors of Wikipedia text about the
    new object, which this project does not have: it is always reported as ``None`` (JSON
    ``null``).

ZsRE
    ``efficacy``        mean token accuracy of ``alt`` given ``src`` (teacher forcing: share of
                        the object's tokens that are the argmax, ``token_accuracy=True``);
    ``generalization``  the same given each ``rephrase``;
    ``specificity``     agreement of the post-edit argmax tokens with the *unedited* model's
                        argmax tokens on ``loc`` (teacher-forced on ``loc_ans``; on the single
                        next token when a case has no ``loc_ans``). It needs the records of a
                        pre-edit pass: ``evaluate_cases(..., reference=pre_records)``. Without
                        a reference it is ``None``; a pass compared with itself gives 100.

:func:`run_evaluation` runs the whole protocol (pre-edit pass, statistics, sequential batches,
post-edit pass) and writes ``results.json`` plus one JSON line per request.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import re
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .datasets import DatasetError, EvalCase, detect_format, load_dataset, read_records
from .hparams import hparams_differences
from .models import ensure_writable_dir, get_adapter
from .runner import encode, encode_target, final_hidden, full_logprobs, make_batch, model_device, pad_id
from .scoring import score_objects

log = logging.getLogger("metake_fast")

__all__ = [
    "EvaluationError",
    "METRIC_KEYS",
    "evaluate_cases",
    "generate_greedy",
    "prompt_log_margins",
    "record_log_margins",
    "record_magnitudes",
    "ngram_entropy",
    "results_records_path",
    "run_evaluation",
    "text_entropy",
]

#: Keys of every metrics dict (values may be ``None`` where not computed).
METRIC_KEYS = (
    "efficacy", "generalization", "specificity", "fluency", "consistency",
    "efficacy_magnitude", "generalization_magnitude", "specificity_magnitude",
)  # fmt: skip
#: CounterFact magnitude metric -> the prompts it averages over
MAGNITUDE_KEYS = {
    "efficacy_magnitude": "rewrite",
    "generalization_magnitude": "paraphrase",
    "specificity_magnitude": "neighborhood",
}


class EvaluationError(ValueError):
    """Bad evaluation input (sizes, a dataset that disagrees with the requested one, ...)."""


# --------------------------------------------------------------------------- small helpers


def record_metrics(records: Sequence[dict]) -> dict[str, float | None]:
    """Efficacy, generalization, specificity and (CounterFact) their magnitudes in percent over
    per-request records (each the mean of its own prompts); requests without prompts of a kind
    (``None``) are left out of it."""
    keys = ("efficacy", "generalization", "specificity", *MAGNITUDE_KEYS)
    return {key: _pct(_mean([r.get(key) for r in records])) for key in keys}


#: per case, the mean log-probability margin over its prompts of each kind (nats)
LOG_MARGIN_KEYS = {
    "efficacy_log_margin": "rewrite",
    "generalization_log_margin": "paraphrase",
    "specificity_log_margin": "neighborhood",
}


def _prompt_diffs(record: dict, kind: str, new: str, true: str) -> list[float]:
    """``e[new] − e[true]`` for each ``kind`` prompt of the record that has both values."""
    return [
        float(e[new]) - float(e[true])
        for e in record.get(kind) or []
        if e.get(new) is not None and e.get(true) is not None
    ]


def _kind_means(record: dict, keys: dict[str, str], new: str, true: str) -> dict[str, float | None]:
    """Per prompt kind, the mean of ``e[new] − e[true]`` over the record's prompts that have both
    (``e[true] − e[new]`` on the neighbourhood); ``None`` for a kind without such prompts."""
    out = {}
    for key, kind in keys.items():
        sign = -1.0 if kind == "neighborhood" else 1.0
        out[key] = _mean([sign * d for d in _prompt_diffs(record, kind, new, true)])
    return out


def record_magnitudes(record: dict) -> dict[str, float | None]:
    """EM / PM / NM of one CounterFact record (fractions, not percent) from its prompts' P(new),
    P(true): the mean of P(new) − P(true) (P(true) − P(new) on the neighbourhood); ``None`` for a
    kind without prompts that have both (ZsRE records have no P(true))."""
    return _kind_means(record, MAGNITUDE_KEYS, "p_new", "p_true")


def record_log_margins(record: dict) -> dict[str, float | None]:
    """The log margins of one CounterFact record (nats): per kind, the mean of ``log P(new) −
    log P(true)`` over its prompts (the negative on the neighbourhood); ``None`` for a kind
    without prompts that have both (ZsRE records have no P(true))."""
    return _kind_means(record, LOG_MARGIN_KEYS, "logprob_new", "logprob_true")


def prompt_log_margins(records: Sequence[dict], kind: str = "paraphrase") -> list[float]:
    """Every ``kind`` prompt's ``log P(new) − log P(true)`` (nats) over ``records``, in record order;
    prompts without both log-probabilities (ZsRE records have no P(true)) are left out."""
    return [d for r in records for d in _prompt_diffs(r, kind, "logprob_new", "logprob_true")]


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [float(x) for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def _finite(x: float) -> float | None:
    """JSON-safe float (NaN/inf -> None)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _prob(lp: float) -> float:
    return float(math.exp(lp)) if math.isfinite(lp) else 0.0


# --------------------------------------------------------------------------- fluency

_WORD = re.compile(r"\w+|[^\w\s]")


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Shannon entropy (bits) of the empirical distribution of the ``n``-grams of ``tokens`` (0 if none)."""
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum((c / total) * math.log2(c / total) for c in counts.values())


def text_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's per-text n-gram entropy: ``mean_n(weight_n * H_n)`` over the text's words (bits)."""
    words = _words(text)
    return sum(w * ngram_entropy(words, n) for n, w in zip(ns, weights)) / len(ns)


@torch.no_grad()
def generate_greedy(model, tok, prompts: Sequence[str], *, max_new_tokens: int = 30, batch_size: int = 64) -> list[str]:
    """Greedy continuations (prompt included in the returned text, as in ROME), batched with left padding."""
    from transformers import GenerationConfig

    dev = model_device(model)
    pid = pad_id(tok)
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pid, eos_token_id=tok.eos_token_id
    )
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        seqs = [encode(tok, p) for p in prompts[s : s + batch_size]]
        T = max(len(q) for q in seqs)
        ids = torch.full((len(seqs), T), pid, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, q in enumerate(seqs):
            ids[i, T - len(q) :] = torch.tensor(q, dtype=torch.long)
            mask[i, T - len(q) :] = 1
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=cfg)
        for i, q in enumerate(seqs):
            new = gen[i, T:].tolist()
            out.append(tok.decode(q + new, skip_special_tokens=True))
    return out


# --------------------------------------------------------------------------- ZsRE argmax tokens


@torch.no_grad()
def _argmax_tokens(model, tok, prompts: Sequence[str], answers: Sequence[str | None], batch_size: int = 64):
    """Per pair: the argmax token ids at the answer's positions under teacher forcing
    (just the next token after the prompt when the answer is empty/None)."""
    adapter = get_adapter(model)
    dev = model_device(model)
    pid = pad_id(tok)
    out: list[list[int]] = []
    for s in range(0, len(prompts), batch_size):
        seqs, rows, cols, counts = [], [], [], []
        for j in range(s, min(len(prompts), s + batch_size)):
            p = encode(tok, prompts[j])
            t = encode_target(tok, answers[j]) if answers[j] else []
            seqs.append(p + t[:-1])
            k = max(1, len(t))
            rows.extend([len(seqs) - 1] * k)
            cols.extend(range(len(p) - 1, len(p) - 1 + k))
            counts.append(k)
        hid = final_hidden(model, adapter, make_batch(seqs, pid, dev))
        h = hid[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]
        am = torch.cat([full_logprobs(model, adapter, h[q : q + 512]).argmax(-1) for q in range(0, h.shape[0], 512)])
        am = am.cpu().tolist()
        pos = 0
        for k in counts:
            out.append(am[pos : pos + k])
            pos += k
    return out


# --------------------------------------------------------------------------- evaluation


def _reference_records(reference) -> list[dict] | None:
    if reference is None:
        return None
    if isinstance(reference, tuple) and len(reference) == 2 and isinstance(reference[1], list):
        return reference[1]
    if isinstance(reference, list):
        return reference
    raise TypeError("reference must be the (metrics, records) result of evaluate_cases or its records list")


def _agreement(a: Sequence[int], b: Sequence[int]) -> float:
    n = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / n if n else 1.0


def evaluate_cases(
    model,
    tok,
    cases: Sequence[EvalCase],
    *,
    fluency: bool = False,
    batch_size: int = 64,
    reference=None,
    fluency_prompts: int = 2,
    fluency_tokens: int = 30,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score ``cases`` on ``model`` as it is now; returns ``(metrics, records)``.

    ``metrics``: ``efficacy``, ``generalization``, ``specificity``, ``fluency``, ``consistency``
    (percent, or ``None`` where not computed — see the module docstring) and ``n`` (cases).
    ``records``: one JSON-serialisable dict per case with every probability (and, for ZsRE, the
    token accuracies and argmax tokens).
    ``reference``: the result (or records) of a pre-edit pass over the same cases; needed for
    ZsRE specificity.
    ``fluency``: compute fluency for full-format CounterFact cases (``fluency_prompts``
    generation prompts per case, ``fluency_tokens`` new tokens each, greedy).
    """
    cases = list(cases)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ref = _reference_records(reference)
    if ref is not None and len(ref) != len(cases):
        raise EvaluationError(f"reference has {len(ref)} records for {len(cases)} cases")
    cf = [i for i, c in enumerate(cases) if c.dataset != "zsre"]
    zs = [i for i, c in enumerate(cases) if c.dataset == "zsre"]
    records: list[dict[str, Any]] = [{} for _ in cases]
    if cf:
        _eval_counterfact(model, tok, cases, cf, records, batch_size)
    if zs:
        _eval_zsre(model, tok, cases, zs, records, batch_size, ref)
    if fluency:
        _eval_fluency(model, tok, cases, records, batch_size, fluency_prompts, fluency_tokens)
    metrics: dict[str, Any] = record_metrics(records)
    ents = [r.get("fluency") for r in records]
    metrics["fluency"] = None if all(e is None for e in ents) else 100.0 * _mean(ents)
    metrics["consistency"] = None  # needs Wikipedia reference texts; see the module docstring
    metrics["n"] = len(cases)
    return metrics, records


def _base_record(i: int, c: EvalCase) -> dict[str, Any]:
    return {
        "index": i,
        "case_id": c.case_id,
        "dataset": c.dataset,
        "format": c.format,
        "prompt": c.request.text(),
        "subject": c.subject,
        "target_new": c.target_new,
        "target_true": c.target_true,
    }


def _eval_counterfact(model, tok, cases, idx, records, batch_size) -> None:
    # every (prompt, object) pair of every case in two score_objects calls (new, true)
    jobs: list[tuple[int, str, str, str | None]] = []  # (case, kind, prompt, true object)
    for i in idx:
        c = cases[i]
        jobs.append((i, "rewrite", c.request.text(), c.target_true))
        jobs += [(i, "paraphrase", p, c.target_true) for p in c.paraphrase_prompts]
        jobs += [(i, "neighborhood", p, c.neighborhood_true) for p in c.neighborhood_prompts]
    lp_new = score_objects(
        model, tok, [j[2] for j in jobs], [cases[j[0]].target_new for j in jobs], batch_size=batch_size
    ).logprob.tolist()
    with_true = [k for k, j in enumerate(jobs) if j[3]]
    lp_true: list[float | None] = [None] * len(jobs)
    if with_true:
        lt = score_objects(
            model, tok, [jobs[k][2] for k in with_true], [jobs[k][3] for k in with_true], batch_size=batch_size
        ).logprob.tolist()
        for k, v in zip(with_true, lt):
            lp_true[k] = v
    for i in idx:
        records[i] = {**_base_record(i, cases[i]), "neighborhood_true": cases[i].neighborhood_true}
        for kind in ("rewrite", "paraphrase", "neighborhood"):
            records[i][kind] = []
    for k, (i, kind, prompt, _true) in enumerate(jobs):
        ln, lt = lp_new[k], lp_true[k]
        ok = None
        if lt is not None:
            ok = bool(ln > lt) if kind != "neighborhood" else bool(lt > ln)
        records[i][kind].append(
            {
                "prompt": prompt,
                "logprob_new": _finite(ln),
                "logprob_true": None if lt is None else _finite(lt),
                "p_new": _prob(ln),
                "p_true": None if lt is None else _prob(lt),
                "success": ok,
            }
        )
    for i in idx:
        r = records[i]
        r["efficacy"] = _mean([e["success"] for e in r["rewrite"]])
        r["generalization"] = _mean([e["success"] for e in r["paraphrase"]])
        r["specificity"] = _mean([e["success"] for e in r["neighborhood"]])
        r.update(record_magnitudes(r))


def _eval_zsre(model, tok, cases, idx, records, batch_size, ref) -> None:
    jobs: list[tuple[int, str, str]] = []
    for i in idx:
        c = cases[i]
        jobs.append((i, "rewrite", c.request.text()))
        jobs += [(i, "paraphrase", p) for p in c.paraphrase_prompts]
    sc = score_objects(
        model, tok, [j[2] for j in jobs], [cases[j[0]].target_new for j in jobs], batch_size=batch_size,
        token_accuracy=True,
    )  # fmt: skip
    lp_new, acc = sc.logprob.tolist(), sc.token_acc.tolist()
    true_k = [k for k, j in enumerate(jobs) if j[1] == "rewrite" and cases[j[0]].target_true]
    lp_true: dict[int, float] = {}
    if true_k:
        lt = score_objects(
            model, tok, [jobs[k][2] for k in true_k], [cases[jobs[k][0]].target_true for k in true_k],
            batch_size=batch_size,
        ).logprob.tolist()  # fmt: skip
        lp_true = dict(zip(true_k, lt))
    loc_jobs: list[tuple[int, str, str | None]] = []
    for i in idx:
        c = cases[i]
        for q, p in enumerate(c.loc_prompts):
            loc_jobs.append((i, p, c.loc_answers[q] if q < len(c.loc_answers) else None))
    loc_am = _argmax_tokens(model, tok, [j[1] for j in loc_jobs], [j[2] for j in loc_jobs], batch_size)
    for i in idx:
        records[i] = {**_base_record(i, cases[i]), "rewrite": [], "paraphrase": [], "loc": []}
    for k, (i, kind, prompt) in enumerate(jobs):
        e = {"prompt": prompt, "token_acc": acc[k], "logprob_new": _finite(lp_new[k]), "p_new": _prob(lp_new[k])}
        if k in lp_true:
            e["logprob_true"] = _finite(lp_true[k])
            e["p_true"] = _prob(lp_true[k])
        records[i][kind].append(e)
    for (i, prompt, ans), am in zip(loc_jobs, loc_am):
        records[i]["loc"].append({"prompt": prompt, "answer": ans, "argmax_tokens": am})
    for i in idx:
        r = records[i]
        r["efficacy"] = _mean([e["token_acc"] for e in r["rewrite"]])
        r["generalization"] = _mean([e["token_acc"] for e in r["paraphrase"]])
        r["specificity"] = None
        if ref is not None:
            ref_loc = ref[i].get("loc") or []
            if len(ref_loc) != len(r["loc"]):
                raise EvaluationError(f"reference record {i} has {len(ref_loc)} loc prompts, case has {len(r['loc'])}")
            for e, re_ in zip(r["loc"], ref_loc):
                e["reference_tokens"] = re_["argmax_tokens"]
                e["agreement"] = _agreement(e["argmax_tokens"], re_["argmax_tokens"])
            r["specificity"] = _mean([e["agreement"] for e in r["loc"]])


def _eval_fluency(model, tok, cases, records, batch_size, n_prompts, n_tokens) -> None:
    jobs = [(i, p) for i, c in enumerate(cases) if c.format == "full" for p in c.generation_prompts[:n_prompts]]
    if not jobs:
        return
    texts = generate_greedy(model, tok, [p for _, p in jobs], max_new_tokens=n_tokens, batch_size=batch_size)
    per: dict[int, list[float]] = {}
    for (i, _), text in zip(jobs, texts):
        records[i].setdefault("generations", []).append(text)
        per.setdefault(i, []).append(text_entropy(text))
    for i, ents in per.items():
        records[i]["fluency"] = sum(ents) / len(ents)


# --------------------------------------------------------------------------- the protocol


def results_records_path(out: str | os.PathLike) -> Path:
    """``results.json`` -> ``results.records.jsonl`` (next to it)."""
    p = Path(out)
    return p.with_name(p.stem + ".records.jsonl") if p.suffix == ".json" else p.with_name(p.name + ".records.jsonl")


def git_commit() -> str | None:
    """The checkout's short commit; ``METAKE_FAST_COMMIT`` overrides it (a copied tree whose git
    metadata is not the code's, such as a device runner's copy)."""
    if os.environ.get("METAKE_FAST_COMMIT"):
        return os.environ["METAKE_FAST_COMMIT"]
    try:
        r = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
            text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return (r.stdout.strip() or None) if r.returncode == 0 else None


def _device_name(model) -> str:
    dev = model_device(model)
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return (
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )


def detect_dataset(path) -> tuple[str, str]:
    """``(dataset, format)`` of a data file from its first record: ``("counterfact", "flat"|"full")`` or ``("zsre", "zsre")``."""
    records = read_records(path)
    if not records:
        raise DatasetError(f"{path}: no records")
    try:
        fmt = detect_format(records[0])
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}") from None
    return ("zsre" if fmt == "zsre" else "counterfact"), fmt


def _positive(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise EvaluationError(f"{name} must be a positive integer, got {v!r}")
    return v


#: run settings added after the first checkpoints: a checkpoint without one was written with this value
_CONFIG_DEFAULTS = {"skip": 0, "on_conflict": "error"}


def _select_cases(dataset_path, num_edits: int, skip: int, on_conflict: str):
    """The run's cases and the case ids left out. ``on_conflict="error"``: the first ``num_edits``
    cases, and a :class:`~metake_fast.requests.RequestError` (before any model is loaded) when two
    of them share prompt and subject (a duplicate, or a conflict: another new object for the same
    fact, which one sequential run cannot hold). ``"skip"``: such later cases are left out and the
    next records taken instead, so the run still has ``num_edits`` cases."""
    from .requests import RequestError, fact_key, validate_requests

    if on_conflict not in ("error", "skip"):
        raise EvaluationError(f"on_conflict must be 'error' or 'skip', got {on_conflict!r}")
    if on_conflict == "error":
        cases = load_dataset(dataset_path, num_edits, skip=skip)  # DatasetError for a bad skip
        try:
            validate_requests([c.request for c in cases])
        except RequestError as e:
            if e.code not in ("duplicate", "conflict"):
                raise
            raise RequestError(
                e.index,
                f"{e.problem}; --on-conflict skip leaves out such later cases",
                field=e.field,
                other=e.other,
                code=e.code,
            ) from None
        return cases, []
    cases, dropped, seen = [], [], set()
    for c in load_dataset(dataset_path, None, skip=skip):
        if len(cases) == num_edits:
            break
        key = fact_key(c.request)
        if key in seen:
            dropped.append(c.case_id)
            continue
        seen.add(key)
        cases.append(c)
    return cases, dropped


def _config_differences(saved, run_config: dict, hp) -> list[str]:
    """How a stored run configuration differs from this run's (empty: the same run): the same
    settings, and hyperparameters equal up to fields added since with their default values
    (:func:`~metake_fast.hparams.hparams_differences`)."""
    if not isinstance(saved, dict):
        return ["no settings were saved"]
    out = []
    for k in dict.fromkeys([*run_config, *saved]):
        if k == "hparams":
            continue
        if k not in run_config and k not in _CONFIG_DEFAULTS:
            out.append(f"{k}: saved, not a setting of this version")
            continue
        was, now = saved.get(k, _CONFIG_DEFAULTS.get(k)), run_config.get(k, _CONFIG_DEFAULTS.get(k))
        if was != now:
            out.append(f"{k}: saved {was!r}, now {now!r}")
    return out + hparams_differences(saved.get("hparams"), hp)


def _same_config(saved, run_config: dict, hp) -> bool:
    return not _config_differences(saved, run_config, hp)


def _another_run(state_path: Path, diff: list[str]) -> EvaluationError:
    return EvaluationError(
        f"checkpoint {state_path} belongs to another run (settings differ: {'; '.join(diff)}); "
        "remove it, or rerun with the settings it was made with"
    )


def _checkpoint_config(path: Path):
    """The run settings stored in an evaluation checkpoint's metadata (None if unreadable)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("extra", "{}")).get("config")
    except Exception:  # noqa: BLE001 - unreadable: load_checkpoint reports it properly
        return None


def _read_json(path: Path):
    """The JSON in ``path``, or None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _fields_of(hp) -> dict:
    """``hp``'s fields as :func:`~metake_fast.hparams.make_hparams` takes them back."""
    from .hparams import to_dict

    return {k: v for k, v in to_dict(hp).items() if k != "method" and not (k == "layers" and not v)}


def run_evaluation(
    model_name: str,
    method: str,
    dataset_path,
    num_edits: int,
    batch_size: int,
    hparams=None,
    corpus=None,
    stats_tokens: int | None = None,
    out=None,
    progress: bool = True,
    records_path=None,
    *,
    dataset: str | None = None,
    fluency: bool | None = None,
    fluency_prompts: int = 2,
    fluency_tokens: int = 30,
    device: str | None = None,
    dtype: str = "fp32",
    cache=True,
    eval_batch_size: int = 64,
    checkpoint=None,
    hparams_overrides: dict | None = None,
    skip: int = 0,
    on_conflict: str = "error",
) -> dict[str, Any]:
    """The field's protocol on the first ``num_edits`` cases of ``dataset_path``; returns the results dict.

    1. score the cases on the unedited model (``metrics_pre``, ``timing.eval_pre_s``);
    2. build the editor; compute or load the key statistics (``timing.stats_s``);
    3. edit all N cases in sequential batches of ``batch_size`` (``timing.edit_s``: editing only,
       statistics and scoring excluded; ``edits_per_s = N / edit_s``);
    4. score every case after the last batch (``metrics_post``, ``timing.eval_s``).

    ``hparams``: YAML path, dict or dataclass (None: the shipped file / defaults);
    ``skip``: leave out the first ``skip`` records of the data (held-out slices), then take
    ``num_edits`` cases. ``on_conflict``: ``"error"`` (default) stops, before the model loads, when
    two of those cases share prompt and subject (a duplicate, or two new objects for one fact);
    ``"skip"`` leaves such later cases out and takes the next records instead (``dropped_conflicts``
    in the results lists their case ids). ``hparams_overrides``: fields set on top of it (the CLI's ``--set KEY=VALUE``);
    ``stats_tokens`` overrides its ``stats_tokens``. ``dataset``: ``"counterfact"`` / ``"zsre"``
    to check against the file's detected format. ``fluency``: None = on for full-format
    CounterFact. ``out``: write ``results.json`` there and the per-request records (one JSON
    line per case, pre and post) to ``records_path`` or :func:`results_records_path` ``(out)``.
    ``checkpoint``: a directory; the pre-edit scores and the editor state after every batch
    are saved there, and a later call with the same settings resumes from the last batch
    (``timing.edit_s`` adds up the editing time of all sessions; ``sessions`` lists them).
    """
    from . import __version__
    from .checkpoint import load_checkpoint, save_checkpoint
    from .editor import Editor, EditReport, RequestReport
    from .hparams import EditHParams, load_hparams, make_hparams, read_yaml, to_dict
    from .models import load_model
    from .requests import validate_requests

    _positive("num_edits", num_edits)
    _positive("batch_size", batch_size)
    if stats_tokens is not None:
        _positive("stats_tokens", stats_tokens)
    detected, fmt = detect_dataset(dataset_path)
    if dataset is not None and dataset.lower() != detected:
        raise EvaluationError(
            f"--dataset {dataset} does not match {dataset_path}: its records are {detected} ({fmt} format)"
        )
    cases, dropped = _select_cases(dataset_path, num_edits, skip, on_conflict)
    if len(cases) < num_edits:
        after = f" after the first {skip} records" if skip else ""
        raise EvaluationError(f"{dataset_path} has only {len(cases)} usable cases{after}, {num_edits} requested")
    if str(method).lower() == "metake":
        import importlib.util

        if importlib.util.find_spec("metake_fast.metake") is None:
            raise EvaluationError("method 'metake' is not available in this installation (no metake_fast.metake)")
    hp_path = None
    set_fields = dict(hparams_overrides or {})
    if isinstance(hparams, (str, os.PathLike)):
        hp_path, hparams = hparams, None
        make_hparams(method, {**read_yaml(hp_path), **set_fields})  # HParamsError before the model loads
    elif isinstance(hparams, EditHParams):
        if set_fields:
            given = getattr(hparams, "source", "given")
            hparams = make_hparams(method, {**_fields_of(hparams), **set_fields})
            hparams.source = f"{given} + overrides ({', '.join(sorted(set_fields))})"
    else:
        make_hparams(method, {**dict(hparams or {}), **set_fields})  # unknown method / bad fields, early
    if checkpoint is not None:
        ensure_writable_dir(Path(checkpoint), "checkpoint directory", EvaluationError)
    out_path = Path(out) if out is not None else None
    rec_path = Path(records_path) if records_path is not None else (results_records_path(out) if out else None)
    for p in (out_path, rec_path):
        if p is not None and p.parent and not p.parent.exists():
            raise EvaluationError(f"output directory {p.parent} does not exist")

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(model_name, dtype=dtype, device=device)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    num_layers = get_adapter(model).num_layers(model)
    if isinstance(hparams, EditHParams):
        hp = hparams
        if stats_tokens is not None:
            hp.stats_tokens = stats_tokens
    else:
        overrides = {**dict(hparams or {}), **set_fields}
        if stats_tokens is not None:
            overrides["stats_tokens"] = stats_tokens
        hp = load_hparams(method, str(model_name), path=hp_path, num_layers=num_layers, overrides=overrides)
    editor = Editor(model, tok, method, hp, model_name=str(model_name), corpus=corpus, cache=cache, progress=progress)
    requests = validate_requests([c.request for c in cases], tok)
    do_fluency = (fmt == "full") if fluency is None else bool(fluency)
    ekw = dict(
        fluency=do_fluency, batch_size=eval_batch_size, fluency_prompts=fluency_prompts, fluency_tokens=fluency_tokens
    )

    # A checkpoint directory makes the run resumable: the pre-edit scores and, after every
    # batch, the editor's full state (weights, solver state, requests) are saved there; a
    # later call with the same settings goes on from the last finished batch.
    ckpt_dir = Path(checkpoint) if checkpoint is not None else None
    run_config = {
        "method": editor.method, "model": str(model_name), "data": str(dataset_path), "num_edits": len(cases),
        "batch_size": batch_size, "dtype": dtype, "fluency": do_fluency, "hparams": to_dict(editor.hparams),
        "skip": skip, "on_conflict": on_conflict,
    }  # fmt: skip
    state_path = ckpt_dir / "state.safetensors" if ckpt_dir is not None else None
    if state_path is not None and state_path.exists():  # refuse another run's state before the slow pre-eval
        saved_config = _checkpoint_config(state_path)
        diff = _config_differences(saved_config, run_config, editor.hparams) if saved_config is not None else []
        if diff:
            raise _another_run(state_path, diff)
    pre_saved = _read_json(ckpt_dir / "pre.json") if ckpt_dir is not None else None
    if pre_saved is not None and _same_config(pre_saved.get("config"), run_config, editor.hparams):
        log.info("pre-edit evaluation taken from the checkpoint in %s", ckpt_dir)
        metrics_pre, rec_pre, eval_pre_s = pre_saved["metrics_pre"], pre_saved["records"], pre_saved["eval_pre_s"]
    else:
        log.info("pre-edit evaluation of %d cases", len(cases))
        t0 = time.perf_counter()
        metrics_pre, rec_pre = evaluate_cases(model, tok, cases, **ekw)
        if detected == "zsre":  # agreement of the unedited model with itself
            metrics_pre, rec_pre = _with_self_reference(metrics_pre, rec_pre)
        eval_pre_s = time.perf_counter() - t0
        if ckpt_dir is not None:
            try:
                _write_json_atomic(ckpt_dir / "pre.json", {"config": run_config, "metrics_pre": metrics_pre,
                                                          "records": rec_pre, "eval_pre_s": eval_pre_s})  # fmt: skip
            except OSError as e:
                log.warning("could not write %s (%s); continuing", ckpt_dir / "pre.json", e.strerror or e)

    s0 = editor.stats_seconds
    editor._ensure_solvers()
    stats_s = editor.stats_seconds - s0

    # One Editor.edit call per batch (sequential calls accumulate exactly like one long run),
    # so that the running efficacy of every edit so far is logged after each batch to
    # <out stem>.progress.jsonl: an hours-long run shows collapse as it happens and leaves
    # a partial result if it is stopped.
    report = EditReport(editor.method, stop_nll=editor.hparams.early_stop_nll)
    report.timing = {}
    done, edit_s_before, progress_lines, sessions = 0, 0.0, [], []
    if state_path is not None and state_path.exists():
        extra = load_checkpoint(editor, state_path)
        diff = _config_differences(extra.get("config"), run_config, editor.hparams)
        if diff:
            raise _another_run(state_path, diff)
        done, edit_s_before = int(extra["edits_done"]), float(extra["edit_s"])
        report.requests = [RequestReport(**r) for r in extra["requests"]]
        report.batches, report.timing = int(extra["batches"]), dict(extra["timing"])
        progress_lines, sessions = list(extra["progress"]), list(extra.get("sessions", []))
        log.info("resuming from %s: %d of %d edits done", state_path, done, len(requests))
    sessions.append({"commit": git_commit(), "from_edit": done})
    prog_path = out_path.with_name(out_path.stem + ".progress.jsonl") if out_path is not None else None
    if prog_path is not None:
        prog_path.write_text("".join(json.dumps(line) + "\n" for line in progress_lines))
    t0 = time.perf_counter()
    timing_before = dict(report.timing)

    def session_edit_s() -> float:
        extra_t = sum(report.timing.get(k, 0.0) - timing_before.get(k, 0.0) for k in ("stats", "score"))
        return time.perf_counter() - t0 - extra_t

    for b0 in range(done, len(requests), batch_size):
        part = editor.edit(requests[b0 : b0 + batch_size], batch_size=batch_size, score=False, track=True)
        report.requests.extend(part.requests)
        report.batches += part.batches
        for k, v in part.timing.items():
            report.timing[k] = report.timing.get(k, 0.0) + v
        run = part.running or {}
        line = {
            "batch": report.batches,
            "edits": run.get("edits"),
            "running_efficacy": _pct(_finite(run.get("efficacy", float("nan")))),
            "running_mean_p_new": _finite(run.get("mean_p_new", float("nan"))),
            "edit_s": edit_s_before + session_edit_s(),
        }
        progress_lines.append(line)
        log.info("batch %d: %s", report.batches, line)
        if prog_path is not None:
            with open(prog_path, "a") as f:
                f.write(json.dumps(line) + "\n")
        if state_path is not None:
            try:
                save_checkpoint(editor, state_path, extra={
                    "config": run_config, "edits_done": b0 + len(part.requests), "edit_s": line["edit_s"],
                    "requests": [dataclasses.asdict(r) for r in report.requests], "batches": report.batches,
                    "timing": report.timing, "progress": progress_lines, "sessions": sessions,
                })  # fmt: skip
            except OSError as e:  # e.g. a full disk: the run goes on, only resuming is lost
                log.warning("could not write checkpoint %s (%s); continuing without it", state_path, e.strerror or e)
    edit_s = edit_s_before + session_edit_s()
    stats_s += report.timing.get("stats", 0.0)

    log.info("post-edit evaluation of %d cases", len(cases))
    t0 = time.perf_counter()
    metrics_post, rec_post = evaluate_cases(model, tok, cases, reference=rec_pre, **ekw)
    eval_s = time.perf_counter() - t0

    realised = [r.realised for r in report.requests]
    nll = [r.target_nll for r in report.requests]
    steps = [r.target_steps for r in report.requests]
    results: dict[str, Any] = {
        "method": editor.method,
        "model": str(model_name),
        "dataset": detected,
        "format": fmt,
        "data": str(dataset_path),
        "skip": skip,
        "on_conflict": on_conflict,
        "dropped_conflicts": dropped,
        "num_edits": len(cases),
        "batch_size": batch_size,
        "metrics_pre": metrics_pre,
        "metrics_post": metrics_post,
        "timing": {
            "stats_s": stats_s,
            "edit_s": edit_s,
            "eval_s": eval_s,
            "eval_pre_s": eval_pre_s,
            "edits_per_s": len(cases) / edit_s if edit_s > 0 else None,
            "edit_breakdown": {k: v for k, v in report.timing.items() if k not in ("stats", "score")},
        },
        "device": _device_name(model),
        "dtype": dtype,
        "version": __version__,
        # the code this process loaded (read when it started: the checkout may move during a long run)
        "commit": sessions[-1]["commit"] if sessions else git_commit(),
        "sessions": sessions,
        "hparams": to_dict(editor.hparams),
        "hparams_source": editor.hparams_source,
        # sampled from the model (seeded): rounding on another device can change a token, and
        # with it every target, so they are part of what a run measured
        "context_templates": editor._templates(),
        "edit": {
            "batches": report.batches,
            "mean_realised": _finite(_mean(realised)) if realised else None,
            "min_realised": _finite(min(realised)) if realised else None,
            "mean_target_nll": _finite(_mean(nll)) if nll else None,
            "mean_target_steps": _mean(steps),
            "targets_unreached": report.unreached,  # planned target NLL above the stop when the steps ran out
            "fallbacks": sum(r.fallback for r in report.requests),
        },
        "fluency_settings": {"prompts_per_case": fluency_prompts, "new_tokens": fluency_tokens, "greedy": True}
        if do_fluency
        else None,
        "consistency_note": "not computed: needs TF-IDF reference texts (Wikipedia) about the new objects",
        "records": str(rec_path) if rec_path is not None else None,
    }
    if rec_path is not None:
        lines = []
        for i, (pre, post) in enumerate(zip(rec_pre, rec_post)):
            rr = report.requests[i] if i < len(report.requests) else None
            edit = (
                {
                    "realised": _finite(rr.realised),
                    "target_nll": _finite(rr.target_nll),
                    "target_steps": rr.target_steps,
                    "fallback": rr.fallback,
                }
                if rr is not None
                else None
            )
            lines.append(json.dumps({"index": i, "case_id": post.get("case_id"), "pre": pre, "post": post,
                                     "edit": edit}, allow_nan=False))  # fmt: skip
        tmp = rec_path.with_name(rec_path.name + f".tmp{os.getpid()}")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, rec_path)
    if out_path is not None:
        _write_json_atomic(out_path, results)
    return results


def _with_self_reference(metrics: dict, records: list[dict]) -> tuple[dict, list[dict]]:
    """ZsRE pre-edit pass: specificity against the model's own predictions (100 by construction)."""
    for r in records:
        if r.get("dataset") != "zsre":
            continue
        for e in r.get("loc", []):
            e["reference_tokens"] = e["argmax_tokens"]
            e["agreement"] = 1.0
        r["specificity"] = _mean([e["agreement"] for e in r.get("loc", [])])
    metrics = dict(metrics)
    metrics["specificity"] = _pct(_mean([r.get("specificity") for r in records]))
    return metrics, records
