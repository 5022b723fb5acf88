#!/usr/bin/env bash
# One GPU check, in one command: build the extension with CUDA, run every GPU test,
# the Triton and op benchmarks, and the editor benchmark on a random-weight
# Llama-3-8B-shaped model in bf16; print one summary. Needs nothing outside the
# machine (no hub, no network) and works from a source checkout (PYTHONPATH=.).
#
#   bash bench/gpu_check.sh                                  # from the repository root
#   GPU_CHECK_BUDGET=540 GPU_CHECK_EDITOR_N=100 bash bench/gpu_check.sh
#
# Every step has its own time cap and the whole script stops starting steps once
# GPU_CHECK_BUDGET seconds (default 540) are spent, so a lease-limited machine
# always returns logs. Logs go to $GPU_CHECK_DIR (default bench/results/gpu_check);
# benchmark rows are appended to bench/results/*.jsonl as usual. When $OUT is set
# (a device runner's return folder) everything is also packed into
# $OUT/gpu_check.tgz.
#
# The editor benchmark needs a tokenizer: GPU_CHECK_TOKENIZER (a directory with
# tokenizer.json and config.json; default: SmolLM2's, which must be converted
# already) or "tiny".
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
DIR="${GPU_CHECK_DIR:-bench/results/gpu_check}"
BUDGET="${GPU_CHECK_BUDGET:-540}"
mkdir -p "$DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log() { echo "[gpu_check +$((SECONDS))s] $*"; }
status=0
run() {  # name, cap seconds, command...
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if (( left < 15 )); then echo "$name SKIPPED (budget spent)" >> "$DIR/summary.txt"; log "$name skipped"; return; fi
  (( cap > left )) && cap=$left
  log "$name (cap ${cap}s)"
  local t0=$SECONDS rc=0
  timeout --kill-after=5 "$cap" "$@" > "$DIR/$name.log" 2>&1 || rc=$?
  if (( rc == 0 )); then echo "$name ok $((SECONDS - t0))s" >> "$DIR/summary.txt"
  else
    local why="FAILED rc=$rc"; (( rc == 124 || rc == 137 )) && why="TIMED OUT"
    echo "$name $why $((SECONDS - t0))s" >> "$DIR/summary.txt"; status=1; tail -25 "$DIR/$name.log"
  fi
}
rm -f "$DIR/summary.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$DIR/device.txt"
"$PY" - <<'PY' | tee -a "$DIR/device.txt"
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "none"
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", tv, torch.cuda.get_device_name(0))
PY
export MAX_JOBS="${MAX_JOBS:-16}" METAKE_FAST_CUDA_ARCHS="${METAKE_FAST_CUDA_ARCHS:-90}"
run build 240 "$PY" setup.py build_ext --inplace
"$PY" -c "import metake_fast; print(metake_fast.format_backends())" 2>&1 | tee "$DIR/backends.txt"
# pytest-xdist, when installed, isolates a crashing test (its worker is replaced) so every result is reported
XDIST=(); "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
run tests_gpu 150 "$PY" -m pytest -q -rfEs --tb=short "${XDIST[@]}" -p no:cacheprovider -m "not slow" \
  tests/test_ops_cuda.py tests/test_editor_cuda.py tests/test_op_gated_delta_inject.py tests/test_extension.py
run bench_triton 60 "$PY" bench/bench_triton.py
TOK="${GPU_CHECK_TOKENIZER:-default}"
run bench_editor 300 "$PY" bench/bench_editor.py --config llama3-8b --tokenizer "$TOK" --dtype bf16 --device cuda \
  --n "${GPU_CHECK_EDITOR_N:-100}" --batch-size "${GPU_CHECK_EDITOR_B:-100}" --methods alphaedit,metake \
  --providers metake_fast
for op in second_moment_accumulate apply_update fused_target_logprob gated_delta_inject; do
  run "bench_$op" 45 "$PY" "bench/bench_$op.py" --large
done
run bench_fused_kl 45 "$PY" bench/bench_fused_kl.py --large --no-compile
echo
echo "== summary ($(head -1 "$DIR/device.txt")) =="
cat "$DIR/summary.txt"
for f in "$DIR"/bench_*.log; do
  [ -f "$f" ] || continue
  echo "--- $(basename "$f" .log)"; grep -E "^\||^#| ms |GB/s|TFLOP|edits/s|^method|^alphaedit|^metake" "$f" | head -40
done
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  tar czf "$OUT/gpu_check.tgz" "$DIR" bench/results/*.jsonl 2>/dev/null && log "packed into $OUT/gpu_check.tgz"
fi
exit $status
