"""Benchmark second_moment_accumulate (S += X[mask]^T X[mask]) per provider.

python bench/bench_second_moment_accumulate.py [--quick] [--large]
"""

from __future__ import annotations

import sys

import _common as C  # noqa: I001
import torch

import metake_fast  # noqa: F401

OP = "second_moment_accumulate"


def main() -> None:
    args = C.parser(__doc__).parse_args()
    dev = C.device()
    ref = sys.modules["metake_fast.ops.second_moment_accumulate"].second_moment_accumulate_reference
    models = [C.SMOLLM2] + ([C.LLAMA3_8B] if args.large else [])
    ns = [512] if args.quick else [512, 4096]
    reps = args.reps or (3 if args.quick else 5)
    for model in models:
        d = model["d_k"] if not args.quick else 768
        for n in ns:
            for dtype in C.parse_dtypes(args.dtypes, [torch.float32, torch.bfloat16]):
                X = torch.randn(n, d, device=dev).to(dtype)
                mask = torch.rand(n, device=dev) > 0.1
                S = torch.zeros(d, d, device=dev)
                fns = {"reference (eager)": lambda: ref(S, X, mask)}
                if not args.no_compile:
                    cref = C.compiled(ref)
                    fns["reference (compile)"] = lambda: cref(S, X, mask)
                if label := C.compiled_provider(OP, dev):
                    fns[label] = lambda: torch.ops.metake_fast.second_moment_accumulate(S, X, mask)
                t = C.time_providers(fns, dev, reps=reps)
                kept = int(mask.sum())
                nbytes = n * d * X.element_size() + 2 * d * d * 4
                C.report(
                    OP,
                    {"model": model["name"], "n": n, "d": d},
                    dtype,
                    dev,
                    t,
                    nbytes,
                    2.0 * kept * d * d,
                    save=not args.no_save,
                )


if __name__ == "__main__":
    main()
