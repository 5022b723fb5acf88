"""fused_target_logprob (+ backward): every built CPU backend vs fp64 autograd of log_softmax."""

from __future__ import annotations

import sys

import pytest
import torch
from _ops import cpp_kernel_built

import metake_fast  # noqa: F401

ref_mod = sys.modules["metake_fast.ops.fused_target_logprob"]


BACKENDS = [
    "reference",
    pytest.param("cpp", marks=pytest.mark.skipif(not cpp_kernel_built("fused_target_logprob"), reason="_C not built")),
]


def _fwd(backend, h, w, t, chunk):
    if backend == "reference":
        return ref_mod.target_logprob_reference(h, w, t, chunk)
    return torch.ops.metake_fast.fused_target_logprob(h, w, t, chunk)


def _bwd(backend, g, h, w, t, lse, chunk, wg):
    if backend == "reference":
        return ref_mod.target_logprob_backward_reference(g, h, w, t, lse, chunk, wg)
    return torch.ops.metake_fast.fused_target_logprob_backward(g, h, w, t, lse, chunk, wg)


def _oracle(h, w, t, g):
    h64 = h.double().requires_grad_()
    w64 = w.double().requires_grad_()
    logp = torch.log_softmax(h64 @ w64.T, dim=1).gather(1, t[:, None]).squeeze(1)
    lse = torch.logsumexp((h64 @ w64.T).detach(), dim=1)
    gh, gw = torch.autograd.grad(logp, (h64, w64), g.double())
    return logp.detach(), lse, gh, gw


def _err(a, b):
    return (a.double() - b).abs().max().item() if a.numel() else 0.0


SHAPES = [(1, 1, 1, 1), (7, 13, 127, 16), (13, 7, 50, 64), (37, 64, 1000, 128), (5, 33, 1031, 700), (64, 20, 300, 8192)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,V,chunk", SHAPES)
def test_forward_backward_match_fp64(backend, dtype, n, d, V, chunk):
    gen = torch.Generator().manual_seed(n + d + V)
    h = torch.randn(n, d, generator=gen).to(dtype)
    w = (torch.randn(V, d, generator=gen) * 0.5).to(dtype)
    t = torch.randint(0, V, (n,), generator=gen)
    g = torch.randn(n, generator=gen)
    logp64, lse64, gh64, gw64 = _oracle(h, w, t, g)
    base = ref_mod.target_logprob_reference(h, w, t, chunk)
    got = _fwd(backend, h, w, t, chunk)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for a, b, want in ((got[0], base[0], logp64), (got[1], base[1], lse64)):
        assert _err(a, want) <= 2 * _err(b, want) + 1e-5 * (1 + want.abs().max().item())
    bgh, bgw = ref_mod.target_logprob_backward_reference(g, h, w, t, base[1], chunk, True)
    gh, gw = _bwd(backend, g, h, w, t, got[1], chunk, True)
    assert gh.dtype == dtype and gw.dtype == dtype and gh.shape == h.shape and gw.shape == w.shape
    for a, b, want in ((gh, bgh, gh64), (gw, bgw, gw64)):
        assert _err(a, want) <= 2 * _err(b, want) + 1e-5 * (1 + want.abs().max().item())
    gh2, gw2 = _bwd(backend, g, h, w, t, got[1], chunk, False)
    assert gw2.numel() == 0
    torch.testing.assert_close(gh2, gh)


@pytest.mark.parametrize("n,d,V,chunk", [(3, 5, 11, 4), (6, 4, 9, 100)])
def test_gradcheck_fp64(n, d, V, chunk):
    h = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (n,))
    fn = ref_mod.fused_target_logprob
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, t, chunk), (h, w))


def test_autograd_matches_log_softmax():
    h = torch.randn(9, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 40, (9,))
    out = ref_mod.fused_target_logprob(h, w, t, 7)
    out.sum().backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    want = torch.log_softmax(h2 @ w2.T, 1).gather(1, t[:, None]).squeeze(1)
    want.sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not cpp_kernel_built("fused_target_logprob"), reason="_C not built")
def test_cpp_rejects_out_of_range_targets():
    with pytest.raises(RuntimeError, match="targets must lie"):
        torch.ops.metake_fast.fused_target_logprob(torch.randn(2, 3), torch.randn(5, 3), torch.tensor([0, 5]), 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    h = torch.randn(5, 8).to(dtype).requires_grad_()
    w = torch.randn(30, 8).to(dtype).requires_grad_()
    t = torch.randint(0, 30, (5,))
    torch.library.opcheck(torch.ops.metake_fast.fused_target_logprob, (h, w, t, 7))
    lse = ref_mod.target_logprob_reference(h.detach(), w.detach(), t, 7)[1]
    for wg in (True, False):
        torch.library.opcheck(
            torch.ops.metake_fast.fused_target_logprob_backward,
            (torch.randn(5), h.detach(), w.detach(), t, lse, 7, wg),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
        )
