"""bench/compare_runs.py: paired differences agree with evaluate's own metrics; the sign test
and the bootstrap interval against closed-form cases."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import compare_runs  # noqa: E402
from results_by_batch import open_records, records_path  # noqa: E402

RES = ROOT / "docs" / "results"
# (baseline, run) on the same cases: the CPU runs, and the H200 runs on the dev and held-out slices
PAIRS = [
    (folder / f"{prefix}_n1000_b100_alphaedit.json", p)
    for folder, prefix in ((RES, "cf"), (RES / "h200", "cf"), (RES / "h200", "cfho"))
    for p in sorted(folder.glob(f"{prefix}_n1000_b100_*.json"))
]
IDS = [f"{b.parent.name}-{p.stem}" for b, p in PAIRS]


@pytest.mark.parametrize("base_path,path", PAIRS, ids=IDS)
def test_paired_difference_is_the_difference_of_the_run_metrics(base_path, path):
    base, other = compare_runs.load_cases(str(base_path)), compare_runs.load_cases(str(path))
    out = compare_runs.compare(base, other, resamples=200)
    pb, po = json.loads(base_path.read_text())["metrics_post"], json.loads(path.read_text())["metrics_post"]
    for m in compare_runs.METRICS:
        s = out["metrics"][m]
        assert s["n"] == 1000
        assert s["diff"] == pytest.approx(po[m] - pb[m], abs=1e-9)
        assert s["ci95"][0] <= s["diff"] <= s["ci95"][1]
        if path == base_path:
            assert s["better"] == s["worse"] == 0 and s["ci95"] == [0.0, 0.0] and s["sign_test_p"] == 1.0


@pytest.mark.parametrize(
    "base_path,path", [(b, p) for b, p in PAIRS if b != p], ids=[i for (b, p), i in zip(PAIRS, IDS) if b != p]
)
def test_magnitudes_against_the_records_probabilities(base_path, path):

    # Oracle: the field's EM / PM / NM recomputed here in fp64 from the logged log-probabilities
    # (exp(logprob), not the records' p fields), paired over the cases.
    def per_case(p):
        out = {k: [] for k in compare_runs.MAGNITUDE_KEYS}
        with open_records(records_path(str(p), json.loads(p.read_text()))) as f:
            lines = f.read().splitlines()
        for line in lines:
            post = json.loads(line)["post"]
            for k, field in compare_runs.MAGNITUDE_KEYS.items():
                sign = -1.0 if field == "neighborhood" else 1.0
                d = [sign * (math.exp(e["logprob_new"]) - math.exp(e["logprob_true"])) for e in post[field]]
                out[k].append(sum(d) / len(d))
        return out

    base, other = per_case(base_path), per_case(path)
    out = compare_runs.compare(
        compare_runs.load_cases(str(base_path)), compare_runs.load_cases(str(path)), resamples=200
    )
    for k in compare_runs.MAGNITUDE_KEYS:
        want = 100.0 * sum(o - b for o, b in zip(other[k], base[k])) / len(base[k])
        s = out["metrics"][k]
        assert s["n"] == 1000 and s["diff"] == pytest.approx(want, abs=1e-6)
        assert s["better"] == sum(o > b for o, b in zip(other[k], base[k]))


@pytest.mark.parametrize("base_path,path", [(b, p) for b, p in PAIRS if b != p][:3])
def test_log_margins_against_the_records(base_path, path):
    """The log-margin rows are the paired mean of each case's mean ``log P(new) − log P(true)``, in nats."""

    def per_case(p):
        with open_records(records_path(str(p), json.loads(p.read_text()))) as f:
            posts = [json.loads(line)["post"] for line in f.read().splitlines()]
        out = {}
        for k, field, sign in (("efficacy", "rewrite", 1), ("generalization", "paraphrase", 1),
                               ("specificity", "neighborhood", -1)):  # fmt: skip
            out[k] = [
                sum(sign * (e["logprob_new"] - e["logprob_true"]) for e in q[field]) / len(q[field]) for q in posts
            ]
        return out

    base, other = per_case(base_path), per_case(path)
    out = compare_runs.compare(
        compare_runs.load_cases(str(base_path)), compare_runs.load_cases(str(path)), resamples=200
    )
    for k in ("efficacy", "generalization", "specificity"):
        s = out["metrics"][f"{k}_log_margin"]
        want = sum(o - b for o, b in zip(other[k], base[k])) / len(base[k])
        assert s["n"] == 1000 and s["diff"] == pytest.approx(want, abs=1e-9)
    assert "generalization_log_margin (nats)" in compare_runs.table(compare_runs.load_cases(str(base_path)), [out])


