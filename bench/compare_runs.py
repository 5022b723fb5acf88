"""Paired comparison of ``metake-fast evaluate`` runs on the same cases, from their records.

The first run is the baseline; every further run is compared with it case by case (the
runs must hold the same cases in the same order). For each metric the table gives the
difference in points, a paired bootstrap 95 % interval over cases, how many cases got
better / worse, and the two-sided exact sign-test p-value on those cases. So a gap of a
few tenths can be told apart from the noise of 1,000 cases.

Besides the three scores (the share of prompts where the right object is preferred) the
table has the field's magnitude metrics for CounterFact records (ROME's EM / PM / NM): per
case the mean of ``P(new) − P(true)`` over its rewrite / paraphrase prompts, and of
``P(true) − P(new)`` over its neighbourhood prompts, in points. A score flips on prompts
where both probabilities are tiny; the magnitude weighs each prompt by how far it moved.
The log margins (``*_log_margin``, in nats, not points) are the same per-case means of
``log P(new) − log P(true)`` (``log P(true) − log P(new)`` on the neighbourhood): the quantity
the target loop and MetaKE's upper level optimise, which a probability difference compresses
once either probability is near 0 or 1.

    python bench/compare_runs.py docs/results/cf_n1000_b100_alphaedit.json \
        docs/results/cf_n1000_b100_metake.json [more runs ...] [--resamples 10000] [--out cmp.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import _common  # noqa: F401,I001  (puts the repository on sys.path)
import numpy as np
from results_by_batch import load_run

from metake_fast.evaluate import LOG_MARGIN_KEYS, MAGNITUDE_KEYS, record_log_margins, record_magnitudes

METRICS = ("efficacy", "generalization", "specificity")
ALL_METRICS = METRICS + tuple(MAGNITUDE_KEYS) + tuple(LOG_MARGIN_KEYS)
#: a per-case value times this is the table's unit: points for the scores and magnitudes, nats for the log margins
SCALE = {m: 1.0 if m in LOG_MARGIN_KEYS else 100.0 for m in ALL_METRICS}


def metric_label(m: str) -> str:
    """The metric's name with its unit where it is not points."""
    return f"{m} (nats)" if SCALE[m] == 1.0 else m


def load_cases(results_path: str) -> dict:
    """``{"label", "case_ids", "index", "post": {metric: [value or None per case]}}`` of one run
    (``index``: each case's position in the run's edit order)."""
    res, records = load_run(results_path)
    ids, index, post = [], [], {m: [] for m in ALL_METRICS}
    for r in records:
        ids.append(r.get("case_id", r["index"]))
        index.append(int(r["index"]))
        for m in METRICS:
            v = r["post"].get(m)
            post[m].append(None if v is None else float(v))
        # computed again from the prompts: records written before the magnitudes existed lack them
        for m, v in record_magnitudes(r["post"]).items():
            post[m].append(v)
        for m, v in record_log_margins(r["post"]).items():
            post[m].append(v)
    name = os.path.splitext(os.path.basename(results_path))[0]
    label = name + (f" ({res['commit']})" if res.get("commit") else "")
    return {"label": label, "results": results_path, "case_ids": ids, "index": index, "post": post}


def pool_cases(parts: list[dict]) -> dict:
    """Several runs' cases as one run (e.g. the same method on two data slices); labels joined by ``+``."""
    if len(parts) == 1:
        return parts[0]
    return {
        "label": " + ".join(p["label"] for p in parts),
        "results": "+".join(p["results"] for p in parts),
        "case_ids": [f"{i}:{c}" for i, p in enumerate(parts) for c in p["case_ids"]],
        "index": [j for p in parts for j in p["index"]],
        "post": {m: [v for p in parts for v in p["post"][m]] for m in parts[0]["post"]},
    }


def load_pooled(arg: str) -> dict:
    """``A.json`` or ``A.json+B.json+...`` (pooled with :func:`pool_cases`)."""
    return pool_cases([load_cases(p) for p in arg.split("+")])


def sign_test_p(better: int, worse: int) -> float:
    """Two-sided exact sign test: P(a split at least this uneven) for ``better + worse`` fair coin flips."""
    n = better + worse
    if n == 0:
        return 1.0
    k = min(better, worse)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def compare(base: dict, other: dict, *, resamples: int = 10000, seed: int = 0) -> dict:
    """Per-metric paired comparison of ``other`` against ``base`` (points, percent scale; nats for the log margins)."""
    if base["case_ids"] != other["case_ids"]:
        raise ValueError(f"{other['results']}: not the same cases, in the same order, as {base['results']}")
    rng = np.random.default_rng(seed)
    out = {"label": other["label"], "results": other["results"], "metrics": {}}
    for m in ALL_METRICS:
        pairs = [(a, b) for a, b in zip(base["post"][m], other["post"][m]) if a is not None and b is not None]
        if not pairs:
            out["metrics"][m] = None
            continue
        d = SCALE[m] * np.array([b - a for a, b in pairs], dtype=np.float64)
        idx = rng.integers(0, len(d), size=(resamples, len(d)))
        boot = d[idx].mean(axis=1)
        better, worse = int((d > 0).sum()), int((d < 0).sum())
        out["metrics"][m] = {
            "n": len(d),
            "diff": float(d.mean()),
            "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
            "better": better,
            "worse": worse,
            "sign_test_p": sign_test_p(better, worse),
        }
    return out


def table(base: dict, comps: list[dict]) -> str:
    lines = [
        f"baseline: {base['label']}",
        "",
        "| run | metric | diff (points) | 95 % interval | better / worse cases | sign-test p |",
        "|---|---|---|---|---|---|",
    ]
    for c in comps:
        for m in ALL_METRICS:
            s = c["metrics"][m]
            if s is None:
                lines.append(f"| {c['label']} | {metric_label(m)} | – | – | – | – |")
                continue
            lo, hi = s["ci95"]
            lines.append(
                f"| {c['label']} | {metric_label(m)} | {s['diff']:+.2f} | [{lo:+.2f}, {hi:+.2f}] | "
                f"{s['better']} / {s['worse']} | {s['sign_test_p']:.3g} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "results",
        nargs="+",
        help="results JSON files written by metake-fast evaluate; the first is the baseline; "
        "A.json+B.json pools two runs' cases (the same method on two slices, paired slice by slice)",
    )
    ap.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples (default 10000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the comparison as JSON here")
    args = ap.parse_args(argv)
    if len(args.results) < 2:
        print("error: give a baseline and at least one run to compare with it", file=sys.stderr)
        return 2
    if args.resamples < 1:
        print("error: --resamples must be at least 1", file=sys.stderr)
        return 2
    try:
        runs = [load_pooled(p) for p in args.results]
        comps = [compare(runs[0], r, resamples=args.resamples, seed=args.seed) for r in runs[1:]]
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(runs[0], comps))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"baseline": runs[0]["label"], "resamples": args.resamples, "seed": args.seed,
                       "comparisons": comps}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
