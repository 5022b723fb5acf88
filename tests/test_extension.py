"""The compiled extension: what it registers, and that importing stays CPU-only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import metake_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _C_or_skip():
    try:
        from metake_fast import _C
    except ImportError:
        pytest.skip("metake_fast._C not built")
    return _C


def test_registered_kernels_match_dispatcher():
    _C = _C_or_skip()
    kernels = _C.registered_kernels()
    assert kernels, "extension registered nothing"
    for op, key, provider in kernels:
        assert op in metake_fast.ops.OPS
        assert isinstance(provider, str) and provider
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"metake_fast::{op}", key)
        assert metake_fast.backends()[op][key.lower()] == provider
    if not _C.with_cuda:
        assert all(key == "CPU" for _, key, _ in kernels)


def _run_py(code: str, **env) -> dict:
    full_env = {**os.environ, **env, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


IMPORT_CHECK = """
import json, torch, metake_fast
S = torch.zeros(4, 4); metake_fast.ops.second_moment_accumulate(S, torch.ones(2, 4))
print(json.dumps({"cuda_init": torch.cuda.is_initialized(), "S": S[0, 0].item(),
                  "backends": metake_fast.backends(), "reference": metake_fast.ops.reference_forced()}))
"""


def test_import_does_not_initialise_cuda():
    res = _run_py(IMPORT_CHECK)
    assert res["cuda_init"] is False and res["S"] == 2.0


def test_reference_mode_uses_pytorch_everywhere_and_passes_opcheck():
    res = _run_py(IMPORT_CHECK, METAKE_FAST_REFERENCE="1")
    assert res["reference"] is True and res["cuda_init"] is False and res["S"] == 2.0
    assert all(p == "reference (PyTorch)" for row in res["backends"].values() for p in row.values())
    code = """
import json, torch, metake_fast
ops = torch.ops.metake_fast
S = torch.randn(6, 6); S = S + S.T
torch.library.opcheck(ops.second_moment_accumulate, (S, torch.randn(3, 6), None))
torch.library.opcheck(ops.apply_update_, (torch.randn(4, 6), torch.randn(4, 2), torch.randn(6, 2), False))
h = torch.randn(3, 5, requires_grad=True); w = torch.randn(11, 5, requires_grad=True); t = torch.tensor([0, 4, 10])
torch.library.opcheck(ops.fused_target_logprob, (h, w, t, 4))
print(json.dumps({"ok": True, "C_loaded": "metake_fast._C" in __import__("sys").modules}))
"""
    res = _run_py(code, METAKE_FAST_REFERENCE="1")
    assert res == {"ok": True, "C_loaded": False}


def test_source_kernels_dir_does_not_shadow_hub_kernels():
    """Python started in the checkout (its root first on ``sys.path``) must not take ``kernels/`` for ``kernels``.

    transformers >= 5.25 imports the Hugging Face ``kernels`` distribution; a regular
    package named ``kernels`` at the repository root used to shadow it and broke every
    model import run from the root (``python -m pytest`` there puts the root first).
    """
    code = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "origin = None if spec is None else spec.origin\n"
        "import transformers, transformers.modeling_utils\n"
        "from metake_fast.ops.backends import kernels_package\n"
        "m = kernels_package()\n"
        "print(json.dumps({'origin': origin, 'ours': list(m.__path__), 'name': m.__name__}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    ours = os.path.join(ROOT, "kernels")
    assert not os.path.exists(os.path.join(ours, "__init__.py"))
    assert res["origin"] is None or not res["origin"].startswith(ours + os.sep), res  # a hub package, or nothing
    assert res["name"] == "metake_fast.kernels"
    assert any(os.path.isfile(os.path.join(p, "apply_update.py")) for p in res["ours"]), res
