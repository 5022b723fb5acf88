"""All ops of the library, declared once (see :mod:`metake_fast.ops.registry`).

Importing this package declares every op with its reference kernel, then loads
the compiled providers that exist (C++ extension, Triton), unless
``METAKE_FAST_REFERENCE=1``.
"""

from __future__ import annotations

from .apply_update import apply_update_, apply_update_reference
from .backends import load_backends
from .fused_kl import fused_kl, kl_backward_reference, kl_reference
from .fused_target_logprob import (
    fused_target_logprob,
    target_logprob_backward_reference,
    target_logprob_reference,
)
from .gated_delta_inject import gated_delta_inject, inject_backward_reference, inject_reference
from .registry import OPS, format_backends, reference_forced, resolved_backends
from .second_moment_accumulate import second_moment_accumulate, second_moment_accumulate_reference

load_backends()

__all__ = [
    "OPS",
    "apply_update_",
    "apply_update_reference",
    "format_backends",
    "fused_kl",
    "fused_target_logprob",
    "gated_delta_inject",
    "inject_backward_reference",
    "inject_reference",
    "kl_backward_reference",
    "kl_reference",
    "reference_forced",
    "resolved_backends",
    "second_moment_accumulate",
    "second_moment_accumulate_reference",
    "target_logprob_backward_reference",
    "target_logprob_reference",
]
