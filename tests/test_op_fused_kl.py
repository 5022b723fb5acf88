"""fused_kl: KL(softmax(W h) ‖ softmax(W h₀)) chunked over V, vs an fp64 full-vocabulary oracle, with gradients."""

from __future__ import annotations

import pytest
import torch

import metake_fast  # noqa: F401
from metake_fast.ops import fused_kl, kl_reference


def problem(n, d, V, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * scale).to(dtype)
    h0 = (h.double() + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)
    W = (torch.randn(V, d, generator=g) / d**0.5).to(dtype)
    return h, h0, W


def oracle(h, h0, W):
    lp = torch.log_softmax(h.double() @ W.double().T, -1)
    lq = torch.log_softmax(h0.double() @ W.double().T, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


SHAPES = [(1, 1, 1, 1), (3, 7, 13, 4), (5, 16, 100, 32), (9, 33, 257, 64), (4, 48, 1000, 1000), (2, 8, 50, 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n,d,V,chunk", SHAPES)
def test_forward_matches_fp64(dtype, n, d, V, chunk):
    h, h0, W = problem(n, d, V, dtype, seed=n + d + V, scale=3.0)
    kl, lse, lse0 = torch.ops.metake_fast.fused_kl(h, h0, W, None, 0.0, chunk)
    want = oracle(h, h0, W)
    # the same-precision full-vocabulary PyTorch computation (logits in the inputs' dtype,
    # softmax in fp32), for the error bound
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lp = torch.log_softmax((h @ W.T).to(acc), -1)
    lq = torch.log_softmax((h0 @ W.T).to(acc), -1)
    plain = (lp.exp() * (lp - lq)).sum(-1)
    err = (kl.double() - want).abs().max().item()
    plain_err = (plain.double() - want).abs().max().item()
    assert err <= 2 * plain_err + (1e-12 if dtype == torch.float64 else 2e-6) * (1 + want.abs().max().item())
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 5e-2
    for got_lse, x in ((lse, h), (lse0, h0)):
        torch.testing.assert_close(got_lse.double(), torch.logsumexp(x.double() @ W.double().T, -1), rtol=tol, atol=tol)
    assert (kl >= -1e-5).all()


@pytest.mark.parametrize("chunk", [3, 64, 10_000])
def test_gradient_matches_autograd_of_full_vocabulary(chunk):
    h, h0, W = problem(6, 12, 203, torch.float64, seed=3, scale=2.0)
    x = h.clone().requires_grad_(True)
    w = torch.rand(6, dtype=torch.float64)
    (fused_kl(x, h0, W, chunk) * w).sum().backward()
    y = h.clone().requires_grad_(True)
    (oracle(y, h0, W) * w).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,d,V,chunk", SHAPES)
def test_backward_matches_fp64(dtype, n, d, V, chunk):
    """Gradient error vs the fp64 full-vocabulary autograd, within 2x the same-precision full-vocabulary one."""
    h, h0, W = problem(n, d, V, dtype, seed=n * d + V, scale=2.0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.rand(n, dtype=acc, generator=torch.Generator().manual_seed(1)) + 0.5
    x64 = h.double().clone().requires_grad_(True)
    (oracle(x64, h0, W) * g.double()).sum().backward()
    xp = h.clone().requires_grad_(True)
    lp = torch.log_softmax((xp @ W.T).to(acc), -1)
    lq = torch.log_softmax((h0 @ W.T).to(acc), -1)
    ((lp.exp() * (lp - lq)).sum(-1) * g).sum().backward()  # xp.grad in the inputs' dtype
    kl, lse, lse0 = kl_reference(h, h0, W, None, 0.0, chunk)
    got = torch.ops.metake_fast.fused_kl_backward(g, h, h0, W, None, 0.0, lse0, kl, lse, chunk)
    assert got.dtype == h.dtype
    err = (got.double() - x64.grad).abs().max().item()
    plain_err = (xp.grad.double() - x64.grad).abs().max().item()
    floor = (1e-12 if dtype == torch.float64 else 2e-6) * (1 + x64.grad.abs().max().item())
    if dtype == torch.bfloat16:
        floor += 0.5 * torch.finfo(dtype).eps * x64.grad.abs().max().item()
    assert err <= 2 * plain_err + floor, (err, plain_err)


def test_gradcheck():
    h, h0, W = problem(3, 5, 17, torch.float64, seed=5)
    assert torch.autograd.gradcheck(lambda x: fused_kl(x, h0, W, 4), (h.clone().requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exactly_zero_at_the_reference(dtype):
    """Both log-normalisers come from the same GEMMs: KL(p ‖ p) is 0 up to fp32 rounding in any dtype."""
    h, _, W = problem(4, 9, 77, dtype, seed=9, scale=3.0)
    assert fused_kl(h, h, W, 16).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    h, h0, W = problem(3, 8, 40, dtype)
    torch.library.opcheck(torch.ops.metake_fast.fused_kl, (h, h0, W, None, 0.0, 16))
    kl, lse, lse0 = kl_reference(h, h0, W, None, 0.0, 16)
    torch.library.opcheck(
        torch.ops.metake_fast.fused_kl_backward, (torch.ones(3), h, h0, W, None, 0.0, lse0, kl, lse, 16)
    )


def test_bad_input():
    h, h0, W = problem(3, 8, 40, torch.float32)
    with pytest.raises(ValueError):
        fused_kl(h, h0[:2], W, 8)
    with pytest.raises(ValueError):
        fused_kl(h, h0, W[:, :5], 8)
    with pytest.raises(ValueError):
        fused_kl(h, h0, W, 0)


@pytest.mark.parametrize("softcap", [0.0, 2.5])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bias_and_softcap_against_full_vocabulary_autograd(softcap, with_bias):
    """GPT-J's unembedding bias and Gemma-2's logit soft-cap, forward and gradient, vs fp64."""
    h, h0, W = problem(5, 11, 97, torch.float64, seed=11, scale=3.0)
    b = torch.randn(97, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) if with_bias else None

    def logits(x):
        z = x @ W.T + (b if b is not None else 0)
        return torch.tanh(z / softcap) * softcap if softcap else z

    x = h.clone().requires_grad_(True)
    lp, lq = torch.log_softmax(logits(x), -1), torch.log_softmax(logits(h0), -1)
    want = (lp.exp() * (lp - lq)).sum(-1)
    w = torch.rand(5, dtype=torch.float64)
    (want * w).sum().backward()
    y = h.clone().requires_grad_(True)
    got = fused_kl(y, h0, W, 13, bias=b, softcap=softcap)
    (got * w).sum().backward()
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-9, atol=1e-11)
    b32 = None if b is None else b.float()
    torch.library.opcheck(torch.ops.metake_fast.fused_kl, (h.float(), h0.float(), W.float(), b32, softcap, 16))
