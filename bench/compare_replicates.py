"""Pool several paired comparisons of two methods, allowing for run-to-run noise.

`compare_runs.py` compares two runs case by case; its interval treats each run as fixed.
But a sequential N-edit run amplifies float rounding: the same method on the same cases moved
3.3 generalization points between a CPU and an H200 (docs/RESULTS.md). So pairs of runs
(baseline, other) repeated on other platforms, data slices or context-template seeds disagree
by more than their case-level intervals say. This script treats each pair as one study and
pools them with a random-effects model, whose between-pair variance ``τ²`` absorbs that noise:

* per pair ``i``: ``d_i`` the mean case difference (points), ``s_i²`` its variance (case
  variance / n, the paired interval's);
* fixed effect: ``w_i = 1/s_i²``, ``d_FE = Σ w_i d_i / Σ w_i``; Cochran's
  ``Q = Σ w_i (d_i − d_FE)²`` on ``k − 1`` degrees of freedom;
* DerSimonian–Laird: ``τ² = max(0, (Q − (k − 1)) / (Σ w − Σ w² / Σ w))``;
  ``w*_i = 1/(s_i² + τ²)``, ``d_RE = Σ w*_i d_i / Σ w*_i``;
* interval: Hartung–Knapp–Sidik–Jonkman, ``d_RE ± t_{k−1} · sqrt(q / Σ w*_i)`` with
  ``q = Σ w*_i (d_i − d_RE)² / (k − 1)``, which keeps its coverage with few pairs (the
  normal-based DL interval does not); ``q`` is floored at 1 (the modified HKSJ) so that
  pairs agreeing by chance do not give an interval narrower than their own noise.

    python bench/compare_replicates.py BASE_1.json:OTHER_1.json BASE_2.json:OTHER_2.json ... [--out F]

Each side may pool slices as in compare_runs (``A.json+B.json``). With one pair there is no
``τ²`` to estimate, and the table says so.

``--edits START:END`` keeps only the edits at positions START … END−1 of each run's edit order
(the records' ``index``; for a pooled side, of each of its runs). In a sequential run the early
edits go through every later write and the late ones through few, so ``--edits 0:500`` and
``--edits 500:1000`` pool the two halves of 1,000-edit runs separately (``results_by_batch.py``
gives one run's halves; this pools them over pairs, with the same interval).

Planning (column "pairs to show it"): if the pooled estimate were the true difference, how many
pairs like these would it take before the interval is expected to leave zero out? Each new pair
is taken to have the mean within-pair variance ``v̄`` of the pairs given and the same ``τ²``, so
``k`` of them give an interval of half-width about ``t_{k−1} · sqrt((v̄ + τ²)/k)``; the answer
is the smallest ``k`` where that is below ``|d_RE|``. At that ``k`` the odds of an interval that
excludes zero are about even, not 95 %: it is the fewest pairs worth planning for, not a promise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import _common  # noqa: F401,I001  (puts the repository on sys.path)
import numpy as np
from compare_runs import ALL_METRICS, SCALE, load_pooled, metric_label

#: two-sided 95 % quantiles of Student's t, degrees of freedom 1..30
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)  # fmt: skip


def t975(df: int) -> float:
    """Student's t 97.5 % quantile; above 30 degrees of freedom a series in 1/df (error < 1e-3)."""
    if df < 1:
        raise ValueError("degrees of freedom must be at least 1")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def pair_differences(base: dict, other: dict, metric: str) -> np.ndarray:
    """Per-case ``other − base`` in points (nats for the log margins), over cases both scored."""
    if base["case_ids"] != other["case_ids"]:
        raise ValueError(f"{other['results']}: not the same cases, in the same order, as {base['results']}")
    pairs = [(a, b) for a, b in zip(base["post"][metric], other["post"][metric]) if a is not None and b is not None]
    return SCALE[metric] * np.array([b - a for a, b in pairs], dtype=np.float64)


def random_effects(d: np.ndarray, v: np.ndarray) -> dict:
    """Pool study estimates ``d`` with within-study variances ``v`` (see the module docstring)."""
    d, v = np.asarray(d, dtype=np.float64), np.asarray(v, dtype=np.float64)
    k = len(d)
    if k == 0 or len(v) != k:
        raise ValueError("give one variance per estimate, and at least one estimate")
    if not np.all(v > 0):
        raise ValueError("within-study variances must be positive")
    w = 1.0 / v
    d_fe = float((w * d).sum() / w.sum())
    out = {"k": k, "fixed": d_fe, "fixed_se": float(math.sqrt(1.0 / w.sum()))}
    if k == 1:
        return {**out, "q": 0.0, "tau2": None, "random": d_fe, "ci95": None}
    q = float((w * (d - d_fe) ** 2).sum())
    tau2 = max(0.0, (q - (k - 1)) / (w.sum() - (w**2).sum() / w.sum()))
    ws = 1.0 / (v + tau2)
    d_re = float((ws * d).sum() / ws.sum())
    q_hk = max(1.0, float((ws * (d - d_re) ** 2).sum()) / (k - 1))
    se_hk = math.sqrt(q_hk / ws.sum())
    half = t975(k - 1) * se_hk
    return {**out, "q": q, "tau2": tau2, "random": d_re, "ci95": [d_re - half, d_re + half]}


