"""Every op on a real CUDA device against an fp64 oracle (skipped without a GPU).

Two tiers:
- ``torch.ops.metake_fast.*`` on CUDA tensors: whatever serves the ``CUDA`` key
  (the C++/CUDA extension where it registered, else the Triton kernel, else the
  reference), as the editor calls it.
- the Triton launchers called directly, compiled for the GPU (not the
  interpreter), also for the ops the CUDA extension takes over.

The rule is the project's: the kernel's error against the fp64 result is at most
twice the error of the PyTorch reference run in the same precision on the same
device (plus half an ulp of the largest entry, for results that are exact in both).
Shapes include odd sizes and SmolLM2-135M's (d_k 1536, d_v 576, V 49152).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("TRITON_INTERPRET is set: this tier compiles for the GPU", allow_module_level=True)

import metake_fast  # noqa: E402,F401  (declares the ops and registers the CUDA providers)
from metake_fast.ops import (  # noqa: E402
    apply_update_reference,
    kl_reference,
    resolved_backends,
    second_moment_accumulate_reference,
    target_logprob_backward_reference,
    target_logprob_reference,
)

DEV = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPS = torch.ops.metake_fast


def _err(x: torch.Tensor, ref64: torch.Tensor) -> float:
    return (x.double().cpu() - ref64.cpu()).abs().max().item() if ref64.numel() else 0.0


def assert_close_as_reference(got, ref, ref64, what=""):
    """``|got − ref64| <= 2 |ref − ref64| + floor``, ``got`` and ``ref`` in the same precision."""
    scale = 1.0 + (ref64.abs().max().item() if ref64.numel() else 0.0)
    eps = torch.finfo(got.dtype).eps if got.dtype.is_floating_point else 0.0
    floor = 0.5 * eps * scale if got.dtype in (torch.bfloat16, torch.float16) else 1e-6 * scale
    e_got, e_ref = _err(got, ref64), _err(ref, ref64)
    assert e_got <= 2 * e_ref + floor, f"{what}: error {e_got:.3e} > 2 x reference error {e_ref:.3e} + {floor:.1e}"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_backends_resolved():
    """The compiled providers serve CUDA: nothing the extension or Triton covers falls back silently."""
    rows = resolved_backends()
    print("\n" + "\n".join(f"{k}: {v}" for k, v in rows.items()))
    try:
        import triton  # noqa: F401

        have_triton = True
    except ImportError:
        have_triton = False
    for name in ("second_moment_accumulate", "apply_update_", "fused_target_logprob", "gated_delta_inject"):
        if have_triton:
            assert rows[name]["cuda"] != "reference (PyTorch)", (name, rows[name])
    if have_triton:
        from metake_fast.ops.triton_registry import OVERRIDE_EXTENSION

        for name in OVERRIDE_EXTENSION:
            assert rows[name]["cuda"] == "Triton", (name, rows[name])


@pytest.fixture
def extension_only():
    """The C++/CUDA extension's kernels alone on ``CUDA`` (the Triton registrations dropped, then restored)."""
    try:
        from metake_fast import _C
    except ImportError:
        pytest.skip("C++ extension not built")
    if not _C.with_cuda:
        pytest.skip("C++ extension built without CUDA")
    from metake_fast.ops import triton_registry as k

    lib = k._LIB
    if lib is not None:
        lib._destroy()
        k._LIB = None
    yield
    if lib is not None:
        k.register_triton_kernels()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(13, 7), (300, 129), (4096, 576)])
def test_extension_second_moment_accumulate(extension_only, dtype, n, d):
    """The extension's CUDA kernel (what serves the op when Triton is absent) against fp64."""
    g = _gen(n + 3 * d)
    X = torch.randn(n, d, generator=g).to(dtype)
    mask = torch.rand(n, generator=g) > 0.3
    S0 = torch.randn(d, d, generator=g)
    S0 = S0 + S0.T
    Xk = X.double()[mask]
    S64 = S0.double() + Xk.T @ Xk
    S, S_ref = S0.to(DEV), S0.to(DEV)
    OPS.second_moment_accumulate(S, X.to(DEV), mask.to(DEV))
    second_moment_accumulate_reference(S_ref, X.to(DEV), mask.to(DEV))
    assert_close_as_reference(S, S_ref, S64, f"extension S {dtype} n={n} d={d}")


