"""Helpers shared by the op tests."""

from __future__ import annotations


def cpp_kernel_built(op: str, key: str = "CPU") -> bool:
    """Whether the C++ extension registered a kernel for ``op`` and dispatch ``key``."""
    try:
        from metake_fast import _C

        return (op, key) in {(o, k) for o, k, _ in _C.registered_kernels()}
    except ImportError:
        return False
