"""The ``metake-fast`` command line.

Subcommands live in :data:`SUBCOMMANDS` (``name -> Subcommand``); another
module adds one with :func:`register_subcommand` before :func:`main` runs::

    def add_arguments(parser): parser.add_argument("--x", type=int, default=1)
    def run(args) -> int: ...
    register_subcommand("mycmd", add_arguments, run, help="one line")

Bad input (unknown model, missing corpus, bad layers or numbers, unusable
cache dir) exits with code 2 and ONE line on stderr, no traceback: raise
:class:`UsageError` (or a :class:`ModelError` / :class:`CorpusError` /
:class:`StatsError`) from ``run``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SUBCOMMANDS", "Subcommand", "UsageError", "main", "parse_layers", "register_subcommand"]

PROG = "metake-fast"
_LAYER_PART = re.compile(r"(\d+)(?:\s*-\s*(\d+))?")


class UsageError(ValueError):
    """Bad command-line input; reported as one line and exit code 2."""


@dataclass(frozen=True)
class Subcommand:
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    help: str = ""


SUBCOMMANDS: dict[str, Subcommand] = {}


def register_subcommand(
    name: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int | None],
    help: str = "",
) -> None:
    """Add (or replace) subcommand ``name``."""
    SUBCOMMANDS[name] = Subcommand(add_arguments, run, help)


class _Parser(argparse.ArgumentParser):
    """Raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(message)


# ---------------------------------------------------------------------------
# argument helpers
# ---------------------------------------------------------------------------


def parse_layers(spec: str, num_layers: int | None = None) -> list[int]:
    """``"4-8"``, ``"4,5,7"``, ``"6"`` or mixes (``"2,4-6"``) -> sorted unique layer indices."""
    out: set[int] = set()
    for part in str(spec).split(","):
        m = _LAYER_PART.fullmatch(part.strip())
        if m is None:
            raise UsageError(f"bad --layers {spec!r}: use e.g. 4-8, 4,5,7 or 6")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo > hi:
            raise UsageError(f"bad --layers {spec!r}: range {part.strip()!r} starts after it ends")
        out.update(range(lo, hi + 1))
    if num_layers is not None:
        bad = sorted(layer for layer in out if layer >= num_layers)
        if bad:
            raise UsageError(f"layer(s) {bad} out of range: the model has layers 0-{num_layers - 1}")
    return sorted(out)


