"""Arithmetic of one target-optimisation step: the published flow against metake_fast.

Counts, for the same CounterFact requests and context templates, the matmul FLOP
of one step of target optimisation per request, from the prompts each flow
actually builds:

* ``reference-flow`` (``bench/reference_flow.py``, ``_RequestPrompts``): every
  rewriting prompt and the KL prompt of one request padded to one batch, a full
  forward through all layers with the unembedding at every position, and the
  gradient w.r.t. the activations back to layer ``L`` (through the unembedding);
* ``metake_fast`` (``ChunkProblem``, prefix cache + replay): only the tokens from
  the subject's last token on (padding included), only the layers above ``L``,
  forward and gradient w.r.t. the activations; the unembedding only at target
  and KL rows (counted here, small).

A ``y = x W`` costs ``2·in·out`` FLOP per token forward and the same for the
gradient w.r.t. ``x`` (weights are frozen). Attention score FLOP are left out
for both (short prompts). The ratio is the speed-up an implementation gets from
doing less arithmetic alone, at equal matmul efficiency.

python bench/target_flop_ratio.py [--n 16] [--model smollm2-135m] [--layer 8]
"""

from __future__ import annotations

import json
import os

import _common as C  # noqa: I001
from reference_flow import _RequestPrompts

from metake_fast.targets import ChunkProblem


def main() -> None:
    args, dev, model, tok, adapter, reqs, tpl = C.target_step_setup(__doc__)
    layers = list(adapter.decoder_layers(model))
    per_layer = [sum(p.numel() for n, p in lyr.named_parameters() if p.dim() == 2) for lyr in layers]
    p_all, p_above = sum(per_layer), sum(per_layer[args.layer + 1 :])
    unembed = model.get_output_embeddings().weight.numel()
    ref_tokens = 0
    for r in reqs:
        ref_tokens += _RequestPrompts(model, tok, adapter, r, args.layer, tpl).batch.input_ids.numel()
    ref = ref_tokens * (2 * (p_all + unembed) + 2 * (p_above + unembed))
    prob = ChunkProblem(model, tok, adapter, reqs, args.layer, tpl, prefix_cache=True, skip_lower=True)
    ours_tokens = prob.run.rest_ids.numel()
    head_rows = len(prob.t_rows) + len(prob.k_rows)
    ours = ours_tokens * 4 * p_above + head_rows * 4 * unembed
    rows = [
        ("reference-flow", ref_tokens, ref),
        ("metake_fast", ours_tokens, ours),
    ]
    print(f"\none target step, {args.n} requests, {args.model}, L={args.layer} (matmul GFLOP per request)")
    print(f"  {'flow':<16}{'tokens':>8}{'GFLOP/req':>11}{'ratio':>8}")
    for name, t, f in rows:
        print(f"  {name:<16}{t:>8}{f / args.n / 1e9:>11.2f}{ref / f:>7.1f}x")
    if not args.no_save:
        os.makedirs(os.path.join(C.ROOT, "bench", "results"), exist_ok=True)
        with open(os.path.join(C.ROOT, "bench", "results", "target_flop_ratio.jsonl"), "a") as fh:
            fh.write(
                json.dumps(
                    {
                        "model": args.model,
                        "requests": args.n,
                        "layer": args.layer,
                        "reference_tokens": ref_tokens,
                        "ours_tokens": ours_tokens,
                        "reference_gflop_per_request": ref / args.n / 1e9,
                        "ours_gflop_per_request": ours / args.n / 1e9,
                        "ratio": ref / ours,
                        "commit": C.git_commit(),
                    }
                )
                + "\n"
            )


if __name__ == "__main__":
    main()
