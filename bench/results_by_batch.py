"""Per-batch breakdown of sequential ``metake-fast evaluate`` runs, from their records.

Each edit's final metrics (measured after the last batch) are grouped by the batch that
wrote it, so one sees where a method loses: early edits that went through many later
writes, or everywhere.

    python bench/results_by_batch.py docs/results/cf_n1000_b100_alphaedit.json \
        docs/results/cf_n1000_b100_metake.json [--out by_batch.json]

Prints one markdown table (rows per run: failed rewrites, generalization, specificity, the
mean paraphrase margin ``log P(new) − log P(true)`` over the batch's paraphrase prompts and,
for MetaKE, the requests that got their plain target), then each run's first and second
half of the batches (the edits that went through more later writes, and the rest), and
optionally writes JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys

import _common  # noqa: F401,I001  (puts the repository on sys.path)

from metake_fast.evaluate import prompt_log_margins, record_metrics


def records_path(results_path: str, res: dict) -> str:
    """The run's records file: as recorded, or next to the results file; either may be gzipped (``.gz``)."""
    rec = res.get("records")
    if not rec:
        raise ValueError(f"{results_path}: no 'records' entry (run evaluate without --no-records)")
    local = os.path.join(os.path.dirname(results_path), os.path.basename(rec))
    for cand in (rec, rec + ".gz", local, local + ".gz"):
        if os.path.exists(cand):
            return cand
    raise ValueError(f"{results_path}: records file {rec!r} not found (nor next to the results file, nor gzipped)")


def open_records(path: str):
    """Open a records file for reading text, gzipped or not."""
    return gzip.open(path, "rt") if path.endswith(".gz") else open(path)


def load_run(results_path: str) -> tuple[dict, list[dict]]:
    """A run's results dict and its per-request records (one dict per line of the records file)."""
    with open(results_path) as f:
        res = json.load(f)
    with open_records(records_path(results_path, res)) as f:
        return res, [json.loads(line) for line in f if line.strip()]


def by_batch(results_path: str) -> dict:
    """Per-batch sums of one run: ``{"label", "batch_size", "batches": [{...}, ...], "overall"}``."""
    res, records = load_run(results_path)
    bsz = int(res["batch_size"])
    posts: dict[int, list[dict]] = {}
    plain: dict[int, int] = {}
    for r in records:
        b = int(r["index"]) // bsz
        posts.setdefault(b, []).append(r["post"])
        plain[b] = plain.get(b, 0) + int(bool((r.get("edit") or {}).get("fallback")))
    batches = []
    for b in sorted(posts):
        recs = posts[b]
        margins = prompt_log_margins(recs)  # empty for ZsRE (no P(true))
        batches.append({
            "batch": b + 1,
            "n": len(recs),
            "failed_rewrites": sum(1.0 - r["efficacy"] for r in recs if r.get("efficacy") is not None),
            **{k: v for k, v in record_metrics(recs).items() if k != "efficacy"},
            "plain_targets": plain[b],
            "paraphrase_prompts": len(margins),
            "paraphrase_margin": sum(margins) / len(margins) if margins else None,
        })  # fmt: skip
    label = res["method"] + (f" ({res['commit']})" if res.get("commit") else "")
    return {"label": label, "results": results_path, "batch_size": bsz, "batches": batches,
            "overall": res["metrics_post"]}  # fmt: skip


def table(runs: list[dict]) -> str:
    nb = max(len(r["batches"]) for r in runs)
    head = "| batch | " + " | ".join(str(i + 1) for i in range(nb)) + " |"
    lines = [head, "|" + "---|" * (nb + 1)]

    def row(name, key, fmt):
        for r in runs:
            vals = [fmt(b[key]) for b in r["batches"]] + [""] * (nb - len(r["batches"]))
            lines.append(f"| {name}, {r['label']} | " + " | ".join(vals) + " |")

    row("failed rewrites", "failed_rewrites", lambda x: f"{x:g}")
    row("generalization", "generalization", lambda x: "–" if x is None else f"{x:.0f}")
    row("specificity", "specificity", lambda x: "–" if x is None else f"{x:.0f}")
    row("paraphrase margin", "paraphrase_margin", lambda x: "–" if x is None else f"{x:+.2f}")
    if any(b["plain_targets"] for r in runs for b in r["batches"]):
        row("plain targets", "plain_targets", str)
    return "\n".join(lines)


def halves(run: dict) -> dict:
    """Efficacy, generalization and specificity (percent) and the mean paraphrase margin (nats)
    over the first and the second half of a run's batches.

    With an odd number of batches the middle one goes to the second half. Each half is
    weighted by its cases (the margin by its paraphrase prompts), so the two halves, weighted,
    give back the run's metrics.
    """
    bs = run["batches"]
    cut = len(bs) // 2
    out = {}
    for name, part in (("first", bs[:cut]), ("second", bs[cut:])):
        n = sum(b["n"] for b in part)
        row = {"batches": [b["batch"] for b in part], "n": n}
        row["efficacy"] = 100.0 * (1 - sum(b["failed_rewrites"] for b in part) / n) if n else None
        for key in ("generalization", "specificity"):
            have = [b for b in part if b[key] is not None]
            row[key] = sum(b[key] * b["n"] for b in have) / sum(b["n"] for b in have) if have else None
        n_par = sum(b.get("paraphrase_prompts", 0) for b in part)
        row["paraphrase_prompts"] = n_par
        row["paraphrase_margin"] = (
            sum(b["paraphrase_margin"] * b["paraphrase_prompts"] for b in part if b.get("paraphrase_prompts")) / n_par
            if n_par
            else None
        )
        out[name] = row
    return out


def halves_table(runs: list[dict]) -> str:
    lines = [
        "| run | efficacy, first half | second half | generalization, first half | second half "
        "| specificity, first half | second half | paraphrase margin, first half | second half |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda x: "–" if x is None else f"{x:.1f}"  # noqa: E731
    fm = lambda x: "–" if x is None else f"{x:+.3f}"  # noqa: E731
    for r in runs:
        h = halves(r)
        cells = [f(h[part][k]) for k in ("efficacy", "generalization", "specificity") for part in ("first", "second")]
        cells += [fm(h[part]["paraphrase_margin"]) for part in ("first", "second")]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="results JSON files written by metake-fast evaluate")
    ap.add_argument("--out", help="also write the breakdown as JSON here")
    args = ap.parse_args(argv)
    try:
        runs = [by_batch(p) for p in args.results]
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(runs))
    print()
    print(halves_table(runs))
    for r in runs:
        r["halves"] = halves(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
