"""Report the structural gradient proxy's agreement with the exact gradient on a real model.

The exact gradient differentiates the target NLL of the *really* edited model
through the multi-layer write (keys recomputed at every layer, the solver's
closed form); the proxy is ``G ∇_H̃ F`` at the virtual hidden ``H + R G``
(METHOD.md). Prints the cosine for each gate variant and writes JSON lines to
``bench/results/metake_proxy_cosine.jsonl``.

    python bench/metake_proxy_cosine.py --model smollm2-135m --n 4

From a sequential run's state (``--checkpoint DIR/state.safetensors --hparams FILE`` of a
MetaKE ``evaluate --checkpoint`` run, ``--start K`` its number of edits), the gradients are
those of the next requests, K to K + n, under the solvers as the run left them: the history
of earlier edits shapes both the gate and the real write. ``--gates`` then defaults to the
run's own gate; other gate choices are measured from the same state.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from metake_fast.datasets import load_dataset
from metake_fast.editor import Editor
from metake_fast.hparams import HParamsError, load_hparams, validate_hparams
from metake_fast.metake import proxy_gradient_cosine
from metake_fast.targets import optimize_targets

RESULTS = Path(__file__).parent / "results" / "metake_proxy_cosine.jsonl"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=4, help="CounterFact requests (one batch)")
    p.add_argument("--gates", default=None, help="comma-separated gate_layers values (default: last,spread,product)")
    p.add_argument("--stats-tokens", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="target steps (default: the hparams)")
    p.add_argument("--data", default="counterfact", help="CounterFact file or shipped name")
    p.add_argument("--checkpoint", default=None, help="state.safetensors of a MetaKE evaluate run")
    p.add_argument(
        "--hparams", default=None, help="hparams file (with --checkpoint: that run's; default: the shipped one)"
    )
    p.add_argument("--start", type=int, default=0, help="first request (with --checkpoint: the run's edits)")
    p.add_argument(
        "--gate-keys", default="mean", help="comma-separated gate_keys values: mean, instance (per-prompt gate)"
    )
    args = p.parse_args(argv)
    if args.checkpoint and (args.stats_tokens or args.steps is not None):
        p.error("--stats-tokens and --steps change the run's settings; a checkpoint loads only into its own")
    reqs = [c.request for c in load_dataset(args.data, n=args.start + args.n)][args.start :]
    if len(reqs) < args.n:
        p.error(f"{args.data} has fewer than {args.start + args.n} records")
    from _common import git_commit  # bench/ is the script's directory

    commit = git_commit()
    rows = []
    # One editor for every gate: the gate enters only the proxy, not the targets or the exact gradient.
    over = {}
    if args.stats_tokens:
        over["stats_tokens"] = args.stats_tokens
    if args.steps is not None:
        over["v_num_grad_steps"] = args.steps
    try:
        hp = load_hparams("metake", args.model, path=args.hparams, overrides=over)
        ed = Editor.from_pretrained(args.model, method="metake", hparams=hp, progress=False)
    except HParamsError as exc:
        p.error(f"--hparams {args.hparams}: {exc}")
    if args.checkpoint:
        ed.load_checkpoint(args.checkpoint)
        if args.start < len(ed.history):
            p.error(f"--start {args.start}: the checkpoint already holds {len(ed.history)} edits")
    gates = args.gates or (ed.hparams.gate_layers if args.checkpoint else "last,spread,product")
    ed._ensure_solvers()
    tpl = ed._templates()
    t0 = time.perf_counter()
    tres = optimize_targets(ed.model, ed.tok, ed.adapter, reqs, ed.layers[-1], tpl, ed._target_config(),
                            progress=False)  # fmt: skip
    targets_s = time.perf_counter() - t0
    combos = [(g, k) for g in gates.split(",") for k in args.gate_keys.split(",")]
    for gate, keys in combos:
        if gate == "product" and keys == "instance":
            continue  # not defined (hparams reject it)
        try:
            ed.hparams = validate_hparams(dataclasses.replace(ed.hparams, gate_layers=gate, gate_keys=keys))
        except HParamsError as exc:
            p.error(f"--gates {gate} --gate-keys {keys}: {exc}")
        t0 = time.perf_counter()
        res = proxy_gradient_cosine(ed, reqs, tpl, tres)
        row = {"model": args.model, "n": args.n, "start": args.start, "checkpoint": args.checkpoint,
               "hparams": args.hparams, "history": len(ed.history), "gate_layers": gate, "gate_keys": keys,
               "layers": ed.layers, "commit": commit,
               "targets_s": targets_s, "seconds": time.perf_counter() - t0, **res}  # fmt: skip
        rows.append(row)
        print(
            f"{gate:8s} {keys:8s} cosine {res['cosine']:+.3f}  |proxy| {res['norm_proxy']:.4f}"
            f"  |exact| {res['norm_exact']:.4f}"
            f"  gate eigenvalues {min(res['gate_eigenvalues']):.3f}..{max(res['gate_eigenvalues']):.3f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(main())
