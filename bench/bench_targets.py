"""Benchmark one target-optimisation step (forward + gradient w.r.t. δ) per runner variant.

One chunk of CounterFact requests on the default model (SmolLM2-135M, edit layer 8,
the shipped 5 context templates + the bare prompt + the essence prompt per request).
Providers, all computing the same losses and gradient (tests/test_targets.py):

* ``full sequences``: every prompt run from its first token, all layers;
* ``prefix cache``: the prompt up to the subject's last token as a KV cache, the
  remaining tokens run through all layers;
* ``prefix cache + replay (shipped)``: as above, and layers 0..L replayed from their
  recorded output, so a step runs only layers L+1.. .

The FLOP column counts the shipped step only (layers above L, forward and backward
w.r.t. the activations: ≈ 4 × params-above-L × step tokens).

python bench/bench_targets.py [--n 16] [--model smollm2-135m] [--reps 5]
"""

from __future__ import annotations

import _common as C  # noqa: I001
import torch

from metake_fast.targets import ChunkProblem

OP = "target_step"


def main() -> None:
    args, dev, model, tok, adapter, reqs, tpl = C.target_step_setup(__doc__, "requests in the chunk")
    variants = {
        "full sequences": dict(prefix_cache=False, skip_lower=False),
        "prefix cache": dict(prefix_cache=True, skip_lower=False),
        "prefix cache + replay (shipped)": dict(prefix_cache=True, skip_lower=True),
    }
    probs = {k: ChunkProblem(model, tok, adapter, reqs, args.layer, tpl, **v) for k, v in variants.items()}
    g = torch.Generator().manual_seed(0)
    base = probs["prefix cache + replay (shipped)"]
    delta = 0.2 * base.h.norm(dim=1, keepdim=True) * torch.randn(base.h.shape, generator=g) / base.h.shape[1] ** 0.5
    delta = delta.to(base.h.device)

    def step(prob):
        d = delta.clone().requires_grad_(True)
        nll, kl = prob.losses(d)
        (grad,) = torch.autograd.grad((nll + 0.0625 * kl).sum(), d)
        return grad

    ref = step(probs["full sequences"])
    for k, prob in probs.items():  # same gradient for every variant
        err = float((step(prob) - ref).norm() / ref.norm())
        print(f"  {k:<34} relative gradient difference vs full sequences: {err:.2e}")
    tm = C.time_providers({k: (lambda prob=prob: step(prob)) for k, prob in probs.items()}, dev, reps=args.reps or 5)
    # "reference" marks the baseline for the speed-up column
    tm = {("reference: " + k if k == "full sequences" else k): v for k, v in tm.items()}
    run = base.run
    tokens = int(run.mask[:, -run.rest_ids.shape[1] :].sum())
    layers = adapter.decoder_layers(model)
    above = sum(p.numel() for lyr in list(layers)[args.layer + 1 :] for p in lyr.parameters())
    shape = {"model": args.model, "requests": args.n, "layer": args.layer, "step_tokens": tokens}
    C.report(OP, shape, next(model.parameters()).dtype, dev, tm, 0.0, 4.0 * above * tokens, save=not args.no_save)


if __name__ == "__main__":
    main()
