"""Evaluation metrics against hand-computed values on a tiny model; the run_evaluation protocol."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from _tiny import save_tiny, tiny_model, tiny_tokenizer  # noqa: E402

from metake_fast.datasets import load_dataset  # noqa: E402
from metake_fast.evaluate import (  # noqa: E402
    EvaluationError,
    evaluate_cases,
    generate_greedy,
    ngram_entropy,
    results_records_path,
    run_evaluation,
    text_entropy,
)
from metake_fast.scoring import score_objects  # noqa: E402

TINY_HP = {
    "v_num_grad_steps": 3,
    "stats_tokens": 2000,
    "stats_max_length": 64,
    "context_template_count": 1,
    "context_template_length": 3,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_tok():
    return tiny_model(seed=1), tiny_tokenizer()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    p.write_text(
        "".join(json.dumps({"text": f"Document {i} tells of the town and the river."}) + "\n" for i in range(60))
    )
    return p


# --------------------------------------------------------------------------- fluency


def test_ngram_entropy_closed_form():
    assert ngram_entropy([], 2) == 0.0
    assert ngram_entropy(["a"], 2) == 0.0
    assert ngram_entropy(["a", "a", "a", "a"], 2) == 0.0
    assert ngram_entropy(list("abcd"), 2) == pytest.approx(math.log2(3))
    assert ngram_entropy(list("abcd"), 3) == pytest.approx(1.0)
    # bigrams of a b a b a: ab, ba, ab, ba -> two equiprobable bigrams
    assert ngram_entropy(list("ababa"), 2) == pytest.approx(1.0)
    # text_entropy = mean(2/3 H2, 4/3 H3) over words (punctuation is a word)
    assert text_entropy("a b c d") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    assert text_entropy("the the the the the") == 0.0
    assert text_entropy("x, y") == pytest.approx((2 / 3 * 1.0 + 4 / 3 * 0.0) / 2)
    # 8 distinct words: H2 = log2 7, H3 = log2 6
    assert text_entropy("one two three four five six seven eight") == pytest.approx(
        (2 / 3 * math.log2(7) + 4 / 3 * math.log2(6)) / 2
    )


def test_generate_greedy_is_deterministic_and_batch_independent(model_tok):
    model, tok = model_tok
    prompts = ["The river", "A long story about the town is", "Hello"]
    a = generate_greedy(model, tok, prompts, max_new_tokens=6, batch_size=3)
    b = [generate_greedy(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert a == b
    assert all(t.startswith(p) for t, p in zip(a, prompts))


# --------------------------------------------------------------------------- CounterFact


def _direct_success(model, tok, prompts, new, true):
    lp_new = score_objects(model, tok, prompts, new).logprob
    lp_true = score_objects(model, tok, prompts, true).logprob
    return (lp_new > lp_true).float()


def test_counterfact_full_metrics_match_score_objects(model_tok):
    model, tok = model_tok
    cases = load_dataset("counterfact-full", 5)
    metrics, records = evaluate_cases(model, tok, cases, batch_size=7)
    # efficacy: share of rewrite prompts with P(new) > P(true)
    eff = _direct_success(model, tok, [c.request.text() for c in cases], [c.target_new for c in cases],
                          [c.target_true for c in cases])  # fmt: skip
    assert metrics["efficacy"] == pytest.approx(100 * eff.mean().item())
    # generalization: every case has 2 paraphrases, so macro = micro
    pp = [(p, c) for c in cases for p in c.paraphrase_prompts]
    gen = _direct_success(model, tok, [p for p, _ in pp], [c.target_new for _, c in pp], [c.target_true for _, c in pp])
    assert metrics["generalization"] == pytest.approx(100 * gen.mean().item())
    # specificity: P(true) > P(new) on neighbourhood prompts
    nn = [(p, c) for c in cases for p in c.neighborhood_prompts]
    spec = 1 - _direct_success(
        model, tok, [p for p, _ in nn], [c.target_new for _, c in nn], [c.neighborhood_true for _, c in nn]
    )
    assert metrics["specificity"] == pytest.approx(100 * spec.mean().item())

    # magnitudes (ROME's EM / PM / NM): mean P(new) - P(true), per case first (here every case has
    # the same number of prompts of each kind, so macro = micro), in fp64 from the log-probs
    def _margin(prompts, new, true):
        lp_new = score_objects(model, tok, prompts, new).logprob.double()
        lp_true = score_objects(model, tok, prompts, true).logprob.double()
        return (lp_new.exp() - lp_true.exp()).mean().item()

    em = _margin([c.request.text() for c in cases], [c.target_new for c in cases], [c.target_true for c in cases])
    pm = _margin([p for p, _ in pp], [c.target_new for _, c in pp], [c.target_true for _, c in pp])
    nm = -_margin([p for p, _ in nn], [c.target_new for _, c in nn], [c.neighborhood_true for _, c in nn])
    assert metrics["efficacy_magnitude"] == pytest.approx(100 * em, abs=1e-4)
    assert metrics["generalization_magnitude"] == pytest.approx(100 * pm, abs=1e-4)
    assert metrics["specificity_magnitude"] == pytest.approx(100 * nm, abs=1e-4)
    assert metrics["fluency"] is None and metrics["consistency"] is None and metrics["n"] == 5
    # records: every probability, JSON-serialisable
    json.dumps(records, allow_nan=False)
    assert len(records) == 5
    r0 = records[0]
    assert len(r0["rewrite"]) == 1 and len(r0["paraphrase"]) == 2 and len(r0["neighborhood"]) == 10
    lp = score_objects(model, tok, [cases[0].request.text()], [cases[0].target_new]).logprob.item()
    assert r0["rewrite"][0]["logprob_new"] == pytest.approx(lp, abs=1e-5)
    assert r0["rewrite"][0]["p_new"] == pytest.approx(math.exp(lp), rel=1e-4)
    for kind in ("rewrite", "paraphrase", "neighborhood"):
        for e in r0[kind]:
            assert 0.0 <= e["p_new"] <= 1.0 and 0.0 <= e["p_true"] <= 1.0


def test_counterfact_fluency(model_tok):
    model, tok = model_tok
    cases = load_dataset("counterfact-full", 2)
    metrics, records = evaluate_cases(model, tok, cases, fluency=True, fluency_prompts=2, fluency_tokens=8)
    gens = generate_greedy(model, tok, [p for c in cases for p in c.generation_prompts[:2]], max_new_tokens=8)
    assert [g for r in records for g in r["generations"]] == gens
    per_case = [
        (text_entropy(gens[0]) + text_entropy(gens[1])) / 2,
        (text_entropy(gens[2]) + text_entropy(gens[3])) / 2,
    ]
    assert metrics["fluency"] == pytest.approx(100 * sum(per_case) / 2)
    # flat CounterFact has no generation prompts: no fluency even when asked
    flat = load_dataset("counterfact", 2)
    m2, _ = evaluate_cases(model, tok, flat, fluency=True)
    assert m2["fluency"] is None


def test_counterfact_flat_without_true_object(model_tok):
    model, tok = model_tok
    cases = load_dataset("counterfact", 3)
    import dataclasses

    cases[1].request = dataclasses.replace(cases[1].request, target_true=None)
    metrics, records = evaluate_cases(model, tok, cases)
    assert records[1]["efficacy"] is None and records[1]["rewrite"][0]["p_true"] is None
    ok = [records[i]["rewrite"][0]["logprob_new"] > records[i]["rewrite"][0]["logprob_true"] for i in (0, 2)]
    assert metrics["efficacy"] == pytest.approx(100 * sum(ok) / 2)


# --------------------------------------------------------------------------- ZsRE


def _direct_argmax(model, tok, prompt, answer):
    """Teacher-forced argmax tokens from a plain full forward (independent of evaluate's code path)."""
    p = tok(prompt)["input_ids"]
    t = tok(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p + t[:-1]])).logits[0]
    return logits[len(p) - 1 : len(p) - 1 + len(t)].argmax(-1).tolist()


