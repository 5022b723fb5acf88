"""Editor checkpoints: the complete state of a sequential editing run, to resume it later.

A delta file (:mod:`metake_fast.delta`) is what a user deploys; a checkpoint is
what a long run (thousands of sequential edits, hours on a CPU) needs to stop and
go on bit-for-bit: the current edited weights *and* the per-layer solver state
(AlphaEdit's null-space factor carries the history of every earlier batch), plus
the requests applied so far. Resuming from a checkpoint and editing the remaining
batches gives exactly the weights of the uninterrupted run (tested).

File: safetensors only (never pickle). Tensors ``weight.<layer>`` (the edited
weight, its own dtype) and ``solver.<layer>.<name>`` (solver state); metadata
``format`` (``"metake_fast.checkpoint"``), ``method``, ``model``, ``fingerprint``
(of the *original* model), ``hparams``, ``requests``, ``extra`` (caller JSON) and
``sha256`` of the tensors. :func:`load_checkpoint` checks the checksum, the model
fingerprint, the method, the hyperparameters and every shape before it changes
anything, then applies all of it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .delta import DeltaError, tensor_checksum, write_atomic

FORMAT = "metake_fast.checkpoint"
#: solver state entries added after the format was first written; a checkpoint without one
#: loads with the solver's default for it (``NullSpaceSolver.history_scale`` 1, the only value
#: such a checkpoint's settings allow).
_SOLVER_STATE_ADDED = {"history_scale"}


class CheckpointError(DeltaError):
    """A checkpoint is missing, corrupt, or does not belong to this editor (model, method, hparams)."""


def save_checkpoint(editor, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write the editor's full state (weights, solver state, requests) to ``path`` atomically."""
    from safetensors.torch import save

    from .hparams import to_dict

    editor._ensure_solvers()
    weights, solvers = editor._snapshot()
    tensors = {f"weight.{layer}": w.contiguous().cpu() for layer, w in weights.items()}
    for layer, state in solvers.items():
        for name, t in state.items():
            tensors[f"solver.{layer}.{name}"] = t.detach().contiguous().cpu()
    meta = {
        "format": FORMAT,
        "method": str(editor.method),
        "model": str(editor.model_name),
        "fingerprint": str(editor.fingerprint),
        "hparams": json.dumps(to_dict(editor.hparams), sort_keys=True),
        "requests": json.dumps([r.to_dict() for r in editor.history]),
        "extra": json.dumps(extra or {}),
        "sha256": tensor_checksum(tensors),
    }
    path = Path(path)
    write_atomic(path, save(tensors, metadata=meta))
    return path


def load_checkpoint(editor, path: str | os.PathLike) -> dict[str, Any]:
    """Restore the state saved by :func:`save_checkpoint` into ``editor``; returns its ``extra`` dict.

    The editor must be built on the same original model (fingerprint) with the
    same method and hyperparameters. Everything is checked before anything changes.
    """
    from safetensors.torch import load

    from .hparams import hparams_differences
    from .requests import EditRequest

    src = str(path)
    try:
        data = Path(path).read_bytes()
        tensors = load(data)
        from safetensors import safe_open

        with safe_open(src, framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise CheckpointError(f"{src}: no such checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - any failure to read means the file is unusable
        raise CheckpointError(f"{src}: unreadable checkpoint: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{src}: not a metake_fast checkpoint (format {meta.get('format')!r})")
    if tensor_checksum(tensors) != meta.get("sha256"):
        raise CheckpointError(f"{src}: checksum mismatch: the checkpoint was modified or corrupted")
    if meta.get("fingerprint") != editor.fingerprint:
        raise CheckpointError(
            f"{src}: checkpoint is for a different model (fingerprint {meta.get('fingerprint')}, "
            f"this model {editor.fingerprint})"
        )
    if meta.get("method") != editor.method:
        raise CheckpointError(f"{src}: checkpoint was made with {meta.get('method')}, this editor uses {editor.method}")
    diff = hparams_differences(json.loads(meta.get("hparams", "null")), editor.hparams)
    if diff:
        raise CheckpointError(f"{src}: checkpoint hyperparameters differ from this editor's: {'; '.join(diff)}")
    try:
        requests = [EditRequest.from_dict(r, index=i) for i, r in enumerate(json.loads(meta["requests"]))]
        extra = json.loads(meta.get("extra", "{}"))
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{src}: corrupt checkpoint metadata: {exc}") from None

    editor._ensure_solvers()
    cur_weights, cur_solvers = editor._snapshot()
    weights = {}
    for layer, w in cur_weights.items():
        t = tensors.get(f"weight.{layer}")
        if t is None or t.shape != w.shape or t.dtype != w.dtype:
            raise CheckpointError(f"{src}: layer {layer}: weight missing or of another shape/dtype")
        weights[layer] = t
    solvers = {}
    for layer, state in cur_solvers.items():
        solvers[layer] = {}
        for name in state:
            t = tensors.get(f"solver.{layer}.{name}")
            if t is None and name in _SOLVER_STATE_ADDED:
                continue  # an older checkpoint: the solver keeps the default (see _SOLVER_STATE_ADDED)
            if t is None:
                raise CheckpointError(f"{src}: layer {layer}: solver state {name!r} missing")
            solvers[layer][name] = t
    snap = (weights, solvers)
    backup = (cur_weights, cur_solvers)
    try:
        editor._rollback(snap)  # writes the weights and loads the solver states
    except Exception as exc:
        editor._rollback(backup)
        raise CheckpointError(f"{src}: checkpoint does not fit this editor: {exc}") from None
    editor.history = requests
    return extra
