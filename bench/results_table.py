"""Print a markdown table from ``metake-fast evaluate`` results files.

python bench/results_table.py docs/results/cf_n100_b100_*.json
"""

from __future__ import annotations

import json
import sys


def fmt(x) -> str:
    return "–" if x is None else f"{x:.1f}"


def load(path: str) -> dict:
    with open(path) as f:
        res = json.load(f)
    missing = [
        k for k in ("method", "num_edits", "batch_size", "metrics_pre", "metrics_post", "timing") if k not in res
    ]
    if missing:
        raise ValueError(f"{path}: not a metake-fast evaluate results file (no {', '.join(missing)})")
    return res


def main(paths: list[str]) -> int:
    if not paths:
        print("no results files given", file=sys.stderr)
        return 2
    try:
        rows = [load(p) for p in paths]
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    head = "| method | N | B | efficacy | generalization | specificity | edit s | edits/s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    first = rows[0]
    pre = first["metrics_pre"]
    print(f"| pre-edit | {first['num_edits']} | – | {fmt(pre.get('efficacy'))} | {fmt(pre.get('generalization'))} "
          f"| {fmt(pre.get('specificity'))} | – | – |")  # fmt: skip
    for r in rows:
        m = r["metrics_post"]
        t = r["timing"]
        print(f"| {r['method']} | {r['num_edits']} | {r['batch_size']} | {fmt(m.get('efficacy'))} "
              f"| {fmt(m.get('generalization'))} | {fmt(m.get('specificity'))} | {t['edit_s']:.0f} "
              f"| {t['edits_per_s']:.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
