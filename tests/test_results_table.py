"""bench/results_table.py: each row is its results file's metrics; bad input is a one-line error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import results_table  # noqa: E402

RUNS = sorted((ROOT / "docs" / "results").glob("cf_n100_b100_*.json"))


def test_rows_are_the_files_metrics(capsys):
    assert len(RUNS) >= 3
    assert results_table.main([str(p) for p in RUNS]) == 0
    lines = capsys.readouterr().out.splitlines()
    first = json.loads(RUNS[0].read_text())
    pre = first["metrics_pre"]
    assert lines[2].split(" | ")[3:6] == [f"{pre[k]:.1f}" for k in ("efficacy", "generalization", "specificity")]
    assert len(lines) == 3 + len(RUNS)
    for line, path in zip(lines[3:], RUNS):
        res = json.loads(path.read_text())
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == res["method"] and cells[1] == str(res["num_edits"]) and cells[2] == str(res["batch_size"])
        post = res["metrics_post"]
        assert cells[3:6] == [f"{post[k]:.1f}" for k in ("efficacy", "generalization", "specificity")]
        assert float(cells[7]) == round(res["timing"]["edits_per_s"], 3)


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    assert results_table.main([]) == 2
    assert "no results files" in capsys.readouterr().err
    assert results_table.main([str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    (tmp_path / "x.json").write_text('{"method": "rome"}')
    assert results_table.main([str(tmp_path / "x.json")]) == 2
    assert "not a metake-fast evaluate results file" in capsys.readouterr().err
    (tmp_path / "y.json").write_text("{not json")
    assert results_table.main([str(tmp_path / "y.json")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
