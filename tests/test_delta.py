"""Edit deltas: safetensors round trip with provenance, and every way a file can be refused
(different model, tampered, truncated, pickle, wrong shapes) leaving the weights untouched."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from _tiny import tiny_model, tiny_tokenizer

from metake_fast.delta import DeltaError, read_delta, tensor_checksum
from metake_fast.editor import Editor

HP = {
    "v_num_grad_steps": 5,
    "stats_tokens": 2000,
    "stats_max_length": 64,
    "context_template_count": 2,
    "context_template_length": 4,
    "layers": [1, 2],
}
REQS = [
    {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "target_true": "Paris"},
    {"prompt": "Bob works for", "subject": "Bob", "target_new": "Google"},
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(ed: Editor) -> dict[int, torch.Tensor]:
    return {layer: ed.adapter.edit_weight(ed.model, layer).detach().clone() for layer in ed.layers}


def _all_params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """(editor, edited weights, delta path) after one MEMIT edit of a tiny Llama."""
    tmp = tmp_path_factory.mktemp("delta")
    ed = Editor(tiny_model("llama", seed=0), tiny_tokenizer(), "memit", HP, cache=tmp / "cache", progress=False)
    ed.edit(REQS, score=False)
    w_edit = _weights(ed)
    assert any(not torch.equal(w_edit[layer], ed._original[layer]) for layer in ed.layers)
    path = tmp / "edits.safetensors"
    ed.save_delta(path)
    return ed, w_edit, path


def _fresh(seed: int = 0) -> Editor:
    """A new editor on a new copy of the tiny model (same seed = same weights)."""
    return Editor(tiny_model("llama", seed=seed), tiny_tokenizer(), "memit", HP, cache=False, progress=False)


def test_file_contents(edited):
    ed, _, path = edited
    deltas, meta = read_delta(path)
    assert sorted(deltas) == ed.layers
    for layer, d in ed.weight_deltas().items():
        assert d.dtype == torch.float32
        assert torch.equal(deltas[layer], d)
    assert meta["fingerprint"] == ed.fingerprint
    assert meta["method"] == "memit"
    assert meta["format_version"] == "1"
    assert [e["module"] for e in meta["layers"]] == [ed.adapter.edit_module_name(layer) for layer in ed.layers]
    assert [r["target_new"] for r in meta["requests"]] == ["Rome", "Google"]
    assert json.loads(meta["hparams"])["layers"] == [1, 2]
    assert meta["version"]
    # no temp files left next to it
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


def test_round_trip(edited):
    ed, w_edit, path = edited
    ed.restore()
    assert _same(_weights(ed), ed._original)
    ed.load_delta(path)
    for layer in ed.layers:
        w = ed.adapter.edit_weight(ed.model, layer)
        # W_orig + (W_edit - W_orig) in fp32: one rounding away from W_edit
        torch.testing.assert_close(w, w_edit[layer], rtol=2e-7, atol=2e-7 * float(w_edit[layer].abs().max()))
    assert [r.target_new for r in ed.history] == ["Rome", "Google"]
    # into a brand-new editor on an identical model
    other = _fresh()
    before = _all_params(other.model)
    other.load_delta(path)
    for layer in other.layers:
        assert torch.equal(other.adapter.edit_weight(other.model, layer), ed.adapter.edit_weight(ed.model, layer))
    after = _all_params(other.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {other.adapter.edit_module_name(layer) + ".weight" for layer in other.layers}
    other.restore()
    assert _same(_all_params(other.model), before)


def test_save_is_atomic_overwrite(edited, tmp_path):
    ed, _, path = edited
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"old")
    ed.save_delta(target)
    read_delta(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def _refused(ed: Editor, path, match: str) -> None:
    before = _all_params(ed.model)
    with pytest.raises(DeltaError, match=match):
        ed.load_delta(path)
    assert _same(_all_params(ed.model), before)


def test_different_model(edited):
    ed, _, path = edited
    other = _fresh(seed=1)
    assert other.fingerprint != ed.fingerprint
    _refused(other, path, f"{ed.fingerprint}.*{other.fingerprint}")


def test_missing_file(edited, tmp_path):
    ed, _, _ = edited
    _refused(ed, tmp_path / "nope.safetensors", "no such")
    (tmp_path / "dir.safetensors").mkdir()
    _refused(ed, tmp_path / "dir.safetensors", "cannot read")


@pytest.mark.parametrize("where", ["data", "last", "header"])
def test_tampered(edited, tmp_path, where):
    ed, _, path = edited
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    if where == "data":
        pos = 8 + n + 100
    elif where == "last":
        pos = len(data) - 1
    else:
        pos = 8 + data[8 : 8 + n].index(b"fingerprint") + 2
    data[pos] ^= 0x41
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(bytes(data))
    _refused(ed, bad, "checksum|not a safetensors|metadata|corrupt|lacks")


def test_tampered_fingerprint_metadata(edited, tmp_path):
    """A consistent file (valid checksum) whose fingerprint field was changed is refused."""
    from safetensors.torch import load, save

    ed, _, path = edited
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    meta["fingerprint"] = "0" * 16
    bad = tmp_path / "fp.safetensors"
    bad.write_bytes(save(load(data), metadata=meta))
    _refused(ed, bad, "different model")


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1, -200])
def test_truncated(edited, tmp_path, keep):
    ed, _, path = edited
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    _refused(ed, bad, "safetensors|truncated")


def test_pickle_renamed(edited, tmp_path):
    ed, _, path = edited
    deltas = {f"delta.{k}": v for k, v in ed.weight_deltas().items()}
    p1 = tmp_path / "torch.safetensors"
    torch.save(deltas, p1)
    _refused(ed, p1, "not a safetensors")
    p2 = tmp_path / "pickle.safetensors"
    p2.write_bytes(pickle.dumps(deltas))
    _refused(ed, p2, "not a safetensors")


def _rewrite(path, out, tensors_fn=None, meta_fn=None):
    from safetensors.torch import load, save

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    tensors = load(data)
    if tensors_fn:
        tensors = tensors_fn(tensors)
    meta["sha256"] = tensor_checksum(tensors)
    if meta_fn:
        meta_fn(meta)
    out.write_bytes(save(tensors, metadata=meta))
    return out


def test_wrong_layer_shape(edited, tmp_path):
    ed, _, path = edited

    def shrink(t):
        t = dict(t)
        t["delta.1"] = t["delta.1"][:, :-1].contiguous()
        return t

    def fix_meta(meta):
        layers = json.loads(meta["layers"])
        layers[0]["shape"][1] -= 1
        meta["layers"] = json.dumps(layers)

    # a consistent file (checksum and metadata agree) with a shape that does not fit the model
    _refused(ed, _rewrite(path, tmp_path / "shape.safetensors", shrink, fix_meta), "shape")
    # tensor shape disagreeing with the metadata
    _refused(ed, _rewrite(path, tmp_path / "shape2.safetensors", shrink), "metadata says")


def test_wrong_layers(edited, tmp_path):
    ed, _, path = edited

    def move(t):
        t = dict(t)
        t["delta.3"] = t.pop("delta.2")
        return t

    def fix_meta(meta):
        layers = json.loads(meta["layers"])
        layers[1]["layer"] = 3
        layers[1]["module"] = layers[1]["module"].replace(".2.", ".3.")
        meta["layers"] = json.dumps(layers)

    _refused(ed, _rewrite(path, tmp_path / "layer.safetensors", move, fix_meta), "layer 3")
    _refused(ed, _rewrite(path, tmp_path / "layer2.safetensors", move), "no tensor|not described")


def test_non_finite(edited, tmp_path):
    ed, _, path = edited

    def nan(t):
        t = dict(t)
        t["delta.1"] = t["delta.1"].clone()
        t["delta.1"][0, 0] = float("nan")
        return t

    _refused(ed, _rewrite(path, tmp_path / "nan.safetensors", nan), "non-finite")


def test_not_a_delta_file(edited, tmp_path):
    from safetensors.torch import save_file

    ed, _, _ = edited
    p = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, p)
    _refused(ed, p, "metadata|not a metake_fast delta")
    save_file({"x": torch.zeros(2)}, p, metadata={"format": "metake_fast.delta", "format_version": "99"})
    _refused(ed, p, "version")
