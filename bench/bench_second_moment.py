"""Throughput of the key second moment: one pass for all layers vs the reference flow.

``onepass``:  :func:`metake_fast.stats.second_moment` (one early-stopped pass
              feeding every layer, chunks of ``--max-length``, ``~--batch-tokens``
              padded tokens per batch).
``reference``: a re-implementation of the ROME/MEMIT/AlphaEdit ``layer_stats``
              flow: one separate pass per layer (each stopped after its layer,
              like ``Trace(stop=True)``), documents truncated at the model's
              full context, groups of 100 documents sorted by length and cut
              into batches of ``3 × context`` padded tokens
              (``length_collation``), ``mom2 += aᵀa`` per batch in fp32.

Both flows read the same documents of the same corpus and sum (about) the same
number of non-pad tokens; throughput is tokens covered for ALL layers per
second. Prints a table and appends JSON lines to ``bench/results/second_moment.jsonl``.

    python bench/bench_second_moment.py                          # smollm2-135m, layers 4-8
    python bench/bench_second_moment.py --model tiny-llama --tokens 5000 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import git_commit  # noqa: E402

from metake_fast.cli import parse_layers, positive_int  # noqa: E402
from metake_fast.corpus import load_corpus  # noqa: E402
from metake_fast.models import get_adapter, load_model, parse_dtype  # noqa: E402
from metake_fast.stats import second_moment  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "second_moment.jsonl"


class _Stop(Exception):
    pass


def load(name: str, dtype: str, device: str):
    if name.startswith("tiny-"):
        sys.path.insert(0, str(ROOT / "tests"))
        from _tiny import tiny_model, tiny_tokenizer

        model = tiny_model(name[len("tiny-") :], layers=12, dtype=parse_dtype(dtype)).to(device)
        return model, tiny_tokenizer()
    return load_model(name, dtype=dtype, device=device)


def model_context(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "n_positions", None) or cfg.max_position_embeddings)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reference_layer_stats(model, tokenizer, layer: int, texts: list[str], tokens: int, maxlen: int, batch_tokens: int):
    """``layer_stats`` of ROME/MEMIT for one layer: ``(Σ aᵀa in fp32, tokens)``."""
    adapter = get_adapter(model)
    device = model.get_input_embeddings().weight.device
    captured = {}

    def hook(module, args):
        captured["x"] = args[0]
        raise _Stop

    handle = adapter.edit_module(model, layer).register_forward_pre_hook(hook)
    d = adapter.key_dim(model, layer)
    mom2 = torch.zeros(d, d, dtype=torch.float32, device=device)
    count = 0
    pad = tokenizer.pad_token_id or 0
    try:
        with torch.no_grad():
            for g in range(0, len(texts), 100):  # DataLoader batch_size=100 documents
                enc = tokenizer(texts[g : g + 100], truncation=True, max_length=maxlen)["input_ids"]
                items = sorted((ids for ids in enc if ids), key=len, reverse=True)  # length_collation
                batches, batch, width = [], [], 0
                for ids in items:
                    if width * (len(batch) + 1) > batch_tokens:
                        batches.append(batch)
                        batch, width = [], 0
                    if not batch:
                        width = len(ids)
                    batch.append(ids)
                if batch:
                    batches.append(batch)
                for b in batches:
                    w = len(b[0])
                    ids = torch.full((len(b), w), pad, dtype=torch.long)
                    mask = torch.zeros((len(b), w), dtype=torch.long)
                    for r, row in enumerate(b):
                        ids[r, : len(row)] = torch.tensor(row)
                        mask[r, : len(row)] = 1
                    ids, mask = ids.to(device), mask.to(device)
                    try:
                        model(input_ids=ids, attention_mask=mask)
                    except _Stop:
                        pass
                    x = captured["x"]
                    feats = x.reshape(-1, x.shape[-1])[mask.reshape(-1).bool()]  # flatten_masked_batch
                    feats = feats.to(torch.float32)
                    mom2 += feats.t() @ feats  # SecondMoment.add
                    count += feats.shape[0]
    finally:
        handle.remove()
    return mom2, count


def slice_texts(tokenizer, tokens: int) -> list[str]:
    """The first documents of the default corpus holding at least ``tokens`` tokens."""
    texts, n = [], 0
    for text in load_corpus(None):
        texts.append(text)
        n += len(tokenizer(text, verbose=False)["input_ids"])
        if n >= tokens:
            break
    return texts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a model dir, or tiny-llama / tiny-gpt2")
    p.add_argument("--layers", default="4-8")
    p.add_argument("--tokens", type=positive_int, default=20_000)
    p.add_argument("--max-length", type=positive_int, default=512)
    p.add_argument("--batch-tokens", type=positive_int, default=8192)
    p.add_argument("--ref-maxlen", type=positive_int, default=None, help="default: the model's context")
    p.add_argument("--ref-batch-tokens", type=positive_int, default=None, help="default: 3 × context")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    model, tok = load(args.model, args.dtype, args.device)
    adapter = get_adapter(model)
    layers = parse_layers(args.layers, adapter.num_layers(model))
    ctx = model_context(model)
    ref_maxlen = args.ref_maxlen or ctx
    ref_batch_tokens = args.ref_batch_tokens or 3 * ctx
    texts = slice_texts(tok, args.tokens)
    d_k = adapter.key_dim(model, layers[0])

    def run_onepass():
        out = second_moment(
            model, tok, layers, texts, tokens=args.tokens, max_length=args.max_length,
            batch_tokens=args.batch_tokens, cache=False, progress=False,
        )  # fmt: skip
        return {layer: m.sum for layer, m in out.items()}, out[layers[0]].count

    def run_reference():
        sums, count = {}, 0
        for layer in layers:
            sums[layer], count = reference_layer_stats(
                model, tok, layer, texts, args.tokens, ref_maxlen, ref_batch_tokens
            )
        return sums, count

    flows = {"onepass": run_onepass}
    if not args.skip_reference:
        flows["reference"] = run_reference
    rows = []
    for name, fn in flows.items():
        fn()  # warm-up (also the first-call costs of tokenizer and kernels)
        times, count, sums = [], 0, None
        for _ in range(max(1, args.repeats)):
            sync(args.device)
            t0 = time.perf_counter()
            sums, count = fn()
            sync(args.device)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        trace = statistics.fmean(float((sums[layer] / count).trace()) for layer in layers)
        rows.append(
            {
                "bench": "second_moment", "flow": name, "model": args.model, "layers": layers, "d_k": d_k,
                "tokens": count, "documents": len(texts),
                "max_length": args.max_length if name == "onepass" else ref_maxlen,
                "batch_tokens": args.batch_tokens if name == "onepass" else ref_batch_tokens,
                "dtype": args.dtype, "stats_dtype": "fp32", "device": args.device,
                "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
                else platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(), "repeats": len(times),
                "median_s": med, "min_s": min(times), "max_s": max(times),
                "tokens_per_s": count / med, "mean_trace": trace, "commit": git_commit(), "torch": torch.__version__,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )  # fmt: skip

    base = rows[-1]["tokens_per_s"]
    print(
        f"second moment  model {args.model}  layers {args.layers}  d_k {d_k}  dtype {args.dtype}  device {args.device}"
    )
    print(f"{'flow':<10} {'tokens':>8} {'median s':>9} {'tok/s':>10} {'speedup':>8} {'mean tr(C)':>11}")
    for r in rows:
        print(
            f"{r['flow']:<10} {r['tokens']:>8} {r['median_s']:>9.2f} {r['tokens_per_s']:>10.0f}"
            f" {r['tokens_per_s'] / base:>7.2f}x {r['mean_trace']:>11.4g}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"appended {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
