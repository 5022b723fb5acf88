"""MetaKE oracles (METHOD.md "Upper level"): gate reduction, ΔW K = R G, proxy vs exact gradient."""

import pytest
import torch
from _tiny import corpus_lines, tiny_model, tiny_tokenizer

from metake_fast.editor import Editor
from metake_fast.metake import proxy_gradient_cosine, refine_targets, structural_gate
from metake_fast.ops import apply_update_
from metake_fast.requests import EditRequest
from metake_fast.targets import optimize_targets

HP = {
    "v_num_grad_steps": 3,
    "stats_tokens": 2000,
    "stats_max_length": 64,
    "context_template_count": 1,
    "context_template_length": 3,
    "layers": [1, 2],
}
REQS = [
    EditRequest("The city of {} is in", s, t, "France")
    for s, t in [("Paris", "Rome"), ("Lyon", "Berlin"), ("Nice", "Tokyo")]
]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_model("llama", layers=4)
    return model, tok


def _editor(model, tok, **extra):
    ed = Editor(model, tok, "metake", {**HP, **extra}, cache=False, progress=False, corpus=corpus_lines(50))
    ed._ensure_solvers()
    return ed


def test_identity_gate_reduces_to_base_targets(setup):
    model, tok = setup
    # P = I (every eigenvalue below the threshold), no history, λ_a → 0: G → I
    ed = _editor(model, tok, nullspace_threshold=1e12, L2=1e-7, outer_steps=0)
    tpl = ed._templates()
    G = structural_gate(ed, REQS, tpl)
    assert torch.allclose(G, torch.eye(len(REQS)), atol=1e-4)
    tres = optimize_targets(model, tok, ed.adapter, REQS, ed.layers[-1], tpl, ed._target_config(), progress=False)
    Z = refine_targets(ed, REQS, tpl, tres, {})
    assert torch.equal(Z, (tres.h + tres.delta).T)


def test_write_realises_R_G(setup):
    model, tok = setup
    ed = _editor(model, tok, L2=0.5, nullspace_threshold=1e-3)
    from metake_fast.keys import keys_and_residual

    L = ed.layers[-1]
    K, _ = keys_and_residual(model, tok, ed.adapter, REQS, L, None, ed._templates())
    Y, G = ed._solvers[L].solve(K)
    R = torch.randn(ed.adapter.value_dim(model), len(REQS))
    W = ed.adapter.edit_weight(model, L).detach().clone()
    W2 = W.clone()
    apply_update_(W2, R, Y, ed.adapter.transposed)
    dWK = (W2.double() - W.double()) @ K.double()
    assert torch.allclose(dWK, R.double() @ G.double(), atol=1e-4 * R.abs().max().item())


@pytest.mark.parametrize("gate_layers", ["last", "spread"])
def test_proxy_gradient_points_along_exact_gradient(setup, gate_layers):
    model, tok = setup
    ed = _editor(model, tok, L2=0.5, nullspace_threshold=1e-3, gate_layers=gate_layers)
    tpl = ed._templates()
    tres = optimize_targets(model, tok, ed.adapter, REQS, ed.layers[-1], tpl, ed._target_config(), progress=False)
    res = proxy_gradient_cosine(ed, REQS, tpl, tres)
    print(f"proxy/exact cosine ({gate_layers}): {res['cosine']:.3f}, per request {res['cosine_per_request']}")
    assert res["cosine"] > 0.1
    assert all(0 <= g < 1 + 1e-6 for g in res["gate_eigenvalues"])


def _edit_with_targets(model, tok, monkeypatch, Z, **extra):
    """Edit REQS with MetaKE's refined targets replaced by ``Z``; returns (editor, report, weights)."""
    import metake_fast.metake as mk

    monkeypatch.setattr(mk, "refine_targets", lambda *a, **k: Z.clone())
    ed = _editor(model, tok, **extra)
    rep = ed.edit(REQS)
    W = {layer: ed.adapter.edit_weight(model, layer).detach().clone() for layer in ed.layers}
    ed.restore()
    return ed, rep, W


SABOTAGE = {  # per request: the refined residual as a multiple of the plain one; safeguard_margin
    # request 1 points away from the new object, request 2 further towards it; the random model
    # prefers request 0's new object by a margin of ~12 whatever is written, requests 1 and 2 not
    "some_fail": ((1.0, -30.0, 30.0), 0.0),
    "none_fail": ((1.0, -30.0, 30.0), -100.0),
    "all_fail": ((-30.0, -30.0, -30.0), 100.0),
}


