"""Sequential stability: many ``edit`` calls accumulate exactly like one long sequential run,
and ``track=True`` reports the running metrics of every edit so far."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from _tiny import SAMPLE_REQUESTS, tiny_model, tiny_tokenizer  # noqa: E402

from metake_fast.editor import Editor  # noqa: E402

HP = {"v_num_grad_steps": 4, "stats_tokens": 1500, "stats_max_length": 48, "context_template_count": 1,
      "context_template_length": 3, "layers": [1, 2]}  # fmt: skip
REQS = SAMPLE_REQUESTS


pytestmark = pytest.mark.usefixtures("one_thread")


def _editor(cache, method):
    return Editor(tiny_model("llama", layers=4, seed=0), tiny_tokenizer(), method, HP, cache=cache, progress=False)


def _edited(ed):
    return {layer: ed.adapter.edit_weight(ed.model, layer).detach().clone() for layer in ed.layers}


@pytest.mark.parametrize("method", ["memit", "alphaedit", "metake"])
def test_many_calls_equal_one_sequential_run(tmp_path, method):
    one = _editor(tmp_path, method)
    one.edit(REQS, batch_size=2, score=False)
    many = _editor(tmp_path, method)
    for s in range(0, len(REQS), 2):
        many.edit(REQS[s : s + 2], batch_size=2, score=False)
    a, b = _edited(one), _edited(many)
    for layer in a:
        assert torch.equal(a[layer], b[layer]), layer  # same batches, same order: bit-identical
    assert [r.subject for r in one.history] == [r.subject for r in many.history]
    if method != "memit":  # the AlphaEdit null-space history is part of the state
        sa, sb = one._solvers[one.layers[-1]].state_dict(), many._solvers[many.layers[-1]].state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_track_reports_running_metrics_of_all_edits(tmp_path):
    ed = _editor(tmp_path, "alphaedit")
    r1 = ed.edit(REQS[:3], batch_size=3, track=True)
    assert r1.running["edits"] == 3
    r2 = ed.edit(REQS[3:], batch_size=3, track=True)
    assert r2.running["edits"] == 6
    # oracle: score every edit so far directly on the model as it is now
    p_new, p_true = ed._score(ed.history)
    ok = [pn > pt for pn, pt in zip(p_new, p_true)]
    assert r2.running["efficacy"] == pytest.approx(sum(ok) / len(ok))
    assert r2.running["mean_p_new"] == pytest.approx(sum(p_new) / len(p_new))
    # the second call's own report covers only its requests
    assert [r.subject for r in r2.requests] == [r["subject"] for r in REQS[3:]]


def test_checkpoint_round_trip_and_refusals(tmp_path):
    from metake_fast.checkpoint import CheckpointError

    ed = _editor(tmp_path, "alphaedit")
    ed.edit(REQS[:2], batch_size=2, score=False)
    path = tmp_path / "state.safetensors"
    ed.save_checkpoint(path, extra={"note": "after batch 1"})
    ed.edit(REQS[2:4], batch_size=2, score=False)
    want = _edited(ed)

    fresh = _editor(tmp_path, "alphaedit")
    assert fresh.load_checkpoint(path) == {"note": "after batch 1"}
    assert [r.subject for r in fresh.history] == [r["subject"] for r in REQS[:2]]
    fresh.edit(REQS[2:4], batch_size=2, score=False)
    got = _edited(fresh)
    assert all(torch.equal(got[layer], want[layer]) for layer in want)  # resumed == uninterrupted

    other_model = Editor(tiny_model("llama", layers=4, seed=1), tiny_tokenizer(), "alphaedit", HP, cache=tmp_path,
                         progress=False)  # fmt: skip
    before = _edited(other_model)
    with pytest.raises(CheckpointError, match="different model"):
        other_model.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="made with alphaedit"):
        _editor(tmp_path, "memit").load_checkpoint(path)
    other_hp = Editor(tiny_model("llama", layers=4, seed=0), tiny_tokenizer(), "alphaedit", {**HP, "L2": 3.0},
                      cache=tmp_path, progress=False)  # fmt: skip
    with pytest.raises(CheckpointError, match=r"hyperparameters differ .*L2: saved [0-9.]+, now 3\.0"):
        other_hp.load_checkpoint(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip a byte inside the tensors
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum|unreadable"):
        _editor(tmp_path, "alphaedit").load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no such"):
        _editor(tmp_path, "alphaedit").load_checkpoint(tmp_path / "missing.safetensors")
    assert all(torch.equal(_edited(other_model)[layer], before[layer]) for layer in before)


@pytest.mark.parametrize("arch", ["gptj", "gemma2"])
def test_bias_and_softcap_architectures_edit_end_to_end(tmp_path, arch):
    """GPT-J (unembedding bias) and Gemma-2 (logit soft-cap) through the vocabulary-chunked paths."""
    from metake_fast.models import get_adapter
    from metake_fast.runner import final_logits_spec

    model = tiny_model(arch, layers=4, seed=0)
    _, bias, softcap = final_logits_spec(model, get_adapter(model))
    assert (bias is not None) if arch == "gptj" else bool(softcap)
    ed = Editor(model, tiny_tokenizer(), "memit", {**HP, "v_num_grad_steps": 8}, cache=tmp_path, progress=False)
    before = _edited(ed)
    report = ed.edit(REQS[:2], batch_size=2)
    assert all(r.p_new_post > r.p_new_pre for r in report.requests)
    after = _edited(ed)
    assert all(torch.isfinite(after[layer]).all() and not torch.equal(after[layer], before[layer]) for layer in after)
    ed.restore()
    assert all(torch.equal(_edited(ed)[layer], before[layer]) for layer in before)


def test_same_hparams_accepts_fields_added_later_only_at_their_default():
    from metake_fast.hparams import make_hparams, same_hparams, to_dict

    hp = make_hparams("metake", {"outer_steps": 4})
    stored = to_dict(hp)
    assert same_hparams(stored, hp)
    older = {k: v for k, v in stored.items() if k not in ("safeguard_history", "safeguard_history_max")}
    assert same_hparams(older, hp)  # a checkpoint written before those fields existed
    assert not same_hparams(older, make_hparams("metake", {"outer_steps": 4, "safeguard_history": True}))
    assert not same_hparams({**stored, "outer_steps": 5}, hp)
    assert not same_hparams({**stored, "no_such_field": 1}, hp)
    assert not same_hparams({k: v for k, v in stored.items() if k != "layers"}, hp)  # no default: must be stored
    assert not same_hparams(None, hp)


def _older_checkpoint(tmp_path, field: str, tensor_suffix: str | None = None):
    """Edit two requests, checkpoint, and rewrite that checkpoint as if hyperparameter ``field``
    (and the solver tensors ending in ``tensor_suffix``) had been added after it was written."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from metake_fast.delta import tensor_checksum

    ed = _editor(tmp_path, "alphaedit")
    ed.edit(REQS[:2], batch_size=2, score=False)
    path = tmp_path / "state.safetensors"
    ed.save_checkpoint(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    if tensor_suffix is not None:
        kept = {k: v for k, v in tensors.items() if not k.endswith(tensor_suffix)}
        assert len(kept) < len(tensors)
        tensors = kept
    hp = json.loads(meta["hparams"])
    del hp[field]
    meta["hparams"] = json.dumps(hp, sort_keys=True)
    meta["sha256"] = tensor_checksum(tensors)
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=meta)
    return ed, old


