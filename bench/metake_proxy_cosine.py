"""Report the structural gradient proxy's agreement with the exact gradient on a real model.

The exact gradient differentiates the target NLL of the *really* edited model
through the multi-layer write (keys recomputed at every layer, the solver's
closed form); the proxy is ``G ∇_H̃ F`` at the virtual hidden ``H + R G``
(METHOD.md). Prints the cosine for each gate variant and writes JSON lines to
``bench/results/metake_proxy_cosine.jsonl``.

    python bench/metake_proxy_cosine.py --model smollm2-135m --n 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

from metake_fast.datasets import load_dataset
from metake_fast.editor import Editor
from metake_fast.metake import proxy_gradient_cosine
from metake_fast.targets import optimize_targets

RESULTS = Path(__file__).parent / "results" / "metake_proxy_cosine.jsonl"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=4, help="CounterFact requests (one batch)")
    p.add_argument("--gates", default="last,spread,product")
    p.add_argument("--stats-tokens", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="target steps (default: the hparams)")
    args = p.parse_args(argv)
    reqs = [c.request for c in load_dataset("counterfact", n=args.n)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    for gate in args.gates.split(","):
        over = {"gate_layers": gate}
        if args.stats_tokens:
            over["stats_tokens"] = args.stats_tokens
        if args.steps is not None:
            over["v_num_grad_steps"] = args.steps
        ed = Editor.from_pretrained(args.model, method="metake", hparams=over, progress=False)
        ed._ensure_solvers()
        tpl = ed._templates()
        t0 = time.perf_counter()
        tres = optimize_targets(ed.model, ed.tok, ed.adapter, reqs, ed.layers[-1], tpl, ed._target_config(),
                                progress=False)  # fmt: skip
        res = proxy_gradient_cosine(ed, reqs, tpl, tres)
        row = {"model": args.model, "n": args.n, "gate_layers": gate, "layers": ed.layers, "commit": commit,
               "seconds": time.perf_counter() - t0, **res}  # fmt: skip
        rows.append(row)
        print(
            f"{gate:8s} cosine {res['cosine']:+.3f}  |proxy| {res['norm_proxy']:.4f}  |exact| {res['norm_exact']:.4f}"
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
