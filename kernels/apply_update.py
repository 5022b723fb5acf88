"""Triton ``apply_update_``: ``W += R Yᵀ`` in place (either orientation), fp32 math rounded once into ``W``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from metake_fast.ops.apply_update import apply_update_reference, check_inputs

from ._common import interpreting, needs_rne_bf16, pow2_block, rne_bf16, same_device


@triton.jit
def _apply_update_kernel(
    W,
    A,
    B,
    M,
    N,
    U,
    stride_wm,
    stride_wn,
    stride_a,
    stride_b,
    RNE_BF16: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """One ``(BM, BN)`` tile of ``W[m, n] = round(W[m, n] + Σ_r A[m, r] · B[n, r])``.

    ``A`` and ``B`` are fp32 ``(M, U)`` and ``(N, U)`` (``A = R, B = Y`` for an
    ``nn.Linear`` weight, ``A = Y, B = R`` for a transposed ``Conv1D`` weight);
    the sum is an IEEE fp32 dot, ``W`` is upcast to fp32 for the add and rounded
    to its dtype once on store.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    ok_m = rm < M
    ok_n = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, U, BK):
        rk = r0 + tl.arange(0, BK)
        ok_k = rk < U
        a = tl.load(A + rm[:, None] * stride_a + rk[None, :], mask=ok_m[:, None] & ok_k[None, :], other=0.0)
        b = tl.load(B + rn[:, None] * stride_b + rk[None, :], mask=ok_n[:, None] & ok_k[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    ok = ok_m[:, None] & ok_n[None, :]
    ptr = W + rm[:, None] * stride_wm + rn[None, :] * stride_wn
    w = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
    if RNE_BF16:
        tl.store(ptr, rne_bf16(w + acc), mask=ok)
    else:
        tl.store(ptr, (w + acc).to(W.dtype.element_ty), mask=ok)


def apply_update_(W: torch.Tensor, R: torch.Tensor, Y: torch.Tensor, transposed: bool = False) -> None:
    """``W += R Yᵀ`` (``transposed``: ``W += Y Rᵀ``) in place; fp64 factors or weight fall back to the reference."""
    check_inputs(W, R, Y, transposed)
    same_device(W, R, Y)
    if torch.float64 in (W.dtype, R.dtype, Y.dtype) or W.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return apply_update_reference(W, R, Y, transposed)
    if W.numel() == 0 or R.shape[1] == 0:
        return None
    R = R.to(torch.float32).contiguous()
    Y = Y.to(torch.float32).contiguous()
    A, B = (Y, R) if transposed else (R, Y)
    M, N = W.shape
    U = R.shape[1]
    if interpreting():
        bm = bn = 32
    else:
        bm, bn = 64, 128
    bm = pow2_block(M, 16, bm)
    bn = pow2_block(N, 16, bn)
    bk = pow2_block(U, 16, 32)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _apply_update_kernel[grid](
        W,
        A,
        B,
        M,
        N,
        U,
        W.stride(0),
        W.stride(1),
        A.stride(0),
        B.stride(0),
        RNE_BF16=needs_rne_bf16(W),
        BM=bm,
        BN=bn,
        BK=bk,
        num_warps=4,
    )
    return None
