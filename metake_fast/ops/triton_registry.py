"""Which Triton kernels exist, and their registration for the ``CUDA`` dispatch key.

The kernels live in the top-level ``kernels/`` directory, installed as
``metake_fast.kernels``. That directory deliberately has no ``__init__.py``:
a regular package named ``kernels`` at the repository root would shadow the
Hugging Face ``kernels`` distribution (which transformers >= 5.25 imports)
whenever Python runs with the checkout's root on ``sys.path``. As an implicit
namespace package it never wins over an installed regular package.

Importing this module never imports Triton; :func:`register_triton_kernels`
(called by :func:`metake_fast.ops.backends.load_backends` when torch has CUDA)
does, and tests load the kernel modules directly under ``TRITON_INTERPRET=1``.

Kernel modules (each imports Triton)
    ``second_moment_accumulate``  ``S += X[mask]ᵀ X[mask]`` (lower-triangle tiles, mirrored)
    ``apply_update``              ``W += R Yᵀ`` in place, both orientations
    ``fused_target_logprob``      target log-prob with online log-sum-exp, and its backward
    ``gated_delta_inject``        hidden + gated residual rows at given positions, one pass
"""

from __future__ import annotations

#: op name -> (kernel module in ``metake_fast.kernels``, launcher) registered for CUDA
TRITON_OPS: dict[str, tuple[str, str]] = {
    "second_moment_accumulate": ("second_moment_accumulate", "second_moment_accumulate"),
    "apply_update_": ("apply_update", "apply_update_"),
    "fused_target_logprob": ("fused_target_logprob", "fused_target_logprob"),
    "fused_target_logprob_backward": ("fused_target_logprob", "fused_target_logprob_backward"),
    "gated_delta_inject": ("gated_delta_inject", "gated_delta_inject"),
}

PROVIDER = "Triton"

#: ops whose Triton kernel replaces the C++/CUDA extension's kernel for ``CUDA``: measured
#: faster (``bench/bench_second_moment_accumulate.py --large`` and ``bench/bench_triton.py``
#: on an H200, 2026-11-27, n 4096, d_k 14336, bf16: Triton 3.1 ms, cuBLAS reference 29.7 ms,
#: the extension's SIMT kernel 106 ms)
OVERRIDE_EXTENSION: frozenset[str] = frozenset({"second_moment_accumulate"})

_LIB = None  # the torch.library.Library holding the CUDA registrations (kept alive)


def load_launchers() -> dict:
    """``{op name: host launcher}`` (imports Triton and the kernel modules)."""
    import importlib

    from .backends import kernels_package

    pkg = kernels_package().__name__
    out = {}
    for name, (module, fn) in TRITON_OPS.items():
        out[name] = getattr(importlib.import_module(f"{pkg}.{module}"), fn)
    return out


def register_triton_kernels() -> None:
    """Register the Triton kernels for the ``CUDA`` dispatch key (idempotent).

    Raises ``ImportError`` when Triton is missing. An op whose CUDA kernel is
    already taken by the C++/CUDA extension keeps it, except the ops in
    :data:`OVERRIDE_EXTENSION`, where the Triton kernel takes the key over
    (dispatcher override; the extension's kernel serves when Triton is absent).
    """
    global _LIB
    if _LIB is not None:
        return None
    import warnings

    import torch

    import metake_fast.ops  # noqa: F401  (declares the ops)

    from .registry import NAMESPACE, _has_kernel, register_provider

    launchers = load_launchers()
    lib = torch.library.Library(NAMESPACE, "IMPL")
    for name, fn in launchers.items():
        if _has_kernel(name, "CUDA") and name not in OVERRIDE_EXTENSION:
            continue
        with warnings.catch_warnings():  # "Overriding a previously registered kernel": intended here
            warnings.simplefilter("ignore", UserWarning)
            lib.impl(name, fn, "CUDA")
        register_provider(name, "CUDA", PROVIDER)
    _LIB = lib
    return None
