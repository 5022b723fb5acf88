"""End-to-end editing throughput: edits/s against N and batch size, metake_fast vs the published flow.

Providers, measured in the same process on the same CounterFact requests:

``metake_fast``     :class:`metake_fast.Editor` as shipped (``edit(..., score=False)``).
``reference-flow``  :func:`bench.reference_flow.reference_flow_edit`, the published
                    ROME/MEMIT/AlphaEdit flow (per-request targets with full forwards and
                    B×T×V logits, keys by full forwards, a fresh fp64 d_k×d_k solve per layer
                    and batch, one statistics pass per layer).

Both use the same hyperparameters, context templates and corpus. Per run the time is split
into stats (one-time, reported apart), prep (factorisations / projectors), keys, targets, solve
and apply; "editing" = keys + targets + solve + apply, edits/s = N / editing. Quality (same
scorer for both): efficacy = share with P(new) > P(true) on the rewrite prompt after the edit,
and mean P(new). Each phase is printed beside its FLOP floor (METHOD.md "Cost model") and the
fraction of a measured matmul peak that the floor represents at the measured time.

Output: a table on stdout, JSON lines appended to ``bench/results/editor.jsonl`` and a plot
``bench/results/editor.png`` (edits/s vs N; needs matplotlib, skipped with a message otherwise).

    python bench/bench_editor.py --n 10 --batch-size 10 --methods alphaedit
    python bench/bench_editor.py --quick                                   # tiny random llama, seconds
    python bench/bench_editor.py --config llama3-8b --dtype bf16 --device cuda --n 100,1000 --batch-size 100
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

from _common import git_commit  # noqa: E402
from bench_second_moment import model_context, reference_layer_stats, slice_texts  # noqa: E402
from reference_flow import reference_flow_edit  # noqa: E402

from metake_fast.context import context_templates  # noqa: E402
from metake_fast.datasets import load_requests  # noqa: E402
from metake_fast.editor import Editor  # noqa: E402
from metake_fast.hparams import load_hparams, to_dict  # noqa: E402
from metake_fast.models import get_adapter, load_model, parse_dtype, resolve_model_path  # noqa: E402
from metake_fast.runner import encode_target, subject_last_index  # noqa: E402
from metake_fast.scoring import score_objects  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "editor.jsonl"
PLOT = ROOT / "bench" / "results" / "editor.png"
METHODS = ("rome", "memit", "alphaedit", "metake")
PROVIDERS = ("metake_fast", "reference-flow")
PHASES = ("keys", "targets", "solve", "apply")

PRESETS = {
    "llama3-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------- helpers
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def csv_ints(s: str) -> list[int]:
    out = [int(x) for x in str(s).split(",") if x.strip()]
    if not out or any(x <= 0 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def csv_choice(choices):
    def parse(s: str) -> list[str]:
        out = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in out if x not in choices]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"unknown {bad or s!r}; choose from {', '.join(choices)}")
        return out

    return parse


def rss_mb() -> float:
    """Process high-water mark of the resident set (MB; ru_maxrss is KB on Linux)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def measure_peak_flops(dev: torch.device, dtype: torch.dtype) -> float:
    """Sustained matmul FLOP/s on this device and dtype (median of a few square GEMMs)."""
    n = 4096 if dev.type == "cuda" else 768
    dt = dtype if (dev.type == "cuda" or dtype == torch.float32) else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dt)
    b = torch.randn(n, n, device=dev, dtype=dt)
    a @ b
    times = []
    for _ in range(5):
        sync(dev)
        t0 = time.perf_counter()
        a @ b
        sync(dev)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


# ---------------------------------------------------------------------------- model
def tiny(layers: int = 4):
    sys.path.insert(0, str(ROOT / "tests"))
    from _tiny import tiny_model, tiny_tokenizer

    return tiny_model("llama", layers=layers), tiny_tokenizer()


