"""Triton kernels on CPU tensors under ``TRITON_INTERPRET=1`` against an fp64 oracle.

Each kernel's error against the fp64 reference must stay within twice the
error of the PyTorch reference in the same precision (plus a tiny floor).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported (read at @triton.jit time)

pytest.importorskip("triton")

from metake_fast.ops import (  # noqa: E402
    apply_update_reference,
    second_moment_accumulate_reference,
    target_logprob_backward_reference,
    target_logprob_reference,
)

pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _kernels_package():
    """``metake_fast.kernels``, installed or from the source tree (``kernels/``)."""
    from metake_fast.ops.backends import kernels_package

    return kernels_package()


def _kernel_module(name: str):
    """A kernel module whose ``@triton.jit`` functions run in the interpreter (reloaded if built otherwise)."""
    _kernels_package()
    common = importlib.import_module("metake_fast.kernels._common")
    mod = importlib.import_module(f"metake_fast.kernels.{name}")
    kernel = getattr(mod, f"_{name}_kernel")
    if type(kernel).__name__ != "InterpretedFunction":  # imported before TRITON_INTERPRET was set
        importlib.reload(common)
        mod = importlib.reload(mod)
    return mod


@pytest.fixture(scope="module", autouse=True)
def _interpreter_works():
    """Skip the tier when Triton's interpreter cannot run a kernel on CPU tensors here."""
    try:
        mod = _kernel_module("apply_update")
        W = torch.zeros(3, 5)
        mod.apply_update_(W, torch.ones(3, 1), torch.ones(5, 1))
    except Exception as exc:  # pragma: no cover - depends on the Triton build
        pytest.skip(f"Triton interpreter unusable with CPU tensors: {type(exc).__name__}: {exc}")
    if not torch.equal(W, torch.ones(3, 5)):  # pragma: no cover
        pytest.skip("Triton interpreter gives wrong results")


def _err(x: torch.Tensor, ref64: torch.Tensor) -> float:
    return (x.double() - ref64).abs().max().item() if ref64.numel() else 0.0


def _floor(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    scale = 1.0 + (ref64.abs().max().item() if ref64.numel() else 0.0)
    if dtype in (torch.bfloat16, torch.float16):
        return 0.5 * torch.finfo(dtype).eps * scale  # half an ulp of the largest entry
    return 1e-6 * scale


def assert_close_as_reference(got, ref, ref64, what=""):
    """``|got − ref64| <= 2 |ref − ref64| + floor`` (both in the same precision)."""
    e_got, e_ref = _err(got, ref64), _err(ref, ref64)
    bound = 2 * e_ref + _floor(ref64, got.dtype)
    assert e_got <= bound, f"{what}: kernel error {e_got:.3e} > 2 x reference error {e_ref:.3e} + floor"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------
# second_moment_accumulate
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,d,block,splits",
    [(1, 1, None, None), (1, 7, None, None), (13, 7, None, None), (7, 13, 16, None), (50, 37, 16, 1), (50, 37, 16, 3)],
)
@pytest.mark.parametrize("masked", [False, True])
def test_second_moment_accumulate(dtype, n, d, block, splits, masked):
    mod = _kernel_module("second_moment_accumulate")
    g = _gen(n * 100 + d)
    X = torch.randn(n, d, generator=g).to(dtype)
    mask = (torch.rand(n, generator=g) > 0.3) if masked else None
    A = torch.randn(d, d, generator=g)
    S0 = A + A.T  # symmetric, as a running second moment is
    S, S_ref = S0.clone(), S0.clone()
    mod.second_moment_accumulate(S, X, mask, block=block, splits=splits)
    second_moment_accumulate_reference(S_ref, X, mask)
    Xk = X.double() if mask is None else X.double()[mask]
    S64 = S0.double() + Xk.T @ Xk
    assert_close_as_reference(S, S_ref, S64, f"S {dtype} n={n} d={d}")
    torch.testing.assert_close(S, S.T, rtol=0, atol=1e-5 * (1 + S.abs().max().item()))


