"""Where one method's margin gain over another lands: by how hard each prompt was before editing.

Two ``metake-fast evaluate`` runs on the same cases (a pair: BASE and OTHER) are compared prompt
by prompt. Each prompt of one kind (default: the paraphrases) is put in a bin by its margin
``log P(new) − log P(true)`` on the *unedited* model (BASE's ``pre`` records). That margin does
not depend on either run, so binning on it does not favour either side; binning on BASE's
post-edit margin would, by regression to the mean. Per bin: the prompts, BASE's mean post-edit
margin, the mean margin difference OTHER − BASE (nats), and each run's success rate (the share
of prompts with ``P(new) > P(true)``, the per-prompt form of the generalization score). Several
pairs are summed bin by bin.

    python bench/margin_by_difficulty.py BASE.json:OTHER.json [BASE2.json:OTHER2.json ...] \
        [--edges -6,-4,-2,0] [--kind paraphrase] [--out F.json]

A gain that shows in the margin but not in the score sits in bins far from the decision line.
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys

import _common  # noqa: F401,I001  (puts the repository on sys.path)
from results_by_batch import load_run

from metake_fast.evaluate import prompt_log_margins

DEFAULT_EDGES = (-6.0, -4.0, -2.0, 0.0)


def pair_margins(base_path: str, other_path: str, kind: str = "paraphrase") -> list[tuple[float, float, float]]:
    """``(pre, base, other)`` margins of every ``kind`` prompt of a pair of runs, in record order."""
    base, other = load_run(base_path)[1], load_run(other_path)[1]
    if len(base) != len(other):
        raise ValueError(f"{base_path} and {other_path} have {len(base)} and {len(other)} records: not one case set")
    for i, (a, b) in enumerate(zip(base, other)):
        if a.get("case_id") != b.get("case_id"):
            raise ValueError(f"record {i}: case {a.get('case_id')} against {b.get('case_id')}: not the same cases")
    pre = prompt_log_margins([r["pre"] for r in base], kind)
    b, o = prompt_log_margins([r["post"] for r in base], kind), prompt_log_margins([r["post"] for r in other], kind)
    if not (len(pre) == len(b) == len(o)):
        raise ValueError(f"{base_path}, {other_path}: {kind} prompts with both log-probabilities differ in number")
    return list(zip(pre, b, o))


def binned(triples, edges=DEFAULT_EDGES) -> list[dict]:
    """Per pre-edit-margin bin (``edges`` ascending; ``len(edges) + 1`` bins, each ``[lo, hi)``):
    ``lo, hi, prompts, base_margin, diff, base_success, other_success`` (success rates in %)."""
    edges = [float(e) for e in edges]
    if edges != sorted(edges) or len(set(edges)) != len(edges):
        raise ValueError(f"bin edges must be strictly ascending, got {edges}")
    bounds = [float("-inf"), *edges, float("inf")]
    acc = [[0, 0.0, 0.0, 0, 0] for _ in range(len(bounds) - 1)]
    for pre, b, o in triples:
        a = acc[bisect.bisect_right(edges, pre)]
        a[0] += 1
        a[1] += b
        a[2] += o - b
        a[3] += b > 0
        a[4] += o > 0
    out = []
    for (lo, hi), (n, sb, sd, wb, wo) in zip(zip(bounds, bounds[1:]), acc):
        out.append({
            "lo": lo, "hi": hi, "prompts": n,
            "base_margin": sb / n if n else None, "diff": sd / n if n else None,
            "base_success": 100.0 * wb / n if n else None, "other_success": 100.0 * wo / n if n else None,
        })  # fmt: skip
    return out


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    lines = [
        "| pre-edit margin (nats) | prompts | BASE post margin | OTHER − BASE (nats) | BASE success | OTHER success |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo = "−∞" if r["lo"] == float("-inf") else f"{r['lo']:g}"
        hi = "∞" if r["hi"] == float("inf") else f"{r['hi']:g}"
        lines.append(
            f"| [{lo}, {hi}) | {r['prompts']} | {_fmt(r['base_margin'], '+.2f')} | {_fmt(r['diff'], '+.2f')} "
            f"| {_fmt(r['base_success'], '.1f')} % | {_fmt(r['other_success'], '.1f')} % |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pairs", nargs="+", metavar="BASE.json:OTHER.json")
    ap.add_argument("--edges", default=",".join(f"{e:g}" for e in DEFAULT_EDGES), help="bin edges, nats")
    ap.add_argument("--kind", default="paraphrase", choices=["rewrite", "paraphrase"])
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    try:
        edges = [float(x) for x in args.edges.split(",") if x.strip()]
        triples = []
        for pair in args.pairs:
            base, sep, other = pair.partition(":")
            if not sep or not base or not other:
                raise ValueError(f"expected BASE.json:OTHER.json, got {pair!r}")
            triples += pair_margins(base, other, args.kind)
        rows = binned(triples, edges)
    except (OSError, ValueError, KeyError) as e:
        print(f"margin_by_difficulty: error: {e}", file=sys.stderr)
        return 2
    print(f"{len(args.pairs)} pair(s), {len(triples)} {args.kind} prompts")
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"pairs": args.pairs, "kind": args.kind, "edges": edges, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