def _margins(report):
    return torch.tensor([torch.tensor(r.p_new_post).log() - torch.tensor(r.p_true_post).log() for r in report.requests])


def _sabotage(monkeypatch, factors, seen):
    import metake_fast.metake as mk

    real = mk.refine_targets

    def sabotaged(editor, reqs, templates, tres, timing):
        Z = real(editor, reqs, templates, tres, timing).clone()
        for i, f in enumerate(factors):
            if f != 1.0:
                Z[:, i] = tres.h[i] + f * tres.delta[i]
        seen["base"], seen["meta"] = (tres.h + tres.delta).T.clone(), Z.clone()
        return Z

    monkeypatch.setattr(mk, "refine_targets", sabotaged)


@pytest.mark.parametrize("case", list(SABOTAGE))
def test_safeguard_gives_failed_requests_their_plain_target(setup, monkeypatch, case):
    """Oracle: the refined targets and the mixed targets each written alone (safeguard off) and
    scored by the edit report's own probabilities. The safeguard must fall back exactly on the
    requests whose refined write is below the margin, and leave the weights of the mixed write
    (it leaves as many rewrite prompts at the margin in every case here)."""
    model, tok = setup
    factors, margin = SABOTAGE[case]
    seen = {}
    _sabotage(monkeypatch, factors, seen)
    ed = _editor(model, tok, L2=0.5, nullspace_threshold=1e-3, safeguard_margin=margin)
    rep = ed.edit(REQS)
    W_safe = {layer: ed.adapter.edit_weight(model, layer).detach().clone() for layer in ed.layers}
    ed.restore()
    fallback = torch.tensor([r.fallback for r in rep.requests])
    kw = dict(L2=0.5, nullspace_threshold=1e-3, safeguard=False)
    _, rep_m, W_m = _edit_with_targets(model, tok, monkeypatch, seen["meta"], **kw)
    failed = _margins(rep_m) < margin
    want = {"some_fail": [False, True, True], "none_fail": [False] * 3, "all_fail": [True] * 3}[case]
    assert failed.tolist() == want, (case, _margins(rep_m))
    mixed = torch.where(failed[None, :], seen["base"], seen["meta"])
    _, rep_x, W_x = _edit_with_targets(model, tok, monkeypatch, mixed, **kw)
    assert int((_margins(rep_x) >= margin).sum()) >= int((_margins(rep_m) >= margin).sum())
    assert torch.equal(fallback, failed)
    for layer in W_safe:
        torch.testing.assert_close(W_safe[layer], W_x[layer], rtol=0, atol=1e-6)
    if case != "none_fail":
        assert not torch.equal(W_safe[ed.layers[-1]], W_m[ed.layers[-1]])
        assert _margins(rep)[1] > _margins(rep_m)[1]  # request 1 is better off with its plain target


def test_safeguard_keeps_refined_write_when_plain_targets_do_not_help(setup, monkeypatch):
    """If the rewrite with plain targets leaves fewer rewrite prompts at the margin, the refined
    write is restored bit-for-bit and nothing is reported as a fallback."""
    import metake_fast.metake as mk

    model, tok = setup
    seen = {}
    _sabotage(monkeypatch, (1.0, -30.0, 30.0), seen)
    real_margin = mk._rewrite_margin
    calls = []

    def margin_fn(editor, reqs):
        m = real_margin(editor, reqs)
        calls.append(m)
        return m if len(calls) == 1 else m - 1e3  # the second (mixed) write "fails everything"

    monkeypatch.setattr(mk, "_rewrite_margin", margin_fn)
    ed = _editor(model, tok, L2=0.5, nullspace_threshold=1e-3)
    rep = ed.edit(REQS)
    W_safe = {layer: ed.adapter.edit_weight(model, layer).detach().clone() for layer in ed.layers}
    ed.restore()
    assert len(calls) == 2 and not any(r.fallback for r in rep.requests)
    monkeypatch.setattr(mk, "_rewrite_margin", real_margin)
    _, _, W_m = _edit_with_targets(model, tok, monkeypatch, seen["meta"], L2=0.5, nullspace_threshold=1e-3,
                                   safeguard=False)  # fmt: skip
    for layer in W_safe:
        assert torch.equal(W_safe[layer], W_m[layer])


