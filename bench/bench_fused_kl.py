"""Benchmark fused_kl (forward and backward) per provider.

Shape: the essence-KL rows of one target-optimisation chunk (n = 100 requests) at
SmolLM2-135M (d 576, V 49152) and Llama-3-8B (d 4096, V 128256).
``full vocabulary`` is the path the target loop used before the op: two
``log_softmax`` over n×V logits (the unedited one was stored, so the editor saved
one of the two GEMMs but kept an n×V tensor per chunk alive).

python bench/bench_fused_kl.py [--quick] [--large]
"""

from __future__ import annotations

import _common as C  # noqa: I001
import torch

import metake_fast  # noqa: F401
from metake_fast.ops import kl_backward_reference, kl_reference

OP = "fused_kl"


def main() -> None:
    args = C.parser(__doc__).parse_args()
    dev = C.device()
    models = [C.SMOLLM2] + ([C.LLAMA3_8B] if args.large else [])
    reps = args.reps or 3
    n, chunk = 100, 8192
    for model in models:
        d, V = model["d_v"], (model["vocab"] if not args.quick else 8192)
        for dtype in C.parse_dtypes(args.dtypes, [torch.float32, torch.bfloat16]):
            h = torch.randn(n, d, device=dev).to(dtype)
            h0 = (h.float() + 0.1 * torch.randn(n, d, device=dev)).to(dtype)
            W = (torch.randn(V, d, device=dev) * 0.05).to(dtype)

            def full():
                lp = torch.log_softmax((h @ W.T).float(), -1)
                lq = torch.log_softmax((h0 @ W.T).float(), -1)
                return (lp.exp() * (lp - lq)).sum(-1)

            fns = {
                "reference (chunked, eager)": lambda: kl_reference(h, h0, W, None, 0.0, chunk),
                "full vocabulary": full,
            }
            if not args.no_compile:
                cref = C.compiled(kl_reference)
                fns["reference (compile)"] = lambda: cref(h, h0, W, None, 0.0, chunk)
            tm = C.time_providers(fns, dev, reps=reps)
            shape = {"model": model["name"], "n": n, "d": d, "V": V, "chunk": chunk}
            nbytes = V * d * W.element_size() + 2 * n * d * h.element_size()
            C.report(OP, shape, dtype, dev, tm, nbytes, 4.0 * n * V * d, save=not args.no_save)
            kl, lse, lse0 = kl_reference(h, h0, W, None, 0.0, chunk)
            g = torch.ones(n, device=dev)
            tm = C.time_providers(
                {
                    "reference (chunked, eager)": lambda: kl_backward_reference(
                        g, h, h0, W, None, 0.0, lse0, kl, lse, chunk
                    )
                },
                dev,
                reps=reps,
            )
            C.report(OP + "_backward", shape, dtype, dev, tm, nbytes, 6.0 * n * V * d, save=not args.no_save)


if __name__ == "__main__":
    main()