def test_checkpoint_from_before_a_new_field_resumes(tmp_path):
    """A checkpoint whose stored hyperparameters lack a field added later (at its default) loads;
    one that then differs from this editor's value of that field is refused."""
    from metake_fast.checkpoint import CheckpointError

    ed, old = _older_checkpoint(tmp_path, "v_weight_decay")
    want = _edited(ed)
    fresh = _editor(tmp_path, "alphaedit")
    assert fresh.hparams.v_weight_decay == type(fresh.hparams)().v_weight_decay  # at its default
    fresh.load_checkpoint(old)
    assert all(torch.equal(_edited(fresh)[layer], want[layer]) for layer in want)
    other = Editor(tiny_model("llama", layers=4, seed=0), tiny_tokenizer(), "alphaedit",
                   {**HP, "v_weight_decay": 0.123}, cache=tmp_path, progress=False)  # fmt: skip
    with pytest.raises(CheckpointError, match=r"v_weight_decay: not saved \(so 0\.001 then\), now 0\.123"):
        other.load_checkpoint(old)


def test_checkpoint_from_before_history_scale_resumes(tmp_path):
    """A checkpoint written before the solver state had ``history_scale`` (no such tensors, no
    such hyperparameter) loads into a default editor with μ = 1 and the same solver answers."""
    ed, old = _older_checkpoint(tmp_path, "history_scale", ".history_scale")
    fresh = _editor(tmp_path, "alphaedit")
    fresh.load_checkpoint(old)
    want = _edited(ed)
    assert all(torch.equal(_edited(fresh)[layer], want[layer]) for layer in want)
    K = torch.randn(next(iter(ed._solvers.values())).d_k, 3, generator=torch.Generator().manual_seed(0))
    for layer, s in fresh._solvers.items():
        assert s.history_scale == 1.0 and s.n_history == 2
        for a, b in zip(s.solve(K), ed._solvers[layer].solve(K)):
            assert torch.equal(a, b)
