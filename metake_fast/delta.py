"""Save and load edits as weight deltas: safetensors only (never pickle), with provenance.

A delta file holds one float32 tensor ``delta.<layer>`` per edited layer,
``W_edited - W_original`` in the module's *stored* orientation (GPT-2 ``Conv1D``:
``(d_k, d_v)``, ``nn.Linear``: ``(d_v, d_k)``), and string metadata:

=================  ==========================================================
``format``         ``"metake_fast.delta"``
``format_version`` ``"1"``
``method``         the editing method (``rome``/``memit``/``alphaedit``/``metake``)
``model``          the model name the editor was built with
``fingerprint``    :func:`metake_fast.models.weights_fingerprint` of the *original* model
``layers``         JSON list of ``{"layer", "module", "shape", "weight_dtype"}``
``hparams``        JSON of :func:`metake_fast.hparams.to_dict`
``requests``       JSON list of the applied requests (:meth:`EditRequest.to_dict`)
``version``        ``metake_fast.__version__`` that wrote the file
``sha256``         hex digest of the tensors (see :func:`tensor_checksum`)
=================  ==========================================================

:func:`load_delta` checks everything (readable, valid safetensors, format,
checksum, model fingerprint, layers, module names, shapes, finite values) before
it touches a weight, then sets ``W = W_original + delta`` (computed in float32,
rounded once into the weight dtype) for every layer, all or nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("metake_fast")

FORMAT = "metake_fast.delta"
FORMAT_VERSION = "1"
_PREFIX = "delta."
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header

__all__ = ["DeltaError", "load_delta", "read_delta", "save_delta", "tensor_checksum"]


class DeltaError(ValueError):
    """A delta file is missing, unreadable, corrupt, or does not fit the editor's model."""


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over ``name, shape, dtype, raw bytes`` of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(json.dumps([list(t.shape), str(t.dtype)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, fsync and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_delta(editor, path: str | os.PathLike) -> Path:
    """Write ``editor.weight_deltas()`` and provenance to ``path`` (atomically: temp file + rename)."""
    from safetensors.torch import save

    from . import __version__
    from .hparams import to_dict

    path = Path(path)
    deltas = editor.weight_deltas()
    tensors = {f"{_PREFIX}{layer}": d.detach().to(torch.float32).contiguous().cpu() for layer, d in deltas.items()}
    layers = [
        {
            "layer": int(layer),
            "module": editor.adapter.edit_module_name(layer),
            "shape": list(d.shape),
            "weight_dtype": str(editor.adapter.edit_weight(editor.model, layer).dtype).removeprefix("torch."),
        }
        for layer, d in sorted(deltas.items())
    ]
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": str(editor.method),
        "model": str(editor.model_name),
        "fingerprint": str(editor.fingerprint),
        "layers": json.dumps(layers),
        "hparams": json.dumps(to_dict(editor.hparams)),
        "requests": json.dumps([r.to_dict() for r in editor.history]),
        "version": __version__,
        "sha256": tensor_checksum(tensors),
    }
    write_atomic(path, save(tensors, metadata=metadata))
    log.info("saved %d layer delta(s) of %d edit(s) to %s", len(tensors), len(editor.history), path)
    return path


def _header(data: bytes, src: str) -> dict:
    """Parse and sanity-check the safetensors header (8-byte length + JSON) without trusting it."""
    if len(data) < 8:
        raise DeltaError(f"{src}: not a safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n == 0 or n > _MAX_HEADER or 8 + n > len(data):
        raise DeltaError(f"{src}: not a safetensors file, or truncated (header length {n}, file {len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeltaError(f"{src}: not a safetensors file (bad header: {exc})") from None
    if not isinstance(header, dict):
        raise DeltaError(f"{src}: not a safetensors file (header is not a mapping)")
    body = len(data) - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise DeltaError(f"{src}: corrupt safetensors header entry {name!r}")
        if not 0 <= offs[0] <= offs[1] <= body:
            raise DeltaError(
                f"{src}: truncated safetensors file (tensor {name!r} ends at {offs[1]}, data {body} bytes)"
            )
    return header


def read_delta(path: str | os.PathLike) -> tuple[dict[int, torch.Tensor], dict]:
    """Read and self-check a delta file: ``({layer: float32 delta}, metadata)``.

    Checks that the file is a valid safetensors file of this format whose
    checksum matches and whose tensors agree with the metadata; the model
    checks are :func:`load_delta`'s. Raises :class:`DeltaError`.
    """
    from safetensors.torch import load

    src = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DeltaError(f"{src}: no such delta file") from None
    except OSError as exc:
        raise DeltaError(f"{src}: cannot read delta file: {exc.strerror or exc}") from None
    header = _header(data, src)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise DeltaError(f"{src}: safetensors file without metadata, not a metake_fast delta file")
    if meta.get("format") != FORMAT:
        raise DeltaError(f"{src}: not a metake_fast delta file (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DeltaError(
            f"{src}: unsupported delta format version {meta.get('format_version')!r} (this reads {FORMAT_VERSION})"
        )
    for key in ("fingerprint", "layers", "sha256", "hparams", "requests", "method"):
        if not isinstance(meta.get(key), str):
            raise DeltaError(f"{src}: delta metadata lacks {key!r}")
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error type (or others on odd input)
        raise DeltaError(f"{src}: corrupt safetensors file: {exc}") from None
    if tensor_checksum(tensors) != meta["sha256"]:
        raise DeltaError(f"{src}: checksum mismatch: the tensors were modified or corrupted")
    try:
        layers = json.loads(meta["layers"])
        json.loads(meta["hparams"])
        requests = json.loads(meta["requests"])
    except json.JSONDecodeError as exc:
        raise DeltaError(f"{src}: corrupt delta metadata: {exc}") from None
    if not isinstance(layers, list) or not isinstance(requests, list):
        raise DeltaError(f"{src}: corrupt delta metadata (layers/requests must be lists)")
    out: dict[int, torch.Tensor] = {}
    for entry in layers:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("layer"), int)
            and isinstance(entry.get("shape"), list)
            and isinstance(entry.get("module"), str)
        ):
            raise DeltaError(f"{src}: corrupt layer entry in delta metadata: {entry!r}")
        layer = entry["layer"]
        t = tensors.get(f"{_PREFIX}{layer}")
        if t is None:
            raise DeltaError(f"{src}: metadata lists layer {layer} but the file has no tensor {_PREFIX}{layer}")
        if list(t.shape) != entry["shape"] or t.dtype != torch.float32:
            raise DeltaError(
                f"{src}: tensor {_PREFIX}{layer} is {t.dtype} {list(t.shape)}, metadata says float32 {entry['shape']}"
            )
        if not bool(torch.isfinite(t).all()):
            raise DeltaError(f"{src}: tensor {_PREFIX}{layer} has non-finite values")
        out[layer] = t
    extra = sorted(set(tensors) - {f"{_PREFIX}{layer}" for layer in out})
    if extra:
        raise DeltaError(f"{src}: tensors not described by the metadata: {', '.join(extra)}")
    meta = dict(meta)
    meta["layers"] = layers
    meta["requests"] = requests
    return out, meta


def load_delta(editor, path: str | os.PathLike) -> None:
    """Set the editor's weights to ``W_original + delta`` from ``path``, all layers or none.

    Everything is validated first (see the module docstring); a file from a
    model with a different weight fingerprint is refused, naming both. Layers
    the editor edits but the file does not hold are reset to their originals.
    The editor's history becomes the file's requests; the solver state is reset
    (as by :meth:`Editor.restore`).
    """
    from .requests import EditRequest

    src = str(path)
    deltas, meta = read_delta(path)
    if meta["fingerprint"] != editor.fingerprint:
        raise DeltaError(
            f"{src}: delta is for a different model: file fingerprint {meta['fingerprint']} "
            f"({meta.get('model', '?')}), this model {editor.fingerprint} ({editor.model_name})"
        )
    entries = {e["layer"]: e for e in meta["layers"]}
    new_weights: dict[int, torch.Tensor] = {}
    for layer in sorted(set(editor.layers) | set(deltas)):
        if layer not in editor._original:
            raise DeltaError(
                f"{src}: delta edits layer {layer}, this editor edits layers {editor.layers} "
                "(build the editor with the file's layers)"
            )
        orig = editor._original[layer]
        if layer not in deltas:
            new_weights[layer] = orig
            continue
        name = editor.adapter.edit_module_name(layer)
        if entries[layer]["module"] != name:
            raise DeltaError(f"{src}: layer {layer} is module {entries[layer]['module']!r} in the file, {name!r} here")
        d = deltas[layer]
        if tuple(d.shape) != tuple(orig.shape):
            raise DeltaError(
                f"{src}: layer {layer} ({name}) delta has shape {tuple(d.shape)}, the weight is {tuple(orig.shape)}"
            )
        new_weights[layer] = (orig.float() + d.to(orig.device)).to(orig.dtype)
    try:
        requests = [EditRequest.from_dict(r, index=i) for i, r in enumerate(meta["requests"])]
    except ValueError as exc:
        raise DeltaError(f"{src}: corrupt request list in delta metadata: {exc}") from None
    if meta.get("method") != editor.method:
        log.warning("%s: delta was made with %s, this editor uses %s", src, meta.get("method"), editor.method)

    # everything checked: write all layers, putting the previous weights back if a copy fails
    before = {layer: editor.adapter.edit_weight(editor.model, layer).detach().clone() for layer in new_weights}
    try:
        with torch.no_grad():
            for layer, w in new_weights.items():
                editor.adapter.edit_weight(editor.model, layer).copy_(w)
    except BaseException:
        with torch.no_grad():
            for layer, w in before.items():
                editor.adapter.edit_weight(editor.model, layer).copy_(w)
        raise
    editor._solvers = {}
    editor.history = requests
    log.info("loaded %d layer delta(s) of %d edit(s) from %s", len(deltas), len(requests), src)