def test_safeguard_off_is_the_adopted_formulation(setup, monkeypatch):
    """safeguard=false writes the refined targets once: the same weights as writing them directly."""
    import metake_fast.metake as mk

    model, tok = setup
    real = mk.refine_targets
    seen = {}

    def spy(editor, reqs, templates, tres, timing):
        seen["Z"] = real(editor, reqs, templates, tres, timing).clone()
        return seen["Z"]

    monkeypatch.setattr(mk, "refine_targets", spy)
    ed = _editor(model, tok, L2=0.5, nullspace_threshold=1e-3, safeguard=False)
    rep = ed.edit(REQS)
    assert not any(r.fallback for r in rep.requests)
    W = {layer: ed.adapter.edit_weight(model, layer).detach().clone() for layer in ed.layers}
    ed.restore()
    ed2 = _editor(model, tok, L2=0.5, nullspace_threshold=1e-3, safeguard=False)
    tpl = ed2._templates()
    ed2._write(REQS, tpl, seen["Z"], {"keys": 0.0, "solve": 0.0, "apply": 0.0})
    for layer in W:
        assert torch.equal(W[layer], ed2.adapter.edit_weight(model, layer).detach())
    ed2.restore()


def test_outer_loop_reusing_the_target_chunks_equals_rebuilding_them(setup):
    """MetaKE's outer loop reuses the target loop's chunk problems (built on the same unedited
    model): the refined targets equal those from freshly built problems, bit for bit."""
    import dataclasses

    model, tok = setup
    ed = _editor(model, tok, L2=0.5, nullspace_threshold=1e-3)
    tpl = ed._templates()
    cfg = ed._target_config()
    tres = optimize_targets(model, tok, ed.adapter, REQS, ed.layers[-1], tpl, cfg, progress=False, keep_problems=True)
    assert tres.problems is not None and sum(len(idx) for idx, _ in tres.problems) == len(REQS)
    Z_reused = refine_targets(ed, REQS, tpl, tres, {})
    Z_fresh = refine_targets(ed, REQS, tpl, dataclasses.replace(tres, problems=None), {})
    assert torch.equal(Z_reused, Z_fresh)
    assert not torch.equal(Z_reused, (tres.h + tres.delta).T)  # the outer loop moved the targets


def test_interrupt_during_safeguard_rewrite_rolls_back_the_batch(setup, monkeypatch):
    """The safeguard's second write is inside the atomic batch: an interrupt there puts every
    weight back bit for bit."""
    model, tok = setup
    _sabotage(monkeypatch, (1.0, -30.0, 30.0), {})  # requests 1 and 2 fail: a second write follows
    ed = _editor(model, tok, L2=0.5, nullspace_threshold=1e-3)
    _interrupt_second_write_and_check_restore(ed, monkeypatch, REQS)  # the mixed write
    assert ed.history == []


def _interrupt_second_write_and_check_restore(ed, monkeypatch, reqs):
    """Edit ``reqs`` with a KeyboardInterrupt right after the batch's second write (its result is
    in the weights then); the weights must be back where the batch started."""
    before = {layer: ed.adapter.edit_weight(ed.model, layer).detach().clone() for layer in ed.layers}
    real_write = ed._write
    calls = []

    def write(*args, **kwargs):
        calls.append(1)
        real_write(*args, **kwargs)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ed, "_write", write)
    with pytest.raises(KeyboardInterrupt):
        ed.edit(reqs)
    assert len(calls) == 2
    for layer, w in before.items():
        assert torch.equal(ed.adapter.edit_weight(ed.model, layer).detach(), w)


REQS2 = [
    EditRequest("The city of {} is in", s, t, "France")
    for s, t in [("Lille", "Madrid"), ("Metz", "Oslo"), ("Caen", "Cairo")]
]


def _history_margin_spy(monkeypatch, sabotage_calls):
    """Wrap ``_rewrite_margin``; calls on the earlier batch (REQS) are numbered from 0 and those
    listed in ``sabotage_calls`` return ``margin − 1e3`` (every earlier edit "broken")."""
    import metake_fast.metake as mk

    real = mk._rewrite_margin
    hist_calls = []

    def spy(editor, reqs):
        m = real(editor, reqs)
        if reqs and [r.subject for r in reqs] == [r.subject for r in REQS]:
            hist_calls.append(len(hist_calls))
            if hist_calls[-1] in sabotage_calls:
                return m - 1e3
        return m

    monkeypatch.setattr(mk, "_rewrite_margin", spy)
    return hist_calls