def test_log_margin_closed_form():
    post = {
        "rewrite": [{"logprob_new": -0.5, "logprob_true": -2.5}],
        "paraphrase": [{"logprob_new": -1.0, "logprob_true": -2.0}, {"logprob_new": -3.0, "logprob_true": -1.0}],
        "neighborhood": [{"logprob_new": -4.0, "logprob_true": -1.0}, {"logprob_new": -1.0}],
    }
    m = compare_runs.record_log_margins(post)
    assert m == {"efficacy_log_margin": 2.0, "generalization_log_margin": -0.5, "specificity_log_margin": 3.0}
    z = compare_runs.record_log_margins({"rewrite": [{"logprob_new": -0.3}]})  # ZsRE: no P(true)
    assert z == {"efficacy_log_margin": None, "generalization_log_margin": None, "specificity_log_margin": None}


def test_prompt_log_margins_closed_form():
    from metake_fast.evaluate import prompt_log_margins

    recs = [
        {"paraphrase": [{"logprob_new": -1.0, "logprob_true": -2.0}, {"logprob_new": -3.0}]},
        {
            "paraphrase": [{"logprob_new": -3.0, "logprob_true": -1.0}],
            "neighborhood": [{"logprob_new": -4.0, "logprob_true": -1.5}],
        },
        {"rewrite": [{"logprob_new": -0.3}]},  # no paraphrase prompts at all
    ]
    assert prompt_log_margins(recs) == [1.0, -2.0]  # in record order; the prompt without P(true) left out
    assert prompt_log_margins(recs, "neighborhood") == [-2.5]
    assert prompt_log_margins(recs, "rewrite") == []


def test_magnitude_closed_form():
    post = {
        "rewrite": [{"p_new": 0.9, "p_true": 0.1}],
        "paraphrase": [{"p_new": 0.5, "p_true": 0.2}, {"p_new": 0.1, "p_true": 0.3}],
        "neighborhood": [{"p_new": 0.2, "p_true": 0.6}, {"p_new": 0.0, "p_true": None}],
    }
    m = compare_runs.record_magnitudes(post)
    assert m["efficacy_magnitude"] == pytest.approx(0.8)
    assert m["generalization_magnitude"] == pytest.approx(0.05)
    assert m["specificity_magnitude"] == pytest.approx(0.4)  # the None prompt is left out
    z = compare_runs.record_magnitudes({"rewrite": [{"p_new": 0.3}]})  # ZsRE: no P(true)
    assert z == {"efficacy_magnitude": None, "generalization_magnitude": None, "specificity_magnitude": None}


def test_sign_test_closed_form():
    assert compare_runs.sign_test_p(0, 0) == 1.0
    assert compare_runs.sign_test_p(10, 0) == pytest.approx(2 / 2**10, rel=1e-12)
    assert compare_runs.sign_test_p(0, 10) == compare_runs.sign_test_p(10, 0)
    # 3 of 8: P(X <= 3) = (1 + 8 + 28 + 56) / 256, doubled.
    assert compare_runs.sign_test_p(3, 5) == pytest.approx(2 * 93 / 256, rel=1e-12)
    assert compare_runs.sign_test_p(4, 4) == 1.0
    # Large n against the normal approximation with continuity correction.
    p = compare_runs.sign_test_p(450, 550)
    z = (550 - 500 - 0.5) / math.sqrt(250)
    assert p == pytest.approx(math.erfc(z / math.sqrt(2)), rel=0.02)


