"""``second_moment_accumulate``: ``S += Xᵀ X`` over the non-pad rows of ``X``.

Shapes and dtypes
    S:    (d, d) float32 or float64, updated in place; symmetric on return.
    X:    (n, d) float32 / bfloat16 / float16 / float64 keys (one row per token).
    mask: (n,) bool or None; rows with ``False`` (pad tokens) are skipped.

Math is done in ``S.dtype`` (inputs are upcast before the product), so a bf16
model still accumulates in fp32 (or fp64).

Compiled kernels: CPU (``csrc/cpu/second_moment_accumulate.cpp``) computes only
the lower block triangle (single-threaded BLAS per 192x192 tile, OpenMP over
tiles) and adds each tile product to both halves, so ``S + XᵀX`` is exact also
for a non-symmetric ``S`` and exactly symmetric when ``S`` was. CUDA
(``csrc/cuda/kernels.cu``) uses the same tiling.
"""

from __future__ import annotations

import torch

from .registry import define_op

SCHEMA = "(Tensor(a!) S, Tensor X, Tensor? mask) -> ()"


def check_inputs(S: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None) -> None:
    if S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"S must be square (d, d), got {tuple(S.shape)}")
    if S.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"S must be float32 or float64, got {S.dtype}")
    if X.dim() != 2 or X.shape[1] != S.shape[0]:
        raise ValueError(f"X must be (n, {S.shape[0]}), got {tuple(X.shape)}")
    if mask is not None and (mask.dim() != 1 or mask.shape[0] != X.shape[0]):
        raise ValueError(f"mask must be ({X.shape[0]},), got {tuple(mask.shape)}")


def second_moment_accumulate_reference(S: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Pure-PyTorch reference: one ``addmm_`` over the kept rows in ``S.dtype``."""
    check_inputs(S, X, mask)
    if mask is not None:
        X = X[mask.to(torch.bool)]
    if X.shape[0] == 0:
        return
    Xs = X.to(S.dtype)
    S.addmm_(Xs.T, Xs)


def _fake(S, X, mask):
    return None


define_op("second_moment_accumulate", SCHEMA, second_moment_accumulate_reference, _fake)


def second_moment_accumulate(S: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """``S += X[mask]ᵀ X[mask]`` in place through the dispatcher (fastest registered kernel)."""
    check_inputs(S, X, mask)
    torch.ops.metake_fast.second_moment_accumulate(S, X.contiguous(), mask)
