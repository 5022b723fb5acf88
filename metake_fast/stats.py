"""Second moment of the keys, ``C_l = E[k kᵀ]``, for several layers in one pass.

``k`` is the input of the edited MLP output projection (``adapter.edit_module``),
``d_k`` wide. :func:`second_moment` tokenises a corpus, cuts documents into
chunks of at most ``max_length`` tokens, packs them into padded batches of about
``batch_tokens`` tokens, and runs ONE forward pass per batch that feeds every
requested layer (forward pre-hooks) and stops right after the last of them.
Pad tokens are skipped; exactly ``tokens`` non-pad tokens are counted (fewer
only if the corpus runs out).

Results are cached, one safetensors file per layer, under
``cache_dir()/stats/``; the file name hashes everything that determines the
result (weights up to that layer, tokenizer, module, corpus, token budget,
``max_length``, accumulation dtype) and the file's metadata repeats the key and
a checksum of the tensor. Long passes write partial checkpoints and resume from
them after an interruption, giving bitwise the same sums.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .corpus import Corpus, CorpusError, load_corpus
from .models import ModelAdapter, ensure_writable_dir, get_adapter, weights_fingerprint
from .models import cache_dir as default_cache_dir
from .ops import second_moment_accumulate

__all__ = ["LayerMoment", "StatsError", "second_moment", "stats_cache_key", "tokenizer_fingerprint"]

log = logging.getLogger("metake_fast")

FORMAT_VERSION = "1"
_TOKENIZE_GROUP = 64  # documents per tokenizer call
_STATS_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
}


class StatsError(ValueError):
    """Bad arguments to :func:`second_moment` (layers, budgets, dtype, cache dir)."""


class _StopForward(Exception):
    """Raised from the hook of the last needed layer to end the forward pass early."""


@dataclass
class LayerMoment:
    """Uncentred second moment of one layer's keys.

    sum:   (d_k, d_k) float32/float64, ``Σ k kᵀ`` over ``count`` tokens,
           on the device of the layer's edit module.
    count: number of (non-pad) tokens summed.
    source: ``"cache"``, ``"computed"`` or ``"resumed"`` (computed from a checkpoint).
    seconds: wall time of the pass that produced it (or of the cache load).
    path / cache_error: the cache file, or why it could not be written (for example a full disk).
    """

    sum: torch.Tensor
    count: int
    layer: int = -1
    source: str = "computed"
    seconds: float = 0.0
    path: Path | None = None
    cache_error: str | None = None  # why a computed result could not be written to the cache

    @property
    def mean(self) -> torch.Tensor:
        """``C_l = sum / count``: (d_k, d_k), the per-token mean."""
        if self.count <= 0:
            raise StatsError(f"layer {self.layer}: no tokens were summed")
        return self.sum / self.count


# ---------------------------------------------------------------------------
# keys and cache files
# ---------------------------------------------------------------------------


def _parse_stats_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.float64):
            return dtype
    elif str(dtype).lower() in _STATS_DTYPES:
        return _STATS_DTYPES[str(dtype).lower()]
    raise StatsError(f"statistics dtype must be fp32 or fp64, got {dtype!r}")


def tokenizer_fingerprint(tokenizer) -> str:
    """Short hash of a tokenizer's vocabulary, merges and special-token behaviour."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    probe = tokenizer(["Hello world. The quick brown fox"], add_special_tokens=True)["input_ids"][0]
    h.update(repr(list(probe)).encode())
    return h.hexdigest()[:16]


def stats_cache_key(
    model: nn.Module,
    tokenizer,
    layer: int,
    corpus: Corpus,
    tokens: int,
    max_length: int,
    dtype: torch.dtype,
    *,
    tokenizer_fp: str | None = None,
) -> dict:
    """Everything that determines the statistics of ``layer`` (JSON-serialisable)."""
    adapter = get_adapter(model)
    return {
        "format": FORMAT_VERSION,
        "model": weights_fingerprint(model, max_layer=layer),
        "layer": layer,
        "module": adapter.edit_module_name(layer),
        "tokenizer": tokenizer_fp or tokenizer_fingerprint(tokenizer),
        "corpus": corpus.fingerprint,
        "tokens": int(tokens),
        "max_length": int(max_length),
        "dtype": str(dtype).replace("torch.", ""),
    }


def _key_json(key: dict) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def _cache_path(directory: Path, key: dict, partial: bool = False) -> Path:
    digest = hashlib.sha256(_key_json(key).encode()).hexdigest()[:20]
    module = key["module"].replace("/", "_")
    name = f"L{key['layer']:03d}_{module}_t{key['tokens']}_m{key['max_length']}_{key['dtype']}_{digest}"
    return directory / (name + (".partial" if partial else "") + ".safetensors")


