"""bench/results_by_batch.py: per-batch sums agree with evaluate's own aggregate metrics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import results_by_batch  # noqa: E402

RES = ROOT / "docs" / "results"
RUNS = sorted(RES.glob("cf_n1000_b100_*.json")) + [
    p for d in ("h200", "h200_steps50") for p in sorted((RES / d).glob("cf*_n1000_b100_*.json"))
]


@pytest.mark.parametrize("path", RUNS, ids=[p.stem for p in RUNS])
def test_batches_add_up_to_the_run_metrics(path):
    """Weighted by batch size, the per-batch numbers give back the run's metrics_post exactly."""
    out = results_by_batch.by_batch(str(path))
    res = json.loads(path.read_text())
    n = sum(b["n"] for b in out["batches"])
    assert n == res["num_edits"] and len(out["batches"]) == res["num_edits"] // res["batch_size"]
    post = res["metrics_post"]
    failed = sum(b["failed_rewrites"] for b in out["batches"])
    assert 100.0 * (1 - failed / n) == pytest.approx(post["efficacy"], abs=1e-9)
    for key in ("generalization", "specificity"):
        assert sum(b[key] * b["n"] for b in out["batches"]) / n == pytest.approx(post[key], abs=1e-9)
    assert sum(b["plain_targets"] for b in out["batches"]) == (res["edit"].get("fallbacks") or 0)
    h = results_by_batch.halves(out)  # the two halves, weighted by their cases, give the run back
    assert h["first"]["n"] + h["second"]["n"] == n and h["first"]["batches"] == list(
        range(1, len(out["batches"]) // 2 + 1)
    )
    for key in ("efficacy", "generalization", "specificity"):
        both = (h["first"][key] * h["first"]["n"] + h["second"][key] * h["second"]["n"]) / n
        assert both == pytest.approx(post[key], abs=1e-9)
    # the paraphrase margin, straight from the records: every paraphrase prompt's log P(new) - log P(true)
    with results_by_batch.open_records(results_by_batch.records_path(str(path), res)) as f:
        margins = [e["logprob_new"] - e["logprob_true"] for line in f for e in json.loads(line)["post"]["paraphrase"]]
    n_par = sum(b["paraphrase_prompts"] for b in out["batches"])
    assert n_par == len(margins) == h["first"]["paraphrase_prompts"] + h["second"]["paraphrase_prompts"]
    by_b = sum(b["paraphrase_margin"] * b["paraphrase_prompts"] for b in out["batches"]) / n_par
    by_h = sum(h[k]["paraphrase_margin"] * h[k]["paraphrase_prompts"] for k in ("first", "second")) / n_par
    assert by_b == pytest.approx(sum(margins) / len(margins), abs=1e-9)
    assert by_h == pytest.approx(sum(margins) / len(margins), abs=1e-9)


def test_zsre_runs_have_no_margin():
    """ZsRE records carry no P(true): the scores are broken down, the margin is left out."""
    path = RES / "zsre3_n100_b100_alphaedit_steps50.json"
    out = results_by_batch.by_batch(str(path))
    post = json.loads(path.read_text())["metrics_post"]
    assert [b["paraphrase_margin"] for b in out["batches"]] == [None]
    assert out["batches"][0]["generalization"] == pytest.approx(post["generalization"], abs=1e-9)
    h = results_by_batch.halves(out)
    assert h["second"]["paraphrase_margin"] is None and h["second"]["paraphrase_prompts"] == 0
    assert results_by_batch.main([str(path)]) == 0


def test_grouping_and_errors(tmp_path, capsys):
    """Records are grouped by index // batch_size; missing prompt kinds stay None; a missing records file is a clear error, not a traceback."""
    recs = []
    for i in range(5):
        gen = None if i == 4 else 0.5 * (i % 3 == 0)  # no paraphrase prompts: left out, as in evaluate
        post = {"efficacy": float(i % 2), "generalization": gen, "specificity": 1.0}
        if gen is not None:  # one paraphrase prompt with margin i
            post["paraphrase"] = [{"logprob_new": float(i), "logprob_true": 0.0}]
        recs.append({"index": i, "post": post, "edit": {"fallback": i == 4}})
    (tmp_path / "r.records.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    res = {"method": "x", "batch_size": 2, "metrics_post": {}, "records": "elsewhere/r.records.jsonl"}
    (tmp_path / "r.json").write_text(json.dumps(res))
    out = results_by_batch.by_batch(str(tmp_path / "r.json"))
    assert [b["n"] for b in out["batches"]] == [2, 2, 1]
    assert [b["failed_rewrites"] for b in out["batches"]] == [1.0, 1.0, 1.0]
    assert [b["generalization"] for b in out["batches"]] == [25.0, 25.0, None]
    assert [b["paraphrase_margin"] for b in out["batches"]] == [0.5, 2.5, None]
    h = results_by_batch.halves(out)  # batch 1 / batches 2-3 (the middle one goes second)
    assert h["first"]["paraphrase_margin"] == 0.5 and h["second"]["paraphrase_margin"] == 2.5
    assert "+2.500" in results_by_batch.halves_table([out])
    assert "–" in results_by_batch.table([out])
    assert [b["plain_targets"] for b in out["batches"]] == [0, 0, 1]
    (tmp_path / "r.records.jsonl").unlink()
    assert results_by_batch.main([str(tmp_path / "r.json")]) == 2
    assert "not found" in capsys.readouterr().err
