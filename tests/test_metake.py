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
