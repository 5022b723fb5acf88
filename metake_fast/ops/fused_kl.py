"""``fused_kl``: ``KL(p ‖ q)`` between the next-token distributions of two hidden states, chunked over V.

The essence (locality) term of the target optimisation (METHOD.md "Target (z)
optimisation") keeps the distribution at the KL prompts close to the unedited
model's: ``KL(p ‖ q)`` with ``p = softmax(W h)`` (current) and ``q = softmax(W h₀)``
(before the edit). Instead of storing ``log q`` (n×V floats, 64 MB for 128
requests at Llama-3's vocabulary) the op keeps the unedited *hidden state* ``h₀``
(n×d) and its log-normaliser, and recomputes ``W h₀`` chunk by chunk, so no
tensor of vocabulary size is ever allocated beyond one ``n × chunk`` block.

Shapes and dtypes
    hidden, ref_hidden: (n, d) final *normed* hidden states (float32/bf16/fp16/fp64).
    weight: (V, d) unembedding; bias: (V,) or None; softcap: ``c`` of ``c·tanh(z/c)`` or 0.
    chunk: vocabulary rows per block.

Returns ``(kl, lse, ref_lse)``, each (n,) fp32 (fp64 for fp64 inputs), from one
pass of online log-sum-exp over both sides: ``m`` (running max), ``s = Σ e^{z−m}``,
``a = Σ e^{z−m}(z − z₀)``, ``KL = a/s − (m + log s) + lse₀``. The GEMMs run in the
inputs' precision (bf16/fp16 tensor cores), the statistics in fp32.

Backward (w.r.t. ``hidden`` only; the unedited side is a constant):
``∂KL/∂z_v = p_v (z_v − lse − z₀_v + lse₀ − KL)``, ``∇h = Wᵀ (∂KL/∂z)`` chunk by chunk.

No compiled kernel, on purpose: the op is GEMM-bound (per chunk one ``[h; h₀] W_cᵀ``
product; the elementwise work is O(n·c) against O(n·c·d) for the GEMM). A C++
kernel fusing the online pass measured no gain over the chunked reference
(n 100, d 576, V 49152, one thread: forward 239 vs 231 ms, backward 327 vs 342 ms),
so the reference is the CPU and GPU implementation (MKL/cuBLAS GEMMs per chunk).
Against the editor's previous path (``log q`` stored as n×V, one ``log_softmax`` of
n×V per step) it costs the recomputed ``W h₀`` (one thread, same shape: fp32 283
vs 266 ms, bf16 203 vs 145 ms median, on the KL rows only, about 1/13 of the
unembedding rows) and allocates 2n×chunk instead of n×V tensors.
"""

from __future__ import annotations

import torch

from .registry import define_op

FWD_SCHEMA = (
    "(Tensor hidden, Tensor ref_hidden, Tensor weight, Tensor? bias, float softcap, int chunk)"
    " -> (Tensor, Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor grad, Tensor hidden, Tensor ref_hidden, Tensor weight, Tensor? bias, float softcap, Tensor ref_lse,"
    " Tensor kl, Tensor lse, int chunk) -> Tensor"
)


def check_inputs(hidden, ref_hidden, weight, chunk, bias=None, softcap=0.0) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (n, d) and weight (V, d) expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if ref_hidden.shape != hidden.shape:
        raise ValueError(f"ref_hidden must be {tuple(hidden.shape)}, got {tuple(ref_hidden.shape)}")
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not softcap >= 0:
        raise ValueError(f"softcap must be >= 0 (0: none), got {softcap}")


