"""``gated_delta_inject``: add gated residuals ``Gᵀ R`` into hidden states at given positions.

The upper level of MetaKE (METHOD.md "Upper level") evaluates the target loss at
the *virtual* post-edit hidden state ``H̃ = H + R G``: every request's residual
reaches the model through the lower-level gate. In the row layout used here
(``delta`` = ``R`` with one row per request) the injected rows are ``V = Gᵀ R``
and the proxy gradient is ``∇_R = G ∇_V``. Plain target optimisation is the
special case ``gate=None`` (``G = I``).

Shapes and dtypes
    hidden: (B, T, d) float32/bfloat16/float16, a layer's output hidden states.
    delta:  (u_in, d) float32/float64, the residual rows ``R``.
    gate:   (u_in, u_out) or None (identity, ``u_out = u_in``).
    rows, cols, owner: (n,) int64: entry ``i`` adds ``V[owner[i]]`` at
        ``hidden[rows[i], cols[i]]``. Repeated positions accumulate.

Returns ``out`` (like ``hidden``): ``hidden`` with every touched position
updated as ``round(float(hidden[p]) + Σ V[owner[i]])`` (one rounding per
position, math in fp32, fp64 if ``delta``/``gate`` is fp64).

Backward: ``∇hidden = ∇out``; with ``S = Σ_i e_{owner[i]} ∇out[rows[i], cols[i]]``
(u_out, d): ``∇delta = G S`` and ``∇gate = R Sᵀ``. The backward reads only the
``n`` touched rows of ``∇out``, so the reference composition is already the
minimal-traffic implementation and is used on every device.

Kernels (forward): the reference clones ``hidden`` and then gathers, adds and
scatters the touched rows (three extra small passes and a sort for repeated
positions). The C++ CPU kernel (``csrc/cpu/gated_delta_inject.cpp``) and the
Triton kernel (``kernels/gated_delta_inject.py``) write the output in one pass:
each row is either copied or upcast, summed with its accumulated ``V`` rows and
rounded once.
"""

from __future__ import annotations

import torch

from .registry import define_op

FWD_SCHEMA = "(Tensor hidden, Tensor delta, Tensor? gate, Tensor rows, Tensor cols, Tensor owner) -> Tensor"
BWD_SCHEMA = "(Tensor grad_out, Tensor delta, Tensor? gate, Tensor rows, Tensor cols, Tensor owner) -> (Tensor, Tensor)"


def check_inputs(hidden, delta, gate, rows, cols, owner) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, d), got shape {tuple(hidden.shape)}")
    if delta.dim() != 2 or delta.shape[1] != hidden.shape[2]:
        raise ValueError(f"delta must be (u, {hidden.shape[2]}), got shape {tuple(delta.shape)}")
    if gate is not None and (gate.dim() != 2 or gate.shape[0] != delta.shape[0]):
        raise ValueError(f"gate must be ({delta.shape[0]}, u_out), got shape {tuple(gate.shape)}")
    if not hidden.is_floating_point() or not delta.is_floating_point():
        raise ValueError("hidden and delta must be floating tensors")
    for name, t in (("rows", rows), ("cols", cols), ("owner", owner)):
        if t.dim() != 1 or t.dtype != torch.long:
            raise ValueError(f"{name} must be a 1-D int64 tensor")
    if not rows.shape[0] == cols.shape[0] == owner.shape[0]:
        raise ValueError("rows, cols and owner must have the same length")
    if rows.numel() and rows.device.type == "cpu" and cols.device.type == "cpu" and owner.device.type == "cpu":
        # Index ranges, checked here for CPU indices (free: no device sync). CUDA indices are
        # not checked (that would synchronise every call); the editor builds them itself.
        u_out = gate.shape[1] if gate is not None else delta.shape[0]
        for name, t, hi in (("rows", rows, hidden.shape[0]), ("cols", cols, hidden.shape[1]), ("owner", owner, u_out)):
            lo_v, hi_v = int(t.min()), int(t.max())
            if lo_v < 0 or hi_v >= hi:
                raise ValueError(f"{name} must lie in [0, {hi}), got values in [{lo_v}, {hi_v}]")


