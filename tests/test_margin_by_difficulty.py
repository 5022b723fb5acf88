"""bench/margin_by_difficulty.py: bins by the pre-edit margin add up to the runs' own numbers."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import margin_by_difficulty as mbd  # noqa: E402

from metake_fast.evaluate import prompt_log_margins  # noqa: E402

H = ROOT / "docs" / "results" / "h200_steps50"
PAIR = (str(H / "cfho_n1000_b100_alphaedit_steps50.json"), str(H / "cfho_n1000_b100_metake_steps50.json"))


def _prompt(margin: float) -> dict:
    return {"logprob_new": math.log(0.5) + margin, "logprob_true": math.log(0.5)}


def _run(tmp_path, name: str, cases: list[tuple[int, list[float], list[float]]]) -> str:
    """A results file and its records: per case (case_id, pre margins, post margins) of the paraphrases."""
    recs = [
        {"index": i, "case_id": cid, "pre": {"paraphrase": [_prompt(m) for m in pre]},
         "post": {"paraphrase": [_prompt(m) for m in post]}}
        for i, (cid, pre, post) in enumerate(cases)
    ]  # fmt: skip
    (tmp_path / f"{name}.records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / f"{name}.json").write_text(json.dumps({"records": f"{name}.records.jsonl"}))
    return str(tmp_path / f"{name}.json")


def test_closed_form_bins(tmp_path):
    base = _run(tmp_path, "base", [(1, [-7.0, -3.0], [-1.0, 2.0]), (2, [-1.0, 0.5], [0.5, 3.0])])
    other = _run(tmp_path, "other", [(1, [-7.0, -3.0], [1.0, 1.5]), (2, [-1.0, 0.5], [0.25, 4.0])])
    rows = mbd.binned(mbd.pair_margins(base, other), edges=[-4.0, 0.0])
    assert [r["prompts"] for r in rows] == [1, 2, 1]
    # [-inf, -4): pre -7, base -1 -> other 1; [-4, 0): pre -3 (2 -> 1.5) and -1 (0.5 -> 0.25); [0, inf): 3 -> 4
    assert rows[0]["diff"] == pytest.approx(2.0) and rows[0]["base_success"] == 0 and rows[0]["other_success"] == 100
    assert rows[1]["base_margin"] == pytest.approx(1.25) and rows[1]["diff"] == pytest.approx(-0.375)
    assert rows[1]["base_success"] == rows[1]["other_success"] == 100
    assert rows[2]["lo"] == 0.0 and rows[2]["hi"] == math.inf and rows[2]["diff"] == pytest.approx(1.0)


def test_empty_bins_and_bad_edges(tmp_path):
    base = _run(tmp_path, "b", [(1, [5.0], [1.0])])
    rows = mbd.binned(mbd.pair_margins(base, base), edges=[-1.0, 0.0])
    assert [r["prompts"] for r in rows] == [0, 0, 1] and rows[0]["diff"] is None
    assert "–" in mbd.table(rows)
    with pytest.raises(ValueError, match="ascending"):
        mbd.binned([], edges=[0.0, -1.0])


def test_other_cases_are_refused(tmp_path, capsys):
    a = _run(tmp_path, "a", [(1, [0.0], [1.0])])
    b = _run(tmp_path, "b", [(2, [0.0], [1.0])])
    assert mbd.main([f"{a}:{b}"]) == 2
    assert "not the same cases" in capsys.readouterr().err
    assert mbd.main([a]) == 2  # not a pair


@pytest.mark.skipif(not Path(PAIR[0]).exists(), reason="results not in this checkout")
def test_real_pair_adds_up_to_the_runs(tmp_path):
    """Summed over the bins: the mean margin difference of all paraphrase prompts, and each run's
    generalization score (CounterFact cases have the same number of paraphrases each)."""
    triples = mbd.pair_margins(*PAIR)
    rows = mbd.binned(triples)
    n = sum(r["prompts"] for r in rows)
    recs = [mbd.load_run(p)[1] for p in PAIR]
    base_m, other_m = (prompt_log_margins([r["post"] for r in rr]) for rr in recs)
    assert n == len(base_m) == len(other_m) == len(triples)
    diff = sum(r["diff"] * r["prompts"] for r in rows if r["prompts"]) / n
    assert diff == pytest.approx(sum(other_m) / n - sum(base_m) / n, abs=1e-9)
    counts = {len(r["post"]["paraphrase"]) for r in recs[0]}
    assert len(counts) == 1
    for key, path in (("base_success", PAIR[0]), ("other_success", PAIR[1])):
        gen = json.loads(Path(path).read_text())["metrics_post"]["generalization"]
        assert sum(r[key] * r["prompts"] for r in rows if r["prompts"]) / n == pytest.approx(gen, abs=1e-9)
    # a run against itself: no difference in any bin
    assert all(r["diff"] in (None, 0.0) for r in mbd.binned(mbd.pair_margins(PAIR[0], PAIR[0])))
    assert mbd.main([f"{PAIR[0]}:{PAIR[1]}", "--out", str(tmp_path / "o.json")]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["rows"][0]["prompts"] == rows[0]["prompts"]
