"""The op registry: every op of the library is declared here exactly once.

Each op is a ``torch.library`` operator in the ``metake_fast`` namespace with

* a schema,
* a fake (meta) kernel so it traces under ``torch.compile`` / FakeTensor,
* a pure-PyTorch reference registered as ``CompositeExplicitAutograd``: the
  correctness oracle and the fallback used on every device where no compiled
  kernel is registered.

Compiled kernels register for a dispatch key and take precedence over the
reference: the C++ extension ``metake_fast._C`` registers ``CPU`` (and ``CUDA``
when built with nvcc), and the Triton kernels in ``metake_fast.kernels``
register ``CUDA`` when Triton and a GPU are present.

Set ``METAKE_FAST_REFERENCE=1`` before importing to force the reference path
everywhere (nothing compiled is loaded).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

NAMESPACE = "metake_fast"
LIB = torch.library.Library(NAMESPACE, "DEF")

#: op name -> {"schema": str, "reference": callable}
OPS: dict[str, dict] = {}

#: (op name, dispatch key) -> human-readable provider ("C++ (OpenMP)", "Triton", ...)
PROVIDERS: dict[tuple[str, str], str] = {}


def reference_forced() -> bool:
    """True when ``METAKE_FAST_REFERENCE`` asks for the pure-PyTorch path."""
    return os.environ.get("METAKE_FAST_REFERENCE", "0").strip().lower() not in ("", "0", "false", "no")


def define_op(name: str, schema: str, reference: Callable, fake: Callable) -> None:
    """Declare ``metake_fast::<name>`` with its schema, reference and fake kernel."""
    if name in OPS:
        raise RuntimeError(f"op {name!r} declared twice")
    LIB.define(f"{name}{schema}")
    LIB.impl(name, reference, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIB)
    OPS[name] = {"schema": f"{name}{schema}", "reference": reference}


def register_provider(name: str, dispatch_key: str, provider: str) -> None:
    """Record that a compiled kernel for ``name`` was registered for ``dispatch_key``."""
    PROVIDERS[(name, dispatch_key)] = provider


def _has_kernel(name: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", key)


def resolved_backends() -> dict[str, dict[str, str]]:
    """Which implementation each op resolves to, per device type.

    Returns ``{op: {"cpu": provider, "cuda": provider}}`` where provider is
    ``"reference (PyTorch)"`` or the compiled kernel's name.
    """
    out: dict[str, dict[str, str]] = {}
    for name in OPS:
        row = {}
        for dev, key in (("cpu", "CPU"), ("cuda", "CUDA")):
            if _has_kernel(name, key):
                row[dev] = PROVIDERS.get((name, key), f"compiled ({key})")
            else:
                row[dev] = "reference (PyTorch)"
        out[name] = row
    return out


def format_backends() -> str:
    """One line per op: ``op: cpu=<provider>, cuda=<provider>``."""
    lines = []
    for name, row in resolved_backends().items():
        lines.append(f"{name}: " + ", ".join(f"{d}={p}" for d, p in row.items()))
    return "\n".join(lines)
