"""Load the compiled providers (C++ extension, Triton) if they exist.

Never raises because something is missing and never initialises CUDA: the
C++ extension is imported (it registers its kernels with the dispatcher on
load), Triton kernels are registered for ``CUDA`` only when ``triton`` is
importable and torch was built with CUDA. One log line says what was loaded.
"""

from __future__ import annotations

import logging

import torch

from .registry import reference_forced, register_provider

log = logging.getLogger("metake_fast")

_STATE = {"loaded": False, "cpp": None, "triton": None}


def kernels_package():
    """``metake_fast.kernels``, the Triton kernel modules (importing it never imports Triton).

    Installed, it is a subpackage (an implicit namespace package: the source
    directory ``kernels/`` has no ``__init__.py``, see :mod:`.triton_registry`).
    In a source checkout used in place (``PYTHONPATH=.`` after
    ``setup.py build_ext --inplace``) it is the top-level ``kernels/`` directory,
    loaded under the same name, so the CUDA key gets the Triton kernels either way.
    """
    import importlib
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    name = "metake_fast.kernels"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
    src = Path(__file__).resolve().parents[2] / "kernels"
    if not (src / "_common.py").is_file():
        raise ModuleNotFoundError(f"{name} is not installed and no source tree kernels/ was found")
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(src)]
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    import metake_fast

    metake_fast.kernels = mod
    return mod


def load_backends() -> dict:
    if _STATE["loaded"]:
        return _STATE
    _STATE["loaded"] = True
    if reference_forced():
        log.info("metake_fast: METAKE_FAST_REFERENCE set, using the PyTorch reference for every op")
        return _STATE
    try:
        from metake_fast import _C  # noqa: F401  (registers kernels on import)

        _STATE["cpp"] = "loaded"
        for name, key, provider in _C.registered_kernels():
            register_provider(name, key, provider)
    except ImportError as exc:
        _STATE["cpp"] = f"not built ({exc})"
    if torch.version.cuda is not None:
        try:
            from .triton_registry import register_triton_kernels

            register_triton_kernels()
            _STATE["triton"] = "registered for CUDA"
        except Exception as exc:  # triton missing or too old: keep the other kernels
            _STATE["triton"] = f"unavailable ({type(exc).__name__}: {exc})"
    from .registry import format_backends

    log.info("metake_fast backends:\n%s", format_backends())
    return _STATE