def test_zsre_metrics(model_tok):
    model, tok = model_tok
    cases = load_dataset("zsre", 4)
    metrics, records = evaluate_cases(model, tok, cases)
    acc = score_objects(model, tok, [c.request.text() for c in cases], [c.target_new for c in cases],
                        token_accuracy=True).token_acc  # fmt: skip
    assert metrics["efficacy"] == pytest.approx(100 * acc.mean().item())
    rp = [(p, c) for c in cases for p in c.paraphrase_prompts]
    acc2 = score_objects(model, tok, [p for p, _ in rp], [c.target_new for _, c in rp], token_accuracy=True).token_acc
    per_case = [acc2[i].item() for i in range(len(rp))]  # one rephrase per case here
    assert len(rp) == 4
    assert metrics["generalization"] == pytest.approx(100 * sum(per_case) / 4)
    # no reference: no specificity; the argmax tokens match a plain forward
    assert metrics["specificity"] is None
    assert all(metrics[k] is None for k in ("efficacy_magnitude", "generalization_magnitude", "specificity_magnitude"))
    for c, r in zip(cases, records):
        assert r["loc"][0]["argmax_tokens"] == _direct_argmax(model, tok, c.loc_prompts[0], c.loc_answers[0])
    json.dumps(records, allow_nan=False)
    # against itself: 100 %
    m_self, _ = evaluate_cases(model, tok, cases, reference=(metrics, records))
    assert m_self["specificity"] == pytest.approx(100.0)
    # a perturbed model against the unedited reference
    other = tiny_model(seed=1)
    with torch.no_grad():
        other.model.layers[2].mlp.down_proj.weight.add_(
            0.5 * torch.randn_like(other.model.layers[2].mlp.down_proj.weight)
        )
    m_post, rec_post = evaluate_cases(other, tok, cases, reference=records)
    want = []
    for c, r in zip(cases, records):
        a = _direct_argmax(other, tok, c.loc_prompts[0], c.loc_answers[0])
        b = r["loc"][0]["argmax_tokens"]
        want.append(sum(x == y for x, y in zip(a, b)) / len(b))
    assert m_post["specificity"] == pytest.approx(100 * sum(want) / len(want))
    assert 0.0 <= m_post["specificity"] <= 100.0
    with pytest.raises(EvaluationError):
        evaluate_cases(model, tok, cases, reference=records[:2])