def _count(text: str, minimum: int) -> int:
    """An integer >= ``minimum``; accepts ``100000``, ``100_000``, ``100k``, ``2M``."""
    t = str(text).strip().lower().replace("_", "")
    mult = 1
    if t[-1:] in ("k", "m"):
        mult = 1000 if t[-1] == "k" else 1_000_000
        t = t[:-1]
    try:
        value = int(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1; accepts ``100000``, ``100_000``, ``100k``, ``2M``."""
    return _count(text, 1)


def nonneg_int(text: str) -> int:
    """An integer >= 0 (same spellings as :func:`positive_int`)."""
    return _count(text, 0)


def check_cache_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check that files can be written there."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"cache dir {p} is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UsageError(f"cache dir {p} is not writable: {e.strerror or e}") from None
    return p


# ---------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------


def _stats_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' or a local model directory")
    p.add_argument("--layers", required=True, help="layers: 4-8, 4,5,7 or 6")
    p.add_argument("--corpus", default=None, help="text / .jsonl / .jsonl.gz file (default: the shipped corpus)")
    p.add_argument("--tokens", type=positive_int, default=100_000, help="token budget (default 100000)")
    p.add_argument("--max-length", type=positive_int, default=512, help="longest chunk in tokens (default 512)")
    p.add_argument("--batch-tokens", type=positive_int, default=8192, help="padded tokens per batch (default 8192)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="model dtype")
    p.add_argument("--stats-dtype", default="fp32", choices=["fp32", "fp64"], help="accumulation dtype")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--cache-dir", default=None, help="cache root (default: $METAKE_FAST_CACHE or ~/.cache/metake_fast)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the statistics cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _quiet_transformers(verbose: bool) -> None:
    """No loading progress bars or advisory warnings from transformers (errors stay one line)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not verbose:
        hf_logging.set_verbosity_error()


def _run_stats(args: argparse.Namespace) -> int:
    import torch

    from .corpus import load_corpus
    from .models import cache_dir

    parse_layers(args.layers)  # syntax errors before the slow model load
    corpus = load_corpus(args.corpus)
    cache = False if args.no_cache else check_cache_dir(args.cache_dir if args.cache_dir else cache_dir())
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _quiet_transformers(args.verbose)
    rank, world = _init_distributed(device)
    ok = False
    try:
        rc = _stats_pass(args, corpus, cache, device, rank, world)
        ok = True
        return rc
    finally:
        if world > 1:
            import torch.distributed as dist

            if ok:
                # Every rank leaves together: a rank that tears gloo down while its peer is
                # still printing can abort in gloo's transport threads.
                dist.barrier()
            dist.destroy_process_group()


def _init_distributed(device: str) -> tuple[int, int]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the process group (NCCL on CUDA, gloo on CPU)."""
    import os

    import torch

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _stats_pass(args, corpus, cache, device, rank: int, world: int) -> int:
    import time

    import torch

    from .models import ModelError, get_adapter, load_model
    from .stats import second_moment

    if world > 1 and str(device) == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    except ModelError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model {args.model!r}: {first}") from None
    layers = parse_layers(args.layers, get_adapter(model).num_layers(model))
    t0 = time.perf_counter()
    stats = second_moment(
        model, tokenizer, layers, corpus,
        tokens=args.tokens, max_length=args.max_length, batch_tokens=args.batch_tokens,
        dtype=args.stats_dtype, cache=cache, progress=not args.no_progress,
    )  # fmt: skip
    total = time.perf_counter() - t0
    adapter = get_adapter(model)
    if rank != 0:
        return 0
    if world > 1:
        print(f"data-parallel over {world} ranks (torch.distributed); sums all-reduced")
    print(f"model {args.model}  corpus {corpus.name} ({corpus.fingerprint})  device {device}  dtype {args.dtype}")
    print(f"{'layer':>5}  {'module':<28} {'d_k':>5} {'tokens':>9} {'trace(C)':>11} {'time s':>8} {'tok/s':>9}  source")
    for layer, m in stats.items():
        rate = f"{m.count / m.seconds:.0f}" if m.seconds > 0 and m.source != "cache" else "-"
        trace = float(m.mean.trace())
        print(
            f"{layer:>5}  {adapter.edit_module_name(layer):<28} {m.sum.shape[0]:>5} {m.count:>9} {trace:>11.5g}"
            f" {m.seconds:>8.2f} {rate:>9}  {m.source}{'' if m.path is None else '  ' + str(m.path)}"
        )
    print(f"total {total:.2f} s")
    unsaved = {layer: m.cache_error for layer, m in stats.items() if m.cache_error is not None}
    if unsaved:
        raise UsageError(
            f"statistics for layer(s) {sorted(unsaved)} were computed but could not be written to the cache "
            f"{cache}: {next(iter(unsaved.values()))}"
        )
    return 0


register_subcommand("stats", _stats_arguments, _run_stats, help="second moment of the keys C_l = E[k kᵀ] per layer")


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Fast locate-then-edit knowledge editing.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log info messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, cmd in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from .corpus import CorpusError
    from .models import ModelError
    from .stats import StatsError

    return (UsageError, ModelError, CorpusError, StatsError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    errors = _known_errors()
    try:
        parser = build_parser()
        args = parser.parse_args(list(argv) if argv is not None else None)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s"
        )
        if args.command is None:
            parser.print_help()
            return 2
        return int(args._run(args) or 0)
    except errors as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


from . import cli_edit as _cli_edit  # noqa: E402,F401  (registers the edit / evaluate subcommands)