def _acc(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _gemm_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """GEMMs run in the inputs' own precision (bf16/fp16 tensor cores, fp32 accumulate) like the
    model's own unembedding; the online statistics are kept in fp32 (fp64 for fp64 inputs)."""
    if hidden.dtype == weight.dtype:
        return hidden.dtype
    return torch.promote_types(hidden.dtype, weight.dtype)


def capped_logits(h, w, bias, softcap, acc=torch.float32):
    """``cap(h wᵀ + b)`` in ``acc`` and the soft-cap derivative ``1 − tanh²`` (None without a cap).
    The GEMM runs in ``h``'s dtype (``w`` is cast to it); ``cap(z) = c·tanh(z/c)``, ``c = softcap``."""
    Z = (h @ w.to(h.dtype).T).to(acc)
    if bias is not None:
        Z = Z + bias.to(acc)
    if softcap:
        t = torch.tanh(Z / softcap)
        return t * softcap, 1 - t * t
    return Z, None


def _chunk_logits(H2, weight, bias, softcap, v0, chunk, acc):
    """Logits of vocabulary rows ``[v0, v0 + chunk)`` for both sides (2n, c), their cap derivative
    and the weight chunk (in the GEMM dtype)."""
    w = weight[v0 : v0 + chunk].to(H2.dtype)
    b = None if bias is None else bias[v0 : v0 + chunk]
    Z, dcap = capped_logits(H2, w, b, softcap, acc)
    return Z, dcap, w


def kl_reference(hidden, ref_hidden, weight, bias, softcap, chunk):
    """Chunked reference: ``(kl, lse, ref_lse)``; both log-normalisers come from the same GEMMs as
    the logits, so ``KL = 0`` exactly when ``hidden == ref_hidden``."""
    check_inputs(hidden, ref_hidden, weight, chunk, bias, softcap)
    acc = _acc(hidden)
    n, V = hidden.shape[0], weight.shape[0]
    H2 = torch.cat([hidden, ref_hidden]).to(_gemm_dtype(hidden, weight))
    m = torch.full((2 * n,), float("-inf"), dtype=acc, device=hidden.device)  # running max, both sides
    s = torch.zeros(2 * n, dtype=acc, device=hidden.device)  # Σ e^{z−m}, both sides
    a = torch.zeros(n, dtype=acc, device=hidden.device)  # Σ e^{z−m} (z − z₀), current side
    for v0 in range(0, V, chunk):
        Z, _, _ = _chunk_logits(H2, weight, bias, softcap, v0, chunk, acc)
        m_new = torch.maximum(m, Z.max(1).values)
        scale = torch.exp(m - m_new)
        E = torch.exp(Z - m_new[:, None])
        s = s * scale + E.sum(1)
        a = a * scale[:n] + (E[:n] * (Z[:n] - Z[n:])).sum(1)
        m = m_new
    lse_both = m + torch.log(s)
    lse, ref_lse = lse_both[:n].clone(), lse_both[n:].clone()  # outputs must not alias
    kl = a / s[:n] - lse + ref_lse
    return kl, lse, ref_lse


def kl_backward_reference(grad, hidden, ref_hidden, weight, bias, softcap, ref_lse, kl, lse, chunk):
    acc = _acc(hidden)
    n = hidden.shape[0]
    H2 = torch.cat([hidden, ref_hidden]).to(_gemm_dtype(hidden, weight))
    g, kl, lse, lse0 = grad.to(acc), kl.to(acc), lse.to(acc), ref_lse.to(acc)
    gh = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
    for v0 in range(0, weight.shape[0], chunk):
        Z, dcap, w = _chunk_logits(H2, weight, bias, softcap, v0, chunk, acc)
        z, z0 = Z.split(n)
        logp = z - lse[:, None]
        dz = g[:, None] * torch.exp(logp) * (logp - (z0 - lse0[:, None]) - kl[:, None])
        if dcap is not None:
            dz = dz * dcap[:n]
        gh += (dz.to(w.dtype) @ w).to(acc)
    return gh.to(hidden.dtype)


def _fake_fwd(hidden, ref_hidden, weight, bias, softcap, chunk):
    n = hidden.shape[0]
    dt = _acc(hidden)
    return tuple(hidden.new_empty((n,), dtype=dt) for _ in range(3))


def _fake_bwd(grad, hidden, ref_hidden, weight, bias, softcap, ref_lse, kl, lse, chunk):
    return torch.empty_like(hidden)


define_op("fused_kl", FWD_SCHEMA, kl_reference, _fake_fwd)
define_op("fused_kl_backward", BWD_SCHEMA, kl_backward_reference, _fake_bwd)


def _setup_context(ctx, inputs, output):
    hidden, ref_hidden, weight, bias, softcap, chunk = inputs
    kl, lse, ref_lse = output
    ctx.save_for_backward(hidden, ref_hidden, weight, bias, ref_lse, kl, lse)
    ctx.chunk, ctx.softcap = chunk, softcap


def _backward(ctx, grad_kl, grad_lse, grad_ref_lse):
    hidden, ref_hidden, weight, bias, ref_lse, kl, lse = ctx.saved_tensors
    for g in (grad_lse, grad_ref_lse):
        if g is not None and bool((g != 0).any()):
            raise RuntimeError("fused_kl: only kl is differentiable (not the log-normalisers)")
    gh = None
    if ctx.needs_input_grad[0] and grad_kl is not None:
        gh = torch.ops.metake_fast.fused_kl_backward(
            grad_kl, hidden, ref_hidden, weight, bias, ctx.softcap, ref_lse, kl, lse, ctx.chunk
        )
    return gh, None, None, None, None, None


torch.library.register_autograd("metake_fast::fused_kl", _backward, setup_context=_setup_context)


def fused_kl(
    hidden: torch.Tensor,
    ref_hidden: torch.Tensor,
    weight: torch.Tensor,
    chunk: int = 8192,
    *,
    bias: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """``KL(softmax(z) ‖ softmax(z₀))`` per row with ``z = cap(W h + b)``, (n,) fp32; differentiable
    w.r.t. ``hidden``. ``bias``: the unembedding bias (GPT-J); ``softcap``: Gemma-2 style
    ``c·tanh(z/c)`` logit cap (0: none)."""
    check_inputs(hidden, ref_hidden, weight, chunk, bias, softcap)
    return torch.ops.metake_fast.fused_kl(
        hidden.contiguous(), ref_hidden.contiguous(), weight, bias, float(softcap or 0.0), chunk
    )[0]