def test_second_moment_edge_cases():
    mod = _kernel_module("second_moment_accumulate")
    X = torch.randn(9, 20)
    S = torch.randn(20, 20)
    before = S.clone()
    mod.second_moment_accumulate(S, X, torch.zeros(9, dtype=torch.bool))  # everything masked
    assert torch.equal(S, before)
    mod.second_moment_accumulate(S, X[:0])  # no rows
    assert torch.equal(S, before)
    S64, S64_ref = before.double(), before.double()  # fp64 S: reference fallback, identical
    mod.second_moment_accumulate(S64, X, None)
    second_moment_accumulate_reference(S64_ref, X, None)
    assert torch.equal(S64, S64_ref)
    S_nc = before.clone().T  # non-contiguous S is updated in place
    mod.second_moment_accumulate(S_nc, X.double())  # fp64 X into fp32 S: rounded like the reference
    ref = before.clone().T
    second_moment_accumulate_reference(ref, X.double(), None)
    torch.testing.assert_close(S_nc, ref, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError):
        mod.second_moment_accumulate(torch.zeros(3, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        mod.second_moment_accumulate(torch.zeros(3, 3, dtype=torch.float16), torch.zeros(2, 3))


# ---------------------------------------------------------------------------
# apply_update_
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("d_v,d_k,u", [(1, 1, 1), (1, 7, 3), (13, 7, 2), (7, 13, 20), (37, 50, 70)])
def test_apply_update(dtype, transposed, d_v, d_k, u):
    mod = _kernel_module("apply_update")
    g = _gen(d_v * 1000 + d_k * 10 + u)
    shape = (d_k, d_v) if transposed else (d_v, d_k)
    W0 = torch.randn(shape, generator=g).to(dtype)
    R = torch.randn(d_v, u, generator=g)
    Y = torch.randn(d_k, u, generator=g)
    W, W_ref = W0.clone(), W0.clone()
    mod.apply_update_(W, R, Y, transposed)
    apply_update_reference(W_ref, R, Y, transposed)
    delta = R.double() @ Y.double().T
    W64 = W0.double() + (delta.T if transposed else delta)
    assert W.dtype == dtype
    assert_close_as_reference(W, W_ref, W64, f"W {dtype} transposed={transposed}")


def test_apply_update_edge_cases():
    mod = _kernel_module("apply_update")
    g = _gen(7)
    W0 = torch.randn(6, 9, generator=g).to(torch.bfloat16)
    R, Y = torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g)
    # a strided view (a Conv1D weight seen as its transpose) is updated in place
    base = W0.T.contiguous()
    view = base.T
    mod.apply_update_(view, R, Y, False)
    ref = W0.clone()
    apply_update_reference(ref, R, Y, False)
    torch.testing.assert_close(base.T, ref, rtol=0, atol=0)
    # u = 0: unchanged
    W = W0.clone()
    mod.apply_update_(W, R[:, :0], Y[:, :0], False)
    assert torch.equal(W, W0)
    # fp64 factors: the reference path, bit-identical
    W, W_ref = W0.clone(), W0.clone()
    mod.apply_update_(W, R.double(), Y.double(), False)
    apply_update_reference(W_ref, R.double(), Y.double(), False)
    assert torch.equal(W, W_ref)
    with pytest.raises(ValueError):
        mod.apply_update_(W, R, Y, True)


# ---------------------------------------------------------------------------
# fused_target_logprob (forward and backward)
# ---------------------------------------------------------------------------

LOGPROB_SHAPES = [(1, 1, 1, 4), (1, 7, 13, 5), (7, 13, 100, 32), (13, 33, 257, 64)]


def _logprob_inputs(n, d, V, dtype, seed=0):
    g = _gen(seed + n * 7 + d * 13 + V)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = torch.randn(V, d, generator=g).to(dtype)
    t = torch.randint(0, V, (n,), generator=g)
    return h, w, t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,V,chunk", LOGPROB_SHAPES)
@pytest.mark.parametrize("splits", [1, None])
def test_fused_target_logprob_forward(dtype, n, d, V, chunk, splits):
    mod = _kernel_module("fused_target_logprob")
    h, w, t = _logprob_inputs(n, d, V, dtype)
    lp, lse = mod.fused_target_logprob(h, w, t, chunk, splits=splits)
    lp_ref, lse_ref = target_logprob_reference(h, w, t, chunk)
    lp64, lse64 = target_logprob_reference(h.double(), w.double(), t, chunk)
    assert lp.dtype == lse.dtype == torch.float32 and lp.shape == lse.shape == (n,)
    assert_close_as_reference(lp, lp_ref, lp64, f"logprob {dtype}")
    assert_close_as_reference(lse, lse_ref, lse64, f"lse {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,V,chunk", LOGPROB_SHAPES)
@pytest.mark.parametrize("weight_grad", [True, False])
def test_fused_target_logprob_backward(dtype, n, d, V, chunk, weight_grad):
    mod = _kernel_module("fused_target_logprob")
    h, w, t = _logprob_inputs(n, d, V, dtype, seed=1)
    grad = torch.randn(n, generator=_gen(n))
    _, lse = target_logprob_reference(h, w, t, chunk)
    _, lse64 = target_logprob_reference(h.double(), w.double(), t, chunk)
    gh, gw = mod.fused_target_logprob_backward(grad, h, w, t, lse, chunk, weight_grad)
    gh_ref, gw_ref = target_logprob_backward_reference(grad, h, w, t, lse, chunk, weight_grad)
    gh64, gw64 = target_logprob_backward_reference(grad.double(), h.double(), w.double(), t, lse64, chunk, weight_grad)
    assert gh.dtype == dtype and gh.shape == h.shape
    assert_close_as_reference(gh, gh_ref, gh64, f"grad hidden {dtype}")
    if weight_grad:
        assert gw.dtype == dtype and gw.shape == w.shape
        assert_close_as_reference(gw, gw_ref, gw64, f"grad weight {dtype}")
    else:
        assert gw.numel() == 0


def test_fused_target_logprob_matches_autograd():
    """The backward is the gradient of the forward (fp32, against autograd through plain log_softmax)."""
    mod = _kernel_module("fused_target_logprob")
    h, w, t = _logprob_inputs(5, 11, 70, torch.float32, seed=3)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    grad = torch.randn(5, generator=_gen(5))
    torch.log_softmax(hh @ ww.T, dim=1).gather(1, t[:, None])[:, 0].backward(grad)
    lp, lse = mod.fused_target_logprob(h, w, t, 16)
    torch.testing.assert_close(lp, torch.log_softmax(h @ w.T, 1).gather(1, t[:, None])[:, 0], rtol=1e-5, atol=1e-5)
    gh, gw = mod.fused_target_logprob_backward(grad, h, w, t, lse, 16, True)
    torch.testing.assert_close(gh, hh.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, ww.grad, rtol=1e-5, atol=1e-5)


def test_fused_target_logprob_fp64_falls_back():
    mod = _kernel_module("fused_target_logprob")
    h, w, t = _logprob_inputs(3, 5, 9, torch.float64)
    got = mod.fused_target_logprob(h, w, t, 4)
    ref = target_logprob_reference(h, w, t, 4)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    with pytest.raises(ValueError):
        mod.fused_target_logprob(h, w, t, 0)


# ---------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------


def test_import_does_not_load_triton():
    """Neither ``import metake_fast`` nor loading the kernel package (installed or from ``kernels/``) imports Triton."""
    code = (
        "import sys\n"
        "import metake_fast\n"
        "from metake_fast.ops.backends import kernels_package\n"
        "from metake_fast.ops.triton_registry import TRITON_OPS\n"
        "m = kernels_package()\n"
        "assert set(TRITON_OPS) >= {'apply_update_', 'fused_target_logprob'}, TRITON_OPS\n"
        "assert sys.modules['metake_fast.kernels'] is m and metake_fast.kernels is m\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=str(ROOT), timeout=120)


def test_register_triton_kernels():
    """Registration for the CUDA key works without a GPU and records the provider."""
    _kernels_package()
    from metake_fast.ops import triton_registry as pkg
    from metake_fast.ops.registry import PROVIDERS, resolved_backends

    pkg.register_triton_kernels()
    pkg.register_triton_kernels()  # idempotent
    backends = resolved_backends()
    for name in pkg.TRITON_OPS:
        assert backends[name]["cuda"] in ("Triton", PROVIDERS.get((name, "CUDA")))
        assert backends[name]["cpu"] != "Triton"


def test_bench_harness_smoke():
    """``bench/bench_triton.py --smoke`` runs every case on tiny CPU shapes under the interpreter."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_triton.py"), "--smoke", "--no-save", "--reps", "1"],
        check=True,
        env=env,
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    for op in ("second_moment_accumulate", "apply_update_", "fused_target_logprob", "fused_target_logprob_backward"):
        assert op in out


# ---------------------------------------------------------------------------
# gated_delta_inject
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1), (2, 5, 7, 3, 2, 4), (3, 13, 70, 5, 5, 9), (2, 9, 33, 4, 3, 0)])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("repeat", [False, True])
def test_gated_delta_inject(dtype, shape, gated, repeat):
    from test_op_gated_delta_inject import oracle, problem

    from metake_fast.ops import inject_reference

    kmod = _kernel_module("gated_delta_inject")
    B, T, d, u_in, u_out, n = shape
    args = problem(B, T, d, u_in, u_out, n, dtype, torch.float32, gated, repeat, seed=sum(shape))
    got = kmod.gated_delta_inject(*args)
    assert got.dtype == dtype
    assert_close_as_reference(got, inject_reference(*args), oracle(*args), f"inject {dtype} {shape}")
    # fp64 delta: the reference path, bit-identical
    args64 = (args[0], args[1].double(), None if args[2] is None else args[2].double(), *args[3:])
    assert torch.equal(kmod.gated_delta_inject(*args64), inject_reference(*args64))
