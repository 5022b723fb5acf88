"""How much the next batch's write moves the keys of earlier edits: plain vs MetaKE residuals.

From a sequential run's checkpoint (``metake-fast evaluate --method metake --checkpoint
DIR``, written by this version), takes the next requests, computes their plain targets
(AlphaEdit's, the lower level alone) and MetaKE's refined ones from the same state, and
compares, at the last edited layer ``L`` and to first order, what each write would do:

* disturbance ``‖ΔW K_p‖²_F = tr(Rᵀ H_p R)`` with ``H_p = Yᵀ K_p K_pᵀ Y`` over the keys
  ``K_p`` of every earlier edit (``NullSpaceSolver.history_gram``: from the solver's
  factor of ``U₀ᵀK_pK_pᵀU₀ + λI``, no stored keys needed);
* realised energy ``‖ΔW K‖²_F = tr(Rᵀ Gᵀ G R)`` on the batch's own keys.

python bench/metake_history_disturbance.py --checkpoint DIR --start 500 --n 20
"""

from __future__ import annotations

import argparse
import json
import time

import _common  # noqa: F401,I001  (puts the repository on sys.path)
import torch

from metake_fast.datasets import load_requests
from metake_fast.editor import Editor
from metake_fast.metake import refine_targets
from metake_fast.targets import optimize_targets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="state.safetensors of a MetaKE evaluate run")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--start", type=int, required=True, help="first CounterFact record of the next batch")
    p.add_argument("--n", type=int, default=20)
    args = p.parse_args()
    ed = Editor.from_pretrained(args.model, method="metake", progress=False)
    ed.load_checkpoint(args.checkpoint)
    ed._ensure_solvers()
    reqs = load_requests("counterfact", args.start + args.n)[args.start :]
    tpl = ed._templates()
    L = ed.layers[-1]
    t0 = time.perf_counter()
    tres = optimize_targets(ed.model, ed.tok, ed.adapter, reqs, L, tpl, ed._target_config(), progress=False)
    Z_meta = refine_targets(ed, reqs, tpl, tres, {"targets": 0.0, "keys": 0.0, "solve": 0.0, "apply": 0.0})
    # the last-layer keys and gate the outer loop already computed (structural_gate)
    K, hp = ed.last_gate_keys, ed.hparams
    Hp = ed._solvers[L].history_gram(K).double()
    last_full = hp.gate_layers == "last" and hp.gate == "full"
    G = (ed.last_gate if last_full else ed._solvers[L].solve(K)[1]).double()
    R = {"plain": tres.delta.double(), "metake": Z_meta.T.double() - tres.h.double()}
    out = {"history": ed._solvers[L].n_history, "requests": len(reqs), "seconds": time.perf_counter() - t0}
    for k, r in R.items():
        out[f"disturbance_{k}"] = float(torch.trace(r.T @ Hp @ r))
        out[f"realised_energy_{k}"] = float(torch.trace(r.T @ G.T @ G @ r))
        out[f"residual_norm_{k}"] = float(r.norm())
    for q in ("disturbance", "realised_energy", "residual_norm"):
        out[f"{q}_ratio"] = out[f"{q}_metake"] / out[f"{q}_plain"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