# --------------------------------------------------------------------------- protocol


def test_records_path_naming(tmp_path):
    assert results_records_path(tmp_path / "results.json") == tmp_path / "results.records.jsonl"
    assert results_records_path(tmp_path / "out") == tmp_path / "out.records.jsonl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", layers=4)


def _check_metrics(m, fluency):
    for k in ("efficacy", "generalization", "specificity"):
        assert isinstance(m[k], float) and 0.0 <= m[k] <= 100.0, (k, m[k])
    assert "consistency" in m and m["consistency"] is None
    if fluency:
        assert isinstance(m["fluency"], float) and m["fluency"] >= 0.0
    else:
        assert m["fluency"] is None


def test_run_evaluation_full_counterfact(model_dir, corpus_file, tmp_path):
    out = tmp_path / "results.json"
    res = run_evaluation(
        str(model_dir), "memit", "counterfact-full", 4, 2, hparams=dict(TINY_HP), corpus=str(corpus_file),
        stats_tokens=1500, out=out, progress=False, cache=False, fluency_prompts=1, fluency_tokens=6,
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(res))
    for key in ("method", "model", "dataset", "num_edits", "batch_size", "metrics_pre", "metrics_post", "timing",
                "device", "version", "commit", "hparams", "edit"):  # fmt: skip
        assert key in data, key
    assert data["method"] == "memit" and data["dataset"] == "counterfact" and data["format"] == "full"
    assert data["num_edits"] == 4 and data["batch_size"] == 2 and data["edit"]["batches"] == 2
    assert data["hparams"]["stats_tokens"] == 1500 and data["hparams"]["v_num_grad_steps"] == 3
    import metake_fast

    assert data["version"] == metake_fast.__version__
    assert data["commit"] == data["sessions"][-1]["commit"]  # read when the run started
    _check_metrics(data["metrics_pre"], fluency=True)
    _check_metrics(data["metrics_post"], fluency=True)
    t = data["timing"]
    for k in ("stats_s", "edit_s", "eval_s"):
        assert t[k] >= 0.0
    assert t["edits_per_s"] == pytest.approx(4 / t["edit_s"])
    assert isinstance(data["edit"]["mean_realised"], float)
    # the context templates the run used: those the unedited model samples with these settings
    from metake_fast.context import context_templates
    from metake_fast.models import load_model

    fresh, fresh_tok = load_model(str(model_dir))[:2]
    hp = data["hparams"]
    want = context_templates(fresh, fresh_tok, hp["context_template_count"], hp["context_template_length"])
    assert data["context_templates"] == json.loads(json.dumps(want)) and data["context_templates"][0] == ["{}"]
    lines = (tmp_path / "results.records.jsonl").read_text().splitlines()
    assert len(lines) == 4 and data["records"] == str(tmp_path / "results.records.jsonl")
    recs = [json.loads(ln) for ln in lines]
    assert [r["index"] for r in recs] == [0, 1, 2, 3]
    for r in recs:
        assert {"pre", "post", "edit"} <= set(r)
        assert r["pre"]["target_new"] == r["post"]["target_new"]
        assert len(r["post"]["neighborhood"]) == 10 and len(r["post"]["generations"]) == 1
    # metrics_post is the mean of the per-request records
    eff = sum(r["post"]["efficacy"] for r in recs) / 4
    assert data["metrics_post"]["efficacy"] == pytest.approx(100 * eff)
    # targets that ran out of steps: counted from the per-request target NLLs against the stop
    stop = data["hparams"]["early_stop_nll"]
    assert data["edit"]["targets_unreached"] == sum(r["edit"]["target_nll"] > stop for r in recs)