def math_dtype(delta: torch.Tensor, gate: torch.Tensor | None) -> torch.dtype:
    if delta.dtype == torch.float64 or (gate is not None and gate.dtype == torch.float64):
        return torch.float64
    return torch.float32


def gated_rows(delta: torch.Tensor, gate: torch.Tensor | None, dt: torch.dtype) -> torch.Tensor:
    """``V = Gᵀ R`` (u_out, d) in ``dt``."""
    return delta.to(dt) if gate is None else gate.to(dt).T @ delta.to(dt)


def inject_reference(hidden, delta, gate, rows, cols, owner) -> torch.Tensor:
    """Pure-PyTorch reference of the forward."""
    check_inputs(hidden, delta, gate, rows, cols, owner)
    dt = math_dtype(delta, gate)
    B, T, d = hidden.shape
    out = hidden.clone()
    if rows.numel() == 0:
        return out
    V = gated_rows(delta, gate, dt)
    pos = rows * T + cols
    uniq, inv = torch.unique(pos, return_inverse=True)
    S = torch.zeros(uniq.numel(), d, dtype=dt, device=hidden.device).index_add_(0, inv, V[owner])
    flat = out.view(B * T, d)
    flat[uniq] = (flat[uniq].to(dt) + S).to(hidden.dtype)
    return out


def inject_backward_reference(grad_out, delta, gate, rows, cols, owner):
    """``(∇delta, ∇gate)``; ``∇gate`` is empty when ``gate`` is None."""
    dt = math_dtype(delta, gate)
    u_out = delta.shape[0] if gate is None else gate.shape[1]
    S = torch.zeros(u_out, delta.shape[1], dtype=dt, device=delta.device)
    if rows.numel():
        S.index_add_(0, owner, grad_out[rows, cols].to(dt))
    if gate is None:
        return S.to(delta.dtype), torch.empty(0, dtype=delta.dtype, device=delta.device)
    g_delta = (gate.to(dt) @ S).to(delta.dtype)
    g_gate = (delta.to(dt) @ S.T).to(gate.dtype)
    return g_delta, g_gate


def _fake_fwd(hidden, delta, gate, rows, cols, owner):
    return torch.empty_like(hidden)


def _fake_bwd(grad_out, delta, gate, rows, cols, owner):
    g_gate = torch.empty_like(gate) if gate is not None else delta.new_empty(0)
    return torch.empty_like(delta), g_gate


define_op("gated_delta_inject", FWD_SCHEMA, inject_reference, _fake_fwd)
define_op("gated_delta_inject_backward", BWD_SCHEMA, inject_backward_reference, _fake_bwd)


def _setup_context(ctx, inputs, output):
    _, delta, gate, rows, cols, owner = inputs
    ctx.save_for_backward(delta, gate, rows, cols, owner)
    ctx.has_gate = gate is not None


def _backward(ctx, grad_out):
    delta, gate, rows, cols, owner = ctx.saved_tensors
    need_delta, need_gate = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    g_delta = g_gate = None
    if need_delta or need_gate:
        gd, gg = torch.ops.metake_fast.gated_delta_inject_backward(
            grad_out, delta, gate if ctx.has_gate else None, rows, cols, owner
        )
        g_delta = gd if need_delta else None
        g_gate = gg if (need_gate and ctx.has_gate) else None
    return grad_out, g_delta, g_gate, None, None, None


torch.library.register_autograd("metake_fast::gated_delta_inject", _backward, setup_context=_setup_context)


def gated_delta_inject(
    hidden: torch.Tensor,
    delta: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    owner: torch.Tensor,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """``hidden`` with ``(gateᵀ delta)[owner[i]]`` added at ``(rows[i], cols[i])``; differentiable."""
    check_inputs(hidden, delta, gate, rows, cols, owner)
    return torch.ops.metake_fast.gated_delta_inject(
        hidden.contiguous(), delta.contiguous(), None if gate is None else gate.contiguous(), rows, cols, owner
    )
