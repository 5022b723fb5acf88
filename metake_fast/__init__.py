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


def backends() -> dict[str, dict[str, str]]:
    """``{op: {"cpu": provider, "cuda": provider}}`` — what each op resolves to."""
    return resolved_backends()


__all__ = [
    "ModelAdapter",
    "__version__",
    "backends",
    "format_backends",
    "get_adapter",
    "load_model",
    "ops",
]
