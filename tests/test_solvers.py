"""Tests for metake_fast.solvers: ROME, MEMIT, AlphaEdit closed forms (fp64, CPU, random data)."""

from __future__ import annotations

import warnings

import pytest
import torch

from metake_fast.solvers import (
    CovarianceSolver,
    IdentityRomeSolver,
    NullSpaceSolver,
    SolverError,
    SolverWarning,
    cholesky_factor,
    cholesky_rank_update,
    gate_eigenvalues,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _second_moment(d: int, n: int, seed: int, low_rank: int | None = None) -> torch.Tensor:
    """Mean uncentered second moment of n random keys; low_rank makes a (numerically) singular tail."""
    g = _gen(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    if low_rank is not None:
        X = torch.randn(n, low_rank, generator=g, dtype=F64) @ torch.randn(low_rank, d, generator=g, dtype=F64)
        X = X / low_rank**0.5
    X = X + 0.3 * torch.randn(d, generator=g, dtype=F64)  # uncentered
    return X.T @ X / n


def _keys(d: int, u: int, seed: int) -> torch.Tensor:
    return torch.randn(d, u, generator=_gen(seed), dtype=F64)


# ---------------------------------------------------------------- Cholesky helpers


@pytest.mark.parametrize("r,u", [(1, 1), (5, 1), (8, 3), (6, 10), (20, 20), (33, 4)])
def test_rank_update_equals_refactorisation(r, u):
    g = _gen(r * 100 + u)
    M = torch.randn(r, r + 2, generator=g, dtype=F64)
    A = M @ M.T + 0.1 * torch.eye(r, dtype=F64)
    V = torch.randn(r, u, generator=g, dtype=F64)
    L = torch.linalg.cholesky(A)
    L0 = L.clone()
    L2 = cholesky_rank_update(L, V)
    ref = torch.linalg.cholesky(A + V @ V.T)
    torch.testing.assert_close(L2, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(L, L0)  # input untouched
    assert torch.equal(L2, L2.tril())
    assert bool((L2.diagonal() > 0).all())


def test_rank_update_repeated_and_zero_columns():
    r = 12
    A = torch.eye(r, dtype=F64) * 3.0
    L = torch.linalg.cholesky(A)
    for s in range(4):
        V = _keys(r, 3, s)
        V[:, 1] = 0.0  # a zero column must be a no-op, not a NaN
        A = A + V @ V.T
        L = cholesky_rank_update(L, V)
    torch.testing.assert_close(L, torch.linalg.cholesky(A), rtol=1e-10, atol=1e-10)
    assert torch.equal(cholesky_rank_update(L, torch.zeros(r, 0, dtype=F64)), L)


def test_cholesky_factor_plain_and_jitter_warns():
    A = _second_moment(10, 50, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L = cholesky_factor(A, layer="h.3")
    torch.testing.assert_close(L @ L.T, A)

    S = _second_moment(10, 50, 1, low_rank=4)  # rank 4 (+ the mean): singular
    with pytest.warns(SolverWarning, match=r"layer h\.3.*jitter.*condition estimate"):
        L = cholesky_factor(S, layer="h.3")
    assert torch.isfinite(L).all()
    assert (L @ L.T - S).abs().max() < 1e-2 * S.diagonal().mean()


def test_cholesky_factor_non_finite_and_hopeless():
    A = torch.eye(4, dtype=F64)
    A[1, 1] = float("nan")
    with pytest.raises(SolverError, match="layer 7"):
        cholesky_factor(A, layer=7)
    with pytest.raises(SolverError, match="layer 7"):
        cholesky_factor(-torch.eye(4, dtype=F64), layer=7)


# ---------------------------------------------------------------- ROME / MEMIT


def test_rome_realises_target():
    d_k, d_v, u = 24, 10, 5
    C = _second_moment(d_k, 200, 2)
    g = _gen(3)
    W = torch.randn(d_v, d_k, generator=g, dtype=F64)
    K = _keys(d_k, u, 4)
    V_star = torch.randn(d_v, u, generator=g, dtype=F64)
    solver = CovarianceSolver(C, lam=1.0, layer=0, out_dtype=None)
    Y = solver.rome(K)
    assert Y.shape == (d_k, u) and Y.dtype == F64
    for i in range(u):  # each request independently: (W + ΔW) k* = v*
        k, v = K[:, i], V_star[:, i]
        R = (v - W @ k).unsqueeze(1)
        W_new = W + R @ Y[:, i : i + 1].T
        torch.testing.assert_close(W_new @ k, v, rtol=1e-10, atol=1e-10)
        # closed form from the spec: (C⁻¹k)ᵀ / ((C⁻¹k)ᵀ k)
        ck = torch.linalg.solve(C, k)
        torch.testing.assert_close(Y[:, i], ck / (ck @ k), rtol=1e-9, atol=1e-12)
    Y1 = solver.rome(K[:, 2])  # a single vector works too, and matches its column
    torch.testing.assert_close(Y1[:, 0], Y[:, 2])


def test_rome_without_covariance_is_rome_with_identity():
    # mom2_adjustment: false. Oracle: the covariance solver fed C = I, and (W + ΔW) k* = v*.
    d_k, u = 24, 5
    K = _keys(d_k, u, 6)
    Y = IdentityRomeSolver(d_k, layer=3, out_dtype=None).rome(K)
    torch.testing.assert_close(Y, CovarianceSolver(torch.eye(d_k, dtype=F64), lam=1.0, out_dtype=None).rome(K))
    torch.testing.assert_close((Y * K).sum(0), torch.ones(u, dtype=F64))  # Y_iᵀ k_i = 1
    assert IdentityRomeSolver(d_k).rome(K).dtype == torch.float32
    assert IdentityRomeSolver(d_k).rome(K[:, :0]).shape == (d_k, 0)
    K[:, 2] = 0
    with pytest.raises(SolverError, match="layer 3.*zero key in column.*2"):
        IdentityRomeSolver(d_k, layer=3).rome(K)


@pytest.mark.parametrize("u", [1, 4, 30])
def test_memit_normal_equations_and_direct_solve(u):
    d_k, d_v, lam = 20, 7, 15.0
    C = _second_moment(d_k, 300, 5)
    K = _keys(d_k, u, 6)
    R = torch.randn(d_v, u, generator=_gen(7), dtype=F64)
    solver = CovarianceSolver(C, lam, layer="mlp.2", out_dtype=None)
    Y, G = solver.memit(K)
    assert Y.shape == (d_k, u) and G.shape == (u, u)
    dW = R @ Y.T
    torch.testing.assert_close(dW @ (lam * C + K @ K.T), R @ K.T, rtol=1e-9, atol=1e-9)
    Y_direct = torch.linalg.solve(lam * C + K @ K.T, K)
    torch.testing.assert_close(Y, Y_direct, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dW @ K, R @ G, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(G, K.T @ Y, rtol=1e-9, atol=1e-12)
    ev = gate_eigenvalues(G)
    assert ev.min() > -1e-10 and ev.max() < 1.0


def test_memit_output_dtype_and_inputs_bf16():
    d_k = 16
    C = _second_moment(d_k, 100, 8).to(torch.bfloat16)
    K = _keys(d_k, 3, 9).to(torch.float32)
    Y, G = CovarianceSolver(C, 10.0).memit(K)
    assert Y.dtype == torch.float32 and G.dtype == torch.float32
    Y32, _ = CovarianceSolver(C, 10.0, dtype=torch.float32, out_dtype=None).memit(K)
    assert Y32.dtype == torch.float32
    torch.testing.assert_close(Y32, Y, rtol=1e-3, atol=1e-5)


def test_empty_batch():
    d_k = 12
    C = _second_moment(d_k, 60, 10)
    K = torch.zeros(d_k, 0)
    s = CovarianceSolver(C, 5.0)
    assert s.rome(K).shape == (d_k, 0)
    Y, G = s.memit(K)
    assert Y.shape == (d_k, 0) and G.shape == (0, 0) and Y.dtype == torch.float32
    ns = NullSpaceSolver(C, threshold=0.5)
    L0 = ns.L_A.clone()
    Y, G = ns.solve(K)
    assert Y.shape == (d_k, 0) and G.shape == (0, 0)
    ns.add_history(K)
    assert torch.equal(ns.L_A, L0)
    assert gate_eigenvalues(G).shape == (0,)


def test_non_finite_keys_name_layer_and_column():
    d_k = 10
    C = _second_moment(d_k, 60, 11)
    K = _keys(d_k, 5, 12)
    K[3, 2] = float("inf")
    s = CovarianceSolver(C, 5.0, layer="transformer.h.5")
    for fn in (s.rome, s.memit):
        with pytest.raises(SolverError, match=r"transformer\.h\.5.*column\(s\) 2"):
            fn(K)
    ns = NullSpaceSolver(C, threshold=0.5, layer=17)
    with pytest.raises(SolverError, match=r"layer 17.*column\(s\) 2"):
        ns.solve(K)
    with pytest.raises(SolverError, match="layer 17"):
        ns.add_history(K)
    Cn = C.clone()
    Cn[0, 0] = float("nan")
    with pytest.raises(SolverError, match="layer 4"):
        CovarianceSolver(Cn, 1.0, layer=4)
    with pytest.raises(SolverError, match="layer 4"):
        NullSpaceSolver(Cn, layer=4)


# ---------------------------------------------------------------- AlphaEdit


def _alphaedit_setup(d_k=30, seed=20):
    # C with a clear split: 12 large eigenvalues (preserved span) and 18 tiny ones (null space).
    g = _gen(seed)
    Q, _ = torch.linalg.qr(torch.randn(d_k, d_k, generator=g, dtype=F64))
    ev = torch.cat([torch.rand(12, generator=g, dtype=F64) + 0.5, torch.rand(d_k - 12, generator=g, dtype=F64) * 1e-3])
    C = (Q * ev) @ Q.T
    return C, Q[:, :12]


def _alphaedit_reference(P, K_p, K, R, lam):
    """AlphaEdit's reference formula: ΔWᵀ = solve(P (K_p K_pᵀ + K Kᵀ) + λ I, P K Rᵀ)."""
    d = P.shape[0]
    M = K_p @ K_p.T + K @ K.T
    return torch.linalg.solve(P @ M + lam * torch.eye(d, dtype=F64), P @ K @ R.T).T


def test_alphaedit_matches_reference_over_sequential_batches():
    d_k, d_v, lam = 30, 9, 10.0
    C, U_keep = _alphaedit_setup(d_k)
    solver = NullSpaceSolver(C, threshold=2e-2, lam=lam, layer="L8", out_dtype=None)
    assert solver.rank == 18
    P = solver.projector
    torch.testing.assert_close(P @ P, P)
    K_p = torch.zeros(d_k, 0, dtype=F64)
    g = _gen(21)
    for b, u in enumerate([3, 1, 5, 2]):
        K = torch.randn(d_k, u, generator=g, dtype=F64) * 2.0
        R = torch.randn(d_v, u, generator=g, dtype=F64)
        Y, G = solver.solve(K)
        dW = R @ Y.T
        torch.testing.assert_close(dW, _alphaedit_reference(P, K_p, K, R, lam), rtol=1e-9, atol=1e-11)
        # preserved span untouched
        assert (dW @ U_keep).abs().max() < 1e-12 * (1 + dW.abs().max())
        # gate: what the solver realises, eigenvalues in [0, 1)
        torch.testing.assert_close(dW @ K, R @ G, rtol=1e-12, atol=1e-12)
        ev = gate_eigenvalues(G)
        assert ev.min() > -1e-12 and ev.max() < 1.0, (b, ev)
        # spec's explicit gate G = Kᵀ P (P M P + λI)⁻¹ K
        M = K_p @ K_p.T + K @ K.T
        G_ref = K.T @ P @ torch.linalg.solve(P @ M @ P + lam * torch.eye(d_k, dtype=F64), K)
        torch.testing.assert_close(G, G_ref, rtol=1e-9, atol=1e-11)
        solver.add_history(K)
        K_p = torch.cat([K_p, K], dim=1)
    A_ref = solver.U0.T @ K_p @ K_p.T @ solver.U0 + lam * torch.eye(solver.rank, dtype=F64)
    torch.testing.assert_close(solver.L_A @ solver.L_A.T, A_ref, rtol=1e-10, atol=1e-10)
    assert solver.n_history == 11


def test_alphaedit_single_request_gate_formula():
    C, U_keep = _alphaedit_setup()
    lam = 10.0
    s = NullSpaceSolver(C, lam=lam, out_dtype=None)
    k = U_keep[:, 0] * 5.0 + 0.3 * _keys(C.shape[0], 1, 3)[:, 0]
    _, G = s.solve(k)
    pk2 = (s.projector @ k).square().sum()
    torch.testing.assert_close(G[0, 0], pk2 / (lam + pk2))


def test_alphaedit_state_dict_roundtrip():
    C, _ = _alphaedit_setup()
    s = NullSpaceSolver(C, lam=3.0, layer=1)
    s.add_history(_keys(C.shape[0], 4, 30))
    sd = s.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    t = NullSpaceSolver(torch.eye(C.shape[0], dtype=F64), threshold=0.5, layer=1)  # different state
    t.load_state_dict(sd)
    K = _keys(C.shape[0], 2, 31)
    for a, b in zip(s.solve(K), t.solve(K)):
        torch.testing.assert_close(a, b)
    assert t.rank == s.rank and t.lam == 3.0 and t.n_history == 4


def test_gate_reduces_to_identity_without_constraint():
    # Oracle (2): P = I, K_p = 0, λ → 0 gives G → I.
    d_k = 10
    s = NullSpaceSolver(torch.zeros(d_k, d_k, dtype=F64), threshold=1.0, lam=1e-10, out_dtype=None)
    assert s.rank == d_k
    K = _keys(d_k, 4, 40)
    Y, G = s.solve(K)
    torch.testing.assert_close(G, torch.eye(4, dtype=F64), rtol=0, atol=1e-8)


def test_alphaedit_float32_solve_close_to_float64():
    C, _ = _alphaedit_setup()
    K = _keys(C.shape[0], 3, 50)
    s64 = NullSpaceSolver(C, lam=10.0)
    s32 = NullSpaceSolver(C.float(), lam=10.0, dtype=torch.float32)
    for s in (s64, s32):
        s.add_history(_keys(C.shape[0], 5, 51))
    (Y64, G64), (Y32, G32) = s64.solve(K), s32.solve(K)
    assert Y64.dtype == Y32.dtype == torch.float32 and s32.L_A.dtype == torch.float32
    torch.testing.assert_close(Y32, Y64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(G32, G64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_batches", [0, 1, 3])
def test_history_gram_is_the_disturbance_of_earlier_keys(n_batches):
    """Oracle: with the earlier keys K_p kept explicitly, ‖ΔW K_p‖²_F = tr(R H_p Rᵀ) for ΔW = R Yᵀ,
    and H_p = Yᵀ K_p K_pᵀ Y entrywise (zero without history)."""
    d_k, d_v, u = 24, 7, 5
    C = _second_moment(d_k, 200, 40, low_rank=14)
    ns = NullSpaceSolver(C, threshold=0.05, lam=3.0, dtype=F64, out_dtype=None)
    assert ns.rank > 0
    Kp = torch.zeros(d_k, 0, dtype=F64)
    for b in range(n_batches):
        Kb = _keys(d_k, 6, 41 + b)
        ns.add_history(Kb)
        Kp = torch.cat([Kp, Kb], 1)
    K = _keys(d_k, u, 50)
    Y, _ = ns.solve(K)
    Hp = ns.history_gram(K)
    want = Y.T @ Kp @ Kp.T @ Y
    torch.testing.assert_close(Hp, want, rtol=1e-9, atol=1e-10 * max(1.0, float(want.abs().max())))
    R = torch.randn(d_v, u, generator=_gen(51), dtype=F64)
    dW = R @ Y.T
    torch.testing.assert_close(torch.trace(R @ Hp @ R.T), (dW @ Kp).pow(2).sum(), rtol=1e-9, atol=1e-10)
    if n_batches == 0:
        assert float(Hp.abs().max()) < 1e-10


def _alphaedit_weighted_reference(P, K_p, K, R, lam, mu):
    """The AlphaEdit solve with the history term weighted by μ, in fp64 from its normal equations:
    minimise ‖ΔW K − R‖² + μ‖ΔW K_p‖² + λ‖ΔW‖² over ΔW = ΔP P (ΔW = R Kᵀ P (P M P + λI)⁺, M = μK_pK_pᵀ + KKᵀ)."""
    d = P.shape[0]
    M = mu * K_p @ K_p.T + K @ K.T
    return torch.linalg.solve(P @ M + lam * torch.eye(d, dtype=F64), P @ K @ R.T).T


@pytest.mark.parametrize("mu", [0.25, 1.0, 4.0])
def test_alphaedit_history_scale_matches_weighted_reference(mu):
    d_k, d_v, lam = 30, 9, 10.0
    C, U_keep = _alphaedit_setup(d_k)
    solver = NullSpaceSolver(C, threshold=2e-2, lam=lam, history_scale=mu, out_dtype=None)
    P = solver.projector
    K_p = torch.zeros(d_k, 0, dtype=F64)
    g = _gen(61)
    for u in (4, 2, 5):
        K = torch.randn(d_k, u, generator=g, dtype=F64) * 2.0
        R = torch.randn(d_v, u, generator=g, dtype=F64)
        Y, G = solver.solve(K)
        torch.testing.assert_close(R @ Y.T, _alphaedit_weighted_reference(P, K_p, K, R, lam, mu), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close((R @ Y.T) @ K, R @ G, rtol=1e-12, atol=1e-12)
        # history_gram is the unweighted disturbance ‖ΔW K_p‖² whatever μ is
        Hp = solver.history_gram(K)
        torch.testing.assert_close(Hp, Y.T @ K_p @ K_p.T @ Y, rtol=1e-9, atol=1e-10 * max(1.0, float(Hp.abs().max())))
        solver.add_history(K)
        K_p = torch.cat([K_p, K], dim=1)


def test_alphaedit_history_scale_protects_earlier_keys_more():
    """Larger μ: less disturbance of the earlier keys and a smaller realised share of the new batch."""
    d_k, d_v = 30, 9
    C, _ = _alphaedit_setup(d_k)
    K_p, K = _keys(d_k, 8, 70), _keys(d_k, 3, 71)
    R = torch.randn(d_v, 3, generator=_gen(72), dtype=F64)
    dist, share = [], []
    for mu in (1.0, 3.0, 10.0):
        s = NullSpaceSolver(C, lam=10.0, history_scale=mu, out_dtype=None)
        s.add_history(K_p)
        Y, G = s.solve(K)
        dist.append(float((R @ Y.T @ K_p).pow(2).sum()))
        share.append(float(torch.trace(G)))
    assert dist[0] > dist[1] > dist[2] and share[0] > share[1] > share[2]


def test_alphaedit_set_history_scale_equals_solver_built_with_it():
    C, _ = _alphaedit_setup()
    batches = [_keys(C.shape[0], u, 80 + i) for i, u in enumerate((3, 6, 2))]
    a = NullSpaceSolver(C, lam=10.0, out_dtype=None)
    b = NullSpaceSolver(C, lam=10.0, history_scale=3.0, out_dtype=None)
    for K in batches:
        a.add_history(K)
        b.add_history(K)
    a.set_history_scale(3.0)
    assert a.history_scale == 3.0
    torch.testing.assert_close(a.L_A @ a.L_A.T, b.L_A @ b.L_A.T, rtol=1e-10, atol=1e-9)
    K = _keys(C.shape[0], 4, 90)
    for x, y in zip(a.solve(K), b.solve(K)):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10)
    # the scale travels with the state
    t = NullSpaceSolver(C, lam=10.0, out_dtype=None)
    t.load_state_dict(b.state_dict())
    assert t.history_scale == 3.0
    for x, y in zip(t.solve(K), b.solve(K)):
        torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="history_scale"):
        NullSpaceSolver(C, history_scale=0.0)
    with pytest.raises(ValueError, match="history_scale"):
        a.set_history_scale(float("nan"))
