"""Editing half-precision models: weights keep their dtype, ROME still realises its planned residual."""

import pytest
import torch
from _tiny import corpus_lines, tiny_model, tiny_tokenizer

from metake_fast.editor import Editor
from metake_fast.requests import EditRequest

HP = {"v_num_grad_steps": 3, "stats_tokens": 2000, "stats_max_length": 64, "context_template_count": 1,
      "context_template_length": 3}  # fmt: skip
REQS = [EditRequest("The city of {} is in", s, t, "France") for s, t in [("Paris", "Rome"), ("Lyon", "Berlin")]]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit", "metake"])
def test_half_precision_edit(dtype, method):
    model = tiny_model("llama", layers=4, dtype=dtype)
    ed = Editor(model, tiny_tokenizer(), method, dict(HP), cache=False, progress=False, corpus=corpus_lines(30))
    before = {layer: ed.adapter.edit_weight(model, layer).clone() for layer in ed.layers}
    report = ed.edit(REQS)
    for layer in ed.layers:
        w = ed.adapter.edit_weight(model, layer)
        assert w.dtype == dtype and torch.isfinite(w).all()
        assert not torch.equal(w, before[layer])
    if method == "rome":  # one layer, rank one per request: the planned residual is written in full
        assert all(abs(r.realised - 1) < 0.1 for r in report.requests)
    ed.restore()
    assert all(torch.equal(ed.adapter.edit_weight(model, layer), before[layer]) for layer in ed.layers)
