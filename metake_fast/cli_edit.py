"""``metake-fast edit`` and ``metake-fast evaluate`` (registered into :mod:`metake_fast.cli`).

    metake-fast edit --model smollm2-135m --method alphaedit --requests FILE.json \\
        [--batch-size B] [--hparams FILE.yaml] [--set KEY=VALUE ...] [--corpus PATH] [--stats-tokens T] \\
        --save-delta OUT.safetensors [--no-progress]
    metake-fast evaluate --model smollm2-135m --method {rome,memit,alphaedit,metake} \\
        --dataset {counterfact,zsre} --data PATH [--skip K] [--on-conflict {error,skip}] --num-edits N --batch-size B \\
        [--hparams FILE.yaml] [--set KEY=VALUE ...] [--corpus PATH] [--stats-tokens T] --out results.json

``--set`` changes single hyperparameters on top of the file (or the shipped one), e.g.
``--set v_num_grad_steps=50``; unknown fields and bad values are rejected before the model loads.

Bad input (missing files, unknown method, sizes <= 0, bad hparams, requests or data, a model
that cannot be loaded, a failed edit batch) exits with code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .cli import UsageError, _quiet_transformers, check_cache_dir, nonneg_int, positive_int, register_subcommand
from .hparams import METHODS

__all__ = ["run_edit", "run_evaluate"]


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _domain_errors() -> tuple[type[BaseException], ...]:
    from .datasets import DatasetError
    from .editor import EditError
    from .evaluate import EvaluationError
    from .hparams import HParamsError
    from .requests import RequestError

    errors: tuple[type[BaseException], ...] = (HParamsError, RequestError, DatasetError, EditError, EvaluationError)
    try:
        from .delta import DeltaError
    except ImportError:
        return errors
    return (*errors, DeltaError)


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' or a local model directory")
    p.add_argument("--method", default="alphaedit", choices=list(METHODS), help="editing method (default alphaedit)")
    p.add_argument(
        "--hparams",
        default=None,
        help="hyperparameter file, YAML or JSON; the published MEMIT / AlphaEdit / EasyEdit files load as they are (default: the shipped file for the model, else defaults)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set one hyperparameter on top of --hparams / the shipped file (repeatable; YAML values: "
        "--set v_num_grad_steps=50 --set layers=[4,5,6])",
    )
    p.add_argument("--corpus", default=None, help="text / .jsonl / .jsonl.gz file for the key statistics")
    p.add_argument("--stats-tokens", type=positive_int, default=None, help="token budget of the key statistics")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="model dtype")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--cache-dir", default=None, help="statistics cache root (default: $METAKE_FAST_CACHE)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the statistics cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _check_inputs(args: argparse.Namespace) -> None:
    """Cheap checks before the slow model load."""
    if args.hparams is not None and not Path(args.hparams).is_file():
        raise UsageError(f"hparams file {args.hparams} does not exist")
    if args.corpus is not None:
        from .corpus import load_corpus

        load_corpus(args.corpus)  # CorpusError (one line) for a missing / unreadable corpus
    if args.method == "metake":
        import importlib.util

        if importlib.util.find_spec("metake_fast.metake") is None:
            raise UsageError("method 'metake' is not available in this installation (no metake_fast.metake)")


def _set_fields(args: argparse.Namespace) -> dict:
    """``--set KEY=VALUE`` items as hparams overrides; ``layers`` also takes the ``4-8`` / ``4,5,7`` form."""
    from .cli import parse_layers
    from .hparams import parse_overrides

    fields = parse_overrides(args.set)
    layers = fields.get("layers")
    if isinstance(layers, str):
        try:
            fields["layers"] = parse_layers(layers)
        except UsageError:
            raise UsageError(f"--set layers={layers}: use e.g. [4,5,6], 4-8 or 4,5,7") from None
    return fields


def _cache(args: argparse.Namespace):
    if args.no_cache:
        return False
    if args.cache_dir:
        return check_cache_dir(args.cache_dir)
    return True


def _device(args: argparse.Namespace) -> str:
    if args.device:
        return args.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(args: argparse.Namespace):
    from .models import ModelError, load_model

    try:
        return load_model(args.model, dtype=args.dtype, device=_device(args))
    except ModelError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model {args.model!r}: {first}") from None


def _check_out_dir(path: str, what: str) -> None:
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{what}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{what}: directory {parent} is not writable")


# --------------------------------------------------------------------------- edit


def _edit_arguments(p: argparse.ArgumentParser) -> None:
    _common_arguments(p)
    p.add_argument("--requests", required=True, help="requests file: CounterFact (flat/full), ZsRE or EasyEdit JSON")
    p.add_argument("--batch-size", type=positive_int, default=100, help="edits per batch (default 100)")
    p.add_argument("--save-delta", required=True, help="write the weight delta here (.safetensors)")


def run_edit(args: argparse.Namespace) -> int:
    try:
        return _run_edit(args)
    except _domain_errors() as e:
        raise UsageError(_one_line(e)) from None


def _run_edit(args: argparse.Namespace) -> int:
    from .datasets import load_requests
    from .editor import Editor
    from .hparams import make_hparams, read_yaml

    set_fields = _set_fields(args)
    requests = load_requests(args.requests)
    if not requests:
        raise UsageError(f"{args.requests}: no usable requests")
    _check_inputs(args)
    hp_values = read_yaml(args.hparams) if args.hparams else {}
    make_hparams(args.method, {**hp_values, **set_fields})  # field errors before the model loads
    _check_out_dir(args.save_delta, "--save-delta")
    cache = _cache(args)
    _quiet_transformers(args.verbose)
    model, tok = _load(args)
    from .hparams import load_hparams
    from .models import get_adapter

    hp = load_hparams(
        args.method, str(args.model), path=args.hparams, num_layers=get_adapter(model).num_layers(model),
        overrides={**set_fields, **({"stats_tokens": args.stats_tokens} if args.stats_tokens else {})},
    )  # fmt: skip
    editor = Editor(
        model, tok, args.method, hp, model_name=str(args.model), corpus=args.corpus, cache=cache,
        progress=not args.no_progress,
    )  # fmt: skip
    report = editor.edit(requests, batch_size=args.batch_size)
    print(report.table())
    print(report.summary())
    try:
        editor.save_delta(args.save_delta)
    except ModuleNotFoundError as e:
        raise UsageError(f"cannot save the delta: {e}") from None
    except OSError as e:
        raise UsageError(f"cannot write {args.save_delta}: {e.strerror or e}") from None
    print(f"delta saved to {args.save_delta}")
    return 0


# --------------------------------------------------------------------------- evaluate


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    _common_arguments(p)
    p.add_argument("--dataset", required=True, choices=["counterfact", "zsre"], help="which benchmark --data holds")
    p.add_argument("--data", required=True, help="data file (format detected from its content)")
    p.add_argument("--num-edits", type=positive_int, required=True, help="edit the first N cases")
    p.add_argument(
        "--skip",
        type=nonneg_int,
        default=0,
        metavar="K",
        help="leave out the first K records of --data first (held-out slices: --skip 100 --num-edits 100 "
        "is records 100-199; default 0)",
    )
    p.add_argument(
        "--on-conflict",
        default="error",
        choices=["error", "skip"],
        help="two cases with the same prompt and subject (CounterFact has some, e.g. twin cities): stop with an "
        "error before the model loads (default), or skip the later ones and take the next records instead",
    )
    p.add_argument("--batch-size", type=positive_int, required=True, help="edits per sequential batch")
    p.add_argument("--out", required=True, help="results JSON (records go to <out stem>.records.jsonl)")
    p.add_argument("--records", default=None, help="per-request JSON lines (default: next to --out)")
    p.add_argument(
        "--fluency", default="auto", choices=["auto", "on", "off"], help="fluency (auto: full CounterFact only)"
    )
    p.add_argument(
        "--checkpoint", default=None, help="directory: save the state after every batch; rerun to resume from it"
    )
    p.add_argument("--fluency-prompts", type=positive_int, default=2, help="generation prompts per case (default 2)")
    p.add_argument("--fluency-tokens", type=positive_int, default=30, help="new tokens per generation (default 30)")


def run_evaluate(args: argparse.Namespace) -> int:
    try:
        return _run_evaluate(args)
    except _domain_errors() as e:
        raise UsageError(_one_line(e)) from None


def _run_evaluate(args: argparse.Namespace) -> int:
    from .datasets import resolve_dataset
    from .evaluate import run_evaluation

    set_fields = _set_fields(args)
    resolve_dataset(args.data)  # DatasetError for a missing file (shipped names are accepted too)
    _check_inputs(args)
    _check_out_dir(args.out, "--out")
    if args.records:
        _check_out_dir(args.records, "--records")
    cache = _cache(args)
    _quiet_transformers(args.verbose)
    results = run_evaluation(
        args.model, args.method, args.data, args.num_edits, args.batch_size, hparams=args.hparams,
        corpus=args.corpus, stats_tokens=args.stats_tokens, out=args.out, progress=not args.no_progress,
        records_path=args.records, dataset=args.dataset,
        fluency=None if args.fluency == "auto" else args.fluency == "on",
        fluency_prompts=args.fluency_prompts, fluency_tokens=args.fluency_tokens, device=args.device,
        dtype=args.dtype, cache=cache, checkpoint=args.checkpoint, hparams_overrides=set_fields, skip=args.skip,
        on_conflict=args.on_conflict,
    )  # fmt: skip
    t = results["timing"]
    print(
        f"{results['method']} on {results['model']}: {results['num_edits']} {results['dataset']} edits, batch {results['batch_size']}"
    )
    keys = ("efficacy", "generalization", "specificity", "fluency")
    heads = ["efficacy", "general.", "specif.", "fluency"]
    if any(results[n].get("efficacy_magnitude") is not None for n in ("metrics_pre", "metrics_post")):
        keys += ("efficacy_magnitude", "generalization_magnitude", "specificity_magnitude")
        heads += ["EM", "PM", "NM"]  # the field's magnitudes: mean P(new) - P(true), in points
    print(f"{'':14} " + " ".join(f"{h:>9}" for h in heads))
    for name in ("metrics_pre", "metrics_post"):
        m = results[name]
        cells = [("-" if m.get(k) is None else f"{m[k]:.2f}") for k in keys]
        print(f"{name[8:]:14} " + " ".join(f"{c:>9}" for c in cells))
    eps = "-" if t["edits_per_s"] is None else f"{t['edits_per_s']:.3f}"
    print(f"stats {t['stats_s']:.1f}s  edit {t['edit_s']:.1f}s ({eps} edits/s)  eval {t['eval_s']:.1f}s")
    e = results["edit"]
    if e.get("targets_unreached"):
        print(
            f"targets unreached: {e['targets_unreached']} of {results['num_edits']} stopped above the target NLL "
            f"{results['hparams']['early_stop_nll']:g} after {results['hparams']['v_num_grad_steps']} steps"
        )
    print(f"results: {args.out}  records: {results['records']}")
    return 0


register_subcommand("edit", _edit_arguments, run_edit, help="apply edit requests and save the weight delta")
register_subcommand(
    "evaluate", _evaluate_arguments, run_evaluate, help="edit N benchmark cases in batches and score them pre/post"
)
