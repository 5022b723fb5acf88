"""Triton ``fused_target_logprob`` (forward: online log-sum-exp over vocabulary blocks) and its backward."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from metake_fast.ops.fused_target_logprob import (
    check_inputs,
    target_logprob_backward_reference,
    target_logprob_reference,
)

from ._common import dot_acc, interpreting, native_dot, needs_rne_bf16, num_sms, pow2_block, rne_bf16, same_device


@triton.jit
def _fused_target_logprob_kernel(
    H,
    W,
    T,
    MPART,
    SPART,
    TGT,
    n,
    V,
    d,
    blocks_per_split,
    n_splits,
    stride_h,
    stride_w,
    NATIVE: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    BD: tl.constexpr,
):
    """Rows ``i`` of one row block, vocabulary blocks ``[s·bps, (s+1)·bps)`` of split ``s``.

    Online log-sum-exp of ``z_iv = h_i · W_v`` (fp32 accumulation): for each
    vocabulary block, ``m' = max(m, max_v z_iv)``,
    ``s' = s·exp(m − m') + Σ_v exp(z_iv − m')``; writes the split's ``(m, s)``
    (the host merges splits: ``lse_i = logsumexp_s(m_is + log s_is)``). Split 0
    also writes the target logit ``h_i · W[t_i]``. Only ``BM × BV`` logits exist.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    ok_m = rm < n
    n_vblocks = tl.cdiv(V, BV)
    vb0 = pid_s * blocks_per_split
    vb1 = tl.minimum(vb0 + blocks_per_split, n_vblocks)
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BM,), dtype=tl.float32)
    for vb in range(vb0, vb1):
        rv = vb * BV + tl.arange(0, BV)
        ok_v = rv < V
        z = tl.zeros((BM, BV), dtype=tl.float32)
        for d0 in range(0, d, BD):
            rd = d0 + tl.arange(0, BD)
            ok_d = rd < d
            h = tl.load(H + rm[:, None] * stride_h + rd[None, :], mask=ok_m[:, None] & ok_d[None, :], other=0.0)
            w = tl.load(W + rv[:, None] * stride_w + rd[None, :], mask=ok_v[:, None] & ok_d[None, :], other=0.0)
            z = dot_acc(h, tl.trans(w), z, NATIVE)
        z = tl.where(ok_v[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(MPART + rm * n_splits + pid_s, m_i, mask=ok_m)
    tl.store(SPART + rm * n_splits + pid_s, s_i, mask=ok_m)
    if pid_s == 0:
        t = tl.load(T + rm, mask=ok_m, other=0)
        ok_t = ok_m & (t >= 0) & (t < V)
        tgt = tl.zeros((BM,), dtype=tl.float32)
        for d0 in range(0, d, BD):
            rd = d0 + tl.arange(0, BD)
            ok_d = rd < d
            h = tl.load(H + rm[:, None] * stride_h + rd[None, :], mask=ok_m[:, None] & ok_d[None, :], other=0.0)
            w = tl.load(W + t[:, None] * stride_w + rd[None, :], mask=ok_t[:, None] & ok_d[None, :], other=0.0)
            tgt += tl.sum(h.to(tl.float32) * w.to(tl.float32), axis=1)
        tl.store(TGT + rm, tgt, mask=ok_m)


@triton.jit
def _fused_target_logprob_backward_kernel(
    H,
    W,
    T,
    G,
    LSE,
    DZ,
    n,
    v0,
    c,
    d,
    stride_h,
    stride_w,
    NATIVE: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    BD: tl.constexpr,
):
    """The logit gradient of one vocabulary chunk ``[v0, v0 + c)``, one ``(BM, BV)`` tile:

    ``DZ[i, j] = g_i · (1[v0 + j = t_i] − exp(h_i · W_{v0+j} − lse_i))`` (fp32),
    so that ``∂h = DZ · W_chunk`` and ``∂W_chunk = DZᵀ · h`` (:func:`_matmul_kernel`).
    """
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rj = pid_v * BV + tl.arange(0, BV)
    ok_m = rm < n
    ok_j = rj < c
    rv = v0 + rj
    z = tl.zeros((BM, BV), dtype=tl.float32)
    for d0 in range(0, d, BD):
        rd = d0 + tl.arange(0, BD)
        ok_d = rd < d
        h = tl.load(H + rm[:, None] * stride_h + rd[None, :], mask=ok_m[:, None] & ok_d[None, :], other=0.0)
        w = tl.load(W + rv[:, None] * stride_w + rd[None, :], mask=ok_j[:, None] & ok_d[None, :], other=0.0)
        z = dot_acc(h, tl.trans(w), z, NATIVE)
    lse = tl.load(LSE + rm, mask=ok_m, other=0.0)
    g = tl.load(G + rm, mask=ok_m, other=0.0)
    t = tl.load(T + rm, mask=ok_m, other=-1)
    onehot = (rv[None, :] == t[:, None]).to(tl.float32)
    dz = g[:, None] * (onehot - tl.exp(z - lse[:, None]))
    tl.store(DZ + rm[:, None] * c + rj[None, :], dz, mask=ok_m[:, None] & ok_j[None, :])


@triton.jit
def _matmul_kernel(
    A,
    B,
    C,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    ACCUMULATE: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """``C[m, n] (+)= Σ_k A[m, k] · B[k, n]``: operands upcast to fp32, IEEE fp32 dot, one rounding into ``C``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    ok_m = rm < M
    ok_n = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        ok_k = rk < K
        a = tl.load(
            A + rm[:, None] * stride_am + rk[None, :] * stride_ak, mask=ok_m[:, None] & ok_k[None, :], other=0.0
        )
        b = tl.load(
            B + rk[:, None] * stride_bk + rn[None, :] * stride_bn, mask=ok_k[:, None] & ok_n[None, :], other=0.0
        )
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    ok = ok_m[:, None] & ok_n[None, :]
    ptr = C + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    if ACCUMULATE:
        acc += tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
    if RNE_BF16:
        tl.store(ptr, rne_bf16(acc), mask=ok)
    else:
        tl.store(ptr, acc.to(C.dtype.element_ty), mask=ok)


def _supported(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    ok = (torch.float32, torch.bfloat16, torch.float16)
    return hidden.dtype in ok and weight.dtype in ok


def _matmul(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, accumulate: bool) -> None:
    """``C (+)= A @ B`` for strided 2-D views (fp32 math, one rounding into ``C``).

    On a GPU this is cuBLAS on fp32 operands, the reference's own arithmetic: the
    IEEE-fp32 Triton GEMM below (no tensor cores, a long K loop in few programs)
    made the backward 40-90x slower than the reference on an H100
    (``bench/bench_triton.py``, 2026-11-27). The Triton GEMM still serves the
    interpreter, where the tests check it.
    """
    if not interpreting():
        prod = A.to(torch.float32) @ B.to(torch.float32)
        if accumulate:
            prod += C
        C.copy_(prod)
        return
    M, K = A.shape
    N = B.shape[1]
    big = not interpreting()
    bm = pow2_block(M, 16, 64 if big else 32)
    bn = pow2_block(N, 16, 128 if big else 32)
    bk = pow2_block(K, 16, 32)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _matmul_kernel[grid](
        A,
        B,
        C,
        M,
        N,
        K,
        A.stride(0),
        A.stride(1),
        B.stride(0),
        B.stride(1),
        C.stride(0),
        C.stride(1),
        ACCUMULATE=accumulate,
        RNE_BF16=needs_rne_bf16(C),
        BM=bm,
        BN=bn,
        BK=bk,
        num_warps=4,
    )


def fused_target_logprob(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 8192, splits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log softmax(hidden @ weightᵀ)[targets], lse)``, both (n,) fp32; fp64 falls back to the reference.

    ``chunk`` is validated like the reference but the kernel never holds more
    than a ``BM × BV`` logit tile; ``splits`` (vocabulary splits) overrides the
    heuristic. Targets must lie in ``[0, V)`` (not checked: that would sync).
    """
    check_inputs(hidden, weight, targets, chunk)
    same_device(hidden, weight, targets)
    if not _supported(hidden, weight):
        return target_logprob_reference(hidden, weight, targets, chunk)
    n, d = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    if n == 0 or V == 0:
        lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
        tgt = torch.zeros((n,), dtype=torch.float32, device=dev)
        if n and d:
            tgt = (hidden.float() * weight[targets].float()).sum(1)
        return tgt - lse, lse
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    targets = targets.contiguous()
    if interpreting():
        bm, bv, bd = pow2_block(n, 16, 16), 32, pow2_block(d, 16, 32)
    else:
        bm, bv, bd = pow2_block(n, 16, 64), 128, pow2_block(d, 16, 64)
    row_blocks = triton.cdiv(n, bm)
    n_vblocks = triton.cdiv(V, bv)
    if splits is None:
        splits = 4 if interpreting() else triton.cdiv(4 * num_sms(dev), row_blocks)
    bps = triton.cdiv(n_vblocks, max(1, min(int(splits), n_vblocks)))
    splits = triton.cdiv(n_vblocks, bps)
    mpart = torch.empty((n, splits), dtype=torch.float32, device=dev)
    spart = torch.empty((n, splits), dtype=torch.float32, device=dev)
    tgt = torch.empty((n,), dtype=torch.float32, device=dev)
    _fused_target_logprob_kernel[(row_blocks, splits)](
        hidden,
        weight,
        targets,
        mpart,
        spart,
        tgt,
        n,
        V,
        d,
        bps,
        splits,
        hidden.stride(0),
        weight.stride(0),
        NATIVE=native_dot(hidden, weight),
        BM=bm,
        BV=bv,
        BD=bd,
        num_warps=4,
    )
    lse = torch.logsumexp(mpart + torch.log(spart), dim=1)
    return tgt - lse, lse


def fused_target_logprob_backward(
    grad: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    chunk: int,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂hidden, ∂weight or an empty tensor)``; per vocabulary chunk one ``n × chunk`` fp32 logit gradient."""
    check_inputs(hidden, weight, targets, chunk)
    same_device(grad, hidden, weight, targets, lse)
    if not _supported(hidden, weight):
        return target_logprob_backward_reference(grad, hidden, weight, targets, lse, chunk, weight_grad)
    n, d = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    targets = targets.contiguous()
    g = grad.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    gh = torch.zeros((n, d), dtype=torch.float32, device=dev)
    gw = torch.empty_like(weight) if weight_grad else hidden.new_empty((0,))
    if n == 0 or V == 0 or d == 0:
        if weight_grad:
            gw.zero_()
        return gh.to(hidden.dtype), gw
    c = min(int(chunk), V)
    dz_buf = torch.empty((n * c,), dtype=torch.float32, device=dev)
    if interpreting():
        bm, bv, bd = pow2_block(n, 16, 16), 32, pow2_block(d, 16, 32)
    else:
        bm, bv, bd = pow2_block(n, 16, 64), 128, pow2_block(d, 16, 64)
    native = native_dot(hidden, weight)
    for v0 in range(0, V, c):
        cc = min(c, V - v0)
        dzc = dz_buf[: n * cc].view(n, cc)
        _fused_target_logprob_backward_kernel[(triton.cdiv(n, bm), triton.cdiv(cc, bv))](
            hidden,
            weight,
            targets,
            g,
            lse,
            dzc,
            n,
            v0,
            cc,
            d,
            hidden.stride(0),
            weight.stride(0),
            NATIVE=native,
            BM=bm,
            BV=bv,
            BD=bd,
            num_warps=4,
        )
        _matmul(dzc, weight[v0 : v0 + cc], gh, accumulate=True)  # ∂h += DZ · W_chunk
        if weight_grad:
            _matmul(dzc.T, hidden, gw[v0 : v0 + cc], accumulate=False)  # ∂W_chunk = DZᵀ · h
    return gh.to(hidden.dtype), gw
