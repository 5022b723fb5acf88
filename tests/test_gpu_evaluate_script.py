"""``bench/gpu_evaluate.sh`` with a stand-in Python: how it starts runs, passes their settings and
stops a wave when one run breaks (the script spends leased GPU time, so a broken run must not)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_evaluate.sh"
HP = "examples/hparams/alphaedit_smollm2_steps50.yaml"

# Stands in for `python`: the model-loading and summary snippets (`python -`) just succeed; an
# `evaluate` run logs its arguments, then behaves as its --method says: `fail` exits 3 after a
# moment, `slow` sleeps, anything else succeeds at once.
FAKE_PY = """#!/usr/bin/env bash
if [ "$1" = "-" ]; then cat > /dev/null; echo "stand-in"; exit 0; fi
echo "ARGS $*"
case "$*" in
  *"--method fail"*) sleep 1; echo "metake-fast: error: broken"; exit 3;;
  *"--method slow"*) sleep 6; echo "DONE";;
  *) echo "DONE";;
esac
"""

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash")


def _run(tmp_path, runs: str, **env):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    out = tmp_path / "out"
    e = {**os.environ, "PYTHON": str(fake), "GPU_EVAL_DIR": str(out), "GPU_EVAL_RUNS": runs, "GPU_EVAL_BUDGET": "120"}
    e.pop("OUT", None)
    e.update(env)
    p = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=e, capture_output=True, text=True, timeout=120)
    return p, out


def test_runs_get_their_data_slice_seed_and_chunk(tmp_path):
    p, out = _run(tmp_path, f"a:ok:{HP}:counterfact-10k:1:2000 b:ok:{HP}")
    assert p.returncode == 0, p.stdout + p.stderr
    a, b = (out / "a.log").read_text(), (out / "b.log").read_text()
    assert "--data counterfact-10k" in a and "--skip 2000" in a and "--on-conflict error" in a
    assert "--data counterfact " in b and "--skip" not in b
    cfg_a, cfg_b = (out / "a.hparams.yaml").read_text(), (out / "b.hparams.yaml").read_text()
    assert cfg_a.startswith((ROOT / HP).read_text()) and "target_chunk_tokens: 8192" in cfg_a
    assert "context_template_seed: 1" in cfg_a and "context_template_seed" not in cfg_b
    summary = (out / "summary.txt").read_text()
    assert "a rc=0" in summary and "b rc=0" in summary


def test_on_conflict_is_passed_through(tmp_path):
    p, out = _run(tmp_path, f"a:ok:{HP}:counterfact-10k::3000", GPU_EVAL_ON_CONFLICT="skip")
    assert p.returncode == 0 and "--on-conflict skip" in (out / "a.log").read_text()


def test_a_broken_run_stops_the_wave(tmp_path):
    p, out = _run(tmp_path, f"s:slow:{HP} f:fail:{HP} o:ok:{HP}")
    assert p.returncode == 1
    assert "f failed (rc=3): stopping the others" in p.stdout and "metake-fast: error: broken" in p.stdout
    summary = (out / "summary.txt").read_text()
    assert "f rc=3" in summary and "o rc=0" in summary
    assert "DONE" not in (out / "s.log").read_text()  # the slow run was stopped, not waited for


def test_without_fail_fast_the_others_finish(tmp_path):
    p, out = _run(tmp_path, f"s:slow:{HP} f:fail:{HP}", GPU_EVAL_FAIL_FAST="0")
    assert p.returncode == 1  # one run failed
    summary = (out / "summary.txt").read_text()
    assert "f rc=3" in summary and "s rc=0" in summary and "DONE" in (out / "s.log").read_text()


def test_a_run_the_budget_cannot_hold_is_not_started(tmp_path):
    # a run starts only with at least 30 s of cap (budget − elapsed − 20); not starting it is a failure
    p, out = _run(tmp_path, f"s:ok:{HP}", GPU_EVAL_BUDGET="25")
    assert p.returncode == 1 and "s not started (budget spent)" in p.stdout
    assert not (out / "s.log").exists()
