"""Benchmark the whole target loop of one batch, with and without compaction.

One batch of ``--n`` CounterFact requests on the default model (SmolLM2-135M, edit
layer 8, the shipped 5 context templates), ``--steps`` target steps with per-request
early stop, as the editor runs it (``metake_fast.targets.optimize_targets``):

* ``reference: every request to the end``: each chunk runs all its requests until the
  last one converges (converged ones frozen but still computed);
* ``compacted (shipped)``: a converged request's prompts leave the forward/backward,
  so a chunk costs the sum of its requests' steps.

Both give the same targets (``tests/test_targets.py``); the table prints their largest
difference, relative to the targets' norm, and whether every request took the same
number of steps. Providers are interleaved round by round.

python bench/bench_target_loop.py [--n 100] [--steps 50] [--skip 0] [--reps 1]
"""

from __future__ import annotations

import time

import _common as C  # noqa: I001
import torch

from metake_fast.targets import TargetConfig, optimize_targets

OP = "target_loop"


def main() -> None:
    from metake_fast.context import context_templates
    from metake_fast.datasets import load_requests
    from metake_fast.models import get_adapter, load_model

    p = C.parser(__doc__)
    p.add_argument("--n", type=int, default=100, help="requests in the batch")
    p.add_argument("--steps", type=int, default=50, help="target steps (the 50-step example files)")
    p.add_argument("--skip", type=int, default=0, help="leave out the first K CounterFact records")
    p.add_argument("--data", default="counterfact-10k")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=8, help="the last edited layer L")
    args = p.parse_args()
    dev = C.device()
    model, tok = load_model(args.model, device=dev)
    adapter = get_adapter(model)
    reqs = load_requests(args.data, args.skip + args.n)[args.skip :]
    tpl = context_templates(model, tok, 5, 10)
    variants = {"reference: every request to the end": False, "compacted (shipped)": True}
    times: dict[str, list[float]] = {k: [] for k in variants}
    results = {}
    for _ in range(args.reps or 1):
        for name, compact in variants.items():
            cfg = TargetConfig(steps=args.steps, compact=compact)
            C.sync(dev)
            t0 = time.perf_counter()
            results[name] = optimize_targets(model, tok, adapter, reqs, args.layer, tpl, cfg, progress=False)
            C.sync(dev)
            times[name].append(1e3 * (time.perf_counter() - t0))
    ref, new = (results[k] for k in variants)
    diff = float((new.delta - ref.delta).norm(dim=1).max() / ref.delta.norm(dim=1).max())
    same_steps = float((new.steps == ref.steps).float().mean())
    print(f"  targets: largest row difference / largest target norm {diff:.2e}; same step count for "
          f"{100 * same_steps:.0f} % of requests; mean steps {float(ref.steps.float().mean()):.1f} of {args.steps}")  # fmt: skip
    tm = {}
    for k, v in times.items():
        t = torch.tensor(v)
        tm[k] = {"median_ms": float(t.median()), "p20_ms": float(t.quantile(0.2)), "p80_ms": float(t.quantile(0.8))}
    shape = {"model": args.model, "requests": args.n, "steps": args.steps, "skip": args.skip, "layer": args.layer,
             "mean_steps": round(float(ref.steps.float().mean()), 2), "max_rel_target_diff": diff}  # fmt: skip
    C.report(OP, shape, next(model.parameters()).dtype, dev, tm, 0.0, 0.0, save=not args.no_save)


if __name__ == "__main__":
    main()
