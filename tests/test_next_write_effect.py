"""bench/next_write_effect.py: each write is the editor's own, and every write is undone."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from _tiny import corpus_lines, tiny_model, tiny_tokenizer
from test_metake import HP  # the small MetaKE settings of the oracle tests

from metake_fast.datasets import EvalCase
from metake_fast.editor import Editor
from metake_fast.evaluate import evaluate_cases
from metake_fast.requests import EditRequest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import next_write_effect as nwe  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _case(subject, new, true):
    req = EditRequest("The city of {} is in", subject, new, true)
    return EvalCase(
        req,
        paraphrase_prompts=[f"Where is {subject}? It is in", f"{subject} lies in"],
        neighborhood_prompts=["The city of Madrid is in"],
        neighborhood_true=true,
    )


HIST = [_case("Paris", "Rome", "France"), _case("Lyon", "Berlin", "France")]
NEXT = [_case("Nice", "Tokyo", "France"), _case("Porto", "Oslo", "Portugal")]


def _editor(**extra) -> Editor:
    torch.manual_seed(0)
    model = tiny_model("llama", layers=4)
    return Editor(
        model, tiny_tokenizer(), "metake", {**HP, **extra}, cache=False, progress=False, corpus=corpus_lines(50)
    )


def _state(ed):
    w = {layer: ed.adapter.edit_weight(ed.model, layer).detach().clone() for layer in ed.layers}
    return w, {
        layer: {k: v.clone() for k, v in s.state_dict().items() if torch.is_tensor(v)}
        for layer, s in ed._solvers.items()
    }


def test_writes_match_the_editor_and_are_undone():
    """The plain write is what an edit with no upper level does; outer_steps=0 is the plain write;
    the state is unchanged afterwards."""
    ed = _editor(safeguard=False)
    ed.edit([c.request for c in HIST], batch_size=2)  # the earlier edits
    before = _state(ed)
    hps = {
        "metake": ed.hparams,
        "o0": dataclasses.replace(ed.hparams, outer_steps=0),
    }
    res = nwe.next_write_effect(ed, HIST, NEXT, hps)
    after = _state(ed)
    for layer in ed.layers:
        assert torch.equal(before[0][layer], after[0][layer])
        for k, v in before[1][layer].items():
            assert torch.equal(v, after[1][layer][k]), k

    rows = res["writes"]
    assert rows["o0"]["earlier_margin_vs_plain"] == 0.0  # no outer steps: the same targets, the same write
    assert res["margins"]["o0"] == res["margins"]["plain"]
    assert rows["metake"]["earlier_margin_vs_plain"] != 0.0  # ten proxy steps move the targets

    # oracle: the editor's own edit of the next batch with no upper level, scored by evaluate_cases
    ed.hparams = dataclasses.replace(ed.hparams, outer_steps=0)
    ed.edit([c.request for c in NEXT], batch_size=2)
    lite = [dataclasses.replace(c, neighborhood_prompts=[]) for c in HIST]
    m_hist, recs = evaluate_cases(ed.model, ed.tok, lite)
    m_next, recs_next = evaluate_cases(ed.model, ed.tok, NEXT)
    want = [e["logprob_new"] - e["logprob_true"] for r in recs for e in r["paraphrase"]]
    assert res["margins"]["plain"] == pytest.approx(want, abs=1e-4)
    assert rows["plain"]["earlier_generalization"] == pytest.approx(m_hist["generalization"])
    assert rows["plain"]["new_efficacy"] == pytest.approx(m_next["efficacy"])
    assert rows["plain"]["new_specificity"] == pytest.approx(m_next["specificity"])
    new_m = [e["logprob_new"] - e["logprob_true"] for r in recs_next for e in r["paraphrase"]]
    assert rows["plain"]["new_paraphrase_margin"] == pytest.approx(sum(new_m) / len(new_m), abs=1e-4)
    change = [a - b for a, b in zip(res["margins"]["plain"], res["before_margins"])]
    assert rows["plain"]["earlier_paraphrase_margin_change"] == pytest.approx(sum(change) / len(change))


def test_scaled_plain_writes():
    """``plain_scales``: S = 1 is the plain write exactly, S = 0 asks for no change (the earlier
    edits' margins stay where they were), and the paired new-batch column is the difference of
    the new batch's mean margins."""
    ed = _editor(safeguard=False)
    ed.edit([c.request for c in HIST], batch_size=2)
    before = _state(ed)
    res = nwe.next_write_effect(ed, HIST, NEXT, {"metake": ed.hparams}, plain_scales=(1.0, 0.0, 2.0))
    after = _state(ed)
    for layer in ed.layers:
        assert torch.equal(before[0][layer], after[0][layer])
    rows, margins = res["writes"], res["margins"]
    assert list(rows) == ["plain", "plain_x1", "plain_x0", "plain_x2", "metake"]
    assert margins["plain_x1"] == margins["plain"] and rows["plain_x1"]["new_margin_vs_plain"] == 0.0
    assert margins["plain_x0"] == pytest.approx(res["before_margins"], abs=1e-4)  # Z = H: nothing to write
    assert rows["plain_x0"]["earlier_paraphrase_margin_change"] == pytest.approx(0.0, abs=1e-4)
    # the tiny model's plain targets are far from H: asking for twice the residual moves the new batch further
    assert rows["plain_x2"]["new_paraphrase_margin"] > rows["plain"]["new_paraphrase_margin"]
    for name in ("plain_x2", "metake"):
        want = rows[name]["new_paraphrase_margin"] - rows["plain"]["new_paraphrase_margin"]
        assert rows[name]["new_margin_vs_plain"] == pytest.approx(want, abs=1e-9)
        assert len(res["new_margins"][name]) == sum(len(c.paraphrase_prompts) for c in NEXT)


def test_variant_options(capsys):
    """``--variant NAME:field=value,...``: values read as YAML, aliases resolved, bad input a one-line usage error."""
    import argparse

    import _common

    p = argparse.ArgumentParser(prog="x")
    got = _common.parse_variants(p, ["eta30:history_weight=30,gamma=1e-2", "o0:outer_steps=0"])
    assert got == {"eta30": {"history_weight": 30, "gamma": 0.01}, "o0": {"outer_steps": 0}}  # 1e-2 as --set reads it
    hp = _editor().hparams
    hps = _common.variant_hparams(p, hp, got)
    assert (
        hps["eta30"].history_weight == 30 and hps["eta30"].gamma == 0.01
    )  # as the hparams files read it and hps["eta30"].outer_lr == hp.outer_lr
    assert hps["o0"].outer_steps == 0 and hp.outer_steps == 10
    got = _common.parse_variants(p, ["x:outer_extra_templates=[[10,5],[20,5]],gamma=0.1"])
    assert got == {"x": {"outer_extra_templates": [[10, 5], [20, 5]], "gamma": 0.1}}  # commas in brackets kept
    assert _common.variant_hparams(p, hp, got)["x"].outer_extra_templates == [[10, 5], [20, 5]]
    for bad in (["x:steps"], ["x:gamma="], ["plain:gamma=1"], ["a:gamma=1", "a:gamma=2"], [":gamma=1"]):
        with pytest.raises(SystemExit) as e:
            _common.parse_variants(p, bad)
        assert e.value.code == 2 and "--variant" in capsys.readouterr().err
    for bad in ({"a": {"no_such_field": 1}}, {"a": {"outer_steps": -1}}):
        with pytest.raises(SystemExit):
            _common.variant_hparams(p, hp, bad)
        assert "--variant a" in capsys.readouterr().err


def test_write_from_the_unedited_model():
    """No earlier edits (``--history-n 0``, no checkpoint): the new batch is scored as before, the
    earlier-edit columns are empty (NaN), and the plain row is the editor's own first edit."""
    ed = _editor(safeguard=False)
    res = nwe.next_write_effect(ed, [], NEXT, {"metake": ed.hparams})
    rows = res["writes"]
    assert res["before_margins"] == [] and res["margins"]["plain"] == []
    assert all(v != v for v in (rows["metake"]["earlier_margin_vs_plain"], rows["plain"]["earlier_efficacy"]))
    ed.hparams = dataclasses.replace(ed.hparams, outer_steps=0)
    ed.edit([c.request for c in NEXT], batch_size=2)
    m_next, recs = evaluate_cases(ed.model, ed.tok, NEXT)
    assert rows["plain"]["new_generalization"] == pytest.approx(m_next["generalization"])
    new_m = [e["logprob_new"] - e["logprob_true"] for r in recs for e in r["paraphrase"]]
    assert res["new_margins"]["plain"] == pytest.approx(new_m, abs=1e-4)
    assert rows["metake"]["new_margin_vs_plain"] != 0.0


def test_history_made_in_process_is_the_editors_own_edit():
    """Without a checkpoint the earlier edits are made here with ``--history-set``'s settings: the
    same weights as an editor built with those settings editing them, and the run's settings back after."""
    ed = _editor(safeguard=False)
    hp_run = ed.hparams
    nwe.build_history(ed, HIST, 1, dataclasses.replace(hp_run, outer_steps=0, v_num_grad_steps=2))
    assert ed.hparams is hp_run and len(ed.history) == len(HIST)
    ref = _editor(safeguard=False, outer_steps=0, v_num_grad_steps=2)
    ref.edit([c.request for c in HIST], batch_size=1)
    for layer in ed.layers:
        assert torch.equal(ed.adapter.edit_weight(ed.model, layer), ref.adapter.edit_weight(ref.model, layer))


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--history-n", "0"], "--checkpoint"),
        (["--history-set", "outer_steps=0"], "--history-set"),
        (["--history-batch", "0"], "--history-batch"),
        (["--next-data", "zsre"], "need CounterFact cases"),
        (["--plain-scale", "-1"], "--plain-scale"),
        (["--plain-scale", "1.1", "--plain-scale", "1.1"], "--plain-scale"),
        (["--variant", "plain_x2:gamma=1"], "plain_x"),
        (["--next-data", "/nonexistent/cf.json"], "/nonexistent/cf.json"),
    ],
)
def test_bad_command_lines_are_usage_errors(monkeypatch, capsys, extra, msg):
    """Caught before the model is loaded: exit 2 and one line on stderr, no traceback."""
    argv = ["next_write_effect.py", "--checkpoint", "x.safetensors", "--history-n", "2", "--next-skip", "0"]
    monkeypatch.setattr(sys, "argv", argv + ["--n", "2"] + extra)
    monkeypatch.setattr(nwe.Editor, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit) as e:
        nwe.main()
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
