"""second_moment_accumulate: every built CPU backend vs an fp64 oracle."""

from __future__ import annotations

import sys

import pytest
import torch
from _ops import cpp_kernel_built

import metake_fast  # noqa: F401  (declares the ops, loads the extension if built)

ref_mod = sys.modules["metake_fast.ops.second_moment_accumulate"]


BACKENDS = [
    "reference",
    pytest.param(
        "cpp", marks=pytest.mark.skipif(not cpp_kernel_built("second_moment_accumulate"), reason="_C not built")
    ),
]


def _run(backend, S, X, mask):
    if backend == "reference":
        ref_mod.second_moment_accumulate_reference(S, X, mask)
    else:
        torch.ops.metake_fast.second_moment_accumulate(S, X, mask)


def _oracle(S, X, mask):
    S64 = S.to(torch.float64, copy=True)
    ref_mod.second_moment_accumulate_reference(S64, X.double(), mask)
    return S64


SHAPES = [(1, 1), (7, 13), (13, 7), (127, 64), (5, 200), (300, 401), (64, 520), (33, 193)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("sdtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_matches_fp64(backend, xdtype, sdtype, n, d, masked):
    g = torch.Generator().manual_seed(n * 1000 + d)
    X = torch.randn(n, d, generator=g).to(xdtype)
    S0 = torch.randn(d, d, generator=g)
    S0 = (S0 + S0.T).to(sdtype)
    mask = (torch.rand(n, generator=g) > 0.3) if masked else None
    want = _oracle(S0, X, mask)
    got = S0.clone()
    _run(backend, got, X, mask)
    base = S0.clone()
    ref_mod.second_moment_accumulate_reference(base, X, mask)
    err = (got.double() - want).abs().max().item()
    ref_err = (base.double() - want).abs().max().item()
    floor = 1e-12 if sdtype == torch.float64 else 1e-6 * (1 + want.abs().max().item())
    assert err <= 2 * ref_err + floor
    if backend == "cpp":
        assert torch.equal(got, got.T)  # symmetric in, exactly symmetric out


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_symmetric_S_is_exact_sum(backend):
    X = torch.randn(50, 300, dtype=torch.float64)
    S = torch.randn(300, 300, dtype=torch.float64)
    got = S.clone()
    _run(backend, got, X, None)
    torch.testing.assert_close(got, S + X.T @ X)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_and_empty(backend):
    S = torch.randn(9, 9)
    got = S.clone()
    _run(backend, got, torch.randn(4, 9), torch.zeros(4, dtype=torch.bool))
    assert torch.equal(got, S)
    _run(backend, got, torch.randn(0, 9), None)
    assert torch.equal(got, S)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_S(backend):
    base = torch.zeros(20, 40)
    S = base[:, ::2]
    X = torch.randn(6, 20)
    _run(backend, S, X, None)
    torch.testing.assert_close(S, X.T @ X)


@pytest.mark.skipif(not cpp_kernel_built("second_moment_accumulate"), reason="_C not built")
def test_cpp_rejects_bad_inputs():
    with pytest.raises(RuntimeError, match="square"):
        torch.ops.metake_fast.second_moment_accumulate(torch.zeros(3, 4), torch.zeros(2, 4), None)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.metake_fast.second_moment_accumulate(torch.zeros(3, 3, dtype=torch.bfloat16), torch.zeros(2, 3), None)
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.metake_fast.second_moment_accumulate(
            torch.zeros(3, 3), torch.zeros(2, 3), torch.ones(5, dtype=torch.bool)
        )


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_opcheck(xdtype):
    S = torch.randn(13, 13)
    S = S + S.T
    X = torch.randn(7, 13).to(xdtype)
    torch.library.opcheck(torch.ops.metake_fast.second_moment_accumulate, (S, X, None))
    torch.library.opcheck(torch.ops.metake_fast.second_moment_accumulate, (S, X, torch.rand(7) > 0.5))
