"""The editor benchmark: the --quick run, and the reference flow's closed forms vs metake_fast's."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from _tiny import tiny_model, tiny_tokenizer  # noqa: E402

from metake_fast.datasets import load_requests  # noqa: E402
from metake_fast.editor import Editor  # noqa: E402
from metake_fast.keys import keys_and_residual  # noqa: E402
from metake_fast.models import get_adapter  # noqa: E402
from metake_fast.solvers import CovarianceSolver, NullSpaceSolver  # noqa: E402

FIELDS = {
    "bench", "model", "config", "device", "device_name", "dtype", "shapes", "n", "batch_size", "method", "provider",
    "seconds", "editing_s", "edits_per_s", "edits_per_s_with_stats", "peak_mem_mb", "mem_kind", "efficacy",
    "mean_p_new", "mean_p_true", "target_steps_mean", "flop_floor", "floor_fraction_of_peak", "peak_flops",
    "stats_tokens", "hparams", "set", "commit", "torch", "date",
}  # fmt: skip


def test_quick_run_writes_json_lines(tmp_path):
    import bench_editor

    out, png = tmp_path / "editor.jsonl", tmp_path / "editor.png"
    rc = bench_editor.main(["--quick", "--device", "cpu", "--methods", "memit,alphaedit", "--out", str(out),
                            "--plot", str(png)])  # fmt: skip
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4
    assert {(r["method"], r["provider"]) for r in rows} == {
        (m, p) for m in ("memit", "alphaedit") for p in ("metake_fast", "reference-flow")
    }
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert set(r["seconds"]) == {"stats", "prep", "keys", "targets", "solve", "apply"}
        assert r["n"] == 2 and r["batch_size"] == 1
        assert r["hparams"]["method"] == r["method"] and r["hparams"]["v_num_grad_steps"] == 2  # --quick's override
        assert r["set"]["v_num_grad_steps"] == 2
        assert r["edits_per_s"] > 0 and r["editing_s"] > 0 and r["peak_mem_mb"] > 0
        assert 0.0 <= r["efficacy"] <= 1.0 and 0.0 <= r["mean_p_new"] <= 1.0
        assert set(r["flop_floor"]) == {"stats", "keys", "targets", "solve", "apply"}
        assert r["shapes"]["d_k"] == 80 and r["shapes"]["d_v"] == 48
    try:
        import matplotlib  # noqa: F401

        assert png.stat().st_size > 0
    except ImportError:
        pass


def _spd(d: int, seed: int, small: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    ev = torch.rand(d, generator=g, dtype=torch.float64) + 0.5
    if small:  # half the spectrum below AlphaEdit's threshold: a null space of dimension d/2
        ev[: d // 2] = 1e-3 * torch.rand(d // 2, generator=g, dtype=torch.float64)
    return (Q * ev) @ Q.T


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_reference_write_matches_metake_fast(method):
    """Same Z, same keys -> the reference flow's ΔW equals metake_fast's (two sequential batches)."""
    from reference_flow import ReferenceState, projector, reference_write

    tok = tiny_tokenizer()
    model_a = tiny_model("llama", layers=4)
    model_b = copy.deepcopy(model_a)
    adapter = get_adapter(model_a)
    hp_over = {"context_template_count": 2, "context_template_length": 3, "layers": [0, 1]}
    # small λ so that ΔW is well above the fp32 rounding of the tiny model's weights
    hp_over.update({"mom2_update_weight": 1e-2} if method == "memit" else {"L2": 1e-2})
    ed = Editor(model_a, tok, method, hp_over, cache=False, progress=False)
    hp = ed.hparams
    d_k = adapter.key_dim(model_a, 0)
    C = {lyr: _spd(d_k, lyr, method == "alphaedit").float() for lyr in hp.layers}
    if method == "memit":
        ed._solvers = {lyr: CovarianceSolver(C[lyr], hp.mom2_update_weight, layer=lyr) for lyr in hp.layers}
    else:
        ed._solvers = {lyr: NullSpaceSolver(C[lyr], hp.nullspace_threshold, hp.L2, layer=lyr) for lyr in hp.layers}
    state = ReferenceState()
    for lyr in hp.layers if method == "alphaedit" else []:
        state.P[lyr] = projector(C[lyr], hp.nullspace_threshold)
        state.cache_c[lyr] = torch.zeros(d_k, d_k, dtype=torch.float64)
    templates = ed._templates()
    reqs = load_requests("counterfact", n=6)
    g = torch.Generator().manual_seed(0)
    W0 = {lyr: adapter.edit_weight(model_a, lyr).detach().clone() for lyr in hp.layers}
    for part in (reqs[:3], reqs[3:]):
        _, H = keys_and_residual(model_a, tok, adapter, part, None, hp.layers[-1], [["{}"]])
        Z = H + 2.0 * torch.randn(H.shape, generator=g)
        ed._write(part, templates, Z.clone(), {"keys": 0.0, "solve": 0.0, "apply": 0.0})
        reference_write(model_b, tok, adapter, part, method, hp, Z.clone(), C, templates, state, {})
    for lyr in hp.layers:
        da = adapter.edit_weight(model_a, lyr).detach() - W0[lyr]
        db = adapter.edit_weight(model_b, lyr).detach() - W0[lyr]
        scale = float(da.abs().max())
        assert scale > 1e-2, f"the update should not be trivial ({scale})"
        assert float((da - db).abs().max()) <= 1e-5 * max(1.0, scale), (lyr, float((da - db).abs().max()), scale)