def _two_batches(model, tok, monkeypatch, sabotage_calls, **extra):
    """REQS then REQS2 with the history safeguard; returns (editor, weights, plain Z, refined Z of batch 2)."""
    import metake_fast.metake as mk

    real_refine = mk.refine_targets
    seen = {}

    def spy(editor, reqs, templates, tres, timing):
        Z = real_refine(editor, reqs, templates, tres, timing)
        seen["base"], seen["meta"] = (tres.h + tres.delta).T.clone(), Z.clone()
        return Z

    monkeypatch.setattr(mk, "refine_targets", spy)
    kw = dict(L2=0.5, nullspace_threshold=1e-3, safeguard_margin=-100.0, safeguard_history=True, **extra)
    ed = _editor(model, tok, **kw)
    ed.edit(REQS)
    writes = []
    real_write = ed._write

    def write(*args, **kwargs):
        writes.append(1)
        real_write(*args, **kwargs)

    monkeypatch.setattr(ed, "_write", write)
    hist_calls = _history_margin_spy(monkeypatch, sabotage_calls)
    rep = ed.edit(REQS2)
    W = {layer: ed.adapter.edit_weight(model, layer).detach().clone() for layer in ed.layers}
    return ed, rep, W, seen, writes, hist_calls


def _written_directly(model, tok, Z2):
    """Oracle: batch 1 edited as above (safeguard without history), then ``Z2`` written directly."""
    ed = _editor(model, tok, L2=0.5, nullspace_threshold=1e-3, safeguard_margin=-100.0)
    ed.edit(REQS)
    ed._write(REQS2, ed._templates(), Z2, {"keys": 0.0, "solve": 0.0, "apply": 0.0})
    W = {layer: ed.adapter.edit_weight(model, layer).detach().clone() for layer in ed.layers}
    ed.restore()
    return W


def test_history_safeguard_keeps_refined_write_when_no_earlier_edit_breaks(setup, monkeypatch):
    """Every earlier edit still at the margin after the refined write: one write, no plain write."""
    model, tok = setup
    ed, rep, W, seen, writes, hist_calls = _two_batches(model, tok, monkeypatch, sabotage_calls=())
    hist = ed.last_safeguard["history"]
    ed.restore()
    assert len(writes) == 1 and len(hist_calls) == 2  # scored before and after the one write
    assert hist["before"] == hist["kept"] == 3 and hist["plain"] is None
    assert not any(r.fallback for r in rep.requests)
    W_meta = _written_directly(model, tok, seen["meta"])
    for layer in W:
        assert torch.equal(W[layer], W_meta[layer])


def test_history_safeguard_takes_plain_write_when_refined_breaks_earlier_edits(setup, monkeypatch):
    """The refined write "breaks" every earlier edit (scores after it sabotaged), the plain write
    does not: the batch ends with exactly the plain targets' write from the same state."""
    model, tok = setup
    ed, rep, W, seen, writes, hist_calls = _two_batches(model, tok, monkeypatch, sabotage_calls=(1,))
    hist = ed.last_safeguard["history"]
    ed.restore()
    assert len(writes) == 2 and len(hist_calls) == 3
    assert hist == {"before": 3, "kept": 0, "plain": 3, "plain_own": 3, "chose_plain": True}
    assert all(r.fallback for r in rep.requests)
    assert not torch.equal(seen["base"], seen["meta"])
    W_plain = _written_directly(model, tok, seen["base"])
    for layer in W:
        assert torch.equal(W[layer], W_plain[layer])


def test_history_safeguard_restores_refined_write_on_a_tie(setup, monkeypatch):
    """Both writes "break" every earlier edit: the refined write is restored bit for bit."""
    model, tok = setup
    ed, rep, W, seen, writes, hist_calls = _two_batches(model, tok, monkeypatch, sabotage_calls=(1, 2))
    hist = ed.last_safeguard["history"]
    ed.restore()
    assert len(writes) == 2 and hist["chose_plain"] is False and hist["plain"] == 0
    assert not any(r.fallback for r in rep.requests)
    W_meta = _written_directly(model, tok, seen["meta"])
    for layer in W:
        assert torch.equal(W[layer], W_meta[layer])


def test_history_sample_is_all_or_evenly_spaced():
    from metake_fast.hparams import HParamsError, make_hparams
    from metake_fast.metake import _history_sample

    hist = list(range(10))
    assert _history_sample(hist, 0) == hist and _history_sample(hist, 10) == hist and _history_sample(hist, 50) == hist
    assert _history_sample(hist, 5) == [0, 2, 4, 6, 8]
    assert _history_sample(hist, 3) == [0, 3, 6]
    assert _history_sample([], 4) == []
    with pytest.raises(HParamsError):
        make_hparams("metake", {"safeguard_history_max": -1})


