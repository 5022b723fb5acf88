"""``history_keys: contexts``: the earlier edits' term of the null-space solve keeps every
context prompt's own key, not only the request's mean key (AlphaEdit and MetaKE)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from _tiny import SAMPLE_REQUESTS, tiny_model, tiny_tokenizer  # noqa: E402

from metake_fast.editor import Editor  # noqa: E402
from metake_fast.hparams import HParamsError, make_hparams  # noqa: E402
from metake_fast.keys import instance_keys_mean_and_history, instance_weights, keys_and_residual  # noqa: E402
from metake_fast.requests import validate_requests  # noqa: E402

HP = {"v_num_grad_steps": 4, "stats_tokens": 1500, "stats_max_length": 48, "context_template_count": 2,
      "context_template_length": 4, "layers": [1, 2]}  # fmt: skip
REQS = SAMPLE_REQUESTS

pytestmark = pytest.mark.usefixtures("one_thread")


def _editor(cache, method="alphaedit", **extra):
    return Editor(
        tiny_model("llama", layers=4, seed=0), tiny_tokenizer(), method, {**HP, **extra}, cache=cache, progress=False
    )


def _w(ed, layer):
    return ed.adapter.edit_weight(ed.model, layer).detach().double().clone()


def _instance_keys(ed, reqs, layer):
    """(d_k, u·n) every prompt's key on the model as it is now, and the template weights."""
    templates = ed._templates()
    K_all, _ = keys_and_residual(ed.model, ed.tok, ed.adapter, reqs, layer, None, templates, per_instance=True)
    return K_all.double(), instance_weights(templates), templates


def test_mean_and_history_columns_against_the_mean_key_pass_and_fp64_gram(tmp_path):
    ed = _editor(tmp_path)
    reqs = validate_requests(REQS[:3])
    layer = ed.layers[0]
    K_all, w, templates = _instance_keys(ed, reqs, layer)
    n = w.numel()
    assert n == 3 and torch.allclose(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    K_mean, _ = keys_and_residual(ed.model, ed.tok, ed.adapter, reqs, layer, None, templates)
    K, K_h = instance_keys_mean_and_history(K_all.float(), templates, len(reqs))
    assert torch.allclose(K.double(), K_mean.double(), rtol=1e-5, atol=1e-6)
    # oracle: sum over requests of the weighted mean of k_t k_tᵀ, by loops in fp64
    gram = torch.zeros(K_all.shape[0], K_all.shape[0], dtype=torch.float64)
    for i in range(len(reqs)):
        for t in range(n):
            k = K_all[:, i * n + t]
            gram += w[t] * torch.outer(k, k)
    Kh = K_h.double()
    assert torch.allclose(Kh @ Kh.T, gram, rtol=1e-5, atol=1e-6)
    spread = gram - K_mean.double() @ K_mean.double().T  # the keys' spread across contexts: PSD, not 0
    assert torch.linalg.eigvalsh(spread).min() > -1e-5 * gram.abs().max()
    assert spread.abs().max() > 1e-3 * gram.abs().max()
    with pytest.raises(ValueError):
        instance_keys_mean_and_history(K_all.float(), templates, len(reqs) + 1)


@pytest.mark.parametrize("method", ["alphaedit", "metake"])
def test_context_history_keeps_the_write_and_stores_the_context_gram(tmp_path, method):
    """The first batch's write is the mean-key write; the solver's history afterwards is
    ``λI + U0ᵀ(Σ w_t k_t k_tᵀ)U0`` at the first edited layer (keys read before any write)."""
    extra = {"outer_steps": 2} if method == "metake" else {}
    mean, ctx = _editor(tmp_path, method, **extra), _editor(tmp_path, method, history_keys="contexts", **extra)
    layer = ctx.layers[0]
    reqs = validate_requests(REQS[:3])
    K_all, w, templates = _instance_keys(ctx, reqs, layer)  # the unedited model: what layer 1's write reads
    mean.edit(REQS[:3], batch_size=3, score=False)
    ctx.edit(REQS[:3], batch_size=3, score=False)
    for lay in ctx.layers:
        assert torch.allclose(_w(ctx, lay), _w(mean, lay), rtol=1e-4, atol=1e-6), lay
    s = ctx._solvers[layer]
    assert s.rank > 0
    U0 = s.U0.double()
    n = w.numel()
    K_bar, Kh = instance_keys_mean_and_history(K_all, templates, len(reqs))  # fp64; checked by the test above
    eye = torch.eye(s.rank, dtype=torch.float64)
    want_ctx = s.lam * eye + U0.T @ Kh @ Kh.T @ U0
    want_mean = s.lam * eye + U0.T @ K_bar @ K_bar.T @ U0
    got_ctx = s.L_A.double() @ s.L_A.double().T
    sm = mean._solvers[layer]
    got_mean = sm.L_A.double() @ sm.L_A.double().T
    tol = 1e-4 * (want_ctx - s.lam * eye).abs().max()  # relative to the history part (λ = 10 dwarfs it)
    assert (got_ctx - want_ctx).abs().max() < tol
    assert (got_mean - want_mean).abs().max() < tol
    assert (want_ctx - want_mean).abs().max() > 100 * tol  # the two histories are told apart
    assert s.n_history == len(reqs) * n and sm.n_history == len(reqs)


def test_next_write_moves_the_earlier_context_keys_less(tmp_path):
    """Same second batch from the same state (up to rounding): the write with the context history
    has the smaller spread term ``Σ_t w_t‖ΔW(k_t − k̄)‖²`` on the first batch's keys, as the
    minimiser of the objective that adds it must."""
    # a small λ_a: the tiny model's keys are short, and λ = 10 would swamp both history terms
    mean, ctx = _editor(tmp_path, L2=1e-4), _editor(tmp_path, L2=1e-4, history_keys="contexts")
    layer = ctx.layers[0]
    first = validate_requests(REQS[:3])
    K_all, w, templates = _instance_keys(ctx, first, layer)
    n = w.numel()
    K_bar, _ = instance_keys_mean_and_history(K_all, templates, len(first))
    D = (K_all.reshape(K_all.shape[0], len(first), n) - K_bar[:, :, None]) * w.sqrt()
    D = D.reshape(K_all.shape[0], -1)
    spread = {}
    for name, ed in (("mean", mean), ("ctx", ctx)):
        ed.edit(REQS[:3], batch_size=3, score=False)
        before = _w(ed, layer)
        ed.edit(REQS[3:], batch_size=3, score=False)
        dW = _w(ed, layer) - before
        dW = dW.T if ed.adapter.transposed else dW  # (d_v, d_k)
        spread[name] = float((dW @ D).pow(2).sum())
    assert spread["ctx"] < 0.9 * spread["mean"], spread


def test_history_keys_is_validated():
    assert make_hparams("alphaedit", {"history_keys": "contexts"}).history_keys == "contexts"
    assert make_hparams("metake", {}).history_keys == "mean"
    with pytest.raises(HParamsError, match="history_keys"):
        make_hparams("alphaedit", {"history_keys": "instance"})
    with pytest.raises(HParamsError, match="history_keys"):
        make_hparams("metake", {"history_keys": "contexts", "base_solver": "memit"})
    with pytest.raises(HParamsError):
        make_hparams("memit", {"history_keys": "contexts"})
