"""Benchmark gated_delta_inject (hidden + (Gᵀ R)[owner] at the injection positions) per provider.

Shapes: one target-optimisation chunk of 100 requests × 6 prompts (600 rows) of 8
remainder tokens, gate 100×100, at SmolLM2-135M (d 576) and Llama-3-8B (d 4096).
``unfused (zeros+index_put+add)`` is the injection the target loop used before the op.

python bench/bench_gated_delta_inject.py [--quick] [--large]
"""

from __future__ import annotations

import sys

import _common as C  # noqa: I001
import torch

import metake_fast  # noqa: F401

OP = "gated_delta_inject"


def main() -> None:
    args = C.parser(__doc__).parse_args()
    dev = C.device()
    ref = sys.modules["metake_fast.ops.gated_delta_inject"].inject_reference
    models = [C.SMOLLM2] + ([C.LLAMA3_8B] if args.large else [])
    reps = args.reps or (5 if args.quick else 15)
    u, prompts, T = 100, 600, 8
    triton_fn = None
    if dev.type == "cuda":
        try:
            from metake_fast.kernels.gated_delta_inject import gated_delta_inject as triton_fn
        except ImportError:
            triton_fn = None
    for model in models:
        d = model["d_v"]
        for dtype in C.parse_dtypes(args.dtypes, [torch.float32, torch.bfloat16]):
            hidden = torch.randn(prompts, T, d, device=dev).to(dtype)
            R = torch.randn(u, d, device=dev) * 0.1
            G = torch.randn(u, u, device=dev) * 0.1
            rows = torch.arange(prompts, device=dev)
            cols = torch.randint(0, T, (prompts,), device=dev)
            owner = torch.arange(prompts, device=dev) % u

            def unfused():
                add = torch.zeros_like(hidden)
                add = add.index_put((rows, cols), (G.T @ R)[owner].to(hidden.dtype))
                return hidden + add

            fns = {
                "reference (eager)": lambda: ref(hidden, R, G, rows, cols, owner),
                "unfused (zeros+index_put+add)": unfused,
            }
            if not args.no_compile:
                cref = C.compiled(ref)
                fns["reference (compile)"] = lambda: cref(hidden, R, G, rows, cols, owner)
            if label := C.compiled_provider(OP, dev):
                fns[label] = lambda: torch.ops.metake_fast.gated_delta_inject(hidden, R, G, rows, cols, owner)
            if triton_fn is not None:
                fns["Triton"] = lambda: triton_fn(hidden, R, G, rows, cols, owner)
            t = C.time_providers(fns, dev, reps=reps)
            nbytes = 2 * hidden.numel() * hidden.element_size() + (R.numel() + G.numel()) * 4
            shape = {"model": model["name"], "rows": prompts, "T": T, "d": d, "u": u}
            C.report(OP, shape, dtype, dev, t, nbytes, 2.0 * u * u * d + prompts * d, save=not args.no_save)


if __name__ == "__main__":
    main()