def test_run_evaluation_zsre_records_path(model_dir, corpus_file, tmp_path):
    from metake_fast.hparams import make_hparams

    rp = tmp_path / "recs.jsonl"
    hp = make_hparams("alphaedit", {**TINY_HP, "layers": [1, 2]})  # a dataclass, then --set on top of it
    res = run_evaluation(
        str(model_dir), "alphaedit", "zsre", 3, 3, hparams=hp, corpus=str(corpus_file), out=None,
        progress=False, records_path=rp, cache=False, dataset="zsre", hparams_overrides={"v_num_grad_steps": 2},
    )  # fmt: skip
    assert res["hparams"]["v_num_grad_steps"] == 2 and res["hparams"]["layers"] == [1, 2]
    assert res["hparams"]["context_template_count"] == 1 and hp.v_num_grad_steps == 3  # the caller's is untouched
    assert res["hparams_source"] == "given + overrides (v_num_grad_steps)"
    assert res["dataset"] == "zsre" and res["metrics_pre"]["specificity"] == pytest.approx(100.0)
    _check_metrics(res["metrics_pre"], fluency=False)
    _check_metrics(res["metrics_post"], fluency=False)
    recs = [json.loads(ln) for ln in rp.read_text().splitlines()]
    assert len(recs) == 3
    assert all("agreement" in e for r in recs for e in r["post"]["loc"])


def test_run_evaluation_bad_input(model_dir, tmp_path):
    with pytest.raises(EvaluationError, match="num_edits"):
        run_evaluation(str(model_dir), "memit", "counterfact", 0, 1)
    with pytest.raises(EvaluationError, match="batch_size"):
        run_evaluation(str(model_dir), "memit", "counterfact", 2, 0)
    with pytest.raises(EvaluationError, match="does not match"):
        run_evaluation(str(model_dir), "memit", "counterfact", 2, 1, dataset="zsre")
    with pytest.raises(EvaluationError, match="only"):
        run_evaluation(str(model_dir), "memit", "counterfact-full", 100_000, 1)
    from metake_fast.hparams import HParamsError

    for over, needle in [({"no_such": 1}, "unknown hparams field"), ({"v_lr": "fast"}, "finite number")]:
        with pytest.raises(HParamsError, match=needle):  # before the model loads
            run_evaluation("no/such/model", "memit", "counterfact", 2, 1, hparams_overrides=over)