def test_interrupt_during_history_plain_write_restores_the_batch(setup, monkeypatch):
    """An interrupt in the history safeguard's plain write puts the weights back to where the
    batch started (after the first batch), and the first batch stays recorded."""
    model, tok = setup
    ed = _editor(model, tok, L2=0.5, nullspace_threshold=1e-3, safeguard_margin=-100.0, safeguard_history=True)
    ed.edit(REQS)
    _history_margin_spy(monkeypatch, sabotage_calls=(1,))  # the refined write "breaks" every earlier edit
    _interrupt_second_write_and_check_restore(ed, monkeypatch, REQS2)  # the plain write
    assert [r.subject for r in ed.history] == [r.subject for r in REQS]
    ed.restore()


def test_history_weight_lowers_the_disturbance_of_earlier_keys(setup):
    """After a first batch, the outer loop with the history term (η > 0) ends at residuals whose
    closed-form disturbance of the earlier keys, tr(Rᵀ H_p R), is below that of the loop without it;
    η = 0 is the loop of METHOD.md (same targets as the default)."""
    from metake_fast.hparams import HParamsError, make_hparams

    model, tok = setup
    kw = dict(L2=0.5, nullspace_threshold=1e-3, safeguard_margin=-100.0, outer_steps=6)
    ed = _editor(model, tok, **kw)
    ed.edit(REQS)
    tpl = ed._templates()
    L = ed.layers[-1]
    tres = optimize_targets(model, tok, ed.adapter, REQS2, L, tpl, ed._target_config(), progress=False)
    Z0 = refine_targets(ed, REQS2, tpl, tres, {})
    Hp = ed._solvers[L].history_gram(ed.last_gate_keys).float()
    assert float(Hp.abs().max()) > 0  # there is history to disturb

    def disturbance(Z):
        R = Z.T - tres.h
        return float((R * (Hp @ R)).sum())

    ed.hparams.history_weight = 50.0
    Z1 = refine_targets(ed, REQS2, tpl, tres, {})
    ed.hparams.history_weight = 0.0
    assert torch.equal(refine_targets(ed, REQS2, tpl, tres, {}), Z0)
    assert disturbance(Z1) < disturbance(Z0)
    ed.restore()
    with pytest.raises(HParamsError, match="history_weight"):
        make_hparams("metake", {"history_weight": 1.0, "base_solver": "memit"})


def test_history_scale_reaches_every_layer_solver(setup):
    """``history_scale`` μ weights the earlier edits in AlphaEdit's solve (the lower level): two
    editors that differ only in μ write the first batch identically (no history yet), and after it
    each layer's solver state equals the μ = 1 state re-weighted to μ."""
    from metake_fast.hparams import HParamsError, make_hparams

    model, tok = setup
    kw = dict(L2=0.5, nullspace_threshold=1e-3, safeguard_margin=-100.0, outer_steps=2)
    states = {}
    for mu in (1.0, 3.0):
        ed = _editor(model, tok, history_scale=mu, **kw)
        ed.edit(REQS)
        states[mu] = ({n: d.clone() for n, d in ed.weight_deltas().items()}, ed._solvers)
        ed.restore()
    w1, s1 = states[1.0]
    w3, s3 = states[3.0]
    for n in w1:
        torch.testing.assert_close(w1[n], w3[n], rtol=0, atol=0)
    for layer, solver in s1.items():
        assert s3[layer].history_scale == 3.0 and s3[layer].n_history == len(REQS)
        solver.set_history_scale(3.0)
        A1, A3 = solver.L_A @ solver.L_A.T, s3[layer].L_A @ s3[layer].L_A.T
        torch.testing.assert_close(A1, A3, rtol=1e-8, atol=1e-8 * float(A3.abs().max()))
    for bad in ({"history_scale": 0.0}, {"history_scale": 2.0, "base_solver": "memit"}):
        with pytest.raises(HParamsError, match="history_scale"):
            make_hparams("metake", bad)
    assert make_hparams("alphaedit", {"history_scale": 2.0}).history_scale == 2.0


# --------------------------------------------------------------------------- per-prompt gate (gate_keys: instance)


