"""metake_fast: fast locate-then-edit knowledge editing.

Importing never fails because the compiled extension is missing and never
initialises CUDA; :func:`backends` says which implementation each op uses.
"""

from __future__ import annotations

import logging

from . import ops
from .models import ModelAdapter, get_adapter, load_model
from .ops import format_backends, resolved_backends

__version__ = "0.1.0"

logging.getLogger("metake_fast").addHandler(logging.NullHandler())


_LAZY = {
    "Editor": "editor",
    "EditReport": "editor",
    "EditError": "editor",
    "EditRequest": "requests",
    "RequestError": "requests",
    "validate_requests": "requests",
    "load_dataset": "datasets",
    "load_requests": "datasets",
    "second_moment": "stats",
    "load_hparams": "hparams",
    "evaluate_cases": "evaluate",
    "run_evaluation": "evaluate",
}


def __getattr__(name: str):
    """Lazy access to the public API (keeps ``import metake_fast`` light)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'metake_fast' has no attribute {name!r}")


def backends() -> dict[str, dict[str, str]]:
    """``{op: {"cpu": provider, "cuda": provider}}`` — what each op resolves to."""
    return resolved_backends()


__all__ = [
    *_LAZY,
    "ModelAdapter",
    "__version__",
    "backends",
    "format_backends",
    "get_adapter",
    "load_model",
    "ops",
]
