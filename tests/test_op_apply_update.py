"""apply_update_: every built CPU backend vs an fp64 oracle, both weight orientations."""

from __future__ import annotations

import sys

import pytest
import torch
from _ops import cpp_kernel_built

import metake_fast  # noqa: F401

ref_mod = sys.modules["metake_fast.ops.apply_update"]


BACKENDS = [
    "reference",
    pytest.param("cpp", marks=pytest.mark.skipif(not cpp_kernel_built("apply_update_"), reason="_C not built")),
]


def _run(backend, W, R, Y, transposed):
    if backend == "reference":
        ref_mod.apply_update_reference(W, R, Y, transposed)
    else:
        torch.ops.metake_fast.apply_update_(W, R, Y, transposed)


SHAPES = [(1, 1, 1), (7, 13, 3), (13, 7, 100), (57, 130, 11), (127, 33, 200), (100, 70, 5)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fdtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d_v,d_k,u", SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_matches_fp64(backend, wdtype, fdtype, d_v, d_k, u, transposed):
    g = torch.Generator().manual_seed(d_v * 7 + d_k * 13 + u)
    W0 = torch.randn((d_k, d_v) if transposed else (d_v, d_k), generator=g).to(wdtype)
    R = (torch.randn(d_v, u, generator=g) * 0.1).to(fdtype)
    Y = torch.randn(d_k, u, generator=g).to(fdtype)
    want = W0.to(torch.float64, copy=True)
    ref_mod.apply_update_reference(want, R.double(), Y.double(), transposed)
    base = W0.clone()
    ref_mod.apply_update_reference(base, R, Y, transposed)
    got = W0.clone()
    _run(backend, got, R, Y, transposed)
    assert got.dtype == wdtype
    err = (got.double() - want).abs().max().item()
    ref_err = (base.double() - want).abs().max().item()
    assert err <= 2 * ref_err + 1e-6 * (1 + want.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_W(backend):
    base = torch.zeros(10, 16)
    W = base[:, ::2]
    R, Y = torch.randn(10, 3), torch.randn(8, 3)
    _run(backend, W, R, Y, False)
    torch.testing.assert_close(W, R @ Y.T)


@pytest.mark.skipif(not cpp_kernel_built("apply_update_"), reason="_C not built")
def test_cpp_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match="shape mismatch"):
        torch.ops.metake_fast.apply_update_(torch.zeros(4, 5), torch.zeros(4, 2), torch.zeros(6, 2), False)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_opcheck(wdtype, transposed):
    W = torch.randn((13, 7) if transposed else (7, 13)).to(wdtype)
    torch.library.opcheck(torch.ops.metake_fast.apply_update_, (W, torch.randn(7, 3), torch.randn(13, 3), transposed))
