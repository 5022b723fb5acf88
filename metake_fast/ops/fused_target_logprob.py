"""``fused_target_logprob``: ``log softmax(h Wᵀ)[t]`` without materialising logits.

Shapes and dtypes
    hidden:  (n, d) hidden states at the target positions only (after the final
             norm); float32 / bfloat16 / float16.
    weight:  (V, d) unembedding (``lm_head.weight``), same dtype as ``hidden``.
    targets: (n,) int64 token ids.
    chunk:   vocabulary chunk size (rows of ``weight`` per step).

Returns ``(logprob, lse)``, both (n,) float32: the target log-probability and
the log-sum-exp of the row's logits. Only ``n × chunk`` logits exist at a time
(online log-sum-exp over vocabulary chunks), never ``n × V``.

Backward (``fused_target_logprob_backward``) recomputes each chunk's softmax
from the saved ``lse``:
    ∂/∂h_i   = g_i (W[t_i] − Σ_v p_iv W_v)
    ∂/∂W_v   = Σ_i g_i (1[v = t_i] − p_iv) h_i

CPU kernel (``csrc/cpu/fused_target_logprob.cpp``): OpenMP over vocabulary
tiles of ``min(chunk, 512)`` rows, each converted to fp32 in a thread-local
buffer (no fp32 copy of ``weight``), one BLAS call per 256-row block of
``hidden`` and a fused online log-sum-exp on the cached tile.
"""

from __future__ import annotations

import torch

from .registry import define_op

FWD_SCHEMA = "(Tensor hidden, Tensor weight, Tensor targets, int chunk) -> (Tensor, Tensor)"
BWD_SCHEMA = (
    "(Tensor grad, Tensor hidden, Tensor weight, Tensor targets, Tensor lse, int chunk, bool weight_grad)"
    " -> (Tensor, Tensor)"
)

DEFAULT_CHUNK = 8192


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (n, d) and weight (V, d) expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must be ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if chunk <= 0:
        raise ValueError("chunk must be positive")


def target_logprob_reference(hidden, weight, targets, chunk):
    """Chunked reference in fp32 (fp64 if inputs are fp64)."""
    check_inputs(hidden, weight, targets, chunk)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h = hidden.to(acc)
    n, V = hidden.shape[0], weight.shape[0]
    lse = torch.full((n,), float("-inf"), dtype=acc, device=hidden.device)
    for s in range(0, V, chunk):
        logits = h @ weight[s : s + chunk].to(acc).T
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
    tgt = (h * weight[targets].to(acc)).sum(1)
    return (tgt - lse).to(torch.float32 if acc == torch.float32 else acc), lse.to(
        torch.float32 if acc == torch.float32 else acc
    )


def target_logprob_backward_reference(grad, hidden, weight, targets, lse, chunk, weight_grad):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h = hidden.to(acc)
    g = grad.to(acc)
    lse = lse.to(acc)
    V = weight.shape[0]
    gh = g[:, None] * weight[targets].to(acc)
    gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if weight_grad else None
    for s in range(0, V, chunk):
        w = weight[s : s + chunk].to(acc)
        p = torch.exp(h @ w.T - lse[:, None]) * g[:, None]  # (n, c)
        gh = gh - p @ w
        if gw is not None:
            gw[s : s + chunk] -= p.T @ h
    if gw is not None:
        gw.index_add_(0, targets, g[:, None] * h)
        gw = gw.to(weight.dtype)
    else:
        gw = hidden.new_empty((0,))
    return gh.to(hidden.dtype), gw


def _fake_fwd(hidden, weight, targets, chunk):
    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    n = hidden.shape[0]
    return hidden.new_empty((n,), dtype=dt), hidden.new_empty((n,), dtype=dt)


def _fake_bwd(grad, hidden, weight, targets, lse, chunk, weight_grad):
    return torch.empty_like(hidden), (torch.empty_like(weight) if weight_grad else hidden.new_empty((0,)))


define_op("fused_target_logprob", FWD_SCHEMA, target_logprob_reference, _fake_fwd)
define_op("fused_target_logprob_backward", BWD_SCHEMA, target_logprob_backward_reference, _fake_bwd)


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, chunk = inputs
    ctx.save_for_backward(hidden, weight, targets, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.chunk = chunk


def _backward(ctx, grad_logprob, grad_lse):
    hidden, weight, targets, lse = ctx.saved_tensors
    # ``lse`` is marked non-differentiable: its incoming gradient is ignored.
    gh, gw = torch.ops.metake_fast.fused_target_logprob_backward(
        grad_logprob.contiguous(), hidden, weight, targets, lse, ctx.chunk, ctx.needs_input_grad[1]
    )
    return (gh if ctx.needs_input_grad[0] else None), (gw if ctx.needs_input_grad[1] else None), None, None


torch.library.register_autograd("metake_fast::fused_target_logprob", _backward, setup_context=_setup_context)


def fused_target_logprob(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Log-probability of ``targets`` under ``softmax(hidden @ weight.T)``; (n,) float32, differentiable."""
    check_inputs(hidden, weight, targets, chunk)
    logprob, _ = torch.ops.metake_fast.fused_target_logprob(
        hidden.contiguous(), weight.contiguous(), targets.contiguous(), int(chunk)
    )
    return logprob
