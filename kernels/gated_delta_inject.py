"""Triton ``gated_delta_inject`` (forward): one pass that copies ``hidden`` and adds the gated rows.

The host side forms ``V = Gᵀ R`` (a u×u by u×d matmul), sums the rows that land
on the same position into ``S`` (index_add over the n entries) and builds a
slot map ``B·T → slot or -1``. The kernel then streams every row of ``hidden``
once: rows without a slot are copied, rows with one are upcast, added to their
``S`` row and rounded once. The backward is the reference (it touches only the n
rows; see :mod:`metake_fast.ops.gated_delta_inject`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from metake_fast.ops.gated_delta_inject import check_inputs, gated_rows, inject_reference, math_dtype

from ._common import interpreting, needs_rne_bf16, pow2_block, rne_bf16, same_device


@triton.jit
def _gated_delta_inject_kernel(
    H, OUT, S, SLOT, NROWS, D, RNE_BF16: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr
):  # fmt: skip
    """A ``(BR, BD)`` tile of rows: ``out = round(float(h) + S[slot])`` where ``slot >= 0``, else ``h``."""
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    r = pid_r * BR + tl.arange(0, BR)
    c = pid_d * BD + tl.arange(0, BD)
    ok_r = r < NROWS
    ok = ok_r[:, None] & (c < D)[None, :]
    h = tl.load(H + r[:, None] * D + c[None, :], mask=ok, other=0.0)
    slot = tl.load(SLOT + r, mask=ok_r, other=-1)
    has = slot >= 0
    add = tl.load(S + tl.where(has, slot, 0)[:, None] * D + c[None, :], mask=ok & has[:, None], other=0.0)
    y = h.to(tl.float32) + add.to(tl.float32)
    y = tl.where(has[:, None], y, h.to(tl.float32))
    if RNE_BF16:
        tl.store(OUT + r[:, None] * D + c[None, :], rne_bf16(y), mask=ok)
    else:
        tl.store(OUT + r[:, None] * D + c[None, :], y.to(OUT.dtype.element_ty), mask=ok)


def gated_delta_inject(hidden, delta, gate, rows, cols, owner) -> torch.Tensor:
    """Forward launcher; fp64 math (fp64 ``delta``/``gate`` or ``hidden``) falls back to the reference."""
    check_inputs(hidden, delta, gate, rows, cols, owner)
    same_device(hidden, delta, gate, rows, cols, owner)
    dt = math_dtype(delta, gate)
    if dt == torch.float64 or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return inject_reference(hidden, delta, gate, rows, cols, owner)
    hidden = hidden.contiguous()
    B, T, d = hidden.shape
    out = torch.empty_like(hidden)
    if hidden.numel() == 0:
        return out
    slot = torch.full((B * T,), -1, dtype=torch.int32, device=hidden.device)
    if rows.numel():
        pos = rows * T + cols
        uniq, inv = torch.unique(pos, return_inverse=True)
        S = torch.zeros(uniq.numel(), d, dtype=torch.float32, device=hidden.device)
        S.index_add_(0, inv, gated_rows(delta, gate, torch.float32)[owner])
        slot[uniq] = torch.arange(uniq.numel(), dtype=torch.int32, device=hidden.device)
    else:
        S = torch.zeros(1, d, dtype=torch.float32, device=hidden.device)
    br = 16 if interpreting() else 32
    bd = pow2_block(d, 16, 64 if interpreting() else 256)
    grid = (triton.cdiv(B * T, br), triton.cdiv(d, bd))
    _gated_delta_inject_kernel[grid](
        hidden, out, S, slot, B * T, d, RNE_BF16=needs_rne_bf16(out), BR=br, BD=bd, num_warps=4
    )  # fmt: skip
    return out
