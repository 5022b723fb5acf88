"""Benchmark apply_update_ (W += R Y^T, rounded once) per provider.

python bench/bench_apply_update.py [--quick] [--large]
"""

from __future__ import annotations

import sys

import _common as C  # noqa: I001
import torch

import metake_fast  # noqa: F401

OP = "apply_update_"


def main() -> None:
    args = C.parser(__doc__).parse_args()
    dev = C.device()
    ref = sys.modules["metake_fast.ops.apply_update"].apply_update_reference
    models = [C.SMOLLM2] + ([C.LLAMA3_8B] if args.large else [])
    reps = args.reps or (5 if args.quick else 15)
    u = 100
    for model in models:
        d_v, d_k = model["d_v"], model["d_k"]
        for dtype in C.parse_dtypes(args.dtypes, [torch.float32, torch.bfloat16]):
            for transposed in (False, True):
                W = torch.randn((d_k, d_v) if transposed else (d_v, d_k), device=dev).to(dtype)
                R = torch.randn(d_v, u, device=dev) * 1e-3
                Y = torch.randn(d_k, u, device=dev)
                fns = {"reference (eager)": lambda: ref(W, R, Y, transposed)}
                if not args.no_compile:
                    cref = C.compiled(ref)
                    fns["reference (compile)"] = lambda: cref(W, R, Y, transposed)
                if label := C.compiled_provider(OP, dev):
                    fns[label] = lambda: torch.ops.metake_fast.apply_update_(W, R, Y, transposed)
                t = C.time_providers(fns, dev, reps=reps)
                nbytes = 2 * W.numel() * W.element_size() + (R.numel() + Y.numel()) * 4
                shape = {"model": model["name"], "d_v": d_v, "d_k": d_k, "u": u, "transposed": transposed}
                C.report(OP, shape, dtype, dev, t, nbytes, 2.0 * d_v * d_k * u, save=not args.no_save)


if __name__ == "__main__":
    main()