def load_tokenizer(spec: str):
    if spec == "tiny":
        return tiny()[1]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m" if spec == "default" else spec))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def random_model(spec: str, tok, dtype: torch.dtype, device: str):
    """A random-weight causal LM from a preset name, a config JSON file or a local config dir."""
    import transformers as tf

    if spec in PRESETS:
        d = dict(PRESETS[spec])
    elif Path(spec).is_file():
        d = json.loads(Path(spec).read_text())
    elif Path(spec).is_dir():
        d = tf.AutoConfig.from_pretrained(spec).to_dict()
    else:
        raise SystemExit(f"--config: {spec!r} is neither a preset ({', '.join(PRESETS)}), a JSON file nor a dir")
    model_type = d.pop("model_type")
    for k in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        d.pop(k, None)
    cfg = tf.AutoConfig.for_model(model_type, **d)
    if cfg.vocab_size < len(tok):
        cfg.vocab_size = len(tok)
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def build(args):
    dtype = parse_dtype(args.dtype)
    if args.config:
        tok = load_tokenizer(args.tokenizer)
        model = random_model(args.config, tok, dtype, args.device)
        return model, tok, f"random:{args.config}"
    if args.model.startswith("tiny-") or args.quick:
        model, tok = tiny(4)
        return model.to(device=args.device, dtype=dtype), tok, "tiny-llama"
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    return model, tok, args.model


def shapes(model, layers) -> dict:
    adapter = get_adapter(model)
    dec = adapter.decoder_layers(model)
    return {
        "num_layers": len(dec), "layers": list(layers), "d_k": adapter.key_dim(model, layers[0]),
        "d_v": adapter.value_dim(model, layers[0]), "vocab": adapter.unembedding(model).weight.shape[0],
        "params": sum(p.numel() for p in model.parameters()),
    }  # fmt: skip


# ---------------------------------------------------------------------------- cost model
def flop_floors(model, tok, reqs, hp, templates, steps: list[int], stats_tokens: int) -> dict:
    """FLOP floors per phase (METHOD.md "Cost model") for editing ``reqs`` with ``steps[i]`` target steps."""
    adapter = get_adapter(model)
    dec = adapter.decoder_layers(model)
    per_layer = [sum(p.numel() for p in lyr.parameters()) for lyr in dec]
    layers = list(hp.layers)
    L, m = layers[-1], len(layers)
    d_k, d_v = adapter.key_dim(model, L), adapter.value_dim(model, L)
    V = adapter.unembedding(model).weight.shape[0]
    p_after = sum(per_layer[L + 1 :])
    p_upto = [sum(per_layer[: lyr + 1]) for lyr in range(len(dec))]
    flat = [c for g in templates for c in g]
    targets = keys = 0.0
    for req, n_steps in zip(reqs, steps):
        t = encode_target(tok, req.target_new)
        suffix = 0
        key_tokens = 0
        for ctx in flat:
            ids, s = subject_last_index(tok, ctx.replace("{}", req.template(), 1), req.subject)
            suffix += len(ids) + len(t) - 1 - s
            key_tokens += len(ids)
        kl_ids, s = subject_last_index(tok, "{} is a", req.subject)
        suffix += len(kl_ids) - s
        per_step = 6 * p_after * suffix + 6 * V * d_v * (len(flat) * len(t) + 1)
        targets += max(1, n_steps) * per_step
        bare = len(subject_last_index(tok, req.template(), req.subject)[0])
        keys += sum(2 * p_upto[lyr] * key_tokens for lyr in layers) + m * 2 * p_upto[L] * bare
    n = len(reqs)
    return {
        "stats": 2 * p_upto[layers[-1]] * stats_tokens + m * stats_tokens * d_k**2,
        "keys": keys,
        "targets": targets,
        "solve": 2 * d_k**2 * n * m,
        "apply": 2 * d_v * d_k * n * m,
    }


# ---------------------------------------------------------------------------- runs
class Weights:
    """Snapshot of every edited weight, to put the model back between runs."""

    def __init__(self, model, layers):
        self.adapter = get_adapter(model)
        self.model = model
        self.saved = {lyr: self.adapter.edit_weight(model, lyr).detach().clone() for lyr in layers}

    def restore(self):
        with torch.no_grad():
            for lyr, w in self.saved.items():
                self.adapter.edit_weight(self.model, lyr).copy_(w)