# ---------------------------------------------------------------------------------------- second moment
SM_SHAPES = [(1, 1), (13, 7), (50, 37), (300, 129), (4096, 576), (2048, 1536)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", SM_SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_second_moment_accumulate(dtype, n, d, masked):
    g = _gen(n + 7 * d)
    X = torch.randn(n, d, generator=g).to(dtype)
    mask = (torch.rand(n, generator=g) > 0.3) if masked else None
    A = torch.randn(d, d, generator=g)
    S0 = A + A.T
    Xk = X.double() if mask is None else X.double()[mask]
    S64 = S0.double() + Xk.T @ Xk
    Xc, mc = X.to(DEV), None if mask is None else mask.to(DEV)
    S, S_ref = S0.to(DEV), S0.to(DEV)
    OPS.second_moment_accumulate(S, Xc, mc)
    second_moment_accumulate_reference(S_ref, Xc, mc)
    assert_close_as_reference(S, S_ref, S64, f"dispatch S {dtype} n={n} d={d}")
    torch.testing.assert_close(S, S.T, rtol=0, atol=1e-5 * (1 + S.abs().max().item()))
    tri = _triton("second_moment_accumulate")
    if tri is not None:
        S_t = S0.to(DEV)
        tri.second_moment_accumulate(S_t, Xc, mc)
        assert_close_as_reference(S_t, S_ref, S64, f"triton S {dtype} n={n} d={d}")


# ---------------------------------------------------------------------------------------- apply update
AU_SHAPES = [(1, 1, 1), (13, 7, 2), (37, 50, 70), (576, 1536, 100), (333, 1000, 17)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("d_v,d_k,u", AU_SHAPES)
def test_apply_update(dtype, transposed, d_v, d_k, u):
    g = _gen(d_v * 1000 + d_k * 10 + u)
    shape = (d_k, d_v) if transposed else (d_v, d_k)
    W0 = torch.randn(shape, generator=g).to(dtype)
    R = torch.randn(d_v, u, generator=g) * 0.1
    Y = torch.randn(d_k, u, generator=g)
    delta = R.double() @ Y.double().T
    W64 = W0.double() + (delta.T if transposed else delta)
    Rc, Yc = R.to(DEV), Y.to(DEV)
    W, W_ref = W0.to(DEV), W0.to(DEV)
    OPS.apply_update_(W, Rc, Yc, transposed)
    apply_update_reference(W_ref, Rc, Yc, transposed)
    assert W.dtype == dtype
    assert_close_as_reference(W, W_ref, W64, f"dispatch W {dtype} transposed={transposed}")
    tri = _triton("apply_update")
    if tri is not None:
        W_t = W0.to(DEV)
        tri.apply_update_(W_t, Rc, Yc, transposed)
        assert_close_as_reference(W_t, W_ref, W64, f"triton W {dtype} transposed={transposed}")


# ---------------------------------------------------------------------------------------- target log-prob
LP_SHAPES = [(1, 1, 1, 4), (7, 13, 100, 32), (13, 33, 257, 64), (64, 576, 49152, 8192), (5, 96, 3001, 1000)]


def _lp_inputs(n, d, V, dtype, seed):
    g = _gen(seed + n * 7 + d * 13 + V)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(V, d, generator=g) * d**-0.5 * 3).to(dtype)
    t = torch.randint(0, V, (n,), generator=g)
    return h, w, t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,V,chunk", LP_SHAPES)
def test_fused_target_logprob(dtype, n, d, V, chunk):
    h, w, t = _lp_inputs(n, d, V, dtype, seed=0)
    lp64, lse64 = target_logprob_reference(h.double(), w.double(), t, chunk)
    hc, wc, tc = h.to(DEV), w.to(DEV), t.to(DEV)
    lp_ref, lse_ref = target_logprob_reference(hc, wc, tc, chunk)
    lp, lse = OPS.fused_target_logprob(hc, wc, tc, chunk)
    assert lp.dtype == lse.dtype == torch.float32 and lp.shape == (n,)
    assert_close_as_reference(lp, lp_ref, lp64, f"logprob {dtype}")
    assert_close_as_reference(lse, lse_ref, lse64, f"lse {dtype}")
    # backward, both with and without the weight gradient
    grad = torch.randn(n, generator=_gen(n))
    gc = grad.to(DEV)
    for weight_grad in (False, True):
        gh, gw = OPS.fused_target_logprob_backward(gc, hc, wc, tc, lse_ref, chunk, weight_grad)
        gh_ref, gw_ref = target_logprob_backward_reference(gc, hc, wc, tc, lse_ref, chunk, weight_grad)
        gh64, gw64 = target_logprob_backward_reference(
            grad.double(), h.double(), w.double(), t, lse64, chunk, weight_grad
        )
        assert gh.dtype == dtype and gh.shape == h.shape
        assert_close_as_reference(gh, gh_ref, gh64, f"grad hidden {dtype} weight_grad={weight_grad}")
        if weight_grad:
            assert_close_as_reference(gw, gw_ref, gw64, f"grad weight {dtype}")


def test_fused_target_logprob_autograd_on_cuda():
    """The public op's gradient equals autograd through a plain fp64 log-softmax."""
    h, w, t = _lp_inputs(9, 40, 700, torch.float32, seed=3)
    hh = h.to(DEV).requires_grad_(True)
    lp = metake_fast.ops.fused_target_logprob(hh, w.to(DEV), t.to(DEV), chunk=128)
    (g,) = torch.autograd.grad(lp.sum(), hh)
    h64 = h.double().requires_grad_(True)
    ref = torch.log_softmax(h64 @ w.double().T, -1).gather(1, t[:, None])[:, 0]
    (g64,) = torch.autograd.grad(ref.sum(), h64)
    torch.testing.assert_close(lp.detach().cpu().double(), ref.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g.cpu().double(), g64, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------- fused KL
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,V,chunk", [(3, 7, 13, 4), (9, 33, 257, 64), (16, 576, 49152, 8192)])
def test_fused_kl(dtype, n, d, V, chunk):
    g = _gen(n + d + V)
    h = (torch.randn(n, d, generator=g) * 3).to(dtype)
    h0 = (h.double() + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)
    W = (torch.randn(V, d, generator=g) / d**0.5).to(dtype)
    kl64 = kl_reference(h.double(), h0.double(), W.double(), None, 0.0, chunk)[0]
    hc, h0c, Wc = h.to(DEV), h0.to(DEV), W.to(DEV)
    kl_ref = kl_reference(hc, h0c, Wc, None, 0.0, chunk)[0]
    kl = OPS.fused_kl(hc, h0c, Wc, None, 0.0, chunk)[0]
    assert_close_as_reference(kl, kl_ref, kl64, f"kl {dtype}")


# ---------------------------------------------------------------------------------------- helpers
def _triton(module: str):
    """The Triton kernel module, compiled for the GPU; None when Triton is not installed."""
    try:
        import importlib

        import triton  # noqa: F401
    except ImportError:
        return None
    from metake_fast.ops.backends import kernels_package

    kernels_package()
    return importlib.import_module(f"metake_fast.kernels.{module}")