def _write_run(tmp_path, name, eff, gen, ids=None):
    recs = [
        {"index": i, "case_id": (ids or range(len(eff)))[i],
         "post": {"efficacy": e, "generalization": g, "specificity": 1.0}}
        for i, (e, g) in enumerate(zip(eff, gen))
    ]  # fmt: skip
    (tmp_path / f"{name}.records.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    res = {"method": "x", "records": f"{name}.records.jsonl", "metrics_post": {}}
    (tmp_path / f"{name}.json").write_text(json.dumps(res))
    return str(tmp_path / f"{name}.json")


def test_constant_shift_and_missing_values(tmp_path, capsys):
    # Every case's generalization rises by exactly 0.25: every resample's mean is 25 points, so the
    # interval collapses onto it. Efficacy flips 10 cases up and none down. A None leaves its case out.
    n = 40
    a = _write_run(tmp_path, "a", [0.0] * n, [0.5] * (n - 1) + [None])
    b = _write_run(tmp_path, "b", [1.0] * 10 + [0.0] * (n - 10), [0.75] * n)
    out = compare_runs.compare(compare_runs.load_cases(a), compare_runs.load_cases(b), resamples=500)
    g = out["metrics"]["generalization"]
    assert g["n"] == n - 1 and g["diff"] == pytest.approx(25.0) and g["ci95"] == pytest.approx([25.0, 25.0])
    assert (g["better"], g["worse"]) == (n - 1, 0)
    e = out["metrics"]["efficacy"]
    assert e["diff"] == pytest.approx(25.0) and (e["better"], e["worse"]) == (10, 0)
    assert e["sign_test_p"] == pytest.approx(2 / 2**10)
    assert e["ci95"][0] < 25.0 < e["ci95"][1]
    s = out["metrics"]["specificity"]
    assert s["diff"] == 0.0 and s["sign_test_p"] == 1.0
    assert out["metrics"]["efficacy_magnitude"] is None  # these records hold no probabilities
    assert compare_runs.main([a, b, "--resamples", "50"]) == 0
    assert "+25.00" in capsys.readouterr().out


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    a = _write_run(tmp_path, "a", [1.0, 0.0], [1.0, 0.0])
    b = _write_run(tmp_path, "b", [1.0, 0.0], [1.0, 0.0], ids=[0, 7])
    assert compare_runs.main([a, b]) == 2
    assert "not the same cases" in capsys.readouterr().err
    assert compare_runs.main([a]) == 2
    assert "at least one run" in capsys.readouterr().err
    assert compare_runs.main([a, str(tmp_path / "missing.json")]) == 2
    assert "error:" in capsys.readouterr().err


def test_pooled_slices_average_the_slice_differences(capsys):
    """A.json+B.json pools the cases of two equal-sized slices: each metric's difference is the mean of the two."""
    h = RES / "h200"
    pairs = [(h / f"{s}_n1000_b100_alphaedit.json", h / f"{s}_n1000_b100_metake_instance.json") for s in ("cf", "cfho")]
    per = [
        compare_runs.compare(compare_runs.load_cases(str(b)), compare_runs.load_cases(str(o)), resamples=50)
        for b, o in pairs
    ]
    base = compare_runs.load_pooled(f"{pairs[0][0]}+{pairs[1][0]}")
    other = compare_runs.load_pooled(f"{pairs[0][1]}+{pairs[1][1]}")
    out = compare_runs.compare(base, other, resamples=50)
    for m in compare_runs.METRICS:
        assert out["metrics"][m]["n"] == 2000
        assert out["metrics"][m]["diff"] == pytest.approx(
            (per[0]["metrics"][m]["diff"] + per[1]["metrics"][m]["diff"]) / 2, abs=1e-9
        )
        assert out["metrics"][m]["better"] == sum(p["metrics"][m]["better"] for p in per)
    # mismatched pooling (slices in a different order) is refused, not silently mispaired
    swapped = compare_runs.load_pooled(f"{pairs[1][1]}+{pairs[0][1]}")
    with pytest.raises(ValueError):
        compare_runs.compare(base, swapped, resamples=10)
    assert compare_runs.main([f"{pairs[0][0]}+{pairs[1][0]}", f"{pairs[0][1]}+{pairs[1][1]}", "--resamples", "20"]) == 0
    assert "+ cfho_n1000_b100_metake_instance" in capsys.readouterr().out