def quality(model, tok, reqs) -> dict:
    prompts = [r.text() for r in reqs]
    p_new = score_objects(model, tok, prompts, [r.target_new for r in reqs]).logprob.exp()
    idx = [i for i, r in enumerate(reqs) if r.target_true]
    p_true = torch.full((len(reqs),), float("nan"))
    if idx:
        p_true[idx] = score_objects(
            model, tok, [prompts[i] for i in idx], [reqs[i].target_true for i in idx]
        ).logprob.exp()
    ok = torch.where(torch.isnan(p_true), p_new > 0.5, p_new > p_true)
    return {
        "efficacy": float(ok.float().mean()),
        "mean_p_new": float(p_new.mean()),
        "mean_p_true": float(p_true[~torch.isnan(p_true)].mean()) if idx else None,
    }


class StatsCache:
    """Second moments per provider, computed once per layer (timed), reused by later runs."""

    def __init__(self, model, tok, tokens: int, max_length: int, cache_dir: str):
        self.model, self.tok, self.tokens, self.max_length, self.cache_dir = model, tok, tokens, max_length, cache_dir
        self.ref: dict[int, torch.Tensor] = {}
        self.ref_s: dict[int, float] = {}
        self.fast_s: dict[tuple, float] = {}
        self.texts = None

    def reference(self, layers) -> tuple[dict, float]:
        dev = self.model.get_input_embeddings().weight.device
        if self.texts is None:
            self.texts = slice_texts(self.tok, self.tokens)
        ctx = model_context(self.model)
        for lyr in layers:
            if lyr not in self.ref:
                sync(dev)
                t0 = time.perf_counter()
                S, count = reference_layer_stats(self.model, self.tok, lyr, self.texts, self.tokens, ctx, 3 * ctx)
                self.ref[lyr] = S / count
                sync(dev)
                self.ref_s[lyr] = time.perf_counter() - t0
        return {lyr: self.ref[lyr] for lyr in layers}, sum(self.ref_s[lyr] for lyr in layers)


def run_fast(model, tok, name, method, hp, reqs, B, stats: StatsCache) -> tuple[dict, list[int]]:
    dev = model.get_input_embeddings().weight.device
    ed = Editor(model, tok, method, copy.deepcopy(hp), model_name=name, cache=stats.cache_dir, progress=False)
    sync(dev)
    t0 = time.perf_counter()
    ed._ensure_solvers()
    sync(dev)
    total = time.perf_counter() - t0
    key = tuple(hp.layers)
    if key not in stats.fast_s:  # first time: computed (later Editors load the run's temporary cache)
        stats.fast_s[key] = ed.stats_seconds
    rep = ed.edit(reqs, batch_size=B, score=False)
    t = dict(rep.timing)
    t["stats"] = stats.fast_s[key]
    t["prep"] = total - ed.stats_seconds
    t.pop("score", None)
    return t, [r.target_steps for r in rep.requests]


