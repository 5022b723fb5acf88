#!/usr/bin/env bash
# One GPU check: build the extension with CUDA, run every GPU test and every op
# benchmark, the editor benchmark on a random-weight Llama-3-8B-shaped model in
# bf16 (N = 1,000, B = 100), and print one summary table. Needs nothing outside
# the machine (no hub, no network). Target: under 8 minutes on one H100/H200.
#
#   bash bench/gpu_check.sh            # from the repository root
#   GPU_CHECK_EDITOR_N=100 bash bench/gpu_check.sh   # a shorter editor run
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu_check}"
mkdir -p "$OUT"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
status=0
run() {  # name, command...
  local name=$1; shift
  log "$name"
  local t0=$SECONDS
  if "$@" > "$OUT/$name.log" 2>&1; then echo "$name ok $((SECONDS - t0))s" >> "$OUT/summary.txt"
  else echo "$name FAILED $((SECONDS - t0))s" >> "$OUT/summary.txt"; status=1; tail -20 "$OUT/$name.log"; fi
}
rm -f "$OUT/summary.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
PY
export MAX_JOBS="${MAX_JOBS:-16}" METAKE_FAST_CUDA_ARCHS="${METAKE_FAST_CUDA_ARCHS:-90}"
run build python setup.py build_ext --inplace
run tests_gpu python -m pytest -q -x -p no:cacheprovider -m "not slow" \
  tests/test_op_second_moment_accumulate.py tests/test_op_apply_update.py tests/test_op_fused_target_logprob.py \
  tests/test_op_gated_delta_inject.py tests/test_op_fused_kl.py \
  tests/test_extension.py tests/test_solvers.py tests/test_metake.py
run bench_second_moment_accumulate python bench/bench_second_moment_accumulate.py --large
run bench_apply_update python bench/bench_apply_update.py --large
run bench_fused_target_logprob python bench/bench_fused_target_logprob.py --large
run bench_gated_delta_inject python bench/bench_gated_delta_inject.py --large
run bench_fused_kl python bench/bench_fused_kl.py --large --no-compile
run bench_triton python bench/bench_triton.py
run bench_editor python bench/bench_editor.py --config llama3-8b --dtype bf16 --device cuda \
  --n "${GPU_CHECK_EDITOR_N:-1000}" --batch-size 100 --methods alphaedit,metake --providers metake_fast
echo
echo "== summary ($(cat "$OUT/device.txt")) =="
column -t "$OUT/summary.txt"
for f in "$OUT"/bench_*.log; do echo "--- $(basename "$f" .log)"; grep -E "^\|| ms |GB/s|TFLOP|edits/s" "$f" | head -40; done
exit $status
