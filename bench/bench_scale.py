"""Ten thousand sequential edits with bounded memory (issue: scale).

Edits the first N CounterFact cases (shipped ``counterfact-10k``) in sequential
batches of B with one :class:`Editor` and reports, per N, the peak resident
memory of the process, the editing time and the running efficacy of all edits so
far after every batch (``track=True``), so a collapse is visible. Every N runs in
its own fresh subprocess, so the peaks are independent.

Oracle for "bounded": the editor keeps only per-layer ``d_k×d_k`` state
(covariance factor, AlphaEdit null-space factor) across batches; requests, keys
and targets live for one batch. So peak memory at N=10,000 must be within a few
percent of N=1,000 (the issue's bar: 10%).

    python bench/bench_scale.py                       # tiny random llama, N=1000,10000, B=100
    python bench/bench_scale.py --n 1000 --model smollm2-135m --steps 25
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> dict:
    import torch

    from metake_fast.datasets import load_requests
    from metake_fast.editor import Editor

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.model == "tiny-llama":
        from _tiny import tiny_model, tiny_tokenizer

        model, tok = tiny_model("llama", layers=4), tiny_tokenizer()
        hp = {"layers": [1, 2], "stats_tokens": 20000, "stats_max_length": 128}
    else:
        from metake_fast.models import load_model

        model, tok = load_model(args.model)
        hp = {}
    hp |= {"v_num_grad_steps": args.steps, "context_template_count": args.templates, "context_template_length": 5}
    ed = Editor(model, tok, args.method, hp, model_name=args.model, progress=False, cache=args.cache)
    reqs = load_requests("counterfact-10k", int(args.n))
    # CounterFact repeats some (prompt, subject) pairs with different targets (83 of the
    # 10,000). One batch may not hold a conflict, so such a case moves to the next batch
    # (later edits of a fact override earlier ones, as in any sequential run).
    batches, pending, deferred = [], list(reqs), 0
    while pending:
        batch, keys, rest = [], set(), []
        for r in pending:
            if len(batch) < args.batch_size and (r.prompt, r.subject) not in keys:
                batch.append(r)
                keys.add((r.prompt, r.subject))
            else:
                rest.append(r)
        deferred += sum(1 for r in rest[: len(pending) - len(batch)] if (r.prompt, r.subject) in keys)
        batches.append(batch)
        pending = rest
    ed._ensure_solvers()  # statistics are not part of the editing time or the growth
    base_rss = _rss_mb()
    per_batch = []
    t0 = time.perf_counter()
    done = 0
    for b, batch in enumerate(batches):
        track = (b + 1) % args.track_every == 0 or b == len(batches) - 1
        rep = ed.edit(batch, batch_size=args.batch_size, score=False, track=track)
        done += len(rep.requests)
        row = {"edits": done, "rss_mb": _rss_mb(), "s": time.perf_counter() - t0}
        if rep.running:
            row["running_efficacy"] = 100 * rep.running["efficacy"]
        per_batch.append(row)
        if track:
            print(json.dumps(row), file=sys.stderr, flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "n": int(args.n), "batch_size": args.batch_size, "method": args.method, "model": args.model,
        "peak_rss_mb": peak, "rss_after_stats_mb": base_rss, "edit_s": time.perf_counter() - t0,
        "final_running_efficacy": per_batch[-1].get("running_efficacy"), "per_batch": per_batch,
        "hparams": {k: v for k, v in hp.items()}, "threads": args.threads, "conflicts_deferred": deferred, "batches": len(batches),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="1000,10000", help="comma list of edit counts")  # an int in --child
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--method", default="alphaedit")
    p.add_argument("--model", default="tiny-llama", help="tiny-llama (random) or smollm2-135m / a model dir")
    p.add_argument("--steps", type=int, default=10, help="target optimisation steps")
    p.add_argument("--templates", type=int, default=2, help="context templates")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--track-every", type=int, default=10, help="running efficacy every this many batches")
    p.add_argument("--cache", default=None, help="statistics cache dir (default: the user cache)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    if args.cache is None:
        args.cache = True
    if args.child:
        print(json.dumps(child(args)))
        return

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from _common import git_commit

    rows = []
    for n in [int(x) for x in args.n.split(",")]:
        cmd = [sys.executable, __file__, "--child", "--n", str(n), "--batch-size", str(args.batch_size),
               "--method", args.method, "--model", args.model, "--steps", str(args.steps),
               "--templates", str(args.templates), "--threads", str(args.threads),
               "--track-every", str(args.track_every)]  # fmt: skip
        if args.cache is not True:
            cmd += ["--cache", str(args.cache)]
        print(f"N={n}: running ...", flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_rss_mb"]
    print(f"\n{args.method} on {args.model}, B={args.batch_size}, {args.steps} target steps, commit {git_commit()}")
    print(f"{'N':>7} {'edit s':>9} {'edits/s':>8} {'peak RSS MB':>12} {'vs first':>9} {'running eff %':>14}")
    for r in rows:
        eff = r["final_running_efficacy"]
        print(
            f"{r['n']:>7} {r['edit_s']:>9.1f} {r['n'] / r['edit_s']:>8.2f} {r['peak_rss_mb']:>12.1f}"
            f" {100 * (r['peak_rss_mb'] / base - 1):>+8.1f}% {'-' if eff is None else f'{eff:.1f}':>14}"
        )
    if not args.no_save:
        import datetime
        import platform

        os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
        with open(os.path.join(ROOT, "bench", "results", "scale.jsonl"), "a") as f:
            for r in rows:
                r |= {"commit": git_commit(), "device": platform.processor() or platform.machine(),
                      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
