"""Models dispatched with accelerate ``device_map`` (issue: scale, sharded models).

On this CPU-only machine the real multi-GPU split cannot run; what can:

* a model dispatched by accelerate with hooks, part of it offloaded to disk
  (weights on ``meta``, loaded by hooks for each forward): editing layers that are
  resident gives exactly the edit of the plain model (oracle: the same edit on an
  undispatched copy), and the offloaded layers keep their stored weights;
* an edited layer that is offloaded is refused before anything changes;
* placement: the keys handed to each layer's solver and its factors live on that
  layer's weight device.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

import torch  # noqa: E402
from _tiny import tiny_model, tiny_tokenizer  # noqa: E402

from metake_fast.editor import EditError, Editor  # noqa: E402
from metake_fast.models import offloaded_value, weights_fingerprint  # noqa: E402

HP = {"v_num_grad_steps": 4, "stats_tokens": 1500, "stats_max_length": 48, "context_template_count": 1,
      "context_template_length": 3, "layers": [1, 2]}  # fmt: skip
REQS = [
    {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "target_true": "Paris"},
    {"prompt": "Bob Smith works for", "subject": "Bob Smith", "target_new": "Google", "target_true": "Apple"},
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _dispatched(tmp_path, offload: list[int]):
    from accelerate import dispatch_model

    model = tiny_model("llama", layers=4, seed=0)
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    for i in range(4):
        device_map[f"model.layers.{i}"] = "disk" if i in offload else "cpu"
    return dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path / "offload"))


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_edit_with_an_offloaded_later_layer_equals_plain_model(tmp_path, method):
    plain = Editor(tiny_model("llama", layers=4, seed=0), tiny_tokenizer(), method, HP, cache=tmp_path, progress=False)
    model = _dispatched(tmp_path, offload=[3])
    assert model.model.layers[3].mlp.down_proj.weight.is_meta  # really offloaded
    ed = Editor(model, tiny_tokenizer(), method, HP, cache=tmp_path, progress=False)
    assert ed.fingerprint == plain.fingerprint  # offloaded values are hashed, not skipped

    stored3 = offloaded_value(model, "model.layers.3.mlp.down_proj.weight").clone()
    r_plain = plain.edit(REQS, batch_size=2)
    r_disp = ed.edit(REQS, batch_size=2)
    for layer in (1, 2):
        a = plain.model.model.layers[layer].mlp.down_proj.weight
        b = model.model.layers[layer].mlp.down_proj.weight
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), layer
        assert not torch.equal(b, ed._original[layer])
    assert torch.equal(offloaded_value(model, "model.layers.3.mlp.down_proj.weight"), stored3)
    for x, y in zip(r_plain.requests, r_disp.requests):
        assert x.p_new_post == pytest.approx(y.p_new_post, rel=1e-4, abs=1e-6)
    assert r_disp.efficacy == r_plain.efficacy
    ed.restore()
    assert weights_fingerprint(model) == plain.fingerprint


def test_offloaded_edit_layer_is_refused(tmp_path):
    model = _dispatched(tmp_path, offload=[2])
    before = {k: v.clone() for k, v in model.state_dict().items() if not v.is_meta}
    with pytest.raises(EditError, match=r"layer 2: .*offloaded"):
        Editor(model, tiny_tokenizer(), "memit", HP, cache=tmp_path, progress=False)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_tensors_follow_the_weight_device(tmp_path, monkeypatch):
    """Every key, residual and update handed to the solver and the writer is on its layer's weight device."""
    from metake_fast import solvers

    seen = []
    real = solvers.NullSpaceSolver.solve if hasattr(solvers.NullSpaceSolver, "solve") else None
    if real is None:
        pytest.skip("solver has no solve method")

    def spy(self, K, *a, **k):
        out = real(self, K, *a, **k)
        seen.append((self.layer, K.device, *[t.device for t in out]))
        return out

    monkeypatch.setattr(solvers.NullSpaceSolver, "solve", spy)
    ed = Editor(tiny_model("llama", layers=4, seed=0), tiny_tokenizer(), "alphaedit", HP, cache=tmp_path,
                progress=False)  # fmt: skip
    ed.edit(REQS[:1], batch_size=1, score=False)
    assert seen and all(set(devs) == {ed.adapter.edit_weight(ed.model, layer).device} for layer, *devs in seen)
