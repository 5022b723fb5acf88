"""bench/compare_replicates.py: the random-effects pool against closed forms and simulation,
and end to end on the shipped N = 1000 records (each pair's difference is compare_runs')."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import compare_replicates as cr  # noqa: E402
import compare_runs  # noqa: E402

RES = ROOT / "docs" / "results"


def test_equal_estimates_have_no_between_pair_variance():
    r = cr.random_effects([1.5, 1.5, 1.5], [0.2, 0.5, 1.0])
    assert r["tau2"] == 0.0 and r["random"] == pytest.approx(1.5) and r["fixed"] == pytest.approx(1.5)
    # the modified HKSJ interval is never narrower than t · (fixed-effect standard error)
    se = math.sqrt(1.0 / (1 / 0.2 + 1 / 0.5 + 1 / 1.0))
    assert r["ci95"] == pytest.approx([1.5 - cr.t975(2) * se, 1.5 + cr.t975(2) * se])


def test_two_pairs_closed_form():
    # equal within-pair variance v: Q = (d1 − d2)² / (2v), τ² = max(0, (d1 − d2)²/2 − v)
    v = 0.5
    for d1, d2 in [(3.0, -1.0), (0.2, 0.0)]:
        r = cr.random_effects([d1, d2], [v, v])
        assert r["q"] == pytest.approx((d1 - d2) ** 2 / (2 * v))
        assert r["tau2"] == pytest.approx(max(0.0, (d1 - d2) ** 2 / 2 - v))
        assert r["random"] == pytest.approx((d1 + d2) / 2)
        half = cr.t975(1) * math.sqrt(max(1.0, (d1 - d2) ** 2 / (2 * (v + r["tau2"]))) / (2 / (v + r["tau2"])))
        assert r["ci95"] == pytest.approx([(d1 + d2) / 2 - half, (d1 + d2) / 2 + half])


def test_one_pair_is_its_own_estimate():
    r = cr.random_effects([2.0], [0.25])
    assert r["random"] == 2.0 and r["tau2"] is None and r["ci95"] is None and r["fixed_se"] == 0.5


def test_tau2_and_coverage_by_simulation():
    rng = np.random.default_rng(0)
    # many pairs: the DL τ² is consistent
    k, tau2 = 400, 4.0
    v = rng.uniform(0.5, 2.0, k)
    d = 1.0 + rng.normal(0, math.sqrt(tau2), k) + rng.normal(0, np.sqrt(v))
    assert cr.random_effects(d, v)["tau2"] == pytest.approx(tau2, rel=0.25)
    # few pairs: the interval covers the true mean at least about 95 % of the time (here 97 %; the DL
    # z-interval covers it 88 % of the time on these draws)
    hits, reps = 0, 2000
    for _ in range(reps):
        v = rng.uniform(0.5, 2.0, 4)
        d = rng.normal(0, math.sqrt(tau2), 4) + rng.normal(0, np.sqrt(v))
        lo, hi = cr.random_effects(d, v)["ci95"]
        hits += lo <= 0.0 <= hi
    assert 0.93 <= hits / reps <= 0.995


def test_pairs_to_show_by_hand():
    # τ² = 0, v̄ = 1: two pairs suffice once t_1 · sqrt(1/2) = 8.984 < |d|; at d = 8.9 three are
    # needed (t_2 · sqrt(1/3) = 2.484)
    assert cr.pairs_to_show(9.0, 1.0, 0.0) == 2 and cr.pairs_to_show(-9.0, 1.0, 0.0) == 2
    assert cr.pairs_to_show(8.9, 1.0, 0.0) == 3
    # |d| = 1 with v̄ + τ² = 2 (split either way): needs t_{k−1}² · 2 < k; k = 10: 2.262² · 2 = 10.23,
    # not below 10; k = 11: 2.228² · 2 = 9.93 < 11
    assert cr.pairs_to_show(1.0, 1.0, 1.0) == cr.pairs_to_show(1.0, 2.0, 0.0) == 11
    assert cr.pairs_to_show(0.0, 1.0, 0.0) is None and cr.pairs_to_show(0.01, 1.0, 1.0, k_max=50) is None
    with pytest.raises(ValueError):
        cr.pairs_to_show(1.0, 0.0, 0.0)


def test_pairs_to_show_gives_even_odds_by_simulation():
    # Draw k pairs around a true difference with the given noise and pool them as the script does:
    # at the projected k about half the intervals leave zero out, at a third of it few, at three
    # times it nearly all.
    rng = np.random.default_rng(3)
    delta, v, tau2 = 0.9, 1.3, 0.8
    k = cr.pairs_to_show(delta, v, tau2)

    def power(n, reps=600):
        hits = 0
        for _ in range(reps):
            d = delta + rng.normal(0, math.sqrt(tau2), n) + rng.normal(0, math.sqrt(v), n)
            hits += cr.random_effects(d, np.full(n, v))["ci95"][0] > 0
        return hits / reps

    assert 0.38 <= power(k) <= 0.65
    assert power(max(2, k // 3)) < 0.25
    assert power(3 * k) > 0.9


def test_t_quantiles():
    assert cr.t975(1) == 12.706 and cr.t975(30) == 2.042
    assert abs(cr.t975(31) - 2.0395) < 2e-3 and abs(cr.t975(120) - 1.9799) < 1e-3
    assert all(cr.t975(df) > cr.t975(df + 1) for df in range(1, 60))
    with pytest.raises(ValueError):
        cr.t975(0)


def test_bad_input():
    with pytest.raises(ValueError):
        cr.random_effects([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        cr.random_effects([1.0, 2.0], [1.0, 0.0])
    assert cr.main(["only-one-file.json"]) == 2


def test_on_the_shipped_runs(tmp_path):
    pairs = [
        (RES / "cf_n1000_b100_alphaedit.json", RES / "cf_n1000_b100_metake_spread.json"),
        (RES / "h200" / "cf_n1000_b100_alphaedit.json", RES / "h200" / "cf_n1000_b100_metake.json"),
        (RES / "h200" / "cfho_n1000_b100_alphaedit.json", RES / "h200" / "cfho_n1000_b100_metake.json"),
    ]
    out = tmp_path / "pooled.json"
    assert cr.main([f"{a}:{b}" for a, b in pairs] + ["--out", str(out)]) == 0
    pooled = json.loads(out.read_text())["metrics"]
    for i, (a, b) in enumerate(pairs):
        # each pair's difference and standard error are compare_runs' paired difference
        c = compare_runs.compare(compare_runs.load_cases(str(a)), compare_runs.load_cases(str(b)), resamples=2000)
        for m in compare_runs.METRICS:
            p = pooled[m]["pairs"][i]
            assert p["n"] == 1000 and p["diff"] == pytest.approx(c["metrics"][m]["diff"], abs=1e-9)
            lo, hi = c["metrics"][m]["ci95"]
            assert 1.96 * p["se"] == pytest.approx((hi - lo) / 2, rel=0.15)  # bootstrap ≈ normal interval
    g = pooled["generalization"]
    assert g["ci95"][0] < g["random"] < g["ci95"][1]
    v_mean = float(np.mean([p["se"] ** 2 for p in g["pairs"]]))
    assert g["pairs_to_show"] == cr.pairs_to_show(g["random"], v_mean, g["tau2"])
    assert g["ci95"][1] - g["ci95"][0] > 2 * 1.96 * g["fixed_se"]  # run noise widens the interval


def test_edits_range_is_each_runs_half(tmp_path):
    # --edits 500:1000 pools the second halves: each pair's difference is the difference of the
    # two runs' second-half scores as results_by_batch (its own code path) gives them
    import results_by_batch

    pairs = [
        (RES / "cf_n1000_b100_alphaedit_steps50.json", RES / "cf_n1000_b100_metake_steps50.json"),
        (RES / "cf6k_n1000_b100_alphaedit_steps50.json", RES / "cf6k_n1000_b100_metake_steps50.json"),
    ]
    for rng, half in (("0:500", "first"), ("500:1000", "second")):
        out = tmp_path / f"pooled_{half}.json"
        assert cr.main([f"{a}:{b}" for a, b in pairs] + ["--edits", rng, "--out", str(out)]) == 0
        doc = json.loads(out.read_text())
        assert doc["edits"] == [int(x) for x in rng.split(":")]
        for i, (a, b) in enumerate(pairs):
            ha, hb = (results_by_batch.halves(results_by_batch.by_batch(str(p)))[half] for p in (a, b))
            for m in ("generalization", "specificity"):
                p = doc["metrics"][m]["pairs"][i]
                assert p["n"] == 500 == ha["n"] == hb["n"]
                assert p["diff"] == pytest.approx(hb[m] - ha[m], abs=1e-9)
    # the whole range is the unrestricted pool
    whole, full = tmp_path / "whole.json", tmp_path / "full.json"
    assert cr.main([f"{a}:{b}" for a, b in pairs] + ["--edits", "0:1000", "--out", str(whole)]) == 0
    assert cr.main([f"{a}:{b}" for a, b in pairs] + ["--out", str(full)]) == 0
    w, f = json.loads(whole.read_text())["metrics"], json.loads(full.read_text())["metrics"]
    assert w["generalization"]["random"] == pytest.approx(f["generalization"]["random"], abs=1e-12)
    # bad ranges are a clear error, not a traceback
    a, b = pairs[0]
    for bad in ("500", "a:b", "600:500", "-1:5", "2000:3000"):
        assert cr.main([f"{a}:{b}", f"--edits={bad}"]) == 2