def run_ref(model, tok, method, hp, reqs, B, stats: StatsCache) -> tuple[dict, list[int]]:
    C, stats_s = stats.reference(hp.layers)
    out = reference_flow_edit(model, tok, reqs, method, hp, C, batch_size=B)
    t = dict(out["timing"])
    t["stats"] = stats_s
    return t, out["target_steps"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a local model dir, or tiny-llama")
    p.add_argument("--config", default=None, help="random-weight model: preset (llama3-8b), config JSON or dir")
    p.add_argument("--tokenizer", default="default", help="for --config: default (smollm2's), tiny, or a dir")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=csv_ints, default=None, help="comma list of request counts (default 10)")
    p.add_argument("--batch-size", type=csv_ints, default=None, help="comma list (default: N, one batch)")
    p.add_argument("--methods", type=csv_choice(METHODS), default=list(METHODS))
    p.add_argument("--providers", type=csv_choice(PROVIDERS), default=list(PROVIDERS))
    p.add_argument(
        "--stats-tokens",
        type=int,
        default=None,
        help="tokens for the key statistics (default: the hparams' on GPU, 5000 on CPU)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="hparams override (repeatable)")
    p.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one untimed 1-request edit per method and provider first (default: on for cuda)",
    )
    p.add_argument("--quick", action="store_true", help="tiny random llama, N=2, B=1, 2 steps (the test)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--plot", type=Path, default=PLOT)
    args = p.parse_args(argv)  # fmt: skip

    dev = torch.device(args.device)
    overrides = {}
    if args.quick:
        args.n = args.n or [2]
        args.batch_size = args.batch_size or [1]
        overrides.update(v_num_grad_steps=2, context_template_count=1, context_template_length=3, outer_steps=1)
        args.stats_tokens = args.stats_tokens or 300
    for kv in args.set:
        k, _, v = kv.partition("=")
        overrides[k.strip()] = yaml.safe_load(v)
    ns = args.n or [10]
    stats_tokens = args.stats_tokens
    if stats_tokens is None and dev.type != "cuda":
        stats_tokens = 5000
        print("[note] CPU: key statistics over 5000 tokens (--stats-tokens to change)")
    warmup = args.warmup if args.warmup is not None else dev.type == "cuda"

    model, tok, name = build(args)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    num_layers = get_adapter(model).num_layers(model)
    peak = measure_peak_flops(dev, model.get_input_embeddings().weight.dtype)
    all_reqs = load_requests("counterfact", n=max(ns))
    hps = {}
    for method in args.methods:
        ov = dict(overrides)
        if method != "metake":
            ov.pop("outer_steps", None)
        if stats_tokens is not None:
            ov["stats_tokens"] = stats_tokens
        hps[method] = load_hparams(method, name, num_layers=num_layers, overrides=ov)
    all_layers = sorted({lyr for hp in hps.values() for lyr in hp.layers})
    weights = Weights(model, all_layers)
    tmp = tempfile.TemporaryDirectory(prefix="bench_editor_stats_")
    tokens_used = stats_tokens or next(iter(hps.values())).stats_tokens
    stats = StatsCache(model, tok, tokens_used, next(iter(hps.values())).stats_max_length, tmp.name)
    hp0 = next(iter(hps.values()))
    context_templates(model, tok, hp0.context_template_count, hp0.context_template_length)  # generate once

    print(
        f"editor bench  model {name}  dtype {args.dtype}  device {device_name(dev)}  matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    rows = []
    for method in args.methods:
        hp = hps[method]
        templates = context_templates(model, tok, hp.context_template_count, hp.context_template_length)
        if warmup:
            for prov in args.providers:
                (run_fast(model, tok, name, method, hp, all_reqs[:1], 1, stats) if prov == "metake_fast"
                 else run_ref(model, tok, method, hp, all_reqs[:1], 1, stats))  # fmt: skip
                weights.restore()
        for n in ns:
            reqs = all_reqs[:n]
            for B in args.batch_size or [n]:
                for prov in args.providers:
                    weights.restore()
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(dev)
                    rss0 = rss_mb()
                    if prov == "metake_fast":
                        t, steps = run_fast(model, tok, name, method, hp, reqs, B, stats)
                    else:
                        t, steps = run_ref(model, tok, method, hp, reqs, B, stats)
                    sync(dev)
                    mem = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else rss_mb()
                    q = quality(model, tok, reqs)
                    weights.restore()
                    editing = sum(t.get(k, 0.0) for k in PHASES)
                    floors = flop_floors(model, tok, reqs, hp, templates, steps, tokens_used)
                    seconds = {k: t.get(k, 0.0) for k in ("stats", "prep", *PHASES)}
                    frac = {k: floors[k] / (seconds[k] * peak) if seconds[k] > 0 else None for k in floors}
                    rows.append({
                        "bench": "editor", "model": name, "config": args.config, "device": dev.type,
                        "device_name": device_name(dev), "dtype": args.dtype, "shapes": shapes(model, hp.layers),
                        "n": n, "batch_size": B, "method": method, "provider": prov, "seconds": seconds,
                        "editing_s": editing, "edits_per_s": n / editing if editing > 0 else None,
                        "edits_per_s_with_stats": n / (editing + seconds["stats"] + seconds["prep"]),
                        "peak_mem_mb": mem, "mem_kind": "cuda_max_allocated" if dev.type == "cuda" else "rss_high_water",
                        "rss_growth_mb": rss_mb() - rss0 if dev.type != "cuda" else None,
                        "efficacy": q["efficacy"], "mean_p_new": q["mean_p_new"], "mean_p_true": q["mean_p_true"],
                        "target_steps_mean": sum(steps) / len(steps) if steps else None,
                        "flop_floor": floors, "floor_fraction_of_peak": frac, "peak_flops": peak,
                        "stats_tokens": tokens_used, "hparams": to_dict(hp), "set": dict(overrides),
                        "commit": git_commit(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    })  # fmt: skip
                    print_row(rows[-1])
                    append_row(args.out, rows[-1])  # now: a run cut short keeps the rows it finished
    print_table(rows)
    print(f"appended {len(rows)} rows to {args.out}")
    plot(rows, args.plot)
    tmp.cleanup()
    return 0


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def print_row(r: dict) -> None:
    s = r["seconds"]
    print(
        f"  done {r['method']}/{r['provider']} N={r['n']} B={r['batch_size']}: editing {r['editing_s']:.2f}s "
        + " ".join(f"{k} {v:.2f}" for k, v in s.items()),
        flush=True,
    )


def print_table(rows: list[dict]) -> None:
    hdr = (
        f"{'method':<10}{'provider':<15}{'N':>5}{'B':>5}{'stats':>8}{'prep':>7}{'keys':>8}{'targets':>9}"
        f"{'solve':>8}{'apply':>7}{'edit s':>8}{'edits/s':>9}{'speedup':>8}{'effic.':>7}{'P(new)':>7}{'mem MB':>8}"
    )
    print("\n" + hdr)
    ref = {(r["method"], r["n"], r["batch_size"]): r["edits_per_s"] for r in rows if r["provider"] == "reference-flow"}
    for r in rows:
        s = r["seconds"]
        base = ref.get((r["method"], r["n"], r["batch_size"]))
        sp = f"{r['edits_per_s'] / base:.1f}x" if base and r["edits_per_s"] else "-"
        print(
            f"{r['method']:<10}{r['provider']:<15}{r['n']:>5}{r['batch_size']:>5}{s['stats']:>8.2f}{s['prep']:>7.2f}"
            f"{s['keys']:>8.2f}{s['targets']:>9.2f}{s['solve']:>8.3f}{s['apply']:>7.3f}{r['editing_s']:>8.2f}"
            f"{(r['edits_per_s'] or 0):>9.3f}{sp:>8}{100 * r['efficacy']:>6.0f}%{r['mean_p_new']:>7.3f}"
            f"{r['peak_mem_mb']:>8.0f}"
        )
    print("\ncost model: FLOP floor per phase, measured time, floor time at the matmul peak, fraction reached")
    print(f"{'method':<10}{'provider':<15}{'N':>5}{'B':>5}  {'phase':<8}{'floor GFLOP':>12}{'measured s':>11}"
          f"{'floor s':>10}{'fraction':>10}")  # fmt: skip
    for r in rows:
        for k in ("stats", *PHASES):
            f = r["flop_floor"][k]
            t = r["seconds"][k]
            fl_s = f / r["peak_flops"]
            frac = r["floor_fraction_of_peak"][k]
            print(
                f"{r['method']:<10}{r['provider']:<15}{r['n']:>5}{r['batch_size']:>5}  {k:<8}{f / 1e9:>12.3f}"
                f"{t:>11.3f}{fl_s:>10.4f}{(f'{100 * frac:.2f}%' if frac is not None else '-'):>10}"
            )


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[plot skipped] matplotlib is not installed (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bss = {r["batch_size"] for r in rows}
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["method"], r["provider"], r["batch_size"]), []).append((r["n"], r["edits_per_s"] or 0.0))
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for (method, prov, B), pts in groups.items():
        pts.sort()
        label = f"{method} / {prov}" + (f" / B={B}" if len(bss) > 1 else "")
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o" if prov == "metake_fast" else "s", label=label,
                color=colors[method], linestyle="-" if prov == "metake_fast" else "--")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (edits)")
    ax.set_ylabel("edits / s (editing only)")
    r0 = rows[0] if rows else {}
    ax.set_title(f"{r0.get('model')} {r0.get('dtype')} on {r0.get('device_name')}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
