"""Shared helpers for bench/bench_<op>.py: timing, providers, table, JSON lines.

Timing: ``warmup`` untimed calls, then ``reps`` timed rounds; providers are
interleaved round by round so that load from other processes hits them alike.
Reported: median, p20, p80 (ms), GB/s (bytes moved / median) and TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SMOLLM2 = {"name": "SmolLM2-135M", "d_k": 1536, "d_v": 576, "vocab": 49152}
LLAMA3_8B = {"name": "Llama-3-8B", "d_k": 14336, "d_v": 4096, "vocab": 128256}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer repetitions")
    p.add_argument("--large", action="store_true", help="also Llama-3-8B shapes")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per provider")
    p.add_argument("--dtypes", default=None, help="comma list, e.g. float32,bfloat16")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    p.add_argument("--no-save", action="store_true", help="do not append to bench/results/<op>.jsonl")
    return p


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    """The checkout's short commit (``METAKE_FAST_COMMIT`` overrides it), as evaluate records it; "unknown" without git."""
    from metake_fast.evaluate import git_commit as commit

    return commit() or "unknown"


def _split_top(spec: str) -> list[str]:
    """``spec`` split at the commas outside brackets (``a=1,b=[[10,5]]`` -> two fields)."""
    out, depth, cur = [], 0, ""
    for ch in spec:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [*out, cur]


def parse_variants(p: argparse.ArgumentParser, specs: list[str]) -> dict[str, dict]:
    """``--variant NAME:field=value,...`` options -> {name: {field: value}}, each value read as
    ``--set`` reads it (YAML, ``1e-2`` a number); bad syntax is ``p.error``."""
    from metake_fast.hparams import HParamsError, parse_overrides

    variants: dict[str, dict] = {}
    for v in specs:
        name, _, spec = v.partition(":")
        try:
            fields = parse_overrides([kv for kv in _split_top(spec) if kv], flag="--variant")
        except HParamsError as exc:
            p.error(f"--variant {v!r}: expected NAME:field=value,... ({exc})")
        if not name or name in ("plain", "metake") or name in variants:
            p.error(f"--variant {v!r}: needs a new name (not plain/metake)")
        variants[name] = fields
    return variants


def variant_hparams(p: argparse.ArgumentParser, hp_run, variants: dict[str, dict]) -> dict:
    """Each variant's MetaKE hyperparameters: ``hp_run`` with its fields replaced, validated."""
    import dataclasses

    from metake_fast.hparams import ALIASES, HParamsError, make_hparams, validate_hparams

    out = {}
    for name, fields in variants.items():
        try:
            typed = make_hparams("metake", fields)
            changed = {ALIASES.get(k, k) for k in fields}
            out[name] = validate_hparams(dataclasses.replace(hp_run, **{k: getattr(typed, k) for k in changed}))
        except (HParamsError, TypeError) as exc:
            p.error(f"--variant {name}: {exc}")
    return out


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_providers(
    fns: dict[str, Callable[[], object]], dev: torch.device, warmup: int = 1, reps: int = 5
) -> dict[str, dict[str, float]]:
    """Interleaved timing. Returns ``{provider: {"median_ms", "p20_ms", "p80_ms"}}``; failures are dropped."""
    live = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            sync(dev)
            live[name] = fn
        except Exception as exc:  # e.g. torch.compile unavailable
            print(f"  [skip] {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    samples: dict[str, list[float]] = {k: [] for k in live}
    for _ in range(reps):
        for name, fn in live.items():
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            samples[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, xs in samples.items():
        xs = sorted(xs)

        def q(f, xs=xs):
            return xs[min(len(xs) - 1, int(round(f * (len(xs) - 1))))]

        out[name] = {"median_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8)}
    return out


def compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def compiled_provider(op: str, dev: torch.device) -> str | None:
    """The compiled kernel that serves ``op`` through the dispatcher on ``dev``'s type, as a
    table label ("C++ extension", "CUDA extension" or "Triton"); None when the reference does."""
    from metake_fast.ops import resolved_backends

    p = resolved_backends().get(op, {}).get("cuda" if dev.type == "cuda" else "cpu", "")
    if not p or p.startswith("reference"):
        return None
    if p.startswith("C++"):
        return "C++ extension"
    if p.startswith("CUDA"):
        return "CUDA extension"
    return p.split(" (")[0]


def report(
    op: str,
    shape: dict,
    dtype: torch.dtype,
    dev: torch.device,
    timings: dict,
    nbytes: float,
    flops: float,
    save: bool = True,
) -> list[dict]:
    """Print one table block and append one JSON line per provider."""
    rows = []
    base = min((v["median_ms"] for k, v in timings.items() if k.startswith("reference")), default=None)
    shape_s = ", ".join(f"{k}={v}" for k, v in shape.items())
    print(f"\n{op}  [{shape_s}]  dtype={str(dtype).replace('torch.', '')}  device={device_name(dev)}")
    print(f"  {'provider':<24}{'median ms':>11}{'p20':>10}{'p80':>10}{'GB/s':>9}{'TFLOP/s':>9}{'vs best ref':>12}")
    commit = git_commit()
    for name, t in timings.items():
        med = t["median_ms"]
        gbs = nbytes / (med * 1e-3) / 1e9
        tfl = flops / (med * 1e-3) / 1e12
        speed = (base / med) if base else float("nan")
        print(f"  {name:<24}{med:>11.2f}{t['p20_ms']:>10.2f}{t['p80_ms']:>10.2f}{gbs:>9.1f}{tfl:>9.3f}{speed:>11.2f}x")
        rows.append(
            {
                "op": op,
                "provider": name,
                "shape": shape,
                "dtype": str(dtype).replace("torch.", ""),
                "device": device_name(dev),
                "median_ms": med,
                "p20_ms": t["p20_ms"],
                "p80_ms": t["p80_ms"],
                "gb_per_s": gbs,
                "tflop_per_s": tfl,
                "speedup_vs_best_reference": speed,
                "torch": torch.__version__,
                "commit": commit,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )
    if save:
        os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
        with open(os.path.join(ROOT, "bench", "results", f"{op}.jsonl"), "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return rows


def parse_dtypes(arg: str | None, default: list[torch.dtype]) -> list[torch.dtype]:
    if not arg:
        return default
    return [getattr(torch, s.strip()) for s in arg.split(",") if s.strip()]


def target_step_setup(description: str, n_help: str = "requests"):
    """Arguments and inputs shared by the target-step benchmarks: ``--n`` CounterFact requests on
    ``--model`` with the last edited layer ``--layer`` and the shipped 5 context templates.
    Returns ``(args, dev, model, tok, adapter, reqs, templates)``."""
    from metake_fast.context import context_templates
    from metake_fast.datasets import load_requests
    from metake_fast.models import get_adapter, load_model

    p = parser(description)
    p.add_argument("--n", type=int, default=16, help=n_help)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=8, help="the last edited layer L")
    args = p.parse_args()
    dev = device()
    model, tok = load_model(args.model, device=dev)
    adapter = get_adapter(model)
    reqs = load_requests("counterfact", args.n)
    return args, dev, model, tok, adapter, reqs, context_templates(model, tok, 5, 10)
