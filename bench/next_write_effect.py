"""What one more batch's write does to the edits already made: plain targets vs MetaKE's.

In the N = 1000 sequential runs MetaKE's last batches generalize better than AlphaEdit's and its
first batches worse (``bench/results_by_batch.py``): its writes seem to cost earlier edits
more. This measures that directly. From a sequential run's checkpoint (the state after the
run's ``--history-n`` edits), the next ``--n`` requests get their plain targets once (the
target loop, the lower level's input), then each write is made from the same state and undone:

* ``plain``: the plain targets written by the run's solver (AlphaEdit's write);
* ``metake``: the run's own upper level (refined targets, its safeguard if it has one);
* ``--variant NAME:field=value,...``: MetaKE with those settings changed (repeatable);
* ``--plain-scale S``: the plain targets with their residuals scaled, ``Z = H + S·Δ``, written as
  ``plain`` is (row ``plain_xS``; repeatable). A stronger write with no upper level: the control
  for whether MetaKE's refinement buys more on the new batch per unit of cost to the earlier
  edits than simply asking for more.

After each write the earlier edits are scored on their rewrite and paraphrase prompts (the
efficacy and generalization prompts of the evaluation) and the new batch on all its prompts.
Reported per write: the new batch's efficacy / generalization / specificity and mean paraphrase
margin, the earlier
edits' efficacy and generalization, and the mean change of the earlier edits' paraphrase
margin ``log P(new) − log P(true)`` against the state before the write (paired over the same
prompts, so small differences between writes are visible). Each write other than ``plain`` is
also paired with ``plain``: on the earlier edits' margins and on the new batch's paraphrase margins.

Without ``--checkpoint`` the earlier edits are made first, in this process, with the run's
hyperparameters changed by ``--history-set`` (e.g. fewer target steps, to make them quickly);
``--history-n 0`` writes the new batch into the unedited model.

    python bench/next_write_effect.py --checkpoint runs/ckpt/state.safetensors \
        --hparams examples/hparams/metake_smollm2_steps50.yaml --history-data counterfact \
        --history-n 1000 --next-data counterfact-10k --next-skip 2000 --n 100 --out effect.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import _common  # noqa: F401,I001  (puts the repository on sys.path)
import torch

from metake_fast.datasets import DatasetError, load_dataset
from metake_fast.editor import Editor
from metake_fast.evaluate import evaluate_cases, git_commit, prompt_log_margins
from metake_fast.targets import optimize_targets


def _lite(cases):
    """The cases with only their rewrite and paraphrase prompts (no neighbourhood: cheaper)."""
    return [dataclasses.replace(c, neighborhood_prompts=[], generation_prompts=[]) for c in cases]


def _pct(x):
    return None if x is None else round(x, 2)


def _mean_ci(d: list[float]) -> tuple[float, float]:
    n = len(d)
    if n == 0:  # no earlier edits (a write from the unedited model)
        return math.nan, math.nan
    m = sum(d) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / max(n - 1, 1))
    return m, 1.96 * sd / math.sqrt(n)


def next_write_effect(
    ed: Editor, hist_cases, next_cases, hps: dict, log=lambda m: None, plain_scales: tuple[float, ...] = ()
) -> dict:
    """Each write of ``next_cases`` from ``ed``'s current state, undone after scoring (see the module doc).

    ``hps``: name -> MetaKE hyperparameters for the refined writes (``"plain"`` is always made
    first); ``plain_scales``: rows ``plain_xS`` writing ``H + S·Δ``. Returns ``before`` /
    ``before_new`` (metrics before any write), ``before_margins``, ``writes`` (one row per write),
    ``margins`` (the earlier edits' paraphrase margins after each write) and ``new_margins`` (the
    new batch's). The editor's weights and solver state are as before when it returns.
    """
    from metake_fast.metake import refine_targets, safeguarded_write

    ed._ensure_solvers()
    hist = _lite(hist_cases)
    nxt = list(next_cases)
    reqs = [c.request for c in nxt]
    tok = ed.tok
    hp_run = ed.hparams

    def score():
        mh, rh = (
            evaluate_cases(ed.model, tok, hist) if hist else ({"efficacy": math.nan, "generalization": math.nan}, [])
        )
        mn, rn = evaluate_cases(ed.model, tok, nxt)
        new_m = prompt_log_margins(rn)
        mn["paraphrase_margin"] = sum(new_m) / max(len(new_m), 1)
        return mh, prompt_log_margins(rh), mn, new_m

    before_h, before_m, before_n, _ = score()
    log(f"before: earlier edits eff {before_h['efficacy']:.1f} gen {before_h['generalization']:.1f}")
    tpl = ed._templates()
    L = ed.layers[-1]
    t0 = time.perf_counter()
    tres = optimize_targets(
        ed.model, tok, ed.adapter, reqs, L, tpl, ed._target_config(), progress=False, keep_problems=True
    )
    t_targets = time.perf_counter() - t0
    Z_plain = (tres.h + tres.delta).T
    scaled = {f"plain_x{s:g}": (tres.h + s * tres.delta).T for s in plain_scales}
    rows = {}
    margins = {}
    new_margins = {}
    try:
        for name in ["plain", *scaled, *hps]:
            snap = ed._snapshot()
            timing = {"targets": 0.0, "keys": 0.0, "solve": 0.0, "apply": 0.0}
            t0 = time.perf_counter()
            fallback = 0
            try:
                if name == "plain":
                    ed._write(reqs, tpl, Z_plain, timing)
                elif name in scaled:
                    ed._write(reqs, tpl, scaled[name], timing)
                else:
                    ed.hparams = hps[name]
                    Z = refine_targets(ed, reqs, tpl, tres, timing)
                    if ed.hparams.safeguard:
                        fallback = int(safeguarded_write(ed, reqs, tpl, Z_plain, Z, timing).sum())
                    else:
                        ed._write(reqs, tpl, Z, timing)
                t_write = time.perf_counter() - t0
                mh, m, mn, new_m = score()
            finally:
                ed.hparams = hp_run
                ed._rollback(snap)
            margins[name] = m
            new_margins[name] = new_m
            dm, ci = _mean_ci([a - b for a, b in zip(m, before_m)])
            rows[name] = {
                "new_efficacy": _pct(mn["efficacy"]),
                "new_generalization": _pct(mn["generalization"]),
                "new_specificity": _pct(mn["specificity"]),
                "new_paraphrase_margin": mn["paraphrase_margin"],
                "earlier_efficacy": _pct(mh["efficacy"]),
                "earlier_generalization": _pct(mh["generalization"]),
                "earlier_paraphrase_margin_change": dm,
                "earlier_paraphrase_margin_change_ci95": ci,
                "plain_targets": fallback,
                "write_s": t_write,
            }
            log(f"{name} {json.dumps(rows[name])}")
    finally:
        tres.problems = None
    for name in [*scaled, *hps]:  # paired against the plain write, on the same prompts
        dm, ci = _mean_ci([a - b for a, b in zip(margins[name], margins["plain"])])
        rows[name]["earlier_margin_vs_plain"] = dm
        rows[name]["earlier_margin_vs_plain_ci95"] = ci
        dm, ci = _mean_ci([a - b for a, b in zip(new_margins[name], new_margins["plain"])])
        rows[name]["new_margin_vs_plain"] = dm
        rows[name]["new_margin_vs_plain_ci95"] = ci
    return {
        "before": before_h, "before_new": before_n, "before_margins": before_m, "writes": rows,
        "margins": margins, "new_margins": new_margins, "targets_s": t_targets, "history_cases": hist,
    }  # fmt: skip


def build_history(ed: Editor, hist_cases, batch_size: int, hp_hist) -> None:
    """Edit ``hist_cases`` in sequential batches with ``hp_hist`` (the earlier edits, made in this
    process instead of loaded from a checkpoint); the editor's hyperparameters are restored after."""
    hp_run = ed.hparams
    ed.hparams = hp_hist
    try:
        ed.edit([c.request for c in hist_cases], batch_size=batch_size)
    finally:
        ed.hparams = hp_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint", default=None,
        help="state.safetensors of a MetaKE evaluate run after its --history-n edits; without it the "
        "earlier edits are made here first (none with --history-n 0: a write from the unedited model)",
    )  # fmt: skip
    p.add_argument(
        "--history-set", action="append", default=[], metavar="FIELD=VALUE",
        help="without --checkpoint: hparams changed for making the earlier edits (e.g. v_num_grad_steps=10 "
        "or outer_steps=0 to make them faster); the next batch's writes use --hparams as given",
    )  # fmt: skip
    p.add_argument(
        "--history-batch", type=int, default=100, help="without --checkpoint: batch size of the earlier edits"
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hparams", default=None, help="the run's hparams file (default: the shipped one)")
    p.add_argument("--history-data", default="counterfact", help="the run's data (its first --history-n cases)")
    p.add_argument("--history-skip", type=int, default=0)
    p.add_argument("--history-n", type=int, required=True, help="edits in the checkpoint")
    p.add_argument("--next-data", default="counterfact-10k")
    p.add_argument("--next-skip", type=int, required=True, help="first record of the next batch")
    p.add_argument("--n", type=int, default=100, help="requests in the next batch")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:FIELD=VALUE,...")
    p.add_argument(
        "--plain-scale", action="append", type=float, default=[], metavar="S",
        help="also write the plain targets with their residuals times S (repeatable)",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    variants = _common.parse_variants(p, args.variant)
    if args.history_n < 0 or args.history_batch < 1:
        p.error("--history-n must be >= 0 and --history-batch >= 1")
    if args.checkpoint is not None and (args.history_n == 0 or args.history_set):
        p.error("--checkpoint is the state after --history-n > 0 edits (and --history-set is for making them here)")
    hist_fields = _common.parse_variants(p, [f"history:{','.join(args.history_set)}"])["history"]
    if any(not math.isfinite(s) or s < 0 for s in args.plain_scale) or len(set(args.plain_scale)) < len(
        args.plain_scale
    ):
        p.error("--plain-scale: each S must be a distinct finite number >= 0")
    if any(name.startswith("plain_x") for name in variants):
        p.error("--variant: names starting with plain_x are the --plain-scale rows")

    try:
        hist = load_dataset(args.history_data, args.history_n, skip=args.history_skip) if args.history_n else []
        nxt = load_dataset(args.next_data, args.n, skip=args.next_skip)
    except DatasetError as exc:
        p.error(str(exc))
    for what, cases in (("--history-data", hist), ("--next-data", nxt)):
        if any(c.dataset != "counterfact" for c in cases):
            p.error(f"{what}: the margins need CounterFact cases (ZsRE has no true object to compare with)")

    t_start = time.perf_counter()
    ed = Editor.from_pretrained(args.model, method="metake", hparams=args.hparams, progress=False)
    hp_run = ed.hparams
    hps = {"metake": hp_run, **_common.variant_hparams(p, hp_run, variants)}
    for name, hp in hps.items():
        if hp.history_scale != hp_run.history_scale:
            p.error(f"--variant {name}: history_scale changes the solver state; not supported here")
    if args.checkpoint is not None:
        ed.load_checkpoint(args.checkpoint)
    elif hist:
        hp_hist = _common.variant_hparams(p, hp_run, {"history": hist_fields})["history"]
        print(f"making the {len(hist)} earlier edits (batches of {args.history_batch})", flush=True)
        build_history(ed, hist, args.history_batch, hp_hist)
    res = next_write_effect(
        ed, hist, nxt, hps, log=lambda m: print(m, flush=True), plain_scales=tuple(args.plain_scale)
    )
    before_h, before_n, rows = res["before"], res["before_new"], res["writes"]
    before_m = res["before_margins"]
    hist = res["history_cases"]
    print()
    print(f"earlier edits: {len(hist)} ({len(before_m)} paraphrase prompts), next batch: {len(nxt)}")
    print(
        "| write | new eff | new gen | new spec | new margin | vs plain | earlier eff | earlier gen"
        " | Δ margin (earlier) | vs plain |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| before | {before_n['efficacy']:.1f} | {before_n['generalization']:.1f} | {before_n['specificity']:.1f}"
        f" | {before_n['paraphrase_margin']:+.3f} | – | {before_h['efficacy']:.1f} | {before_h['generalization']:.1f} | – | – |"
    )
    for name, r in rows.items():
        vs, vs_new = (
            (
                f"{r['earlier_margin_vs_plain']:+.3f} ± {r['earlier_margin_vs_plain_ci95']:.3f}",
                f"{r['new_margin_vs_plain']:+.3f} ± {r['new_margin_vs_plain_ci95']:.3f}",
            )
            if "earlier_margin_vs_plain" in r
            else ("–", "–")
        )
        print(
            f"| {name} | {r['new_efficacy']:.1f} | {r['new_generalization']:.1f} | {r['new_specificity']:.1f}"
            f" | {r['new_paraphrase_margin']:+.3f} | {vs_new} | {r['earlier_efficacy']:.1f} | {r['earlier_generalization']:.1f}"
            f" | {r['earlier_paraphrase_margin_change']:+.3f} ± {r['earlier_paraphrase_margin_change_ci95']:.3f}"
            f" | {vs} |"
        )
    out = {
        "checkpoint": args.checkpoint,
        "hparams": args.hparams,
        "history": {
            "data": args.history_data,
            "skip": args.history_skip,
            "n": args.history_n,
            "made_here": args.checkpoint is None and args.history_n > 0,
            "set": hist_fields,
            "batch_size": args.history_batch,
        },  # fmt: skip
        "next": {"data": args.next_data, "skip": args.next_skip, "n": args.n},
        "variants": variants,
        "plain_scales": args.plain_scale,
        "before": {
            "earlier_efficacy": before_h["efficacy"],
            "earlier_generalization": before_h["generalization"],
            "new": {k: before_n[k] for k in ("efficacy", "generalization", "specificity", "paraphrase_margin")},
        },
        "writes": rows,
        "new_margins": res["new_margins"],  # per paraphrase prompt of the new batch, per write (pair any two)
        "targets_s": res["targets_s"],
        "seconds": time.perf_counter() - t_start,
        "device": str(next(ed.model.parameters()).device),
        "commit": git_commit(),
        "threads": torch.get_num_threads(),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
