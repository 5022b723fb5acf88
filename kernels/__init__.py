"""Triton kernels (installed as ``metake_fast.kernels``).

Importing this package never imports Triton; kernels are loaded lazily by
:func:`register_triton_kernels` (CUDA) or directly by tests under
``TRITON_INTERPRET=1`` (CPU).
"""


def register_triton_kernels() -> None:
    """Register the Triton kernels for the ``CUDA`` dispatch key (no-op when none exist yet)."""
    return None
