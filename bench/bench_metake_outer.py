"""Benchmark MetaKE's upper level on one batch, with and without compaction.

One batch of ``--n`` CounterFact requests on the default model, from the unedited model,
with a MetaKE hyperparameter file (default: the 50-step file with extra contexts). The plain
targets are optimised once (``metake_fast.targets.optimize_targets``); then the upper level
(``metake_fast.metake.refine_targets``) runs twice from them:

* ``reference: every request to the end``: every outer step runs every request's prompts;
* ``compacted (shipped)``: a request whose virtual NLL is below ``early_stop_nll`` enters no
  later loss, so its prompts leave the forward/backward.

Both give the same refined targets (``tests/test_metake.py``); the table prints their largest
difference relative to the targets' norm, and how many requests each outer step still ran.

python bench/bench_metake_outer.py [--n 100] [--hparams examples/hparams/metake_smollm2_steps50_ctx.yaml]
"""

from __future__ import annotations

import dataclasses
import time

import _common as C  # noqa: I001
import torch

from metake_fast.editor import Editor
from metake_fast.metake import refine_targets
from metake_fast.targets import ChunkProblem, optimize_targets

OP = "metake_outer"


def main() -> None:
    from metake_fast.datasets import load_requests

    p = C.parser(__doc__)
    p.add_argument("--n", type=int, default=100, help="requests in the batch")
    p.add_argument("--skip", type=int, default=0, help="leave out the first K CounterFact records")
    p.add_argument("--data", default="counterfact-10k")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hparams", default="examples/hparams/metake_smollm2_steps50_ctx.yaml")
    args = p.parse_args()
    dev = C.device()
    ed = Editor.from_pretrained(args.model, method="metake", hparams=args.hparams, progress=False, device=str(dev))
    ed._ensure_solvers()
    reqs = load_requests(args.data, args.skip + args.n)[args.skip :]
    tpl = ed._templates()
    cfg = ed._target_config()
    t0 = time.perf_counter()
    tres = optimize_targets(ed.model, ed.tok, ed.adapter, reqs, ed.layers[-1], tpl, cfg, progress=False,
                            keep_problems=True)  # fmt: skip
    print(f"  plain targets: {time.perf_counter() - t0:.1f} s")
    sizes: list[int] = []
    losses = ChunkProblem.losses

    def spy(self, *a, **k):
        sizes.append(self.u)
        return losses(self, *a, **k)

    ChunkProblem.losses = spy
    variants = {"reference: every request to the end": False, "compacted (shipped)": True}
    times, Z, per_step = {}, {}, {}
    try:
        for name, compact in variants.items():
            run_cfg = dataclasses.replace(cfg, compact=compact)
            ed._target_config = lambda run_cfg=run_cfg: run_cfg
            sizes.clear()
            C.sync(dev)
            t0 = time.perf_counter()
            Z[name] = refine_targets(ed, reqs, tpl, tres, {})
            C.sync(dev)
            times[name] = 1e3 * (time.perf_counter() - t0)
            per_step[name] = sum(sizes)
    finally:
        ChunkProblem.losses = losses
    ref, new = (Z[k] for k in variants)
    diff = float((new - ref).norm(dim=0).max() / ref.norm(dim=0).max())
    print(f"  refined targets: largest column difference / largest target norm {diff:.2e}; request-chunk "
          f"forwards {per_step[next(iter(variants))]} -> {per_step['compacted (shipped)']}")  # fmt: skip
    tm = {k: {"median_ms": v, "p20_ms": v, "p80_ms": v} for k, v in times.items()}
    shape = {"model": args.model, "requests": args.n, "skip": args.skip, "hparams": args.hparams,
             "outer_steps": ed.hparams.outer_steps, "request_forwards": per_step, "max_rel_target_diff": diff}  # fmt: skip
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    shape["peak_rss_gib"] = round(peak, 2)
    print(f"  peak resident memory of the process (both variants): {peak:.2f} GiB")
    C.report(OP, shape, torch.float32, dev, tm, 0.0, 0.0, save=not args.no_save)


if __name__ == "__main__":
    main()
