"""The editor on a CUDA device writes the same edit as on the CPU (skipped without a GPU).

Oracle: the CPU run of the same editor on the same tiny model, hparams, corpus
and requests (fp32, TF32 off). Every op resolves to a different implementation
on the two devices (C++/CUDA or Triton kernels on the GPU, C++ or PyTorch on the
CPU), so agreement of the written ΔW checks the whole GPU path end to end.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from _tiny import corpus_lines, tiny_model, tiny_tokenizer  # noqa: E402

from metake_fast.editor import Editor  # noqa: E402
from metake_fast.requests import EditRequest  # noqa: E402

HP = {"v_num_grad_steps": 4, "stats_tokens": 2000, "stats_max_length": 64, "context_template_count": 1,
      "context_template_length": 3, "outer_steps": 2}  # fmt: skip
REQS = [EditRequest("The city of {} is in", s, t, "France") for s, t in [("Paris", "Rome"), ("Lyon", "Berlin")]]


def _edit(method: str, device: str, dtype=torch.float32):
    torch.manual_seed(0)
    model = tiny_model("llama", layers=4, dtype=dtype).to(device)
    hp = dict(HP)
    if method != "metake":
        hp.pop("outer_steps")
    ed = Editor(model, tiny_tokenizer(), method, hp, cache=False, progress=False, corpus=corpus_lines(30))
    before = {lyr: ed.adapter.edit_weight(model, lyr).detach().double().cpu().clone() for lyr in ed.layers}
    report = ed.edit(REQS)
    delta = {lyr: ed.adapter.edit_weight(model, lyr).detach().double().cpu() - before[lyr] for lyr in ed.layers}
    return delta, report


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit", "metake"])
def test_cuda_edit_matches_cpu(method):
    d_cpu, r_cpu = _edit(method, "cpu")
    d_gpu, r_gpu = _edit(method, "cuda")
    assert d_cpu.keys() == d_gpu.keys()
    for lyr in d_cpu:
        a, b = d_gpu[lyr], d_cpu[lyr]
        assert b.norm() > 0
        rel = float((a - b).norm() / b.norm())
        assert rel < 2e-2, (method, lyr, rel)
    for x, y in zip(r_gpu.requests, r_cpu.requests):
        assert abs(x.p_new_post - y.p_new_post) < 2e-2, (method, x.p_new_post, y.p_new_post)


@pytest.mark.parametrize("method", ["alphaedit", "metake"])
def test_cuda_bf16_edit_is_finite_and_restores(method):
    torch.manual_seed(0)
    model = tiny_model("llama", layers=4, dtype=torch.bfloat16).to("cuda")
    hp = dict(HP)
    if method != "metake":
        hp.pop("outer_steps")
    ed = Editor(model, tiny_tokenizer(), method, hp, cache=False, progress=False, corpus=corpus_lines(30))
    before = {lyr: ed.adapter.edit_weight(model, lyr).clone() for lyr in ed.layers}
    ed.edit(REQS)
    for lyr in ed.layers:
        w = ed.adapter.edit_weight(model, lyr)
        assert w.dtype == torch.bfloat16 and w.is_cuda and torch.isfinite(w).all()
        assert not torch.equal(w, before[lyr])
    ed.restore()
    assert all(torch.equal(ed.adapter.edit_weight(model, lyr), before[lyr]) for lyr in ed.layers)
