"""Benchmark fused_target_logprob forward (and --backward) per provider.

python bench/bench_fused_target_logprob.py [--quick] [--large] [--backward]
"""

from __future__ import annotations

import sys

import _common as C  # noqa: I001
import torch

import metake_fast  # noqa: F401

OP = "fused_target_logprob"


def main() -> None:
    p = C.parser(__doc__)
    p.add_argument("--backward", action="store_true", help="also time the backward op")
    p.add_argument("--n", type=int, nargs="*", default=None, help="token counts")
    args = p.parse_args()
    dev = C.device()
    mod = sys.modules["metake_fast.ops.fused_target_logprob"]
    models = [C.SMOLLM2] + ([C.LLAMA3_8B] if args.large else [])
    ns = args.n or ([128] if args.quick else [512])
    reps = args.reps or 3
    chunk = mod.DEFAULT_CHUNK
    for model in models:
        d, V = model["d_v"], model["vocab"] if not args.quick else 8192
        for n in ns:
            for dtype in C.parse_dtypes(args.dtypes, [torch.float32, torch.bfloat16]):
                h = torch.randn(n, d, device=dev).to(dtype)
                w = (torch.randn(V, d, device=dev) * 0.05).to(dtype)
                t = torch.randint(0, V, (n,), device=dev)
                fns = {"reference (eager)": lambda: mod.target_logprob_reference(h, w, t, chunk)}
                if not args.no_compile:
                    cref = C.compiled(mod.target_logprob_reference)
                    fns["reference (compile)"] = lambda: cref(h, w, t, chunk)
                if label := C.compiled_provider(OP, dev):
                    fns[label] = lambda: torch.ops.metake_fast.fused_target_logprob(h, w, t, chunk)
                tm = C.time_providers(fns, dev, reps=reps)
                shape = {"model": model["name"], "n": n, "d": d, "V": V, "chunk": chunk}
                nbytes = V * d * w.element_size() + n * d * h.element_size()
                C.report(OP, shape, dtype, dev, tm, nbytes, 2.0 * n * V * d, save=not args.no_save)
                if args.backward:
                    g = torch.randn(n, device=dev)
                    lse = mod.target_logprob_reference(h, w, t, chunk)[1]
                    bargs = (g, h, w, t, lse, chunk, True)
                    fns = {"reference (eager)": lambda: mod.target_logprob_backward_reference(*bargs)}
                    if label := C.compiled_provider(OP + "_backward", dev):
                        fns[label] = lambda: torch.ops.metake_fast.fused_target_logprob_backward(*bargs)
                    tm = C.time_providers(fns, dev, reps=reps)
                    C.report(
                        OP + "_backward", shape, dtype, dev, tm, 2 * nbytes, 6.0 * n * V * d, save=not args.no_save
                    )


if __name__ == "__main__":
    main()