@pytest.mark.parametrize("method", ["alphaedit", "metake"])
def test_interrupted_run_resumes_from_checkpoint_to_the_same_result(
    model_dir, corpus_file, tmp_path, monkeypatch, method
):
    """Stop after the first of three batches, rerun with the same checkpoint: same records as one run."""
    from metake_fast.editor import Editor

    kw = dict(hparams=dict(TINY_HP), corpus=str(corpus_file), stats_tokens=1500, progress=False,
              cache=tmp_path / "cache", fluency=False)  # fmt: skip
    full = run_evaluation(str(model_dir), method, "counterfact", 6, 2, out=tmp_path / "full.json", **kw)

    real_edit = Editor.edit
    calls = []

    def stop_on_second_batch(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_edit(self, *a, **k)

    ck = tmp_path / "ckpt"
    monkeypatch.setattr(Editor, "edit", stop_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(str(model_dir), method, "counterfact", 6, 2, out=tmp_path / "r.json", checkpoint=ck, **kw)
    monkeypatch.setattr(Editor, "edit", real_edit)
    assert (ck / "pre.json").exists() and (ck / "state.safetensors").exists()
    assert len((tmp_path / "r.progress.jsonl").read_text().splitlines()) == 1

    resumed = run_evaluation(str(model_dir), method, "counterfact", 6, 2, out=tmp_path / "r.json", checkpoint=ck, **kw)
    assert resumed["metrics_post"] == full["metrics_post"] and resumed["metrics_pre"] == full["metrics_pre"]
    a = [json.loads(x) for x in (tmp_path / "full.records.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "r.records.jsonl").read_text().splitlines()]
    assert [x["post"] for x in a] == [x["post"] for x in b]  # bit-identical probabilities after the edits
    assert [x["edit"] for x in a] == [x["edit"] for x in b]
    assert [s["from_edit"] for s in resumed["sessions"]] == [0, 2] and resumed["edit"]["batches"] == 3
    assert len((tmp_path / "r.progress.jsonl").read_text().splitlines()) == 3

    # a checkpoint from other settings is refused, nothing is edited
    with pytest.raises(EvaluationError, match="another run .*batch_size: saved 2, now 3"):
        run_evaluation(str(model_dir), method, "counterfact", 6, 3, out=tmp_path / "x.json", checkpoint=ck, **kw)


def test_checkpoint_write_failure_does_not_stop_the_run(model_dir, corpus_file, tmp_path, monkeypatch, caplog):
    import errno
    import logging

    import metake_fast.checkpoint as ckpt_mod

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "write_atomic", full_disk)
    with caplog.at_level(logging.WARNING, logger="metake_fast"):
        res = run_evaluation(
            str(model_dir), "memit", "counterfact", 2, 1, hparams=dict(TINY_HP), corpus=str(corpus_file),
            stats_tokens=1500, progress=False, cache=False, fluency=False, checkpoint=tmp_path / "ck",
        )  # fmt: skip
    assert res["edit"]["batches"] == 2 and not (tmp_path / "ck" / "state.safetensors").exists()
    assert any("could not write checkpoint" in r.getMessage() for r in caplog.records)


def test_checkpoints_from_before_skip_still_match():
    from metake_fast.evaluate import _config_differences
    from metake_fast.hparams import make_hparams, to_dict

    hp = make_hparams("alphaedit", {**TINY_HP, "layers": [1]})
    old = {"method": "alphaedit", "num_edits": 4, "hparams": to_dict(hp)}  # written before `skip` existed
    assert _config_differences(old, {**old, "skip": 0}, hp) == []
    assert _config_differences(old, {**old, "skip": 5}, hp) == ["skip: saved 0, now 5"]
    # nor `on_conflict` (added later; before it, a run with a conflict stopped)
    assert _config_differences(old, {**old, "on_conflict": "error"}, hp) == []
    assert _config_differences(old, {**old, "on_conflict": "skip"}, hp) == ["on_conflict: saved 'error', now 'skip'"]
    assert _config_differences({**old, "gone": 1}, old, hp) == ["gone: saved, not a setting of this version"]


def test_recorded_commit_follows_the_override(monkeypatch):
    """A device runner's copy of the tree carries stale git metadata: METAKE_FAST_COMMIT names the code's commit."""
    from metake_fast.evaluate import git_commit

    monkeypatch.delenv("METAKE_FAST_COMMIT", raising=False)
    real = git_commit()
    monkeypatch.setenv("METAKE_FAST_COMMIT", "abc1234")
    assert git_commit() == "abc1234" != real


def test_select_cases_on_a_shipped_slice_with_a_conflict():
    """counterfact-10k records 3000-3999 hold two new objects for Warsaw's twin city: "error" names
    the pair, "skip" keeps 1,000 cases with distinct (prompt, subject), the later twin left out."""
    from metake_fast.evaluate import EvaluationError, _select_cases
    from metake_fast.requests import RequestError

    with pytest.raises(RequestError, match="conflicts with request .*Warsaw.*--on-conflict skip") as e:
        _select_cases("counterfact-10k", 1000, 3000, "error")
    assert e.value.code == "conflict"
    cases, dropped = _select_cases("counterfact-10k", 1000, 3000, "skip")
    keys = [(c.request.template(), c.request.subject) for c in cases]
    assert len(cases) == 1000 and len(set(keys)) == 1000
    plain = load_dataset("counterfact-10k", 1000 + len(dropped), skip=3000)
    assert [c.case_id for c in plain if c.case_id not in dropped] == [c.case_id for c in cases]
    for cid in dropped:  # each left-out case repeats the key of a kept case before it
        d = next(c for c in plain if c.case_id == cid)
        assert (d.request.template(), d.request.subject) in keys[: plain.index(d)]
    assert _select_cases("counterfact-10k", 1000, 5000, "skip")[1] == []  # a slice without conflicts
    with pytest.raises(EvaluationError, match="on_conflict"):
        _select_cases("counterfact-10k", 10, 0, "drop")
