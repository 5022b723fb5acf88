"""How much the next batch's write moves the keys of earlier edits: plain vs MetaKE residuals.

From a sequential run's checkpoint (``metake-fast evaluate --method metake --checkpoint
DIR``, written by this version), takes the next requests, computes their plain targets
(AlphaEdit's, the lower level alone) and MetaKE's refined ones from the same state, and
compares, at the last edited layer ``L`` and to first order, what each write would do:

* disturbance ``‖ΔW K_p‖²_F = tr(Rᵀ H_p R)`` with ``H_p = Yᵀ K_p K_pᵀ Y`` over the keys
  ``K_p`` of every earlier edit (``NullSpaceSolver.history_gram``: from the solver's
  factor of ``U₀ᵀK_pK_pᵀU₀ + λI``, no stored keys needed);
* realised energy ``‖ΔW K‖²_F = tr(Rᵀ Gᵀ G R)`` on the batch's own keys.

Ratios are against the plain targets under the run's own solver. A variant that re-weights the
history (``history_scale``) is measured under its own solver, and so are the plain targets
(``*_plain_<name>``: AlphaEdit with that weight).

python bench/metake_history_disturbance.py --checkpoint DIR --start 500 --n 20

Settings other than the run's own are compared from the same state and the same plain
targets with ``--variant NAME:field=value,...`` (repeatable), e.g. to choose the
history term's weight: ``--variant eta10:history_weight=10 --variant eta30:history_weight=30``.
``--hparams FILE`` is the run's own file (a checkpoint only loads into matching settings).
"""

from __future__ import annotations

import argparse
import json
import time

import _common  # noqa: F401,I001  (puts the repository on sys.path)
import torch

from metake_fast.datasets import load_requests
from metake_fast.editor import Editor
from metake_fast.hparams import ALIASES
from metake_fast.metake import refine_targets
from metake_fast.targets import optimize_targets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="state.safetensors of a MetaKE evaluate run")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--start", type=int, required=True, help="first CounterFact record of the next batch")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--hparams", default=None, help="the run's hparams file (default: the shipped one)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:FIELD=VALUE,...",
        help="also refine with these settings changed (repeatable)",
    )
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    variants = _common.parse_variants(p, args.variant)
    ed = Editor.from_pretrained(args.model, method="metake", hparams=args.hparams, progress=False)
    hp_run = ed.hparams
    hps = _common.variant_hparams(p, hp_run, variants)
    ed.load_checkpoint(args.checkpoint)
    ed._ensure_solvers()
    reqs = load_requests("counterfact", args.start + args.n)[args.start :]
    tpl = ed._templates()
    L = ed.layers[-1]
    t0 = time.perf_counter()
    tres = optimize_targets(ed.model, ed.tok, ed.adapter, reqs, L, tpl, ed._target_config(), progress=False)
    timing = {"targets": 0.0, "keys": 0.0, "solve": 0.0, "apply": 0.0}
    solvers = ed._solvers
    saved = {layer: (s.L_A.clone(), s.history_scale) for layer, s in solvers.items()}

    def measured(r: torch.Tensor) -> dict:
        # the last-layer keys and gate the outer loop just computed (structural_gate), for the
        # solver as it is now (a variant may re-weight the history, ``history_scale``)
        hp = ed.hparams
        K = ed.last_gate_keys
        Hp = solvers[L].history_gram(K).double()
        last_full = hp.gate_layers == "last" and hp.gate == "full"
        G = (ed.last_gate if last_full else solvers[L].solve(K)[1]).double()
        return {
            "disturbance": float(torch.trace(r.T @ Hp @ r)),
            "realised_energy": float(torch.trace(r.T @ G.T @ G @ r)),
            "residual_norm": float(r.norm()),
        }

    res = {}
    Z_meta = refine_targets(ed, reqs, tpl, tres, timing)
    plain = tres.delta.double()
    res["plain"] = measured(plain)
    res["metake"] = measured(Z_meta.T.double() - tres.h.double())
    for name, hpv in hps.items():
        ed.hparams = hpv
        reweighted = hpv.history_scale != hp_run.history_scale
        if reweighted:
            for s in solvers.values():
                s.set_history_scale(hpv.history_scale)
        res[name] = measured(refine_targets(ed, reqs, tpl, tres, timing).T.double() - tres.h.double())
        if reweighted:  # the lower level alone (AlphaEdit with this μ) on the same plain targets
            res[f"plain_{name}"] = measured(plain)
            for layer, s in solvers.items():
                s.L_A, s.history_scale = saved[layer][0].clone(), saved[layer][1]
    ed.hparams = hp_run
    out = {"history": solvers[L].n_history, "requests": len(reqs), "seconds": time.perf_counter() - t0}
    out["variants"] = {
        name: {ALIASES.get(k, k): getattr(hps[name], ALIASES.get(k, k)) for k in f} for name, f in variants.items()
    }
    for k, m in res.items():
        for q, v in m.items():
            out[f"{q}_{k}"] = v
    for k in res:
        if k == "plain":
            continue
        sfx = "" if k == "metake" else f"_{k}"
        for q in ("disturbance", "realised_energy", "residual_norm"):
            out[f"{q}_ratio{sfx}"] = out[f"{q}_{k}"] / out[f"{q}_plain"]
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