def _checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy()).hexdigest()


def _unlink_quietly(path: Path) -> None:
    """Remove ``path`` if it exists; an error here must not hide the one being reported."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _save(path: Path, S: torch.Tensor, count: int, key: dict, **extra) -> str | None:
    """Atomically write ``S`` with its key and checksum; None, or the reason (and a warning) on I/O errors."""
    from safetensors.torch import save_file

    cpu = S.detach().to("cpu").contiguous()
    meta = {"key": _key_json(key), "count": str(int(count)), "checksum": _checksum(cpu)}
    meta.update({k: str(v) for k, v in extra.items()})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file({"sum": cpu}, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return None
    except OSError as e:
        reason = f"{'disk full: ' if e.errno in (errno.ENOSPC, errno.EDQUOT) else ''}{e.strerror or e}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            log.warning(
                "disk full: could not write statistics cache file %s (%s); the statistics are used but not "
                "cached. Free space or point the cache elsewhere (--cache-dir / METAKE_FAST_CACHE).",
                path, e.strerror or e,
            )  # fmt: skip
        else:
            log.warning("could not write statistics cache file %s: %s", path, e)
        _unlink_quietly(tmp)
        return reason


def _load(path: Path, key: dict, device) -> tuple[torch.Tensor, int, dict] | None:
    """``(sum, count, metadata)`` from a cache file, or None if absent; corrupt files are deleted."""
    if not path.exists():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            S = f.get_tensor("sum")
        if meta.get("key") != _key_json(key):
            raise ValueError("its key does not match the file name")
        if S.dim() != 2 or S.shape[0] != S.shape[1]:
            raise ValueError(f"tensor shape {tuple(S.shape)} is not square")
        if meta.get("checksum") != _checksum(S.contiguous()):
            raise ValueError("checksum mismatch")
        count = int(meta["count"])
    except Exception as e:  # noqa: BLE001 - any failure to read means the file is unusable
        log.warning("statistics cache file %s is unreadable (%s); deleting it and recomputing", path, e)
        _unlink_quietly(path)
        return None
    return S.to(device), count, meta


# ---------------------------------------------------------------------------
# token stream
# ---------------------------------------------------------------------------


def _tokenized_documents(corpus: Corpus, tokenizer, start_doc: int) -> Iterator[tuple[int, list[int]]]:
    """``(document index, token ids)`` from document ``start_doc`` on, tokenised in groups."""
    group: list[str] = []
    first = start_doc

    def flush():
        enc = tokenizer(group, add_special_tokens=True, verbose=False)["input_ids"]
        return [(first + i, list(ids)) for i, ids in enumerate(enc)]

    for i, text in enumerate(corpus):
        if i < start_doc:
            continue
        if not group:
            first = i
        group.append(text)
        if len(group) == _TOKENIZE_GROUP:
            yield from flush()
            group = []
    if group:
        yield from flush()


def _pools(
    docs: Iterable[tuple[int, list[int]]], max_length: int, budget: int, consumed: int, pool_tokens: int
) -> Iterator[tuple[list[list[int]], int, int]]:
    """Groups of whole documents' chunks: ``(chunks, documents consumed, tokens consumed)``.

    Chunks are at most ``max_length`` tokens; the very last chunk is cut so the
    total equals ``budget`` exactly. Pools end on document boundaries, so a pass
    can resume from any pool boundary.
    """
    pool: list[list[int]] = []
    n = 0
    for doc, ids in docs:
        for s in range(0, len(ids), max_length):
            chunk = ids[s : s + max_length][: budget - consumed - n]
            if chunk:
                pool.append(chunk)
                n += len(chunk)
            if consumed + n >= budget:
                yield pool, doc + 1, consumed + n
                return
        if n >= pool_tokens:
            consumed += n
            yield pool, doc + 1, consumed
            pool, n = [], 0
    if pool:
        yield pool, doc + 1, consumed + n


def _batches(pool: list[list[int]], batch_tokens: int) -> Iterator[list[list[int]]]:
    """Longest first; each batch has about ``batch_tokens`` padded tokens (at least one row)."""
    order = sorted(pool, key=len, reverse=True)
    i = 0
    while i < len(order):
        rows = max(1, batch_tokens // len(order[i]))
        yield order[i : i + rows]
        i += rows


def _forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """One (early-stopped) forward pass; the hooks do the work."""
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass


# ---------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------


def _parse_layers(layers, num_layers: int) -> list[int]:
    if isinstance(layers, int):
        layers = [layers]
    try:
        out = sorted({int(layer) for layer in layers})
    except (TypeError, ValueError):
        raise StatsError(f"layers must be integers, got {layers!r}") from None
    if not out:
        raise StatsError("no layers requested")
    bad = [layer for layer in out if not 0 <= layer < num_layers]
    if bad:
        raise StatsError(f"layer(s) {bad} out of range: the model has layers 0-{num_layers - 1}")
    return out


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StatsError(f"{name} must be a positive integer, got {value!r}")
    return value


def _prepare_cache_dir(cache) -> Path | None:
    if cache is False or cache is None:
        return None
    directory = (default_cache_dir() if cache is True else Path(cache).expanduser()) / "stats"
    return ensure_writable_dir(directory, "statistics cache dir", StatsError)


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of an initialised ``torch.distributed`` process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def second_moment(
    model: nn.Module,
    tokenizer,
    layers: int | Iterable[int],
    corpus=None,
    *,
    tokens: int = 100_000,
    max_length: int = 512,
    batch_tokens: int = 8192,
    dtype=torch.float32,
    cache: bool | str | os.PathLike = True,
    progress: bool = True,
    checkpoint_every: int | None = 100_000,
) -> dict[int, LayerMoment]:
    """``{layer: LayerMoment}``: ``Σ k kᵀ`` and token count of every requested layer.

    model, tokenizer: a transformers causal LM (fp32/bf16/fp16) and its tokenizer.
    layers:     one layer index or several; all are collected in ONE forward pass
                that stops after the last of them.
    corpus:     ``None`` (shipped default), a path, or an iterable (see :mod:`metake_fast.corpus`).
    tokens:     exact number of non-pad tokens to sum (fewer only if the corpus runs out).
    max_length: longest chunk fed to the model (documents are split, not truncated).
    batch_tokens: padded tokens per forward batch (memory knob; does not change the key).
    dtype:      accumulation dtype, float32 or float64 (``"fp32"``/``"fp64"``).
    cache:      True (``cache_dir()/stats``), a directory (``<dir>/stats``), or False.
    checkpoint_every: with a cache, write partial checkpoints every this many tokens
                (None: never); an interrupted pass resumes from the last one.

    Data-parallel: when a ``torch.distributed`` process group is initialised (for
    example under ``torchrun``; gloo on CPU, NCCL on GPUs), every rank reads the same
    token stream and runs every ``world_size``-th batch; the sums are all-reduced, so
    every rank returns the single-process result up to fp32 summation order. Only
    rank 0 writes the cache; partial checkpoints are not written in this mode.
    """
    adapter = get_adapter(model)
    layer_list = _parse_layers(layers, adapter.num_layers(model))
    tokens = _check_positive("tokens", tokens)
    max_length = _check_positive("max_length", max_length)
    batch_tokens = _check_positive("batch_tokens", batch_tokens)
    if checkpoint_every is not None:
        checkpoint_every = _check_positive("checkpoint_every", checkpoint_every)
    acc_dtype = _parse_stats_dtype(dtype)
    corpus = load_corpus(corpus)
    directory = _prepare_cache_dir(cache)

    devices = {layer: adapter.edit_weight(model, layer).device for layer in layer_list}
    results: dict[int, LayerMoment] = {}
    keys: dict[int, dict] = {}
    if directory is not None:
        tok_fp = tokenizer_fingerprint(tokenizer)
        for layer in layer_list:
            keys[layer] = stats_cache_key(
                model, tokenizer, layer, corpus, tokens, max_length, acc_dtype, tokenizer_fp=tok_fp
            )
            t0 = time.perf_counter()
            path = _cache_path(directory, keys[layer])
            hit = _load(path, keys[layer], devices[layer])
            if hit is not None:
                S, count, _ = hit
                results[layer] = LayerMoment(S, count, layer, "cache", time.perf_counter() - t0, path)
    missing = [layer for layer in layer_list if layer not in results]
    if missing:
        results.update(
            _compute(
                model, adapter, tokenizer, corpus, missing, devices, keys, directory,
                tokens=tokens, max_length=max_length, batch_tokens=batch_tokens, dtype=acc_dtype,
                progress=progress, checkpoint_every=checkpoint_every,
            )
        )  # fmt: skip
    return {layer: results[layer] for layer in layer_list}


def _resume_point(missing, keys, directory, devices) -> tuple[dict[int, torch.Tensor], int, int]:
    """Partial sums and ``(documents, tokens)`` consumed, if every missing layer has the same checkpoint."""
    if directory is None:
        return {}, 0, 0
    partials = {}
    for layer in missing:
        hit = _load(_cache_path(directory, keys[layer], partial=True), keys[layer], devices[layer])
        if hit is None:
            return {}, 0, 0
        S, count, meta = hit
        partials[layer] = (S, int(meta.get("documents", -1)), count)
    positions = {(docs, count) for _, docs, count in partials.values()}
    if len(positions) != 1 or next(iter(positions))[0] < 0:
        log.info("statistics checkpoints of layers %s are at different positions; starting over", missing)
        return {}, 0, 0
    docs, count = positions.pop()
    return {layer: S for layer, (S, _, _) in partials.items()}, docs, count


def _compute(
    model, adapter: ModelAdapter, tokenizer, corpus: Corpus, layers: list[int], devices, keys, directory,
    *, tokens, max_length, batch_tokens, dtype, progress, checkpoint_every,
) -> dict[int, LayerMoment]:  # fmt: skip
    from tqdm.auto import tqdm

    d_k = {layer: adapter.key_dim(model, layer) for layer in layers}
    sums, start_docs, start_tokens = _resume_point(layers, keys, directory, devices)
    if sums:
        log.info("resuming statistics of layers %s from a checkpoint at %d tokens", layers, start_tokens)
        if any(S.dtype != dtype or S.shape != (d_k[layer], d_k[layer]) for layer, S in sums.items()):
            sums, start_docs, start_tokens = {}, 0, 0
    if not sums:
        sums = {layer: torch.zeros(d_k[layer], d_k[layer], dtype=dtype, device=devices[layer]) for layer in layers}
    source = "resumed" if start_tokens else "computed"
    rank, world = distributed_world()
    if world > 1:
        checkpoint_every = None  # partial sums differ per rank; a distributed pass restarts from scratch
        source = "computed-distributed" if source == "computed" else source

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    input_device = model.get_input_embeddings().weight.device
    last = layers[-1]
    current = {}

    def make_hook(layer: int):
        def hook(module, args):
            x = args[0]
            x = x.reshape(-1, x.shape[-1])
            mask = current["mask"]
            second_moment_accumulate(sums[layer], x, mask if mask.device == x.device else mask.to(x.device))
            if layer == last:
                raise _StopForward

        return hook

    handles = [adapter.edit_module(model, layer).register_forward_pre_hook(make_hook(layer)) for layer in layers]
    was_training = model.training
    model.eval()
    consumed, docs_done, since_ckpt = start_tokens, start_docs, 0
    bar = tqdm(
        total=tokens, initial=start_tokens, unit="tok", unit_scale=True,
        desc=f"second moment L{','.join(map(str, layers))}", dynamic_ncols=True, disable=not progress or rank != 0,
    )  # fmt: skip
    t0 = time.perf_counter()
    batch_no = -1
    try:
        with torch.no_grad():
            documents = _tokenized_documents(corpus, tokenizer, start_docs)
            for pool, docs_done, consumed in _pools(
                documents, max_length, tokens, start_tokens, pool_tokens=4 * batch_tokens
            ):
                for rows in _batches(pool, batch_tokens):
                    batch_no += 1
                    if batch_no % world != rank:  # another rank's batch
                        bar.update(sum(len(c) for c in rows))
                        continue
                    width = len(rows[0])
                    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                    attn = torch.zeros((len(rows), width), dtype=torch.long)
                    for r, chunk in enumerate(rows):
                        ids[r, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
                        attn[r, : len(chunk)] = 1
                    ids, attn = ids.to(input_device), attn.to(input_device)
                    current["mask"] = attn.reshape(-1).bool()
                    _forward(model, ids, attn)
                    bar.update(sum(len(c) for c in rows))
                since_ckpt += sum(len(c) for c in pool)
                if (
                    directory is not None
                    and checkpoint_every is not None
                    and since_ckpt >= checkpoint_every
                    and consumed < tokens
                ):
                    for layer in layers:
                        _save(_cache_path(directory, keys[layer], partial=True), sums[layer], consumed, keys[layer],
                              documents=docs_done)  # fmt: skip
                    since_ckpt = 0
    finally:
        bar.close()
        for h in handles:
            h.remove()
        model.train(was_training)
    if world > 1:
        import torch.distributed as dist

        for layer in layers:
            dist.all_reduce(sums[layer])
    seconds = time.perf_counter() - t0
    if consumed == 0:
        raise CorpusError(f"corpus {corpus.name} produced no tokens")
    if consumed < tokens:
        log.warning("corpus %s has only %d tokens, fewer than the budget of %d", corpus.name, consumed, tokens)

    out = {}
    for layer in layers:
        path, cache_error = None, None
        if directory is not None and rank == 0:
            path = _cache_path(directory, keys[layer])
            cache_error = _save(path, sums[layer], consumed, keys[layer], documents=docs_done)
            if cache_error is not None:
                path = None
            _cache_path(directory, keys[layer], partial=True).unlink(missing_ok=True)
        out[layer] = LayerMoment(sums[layer], consumed, layer, source, seconds, path, cache_error)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # the cache file exists for every rank once this returns
    return out