@pytest.mark.parametrize("gate_layers", ["last", "spread"])
def test_instance_gate_averages_to_the_mean_key_gate(setup, gate_layers):
    """Γ is linear in the prompt keys and the mean key is their weighted mean, so each request's
    template-weighted mean of its Γ columns is its column of G, for one layer and for the spread."""
    model, tok = setup
    ed = _editor(model, tok, L2=0.5, nullspace_threshold=1e-3, gate_layers=gate_layers)
    tpl = ed._templates()
    G, Gam = structural_gate(ed, REQS, tpl, per_instance=True)
    u = len(REQS)
    n = Gam.shape[1] // u
    assert n == sum(len(g) for g in tpl) and n > 1
    w = torch.tensor([1.0 / (len(tpl) * len(g)) for g in tpl for _ in g])
    mean_cols = (Gam.reshape(u, u, n) * w).sum(-1)
    assert torch.allclose(mean_cols, G, atol=1e-4)
    assert not torch.allclose(Gam.reshape(u, u, n)[..., 0], G, atol=1e-3)  # the prompts' keys do differ
    assert torch.allclose(structural_gate(ed, REQS, tpl, per_instance=False), G, atol=1e-5)


def test_write_realises_R_Gamma_on_each_prompt_key(setup):
    """One layer: the write solved for the mean keys changes each prompt's own key's output by R Γ[:, t]."""
    model, tok = setup
    ed = _editor(model, tok, L2=0.5, nullspace_threshold=1e-3, layers=[2], gate_layers="last")
    from metake_fast.keys import keys_and_residual

    tpl = ed._templates()
    L = ed.layers[-1]
    K, _ = keys_and_residual(model, tok, ed.adapter, REQS, L, None, tpl)
    Ki, _ = keys_and_residual(model, tok, ed.adapter, REQS, L, None, tpl, per_instance=True)
    Y, _ = ed._solvers[L].solve(K)
    _, Gam = structural_gate(ed, REQS, tpl, per_instance=True)
    R = torch.randn(ed.adapter.value_dim(model), len(REQS))
    W = ed.adapter.edit_weight(model, L).detach().clone()
    W2 = W.clone()
    apply_update_(W2, R, Y, ed.adapter.transposed)
    dW = W2.double() - W.double()
    dWK = (dW if not ed.adapter.transposed else dW.T) @ Ki.double()
    assert torch.allclose(dWK, R.double() @ Gam.double(), atol=1e-4 * R.abs().max().item())


@pytest.mark.parametrize("gate_layers", ["last", "spread"])
def test_instance_proxy_gradient_points_along_exact_gradient(setup, gate_layers):
    model, tok = setup
    ed = _editor(model, tok, L2=0.5, nullspace_threshold=1e-3, gate_layers=gate_layers, gate_keys="instance")
    tpl = ed._templates()
    tres = optimize_targets(model, tok, ed.adapter, REQS, ed.layers[-1], tpl, ed._target_config(), progress=False)
    res_i = proxy_gradient_cosine(ed, REQS, tpl, tres)
    res_m = proxy_gradient_cosine(ed, REQS, tpl, tres, per_instance=False)
    print(f"proxy/exact cosine ({gate_layers}): instance {res_i['cosine']:.3f}, mean {res_m['cosine']:.3f}")
    assert res_i["cosine"] > 0.1


def test_instance_gate_refines_targets_and_rejects_product(setup):
    model, tok = setup
    ed = _editor(model, tok, L2=0.5, nullspace_threshold=1e-3, gate_layers="spread", gate_keys="instance")
    tpl = ed._templates()
    tres = optimize_targets(model, tok, ed.adapter, REQS, ed.layers[-1], tpl, ed._target_config(), progress=False)
    Z = refine_targets(ed, REQS, tpl, tres, {})
    Z_mean = refine_targets(
        _editor(model, tok, L2=0.5, nullspace_threshold=1e-3, gate_layers="spread"), REQS, tpl, tres, {}
    )
    assert torch.isfinite(Z).all() and Z.shape == Z_mean.shape
    assert not torch.allclose(Z, Z_mean)  # the per-prompt gate changes the refined targets
    from metake_fast.hparams import HParamsError

    with pytest.raises(HParamsError, match="gate_keys"):
        _editor(model, tok, gate_layers="product", gate_keys="instance")


def test_instance_gate_is_independent_of_the_chunking(setup):
    """Per-prompt gate columns are picked per chunk row: one request per chunk gives the same
    refined targets as one chunk for all (the chunk → global column mapping is right)."""
    model, tok = setup
    Z = {}
    for chunk_tokens in (1, 100_000):
        ed = _editor(
            model, tok, L2=0.5, nullspace_threshold=1e-3, gate_layers="spread", gate_keys="instance",
            target_chunk_tokens=chunk_tokens,
        )  # fmt: skip
        tpl = ed._templates()
        cfg = ed._target_config()
        tres = optimize_targets(
            model, tok, ed.adapter, REQS, ed.layers[-1], tpl, cfg, progress=False, keep_problems=True
        )
        n_chunks = len(tres.problems)
        assert n_chunks == (len(REQS) if chunk_tokens == 1 else 1)
        Z[chunk_tokens] = refine_targets(ed, REQS, tpl, tres, {})
    assert torch.allclose(Z[1], Z[100_000], atol=1e-4, rtol=1e-4)


