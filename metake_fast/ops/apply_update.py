"""``apply_update_``: ``W += R Yᵀ`` in place, fp32 math rounded once into ``W``.

Shapes and dtypes
    W: (d_v, d_k) weight (``transposed=False``, ``nn.Linear``) or
       (d_k, d_v) (``transposed=True``, GPT-2 ``Conv1D``); float32/bfloat16/float16.
    R: (d_v, u) residual factor, float32 or float64.
    Y: (d_k, u) key-side factor, float32 or float64.

The product is formed in ``float32`` (``float64`` if either factor is fp64),
added to ``W`` upcast to the same precision, and rounded to ``W.dtype`` once.

CPU kernel (``csrc/cpu/apply_update.cpp``): fp32 ``W`` gets one ``addmm_``;
otherwise 32-row blocks of the product are formed in a thread-local buffer and
added/rounded into ``W`` (no full-size upcast copy). CUDA: ``csrc/cuda/kernels.cu``.
"""

from __future__ import annotations

import torch

from .registry import define_op

SCHEMA = "(Tensor(a!) W, Tensor R, Tensor Y, bool transposed) -> ()"


def check_inputs(W: torch.Tensor, R: torch.Tensor, Y: torch.Tensor, transposed: bool) -> None:
    if W.dim() != 2 or R.dim() != 2 or Y.dim() != 2:
        raise ValueError("W, R and Y must be 2-D")
    d_v, d_k = (W.shape[1], W.shape[0]) if transposed else (W.shape[0], W.shape[1])
    if R.shape[0] != d_v or Y.shape[0] != d_k or R.shape[1] != Y.shape[1]:
        raise ValueError(
            f"shape mismatch: W {tuple(W.shape)} (transposed={transposed}), R {tuple(R.shape)}, Y {tuple(Y.shape)}"
        )


def _math_dtype(R: torch.Tensor, Y: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (R.dtype, Y.dtype) else torch.float32


def apply_update_reference(W: torch.Tensor, R: torch.Tensor, Y: torch.Tensor, transposed: bool) -> None:
    """Pure-PyTorch reference: ``W.copy_(W.float() + R @ Y.T)``."""
    check_inputs(W, R, Y, transposed)
    dt = _math_dtype(R, Y)
    delta = R.to(dt) @ Y.to(dt).T  # (d_v, d_k)
    if transposed:
        delta = delta.T
    W.copy_((W.to(dt) + delta).to(W.dtype))


def _fake(W, R, Y, transposed):
    return None


define_op("apply_update_", SCHEMA, apply_update_reference, _fake)


def apply_update_(W: torch.Tensor, R: torch.Tensor, Y: torch.Tensor, transposed: bool = False) -> None:
    """``W += R Yᵀ`` (or its transpose) in place through the dispatcher."""
    check_inputs(W, R, Y, transposed)
    with torch.no_grad():
        torch.ops.metake_fast.apply_update_(W, R.contiguous(), Y.contiguous(), transposed)
