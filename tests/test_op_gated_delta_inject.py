"""gated_delta_inject: every built CPU backend vs an fp64 oracle, gradients vs closed forms, opcheck."""

from __future__ import annotations

import sys

import pytest
import torch
from _ops import cpp_kernel_built

import metake_fast  # noqa: F401

mod = sys.modules["metake_fast.ops.gated_delta_inject"]


BACKENDS = [
    "reference",
    pytest.param("cpp", marks=pytest.mark.skipif(not cpp_kernel_built("gated_delta_inject"), reason="_C not built")),
]


def _run(backend, *args):
    return mod.inject_reference(*args) if backend == "reference" else torch.ops.metake_fast.gated_delta_inject(*args)


def problem(B, T, d, u_in, u_out, n, dtype, ddtype=torch.float32, gated=True, repeat=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=g).to(dtype)
    delta = (torch.randn(u_in, d, generator=g) * 0.3).to(ddtype)
    gate = torch.randn(u_in, u_out, generator=g).to(ddtype) if gated else None
    u_o = u_out if gated else u_in
    if repeat:  # positions drawn with replacement: some repeat and must accumulate
        rows = torch.randint(0, B, (n,), generator=g)
        cols = torch.randint(0, T, (n,), generator=g)
    else:
        flat = torch.randperm(B * T, generator=g)[:n]
        rows, cols = flat // T, flat % T
    owner = torch.randint(0, u_o, (n,), generator=g)
    return hidden, delta, gate, rows, cols, owner


def oracle(hidden, delta, gate, rows, cols, owner):
    """fp64, one entry at a time."""
    V = delta.double() if gate is None else gate.double().T @ delta.double()
    out = hidden.double().clone()
    for r, c, o in zip(rows.tolist(), cols.tolist(), owner.tolist()):
        out[r, c] += V[o]
    return out


SHAPES = [  # B, T, d, u_in, u_out, n
    (1, 1, 1, 1, 1, 1), (2, 5, 7, 3, 2, 4), (3, 13, 17, 5, 5, 9), (4, 31, 64, 11, 7, 0), (8, 29, 96, 20, 20, 40),
]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ddtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("repeat", [False, True])
def test_forward_matches_fp64(backend, dtype, ddtype, shape, gated, repeat):
    B, T, d, u_in, u_out, n = shape
    args = problem(B, T, d, u_in, u_out, n, dtype, ddtype, gated, repeat, seed=sum(shape))
    want = oracle(*args)
    got = _run(backend, *args)
    ref = mod.inject_reference(*args)
    assert got.dtype == dtype and got.shape == args[0].shape
    err = (got.double() - want).abs().max().item()
    ref_err = (ref.double() - want).abs().max().item()
    assert err <= 2 * ref_err + 1e-6 * (1 + want.abs().max().item()), (err, ref_err)
    untouched = torch.ones(B * T, dtype=torch.bool)
    untouched[args[3] * T + args[4]] = False
    assert torch.equal(got.view(B * T, d)[untouched], args[0].view(B * T, d)[untouched])  # copied bit-exactly


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("repeat", [False, True])
def test_gradients_closed_form(gated, repeat):
    """∇delta = G S and ∇gate = R Sᵀ, S = Σ e_owner ∇out[row, col] (autograd through the dispatcher)."""
    hidden, delta, gate, rows, cols, owner = problem(3, 11, 13, 6, 4, 10, torch.float64, torch.float64, gated, repeat)
    hidden.requires_grad_(True)
    delta.requires_grad_(True)
    if gate is not None:
        gate.requires_grad_(True)
    out = metake_fast.ops.gated_delta_inject(hidden, delta, rows, cols, owner, gate=gate)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    u_out = 4 if gated else 6
    S = torch.zeros(u_out, 13, dtype=torch.float64)
    for r, c, o in zip(rows.tolist(), cols.tolist(), owner.tolist()):
        S[o] += w[r, c]
    torch.testing.assert_close(hidden.grad, w)
    torch.testing.assert_close(delta.grad, (gate.detach() @ S) if gated else S)
    if gated:
        torch.testing.assert_close(gate.grad, delta.detach() @ S.T)


def test_gradcheck():
    hidden, delta, gate, rows, cols, owner = problem(2, 5, 4, 3, 2, 5, torch.float64, torch.float64, True, True)
    f = lambda h, r, g: metake_fast.ops.gated_delta_inject(h, r, rows, cols, owner, gate=g)  # noqa: E731
    assert torch.autograd.gradcheck(f, (hidden.requires_grad_(), delta.requires_grad_(), gate.requires_grad_()))