def test_editor_edits_with_the_instance_gate(setup):
    model, tok = setup
    ed = _editor(model, tok, L2=0.5, nullspace_threshold=1e-3, gate_layers="spread", gate_keys="instance")
    W0 = {layer: ed.adapter.edit_weight(model, layer).detach().clone() for layer in ed.layers}
    rep = ed.edit(REQS, batch_size=len(REQS))
    assert len(rep.requests) == len(REQS)
    for layer in ed.layers:
        W = ed.adapter.edit_weight(model, layer).detach()
        assert torch.isfinite(W).all() and not torch.equal(W, W0[layer])
    ed.restore()
    for layer in ed.layers:
        assert torch.equal(ed.adapter.edit_weight(model, layer).detach(), W0[layer])


# --------------------------------------------------------------------------- extra contexts in F (outer_extra_templates)


def test_extra_templates_keep_the_write_gate_and_add_columns_on_their_own_keys(setup):
    """F's extra contexts do not change what is written: G and the own prompts' Γ columns are the
    same as without them; each extra prompt's column is Yᵀ k_t on its own key, Y the mean-key solve."""
    from metake_fast.context import with_extra_groups
    from metake_fast.keys import keys_and_residual

    model, tok = setup
    ed = _editor(model, tok, L2=0.5, nullspace_threshold=1e-3, layers=[2], gate_layers="last")
    tpl = ed._templates()
    scored = with_extra_groups(model, tok, tpl, [[4, 2]], seed=1)
    assert scored[: len(tpl)] == tpl and len(scored) == len(tpl) + 1 and len(scored[-1]) == 2
    assert not set(scored[-1]) & set(tpl[-1])  # other prefixes than the target loop's
    G0, Gam0 = structural_gate(ed, REQS, tpl, per_instance=True)
    G, Gam = structural_gate(ed, REQS, tpl, per_instance=True, scored=scored)
    u = len(REQS)
    n0, n = Gam0.shape[1] // u, Gam.shape[1] // u
    assert n == n0 + 2
    assert torch.allclose(G, G0, atol=1e-6)
    assert torch.allclose(Gam.reshape(u, u, n)[..., :n0], Gam0.reshape(u, u, n0), atol=1e-6)
    L = ed.layers[-1]
    K, _ = keys_and_residual(model, tok, ed.adapter, REQS, L, None, tpl)
    Ki, _ = keys_and_residual(model, tok, ed.adapter, REQS, L, None, scored, per_instance=True)
    Y, _ = ed._solvers[L].solve(K)
    assert torch.allclose(Gam, (Y.double().T @ Ki.double()).float(), atol=1e-4)


def _extra_context_base(model, tok):
    """The per-prompt spread-gate settings, templates, plain target result and refined targets
    without extra contexts, that the extra-context tests compare against."""
    common = dict(L2=0.5, nullspace_threshold=1e-3, gate_layers="spread", gate_keys="instance")
    ed0 = _editor(model, tok, **common)
    tpl = ed0._templates()
    tres = optimize_targets(model, tok, ed0.adapter, REQS, ed0.layers[-1], tpl, ed0._target_config(), progress=False)
    return common, tpl, tres, refine_targets(ed0, REQS, tpl, tres, {})


