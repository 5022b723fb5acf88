"""Benchmark the Triton kernels against the PyTorch references on a CUDA GPU.

    python bench/bench_triton.py                 # SmolLM2-135M and Llama-3-8B shapes
    python bench/bench_triton.py --models smollm2 --reps 50
    python bench/bench_triton.py --smoke         # tiny shapes on CPU under TRITON_INTERPRET=1 (harness check)

For each op and shape: median / p20 / p80 time (CUDA events), effective GB/s
(the bytes the op must move at least once) and TFLOP/s (useful flops, the same
count for both implementations), the kernel's max error against the reference,
and the speed-up. Prints a table and appends one JSON line per (op, shape,
implementation) to ``bench/results/triton.jsonl``. Without a GPU (and without
``--smoke``) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "triton.jsonl"

#: name -> (d_k, d_v, V); the logprob hidden size is d_v
MODELS = {
    "smollm2": (1536, 576, 49152),
    "llama3-8b": (14336, 4096, 128256),
}
SMOKE = {"tiny": (40, 24, 300)}


def _kernels_package():
    """``metake_fast.kernels``, installed or from the source tree."""
    if importlib.util.find_spec("metake_fast") is None:
        sys.path.insert(0, str(ROOT))
    from metake_fast.ops.backends import kernels_package

    return kernels_package()


def _timer(device):
    import torch

    if device.type == "cuda":

        def run(fn, reps, warmup):
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize(device)
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return times

    else:

        def run(fn, reps, warmup):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return times

    return run


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")  # deciles
    return statistics.median(times), q[1], q[7]


def cases(shape_name: str, dims: tuple[int, int, int], device, tokens: int, rows: int, u: int):
    """``(op, label, {"triton": fn, "reference": fn}, bytes, flops, check)`` for one model shape."""
    import torch

    _kernels_package()  # also puts the source tree on sys.path when not installed

    from metake_fast.ops import (
        apply_update_reference,
        second_moment_accumulate_reference,
        target_logprob_backward_reference,
        target_logprob_reference,
    )
    from metake_fast.ops.triton_registry import load_launchers

    launch = load_launchers()
    d_k, d_v, V = dims
    bf16 = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    out = []

    # second moment: S (d_k, d_k) fp32 += X[mask]ᵀ X[mask], X bf16 keys
    X = randn(tokens, d_k, dtype=bf16)
    mask = torch.rand(tokens, generator=g, device=device) > 0.1
    kept = int(mask.sum())
    S_t = torch.zeros(d_k, d_k, device=device)
    S_r = torch.zeros(d_k, d_k, device=device)

    def check_sm():
        a, b = torch.zeros_like(S_t), torch.zeros_like(S_r)
        launch["second_moment_accumulate"](a, X, mask)
        second_moment_accumulate_reference(b, X, mask)
        return (a - b).abs().max().item() / max(1e-30, b.abs().max().item())

    out.append(
        (
            "second_moment_accumulate",
            f"{shape_name} n={tokens} d_k={d_k} bf16",
            {
                "triton": lambda: launch["second_moment_accumulate"](S_t, X, mask),
                "reference": lambda: second_moment_accumulate_reference(S_r, X, mask),
            },
            X.numel() * 2 + 2 * d_k * d_k * 4,
            2 * kept * d_k * d_k,
            check_sm,
        )
    )

    # apply_update_: W (d_v, d_k) bf16 += R Yᵀ, u columns
    W_t = randn(d_v, d_k, dtype=bf16)
    W_r = W_t.clone()
    R = randn(d_v, u, scale=1e-3)
    Y = randn(d_k, u)

    def check_au():
        a, b = W_t.clone(), W_t.clone()
        launch["apply_update_"](a, R, Y, False)
        apply_update_reference(b, R, Y, False)
        return (a.float() - b.float()).abs().max().item()

    out.append(
        (
            "apply_update_",
            f"{shape_name} W=({d_v},{d_k}) bf16 u={u}",
            {
                "triton": lambda: launch["apply_update_"](W_t, R, Y, False),
                "reference": lambda: apply_update_reference(W_r, R, Y, False),
            },
            2 * W_t.numel() * 2 + (R.numel() + Y.numel()) * 4,
            2 * d_v * d_k * u,
            check_au,
        )
    )

    # fused_target_logprob: hidden (rows, d_v) bf16, weight (V, d_v) bf16
    h = randn(rows, d_v, dtype=bf16)
    w = randn(V, d_v, dtype=bf16, scale=d_v**-0.5)
    t = torch.randint(0, V, (rows,), generator=g, device=device)
    chunk = 8192

    def check_fwd():
        a = launch["fused_target_logprob"](h, w, t, chunk)[0]
        b = target_logprob_reference(h, w, t, chunk)[0]
        return (a - b).abs().max().item()

    out.append(
        (
            "fused_target_logprob",
            f"{shape_name} n={rows} d={d_v} V={V} bf16",
            {
                "triton": lambda: launch["fused_target_logprob"](h, w, t, chunk),
                "reference": lambda: target_logprob_reference(h, w, t, chunk),
            },
            w.numel() * 2 + h.numel() * 2,
            2 * rows * V * d_v,
            check_fwd,
        )
    )

    _, lse = target_logprob_reference(h, w, t, chunk)
    grad = randn(rows)
    for weight_grad in (False, True):

        def check_bwd(weight_grad=weight_grad):
            a = launch["fused_target_logprob_backward"](grad, h, w, t, lse, chunk, weight_grad)
            b = target_logprob_backward_reference(grad, h, w, t, lse, chunk, weight_grad)
            errs = [(x.float() - y.float()).abs().max().item() for x, y in zip(a, b) if x.numel()]
            return max(errs)

        out.append(
            (
                "fused_target_logprob_backward",
                f"{shape_name} n={rows} d={d_v} V={V} bf16 weight_grad={weight_grad}",
                {
                    "triton": lambda wg=weight_grad: launch["fused_target_logprob_backward"](
                        grad, h, w, t, lse, chunk, wg
                    ),
                    "reference": lambda wg=weight_grad: target_logprob_backward_reference(
                        grad, h, w, t, lse, chunk, wg
                    ),
                },
                w.numel() * 2 * (2 if weight_grad else 1) + h.numel() * 4,
                2 * rows * V * d_v * (3 if weight_grad else 2),
                check_bwd,
            )
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--ops", nargs="+", default=None, help="only these ops")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=4096, help="rows of X for second_moment_accumulate")
    ap.add_argument("--rows", type=int, default=256, help="target positions for fused_target_logprob")
    ap.add_argument("--u", type=int, default=64, help="rank of the apply_update_ factors")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = ap.parse_args(argv)

    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if args.smoke:
        device = torch.device("cpu")
        shapes = SMOKE
        args.tokens, args.rows, args.u = 50, 9, 5
        args.reps, args.warmup = min(args.reps, 2), 0
    else:
        if not torch.cuda.is_available():
            print("bench_triton: needs a CUDA GPU (none found); nothing to do. Use --smoke for a CPU harness check.")
            return 0
        try:
            import triton  # noqa: F401
        except ImportError:
            print("bench_triton: needs Triton (pip install triton); nothing to do.")
            return 0
        device = torch.device("cuda")
        shapes = {m: MODELS[m] for m in args.models}

    import triton
    from _common import git_commit  # bench/ is the script's directory

    run = _timer(device)
    meta = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "commit": git_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "interpret": bool(args.smoke),
    }
    rows = []
    header = (
        f"{'op':<31} {'shape':<50} {'impl':<9} {'median ms':>10} {'p20':>9} {'p80':>9} {'GB/s':>8} {'TFLOP/s':>8}"
        f" {'speed-up':>8} {'max err':>9}"
    )
    print(f"# {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  commit {meta['commit']}")
    print(header)
    print("-" * len(header))
    for shape_name, dims in shapes.items():
        for op, label, impls, nbytes, flops, check in cases(shape_name, dims, device, args.tokens, args.rows, args.u):
            if args.ops and op not in args.ops:
                continue
            err = check()
            medians = {}
            for impl, fn in impls.items():
                try:
                    times = run(fn, args.reps, args.warmup)
                except torch.OutOfMemoryError as exc:
                    print(f"{op:<31} {label:<50} {impl:<9} out of memory ({exc})")
                    torch.cuda.empty_cache()
                    continue
                med, p20, p80 = _quantiles(times)
                medians[impl] = med
                rec = dict(
                    meta,
                    op=op,
                    shape=label,
                    model=shape_name,
                    impl=impl,
                    median_ms=med,
                    p20_ms=p20,
                    p80_ms=p80,
                    reps=len(times),
                    gbps=nbytes / (med * 1e-3) / 1e9,
                    tflops=flops / (med * 1e-3) / 1e12,
                    bytes=nbytes,
                    flops=flops,
                    max_err_vs_reference=err if impl == "triton" else 0.0,
                )
                rows.append(rec)
            for rec in rows[-len(medians) :]:
                if "reference" in medians and "triton" in medians:
                    rec["speedup"] = medians["reference"] / medians["triton"] if rec["impl"] == "triton" else 1.0
                print(
                    f"{rec['op']:<31} {rec['shape']:<50} {rec['impl']:<9} {rec['median_ms']:>10.3f} {rec['p20_ms']:>9.3f}"
                    f" {rec['p80_ms']:>9.3f} {rec['gbps']:>8.1f} {rec['tflops']:>8.2f}"
                    f" {rec.get('speedup', float('nan')):>8.2f} {rec['max_err_vs_reference']:>9.2e}"
                )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if not args.no_save and rows:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for rec in rows:
                f.write(json.dumps(rec) + "\n")
        print(f"appended {len(rows)} records to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