def test_proxy_gradient_identity():
    """The op's ∇delta is the structural proxy G ∇_V of metake.refine_targets (loss on the injected rows)."""
    hidden, delta, gate, rows, cols, owner = problem(4, 6, 8, 4, 4, 4, torch.float32, torch.float32)
    owner = torch.arange(4)
    delta.requires_grad_(True)
    out = metake_fast.ops.gated_delta_inject(hidden, delta, rows, cols, owner, gate=gate)
    loss = out[rows, cols].pow(2).sum()
    (g_op,) = torch.autograd.grad(loss, delta)
    V = (gate.T @ delta.detach()).requires_grad_(True)
    loss_v = (hidden[rows, cols] + V).pow(2).sum()
    (g_v,) = torch.autograd.grad(loss_v, V)
    torch.testing.assert_close(g_op, gate @ g_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [True, False])
def test_opcheck(dtype, gated):
    hidden, delta, gate, rows, cols, owner = problem(2, 7, 9, 3, 3, 5, dtype, torch.float32, gated, True)
    torch.library.opcheck(torch.ops.metake_fast.gated_delta_inject, (hidden, delta, gate, rows, cols, owner))
    g = torch.randn(2, 7, 9).to(dtype)
    torch.library.opcheck(torch.ops.metake_fast.gated_delta_inject_backward, (g, delta, gate, rows, cols, owner))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    hidden, delta, gate, rows, cols, owner = problem(2, 3, 4, 2, 2, 2, torch.float32)
    with pytest.raises((ValueError, RuntimeError)):
        _run(backend, hidden, delta[:, :3], gate, rows, cols, owner)
    with pytest.raises((ValueError, RuntimeError, IndexError)):
        _run(backend, hidden, delta, gate, rows + 5, cols, owner)
    with pytest.raises((ValueError, RuntimeError, IndexError)):
        _run(backend, hidden, delta, gate, rows, cols, owner + 7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("repeat", [False, True])
def test_cuda_matches_fp64(dtype, shape, repeat):
    """Whatever serves CUDA (Triton here) against the fp64 oracle, forward and gradient."""
    B, T, d, u_in, u_out, n = shape
    args = problem(B, T, d, u_in, u_out, n, dtype, torch.float32, True, repeat, seed=sum(shape))
    want = oracle(*args)
    ref = mod.inject_reference(*args)
    cuda_args = [a.cuda() for a in args]
    got = torch.ops.metake_fast.gated_delta_inject(*cuda_args).cpu()
    err = (got.double() - want).abs().max().item()
    ref_err = (ref.double() - want).abs().max().item()
    assert err <= 2 * ref_err + 1e-6 * (1 + want.abs().max().item()), (err, ref_err)
    delta = cuda_args[1].clone().requires_grad_(True)
    out = metake_fast.ops.gated_delta_inject(cuda_args[0], delta, *cuda_args[3:], gate=cuda_args[2])
    (g,) = torch.autograd.grad(out.float().sum(), delta)
    w = torch.ones(B, T, d, dtype=torch.float64)
    S = torch.zeros(u_out, d, dtype=torch.float64)
    for r, c, o in zip(args[3].tolist(), args[4].tolist(), args[5].tolist()):
        S[o] += w[r, c]
    torch.testing.assert_close(g.cpu().double(), args[2].double() @ S, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gated", [True, False])
def test_public_api_rejects_out_of_range_indices(gated):
    """The public op validates CPU index ranges in Python, before any kernel runs (a message, never a crash)."""
    hidden, delta, gate, rows, cols, owner = problem(2, 3, 4, 2, 2, 2, torch.float32, gated=gated)
    before = hidden.clone()
    for bad, what in (
        ((rows + 2, cols, owner), "rows"),
        ((rows, cols - 5, owner), "cols"),
        ((rows, cols, owner + 2), "owner"),
    ):
        with pytest.raises(ValueError, match=what):
            metake_fast.ops.gated_delta_inject(hidden, delta, *bad, gate=gate)
        with pytest.raises(ValueError, match=what):
            mod.inject_reference(hidden, delta, gate, *bad)
    assert torch.equal(hidden, before)
    out = metake_fast.ops.gated_delta_inject(hidden, delta, rows, cols, owner, gate=gate)  # in range: fine
    torch.testing.assert_close(out, mod.inject_reference(hidden, delta, gate, rows, cols, owner))