def test_extra_templates_enter_the_outer_objective_only(setup, monkeypatch):
    """With extra contexts the outer loop scores them (its chunk problems hold the extra prompts),
    its result differs from F without them, and is the same however the requests are chunked."""
    import metake_fast.metake as mk

    model, tok = setup
    common, tpl, tres, Z0 = _extra_context_base(model, tok)
    seen = []
    real = mk.ChunkProblem

    def spy(*args, **kw):
        seen.append(args[5])
        return real(*args, **kw)

    monkeypatch.setattr(mk, "ChunkProblem", spy)
    Z = {}
    for chunk_tokens in (1, 100_000):
        ed = _editor(model, tok, **common, outer_extra_templates=[[4, 2]], target_chunk_tokens=chunk_tokens)
        Z[chunk_tokens] = refine_targets(ed, REQS, tpl, tres, {})
    assert seen and all(len(t) == len(tpl) + 1 and t[: len(tpl)] == tpl for t in seen)
    assert len(seen) == len(REQS) + 1  # one problem per request, then one for all
    assert torch.allclose(Z[1], Z[100_000], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(Z[1], Z0, atol=1e-4)
    ed = _editor(model, tok, **common, outer_extra_templates=[[4, 2]], outer_steps=0)
    assert torch.equal(refine_targets(ed, REQS, tpl, tres, {}), (tres.h + tres.delta).T)


def test_extra_weight_zero_is_f_without_extras_and_weight_between_differs(setup):
    """``outer_extra_weight``: at 0 the extra prompts hold no share of F, so the refined targets are
    those without extra contexts (the own prompts' gate columns do not change with them); a weight
    between 0 and 1 gives targets unlike both 0 and 1 (every prompt alike)."""
    model, tok = setup
    common, tpl, tres, Z0 = _extra_context_base(model, tok)
    Z = {}
    for w in (0.0, 0.3, 1.0):
        ed = _editor(model, tok, **common, outer_extra_templates=[[4, 2]], outer_extra_weight=w)
        Z[w] = refine_targets(ed, REQS, tpl, tres, {})
    torch.testing.assert_close(Z[0.0], Z0, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(Z[0.3], Z0, atol=1e-4) and not torch.allclose(Z[0.3], Z[1.0], atol=1e-4)


def test_extra_templates_are_validated():
    from metake_fast.hparams import HParamsError, make_hparams

    assert make_hparams("metake", {"outer_extra_templates": [[10, 5], [20, 5]]}).outer_extra_templates == [
        [10, 5],
        [20, 5],
    ]
    for bad in ([10, 5], [[10, -1]], [[10]], "10x5"):
        with pytest.raises(HParamsError, match="outer_extra_templates"):
            make_hparams("metake", {"outer_extra_templates": bad})
    with pytest.raises(HParamsError, match="outer_extra_templates"):
        make_hparams("alphaedit", {"outer_extra_templates": [[10, 5]]})
    assert make_hparams("metake", {"outer_extra_weight": 0.2}).outer_extra_weight == 0.2
    with pytest.raises(HParamsError, match="outer_extra_weight"):
        make_hparams("metake", {"outer_extra_weight": -0.1})


@pytest.mark.parametrize("gate_keys", ["mean", "instance"])
def test_outer_loop_compaction_equals_running_every_request(setup, monkeypatch, gate_keys):
    """A request that converges in the upper level enters no later loss, so its prompts leave the
    forward/backward (``TargetConfig.compact``): the refined targets are those of the loop that runs
    every request at every outer step, and the later steps do run fewer requests."""
    import dataclasses

    from metake_fast.targets import ChunkProblem

    model, tok = setup
    common = dict(L2=0.5, nullspace_threshold=1e-3, gate_layers="spread", gate_keys=gate_keys, outer_lr=0.5)
    ed = _editor(model, tok, **common)
    tpl = ed._templates()
    tres = optimize_targets(
        model, tok, ed.adapter, REQS, ed.layers[-1], tpl, ed._target_config(), progress=False, keep_problems=True
    )
    probe = _editor(model, tok, **common, early_stop_nll=0.0, outer_steps=3)
    refine_targets(probe, REQS, tpl, tres, {})
    low = probe.last_outer_nll.sort().values
    assert float(low[1] - low[0]) > 1e-3  # requests apart: one converges before the others
    threshold = float(low[0] + low[1]) / 2
    sizes, losses = [], ChunkProblem.losses

    def spy(self, *a, **k):
        sizes.append(self.u)
        return losses(self, *a, **k)

    monkeypatch.setattr(ChunkProblem, "losses", spy)
    Z, runs = {}, {}
    for compact in (False, True):
        run = _editor(model, tok, **common, early_stop_nll=threshold, outer_steps=10)
        cfg = dataclasses.replace(run._target_config(), compact=compact)
        monkeypatch.setattr(run, "_target_config", lambda cfg=cfg: cfg)
        sizes.clear()
        Z[compact] = refine_targets(run, REQS, tpl, tres, {})
        runs[compact] = list(sizes)
    assert set(runs[False]) == {len(REQS)} and min(runs[True]) < len(REQS), runs
    assert len(runs[True]) > 3  # the loop went on after the first request converged
    torch.testing.assert_close(Z[True], Z[False], rtol=1e-5, atol=1e-5 * float(Z[False].abs().max()))
    assert not torch.allclose(Z[False], (tres.h + tres.delta).T, atol=1e-6)  # the upper level moved the targets