#: the most pairs "pairs to show it" looks for
PLAN_MAX_PAIRS = 1000


def pairs_to_show(d: float, v_mean: float, tau2: float, k_max: int = PLAN_MAX_PAIRS) -> int | None:
    """The fewest pairs ``k ≥ 2`` with ``t_{k−1} · sqrt((v_mean + tau2)/k) < |d|`` (see the module
    docstring); None if ``d`` is 0 or more than ``k_max`` pairs would be needed."""
    if v_mean <= 0 or tau2 < 0:
        raise ValueError("the within-pair variance must be positive and τ² not negative")
    s2 = v_mean + tau2
    for k in range(2, k_max + 1):
        if t975(k - 1) * math.sqrt(s2 / k) < abs(d):
            return k
    return None


def select_edits(run: dict, start: int, end: int) -> dict:
    """``run`` restricted to the cases whose edit position ``index`` is in ``[start, end)``."""
    keep = [i for i, j in enumerate(run["index"]) if start <= j < end]
    if not keep:
        raise ValueError(f"{run['results']}: no edits at positions {start}:{end} (it has {len(run['index'])})")
    return {
        **run,
        "label": f"{run['label']} [edits {start}:{end}]",
        "case_ids": [run["case_ids"][i] for i in keep],
        "index": [run["index"][i] for i in keep],
        "post": {m: [v[i] for i in keep] for m, v in run["post"].items()},
    }


def parse_edits(spec: str) -> tuple[int, int]:
    """``"START:END"`` → ``(START, END)``, with ``0 ≤ START < END``."""
    try:
        a, b = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"--edits {spec!r}: give START:END, two whole numbers, e.g. 500:1000") from None
    if not 0 <= a < b:
        raise ValueError(f"--edits {spec!r}: need 0 <= START < END")
    return a, b


def pool_pairs(pairs: list[tuple[dict, dict]]) -> dict:
    """Per metric: each pair's difference and variance, and their random-effects pool."""
    out = {}
    for m in ALL_METRICS:
        ds, vs, per = [], [], []
        for base, other in pairs:
            x = pair_differences(base, other, m)
            if len(x) < 2:
                continue
            var = float(x.var(ddof=1) / len(x))
            if var <= 0:  # identical runs on this metric: no within-pair noise to weigh by
                var = 1e-12
            ds.append(float(x.mean()))
            vs.append(var)
            per.append({"base": base["label"], "other": other["label"], "n": len(x), "diff": ds[-1],
                        "se": math.sqrt(var)})  # fmt: skip
        if not ds:
            out[m] = None
            continue
        r = random_effects(np.array(ds), np.array(vs))
        if r["tau2"] is not None:
            r["pairs_to_show"] = pairs_to_show(r["random"], float(np.mean(vs)), r["tau2"])
        out[m] = {"pairs": per, **r}
    return out


def table(pooled: dict) -> str:
    lines = [
        "| metric | pairs: diff each (points) | fixed effect | τ (points) | random effects | 95 % interval (HKSJ) "
        "| pairs to show it |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, r in pooled.items():
        if r is None:
            lines.append(f"| {metric_label(m)} | – | – | – | – | – | – |")
            continue
        each = ", ".join(f"{p['diff']:+.2f}" for p in r["pairs"])
        tau = "–" if r["tau2"] is None else f"{math.sqrt(r['tau2']):.2f}"
        ci = (
            "one pair: no between-pair variance" if r["ci95"] is None else f"[{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}]"
        )
        if r["tau2"] is None:
            need = "–"
        else:
            need = str(r["pairs_to_show"]) if r["pairs_to_show"] is not None else f"> {PLAN_MAX_PAIRS}"
        lines.append(
            f"| {metric_label(m)} | {each} | {r['fixed']:+.2f} ± {1.96 * r['fixed_se']:.2f} | {tau} "
            f"| {r['random']:+.2f} | {ci} | {need} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pairs", nargs="+", help="BASE.json:OTHER.json, one per pair of runs on the same cases")
    ap.add_argument("--out", help="also write the pooled comparison as JSON here")
    ap.add_argument(
        "--edits", metavar="START:END", help="only the edits at these positions of each run (e.g. 500:1000)"
    )
    args = ap.parse_args(argv)
    try:
        edits = parse_edits(args.edits) if args.edits else None
        pairs = []
        for spec in args.pairs:
            if spec.count(":") != 1:
                raise ValueError(f"{spec!r}: give BASE.json:OTHER.json")
            a, b = spec.split(":")
            base, other = load_pooled(a), load_pooled(b)
            if edits is not None:
                base, other = select_edits(base, *edits), select_edits(other, *edits)
            pairs.append((base, other))
        pooled = pool_pairs(pairs)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for i, (a, b) in enumerate(pairs, 1):
        print(f"pair {i}: {b['label']}  against  {a['label']}")
    print()
    print(table(pooled))
    if args.out:
        with open(args.out, "w") as f:
            doc = {"pairs": [[a["label"], b["label"]] for a, b in pairs], "edits": list(edits) if edits else None}
            json.dump({**doc, "metrics": pooled}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
