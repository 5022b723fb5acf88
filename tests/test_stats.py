"""One-pass key second moment: exactness against a naive fp64 loop, early stop, budget, cache, resume."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("transformers")

from _tiny import corpus_lines, tiny_model, tiny_tokenizer  # noqa: E402

import metake_fast.stats as stats_mod  # noqa: E402
from metake_fast.corpus import CorpusError  # noqa: E402
from metake_fast.models import get_adapter  # noqa: E402
from metake_fast.stats import LayerMoment, StatsError, second_moment  # noqa: E402

# documents of very different lengths: some are split into several chunks, some are short
TEXTS = [t for t in corpus_lines(60)[20:60]] + ["Short one.", "Tiny."]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=4, seed=0)


def naive_moments(model, tok, layers, texts, tokens, max_length):
    """Σ k kᵀ in fp64 over the first ``tokens`` tokens of the documents, one unpadded chunk at a time."""
    adapter = get_adapter(model)
    captured = {}
    handles = [
        adapter.edit_module(model, l).register_forward_pre_hook(
            lambda m, args, l=l: captured.__setitem__(l, args[0].detach())
        )
        for l in layers
    ]
    sums = {l: torch.zeros(adapter.key_dim(model, l), adapter.key_dim(model, l), dtype=torch.float64) for l in layers}
    left = tokens
    try:
        for text in texts:
            ids = tok(text)["input_ids"]
            for s in range(0, len(ids), max_length):
                chunk = ids[s : s + max_length][:left]
                if not chunk:
                    continue
                with torch.no_grad():
                    model(input_ids=torch.tensor([chunk]))
                for l in layers:
                    k = captured[l][0].double()
                    for row in k:  # naive loop over tokens
                        sums[l] += torch.outer(row, row)
                left -= len(chunk)
            if left == 0:
                break
    finally:
        for h in handles:
            h.remove()
    return sums, tokens - left


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_naive_fp64(tok, dtype, tol):
    model = tiny_model("llama", layers=4, seed=1, dtype=dtype)
    layers = [0, 2, 3]
    tokens, max_length = (1500 if dtype == torch.float32 else 500), 48
    out = second_moment(
        model, tok, layers, TEXTS, tokens=tokens, max_length=max_length, batch_tokens=200, cache=False, progress=False
    )
    ref, n = naive_moments(model, tok, layers, TEXTS, tokens, max_length)
    assert n == tokens
    assert list(out) == layers
    for l in layers:
        m = out[l]
        assert isinstance(m, LayerMoment) and m.count == tokens and m.sum.dtype == torch.float32
        assert m.sum.shape == (80, 80)
        assert rel_err(m.sum, ref[l]) < tol, (l, rel_err(m.sum, ref[l]))
        assert torch.allclose(m.mean.double(), ref[l] / tokens, rtol=0, atol=tol * (ref[l] / tokens).abs().max())


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_other_architectures_fp64(tok, arch):
    model = tiny_model(arch, layers=3, seed=2)
    out = second_moment(
        model, tok, [1, 2], TEXTS, tokens=700, max_length=40, batch_tokens=128, dtype="fp64", cache=False,
        progress=False,
    )  # fmt: skip
    ref, _ = naive_moments(model, tok, [1, 2], TEXTS, 700, 40)
    for l in (1, 2):
        assert out[l].sum.dtype == torch.float64
        assert rel_err(out[l].sum, ref[l]) < 1e-5


def test_early_stop(tok, model):
    adapter = get_adapter(model)
    calls = {i: 0 for i in range(4)}
    handles = [
        layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(adapter.decoder_layers(model))
    ]
    head_calls = []
    handles.append(adapter.unembedding(model).register_forward_pre_hook(lambda m, a: head_calls.append(1)))
    try:
        second_moment(model, tok, [0, 1], TEXTS, tokens=400, max_length=64, cache=False, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert calls[0] > 0 and calls[1] == calls[0]
    assert calls[2] == 0 and calls[3] == 0 and not head_calls


def test_token_budget_exact_and_corpus_exhausted(tok, model, caplog):
    for budget in (1, 37, 513):
        out = second_moment(model, tok, 1, TEXTS, tokens=budget, max_length=32, cache=False, progress=False)
        assert out[1].count == budget
    small = ["one two three", "four five"]
    total = sum(len(tok(t)["input_ids"]) for t in small)
    with caplog.at_level(logging.WARNING, logger="metake_fast"):
        out = second_moment(model, tok, 1, small, tokens=10_000, cache=False, progress=False)
    assert out[1].count == total
    assert "fewer than the budget" in caplog.text


def test_batch_size_does_not_change_result(tok, model):
    kw = dict(tokens=900, max_length=50, cache=False, progress=False)
    a = second_moment(model, tok, [2], TEXTS, batch_tokens=64, **kw)[2]
    b = second_moment(model, tok, [2], TEXTS, batch_tokens=4096, **kw)[2]
    assert a.count == b.count
    assert rel_err(a.sum, b.sum) < 1e-5


def test_cache_round_trip(tok, model, tmp_path):
    kw = dict(tokens=600, max_length=64, cache=tmp_path, progress=False)
    first = second_moment(model, tok, [1, 2], TEXTS, **kw)
    assert {m.source for m in first.values()} == {"computed"}
    files = sorted((tmp_path / "stats").glob("*.safetensors"))
    assert len(files) == 2 and all(m.path in files for m in first.values())
    second = second_moment(model, tok, [1, 2], TEXTS, **kw)
    for l in (1, 2):
        assert second[l].source == "cache"
        assert torch.equal(second[l].sum, first[l].sum) and second[l].count == first[l].count
    # a superset computes only the new layer
    third = second_moment(model, tok, [1, 2, 3], TEXTS, **kw)
    assert [third[l].source for l in (1, 2, 3)] == ["cache", "cache", "computed"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip"])
def test_corrupt_cache_file_is_recomputed(tok, model, tmp_path, caplog, damage):
    kw = dict(tokens=300, max_length=64, cache=tmp_path, progress=False)
    ref = second_moment(model, tok, [1], TEXTS, **kw)[1]
    path = ref.path
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 7)
    else:  # valid file, changed tensor bytes: only the checksum catches it
        path.write_bytes(data[:-4] + bytes(b ^ 0x55 for b in data[-4:]))
    with caplog.at_level(logging.WARNING, logger="metake_fast"):
        again = second_moment(model, tok, [1], TEXTS, **kw)[1]
    assert again.source == "computed"
    assert "unreadable" in caplog.text
    assert torch.equal(again.sum, ref.sum)
    assert second_moment(model, tok, [1], TEXTS, **kw)[1].source == "cache"


def test_cache_key_sensitivity(tok, model, tmp_path):
    base = dict(tokens=200, max_length=64, dtype=torch.float32)
    variants = [
        dict(base),
        dict(base, tokens=201),
        dict(base, max_length=65),
        dict(base, dtype=torch.float64),
    ]
    for kw in variants:
        second_moment(model, tok, [1], TEXTS, cache=tmp_path, progress=False, **kw)
    second_moment(model, tok, [1], TEXTS[::-1], cache=tmp_path, progress=False, **base)  # other corpus
    other_model = tiny_model("llama", layers=4, seed=5)
    second_moment(other_model, tok, [1], TEXTS, cache=tmp_path, progress=False, **base)
    files = list((tmp_path / "stats").glob("*.safetensors"))
    assert len(files) == len(variants) + 2
    # batch_tokens does not change the result, so it is not part of the key
    out = second_moment(model, tok, [1], TEXTS, cache=tmp_path, progress=False, batch_tokens=100, **base)
    assert out[1].source == "cache"


def test_weights_after_layer_do_not_change_key(tok, tmp_path):
    model = tiny_model("llama", layers=4, seed=0)
    second_moment(model, tok, [1], TEXTS, tokens=200, cache=tmp_path, progress=False)
    with torch.no_grad():
        get_adapter(model).edit_weight(model, 3).add_(1.0)
    assert second_moment(model, tok, [1], TEXTS, tokens=200, cache=tmp_path, progress=False)[1].source == "cache"


def test_resume_after_interrupt_equals_uninterrupted(tok, model, tmp_path, monkeypatch):
    kw = dict(tokens=1200, max_length=40, batch_tokens=80, progress=False, checkpoint_every=200)
    full = second_moment(model, tok, [0, 2], TEXTS, cache=False, **kw)

    real_forward = stats_mod._forward
    calls = []

    def interrupting_forward(*args):
        calls.append(1)
        if len(calls) == 12:
            raise KeyboardInterrupt
        return real_forward(*args)

    monkeypatch.setattr(stats_mod, "_forward", interrupting_forward)
    with pytest.raises(KeyboardInterrupt):
        second_moment(model, tok, [0, 2], TEXTS, cache=tmp_path, **kw)
    monkeypatch.setattr(stats_mod, "_forward", real_forward)
    partials = list((tmp_path / "stats").glob("*.partial.safetensors"))
    assert len(partials) == 2

    resumed = second_moment(model, tok, [0, 2], TEXTS, cache=tmp_path, **kw)
    for l in (0, 2):
        assert resumed[l].source == "resumed"
        assert resumed[l].count == full[l].count == 1200
        assert torch.equal(resumed[l].sum, full[l].sum)
    assert not list((tmp_path / "stats").glob("*.partial.safetensors"))
    assert second_moment(model, tok, [0, 2], TEXTS, cache=tmp_path, **kw)[0].source == "cache"


def test_training_mode_restored(tok):
    model = tiny_model("llama", layers=2)
    model.train()
    second_moment(model, tok, [0], TEXTS, tokens=50, cache=False, progress=False)
    assert model.training


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layers=[4]), "out of range"),
        (dict(layers=[-1]), "out of range"),
        (dict(layers=[]), "no layers"),
        (dict(layers=[0], tokens=0), "tokens"),
        (dict(layers=[0], max_length=-1), "max_length"),
        (dict(layers=[0], dtype=torch.float16), "fp32 or fp64"),
    ],
)
def test_bad_arguments(tok, model, kwargs, match):
    with pytest.raises(StatsError, match=match):
        second_moment(model, tok, corpus=TEXTS, cache=False, progress=False, **kwargs)


def test_bad_cache_dir_and_empty_corpus(tok, model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StatsError, match="cache dir"):
        second_moment(model, tok, [0], TEXTS, tokens=10, cache=blocker, progress=False)
    with pytest.raises(CorpusError):
        second_moment(model, tok, [0], [], tokens=10, cache=False, progress=False)


@pytest.mark.slow
def test_default_model_small_budget(tmp_path):
    from metake_fast.models import load_model

    model, tok = load_model("smollm2-135m")
    out = second_moment(model, tok, [4, 6], tokens=600, max_length=128, cache=tmp_path, progress=False)
    ref, _ = naive_moments(model, tok, [6], list(load_corpus_texts(5)), 200, 128)
    for l in (4, 6):
        m = out[l]
        assert m.count == 600 and m.sum.shape == (1536, 1536)
        assert torch.allclose(m.sum, m.sum.T, rtol=1e-5, atol=1e-3)
        assert torch.linalg.eigvalsh(m.mean.double()).min() > -1e-6 * m.mean.trace()
    small = second_moment(model, tok, [6], tokens=200, max_length=128, cache=False, progress=False)[6]
    assert rel_err(small.sum, ref[6]) < 1e-4
    assert second_moment(model, tok, [4, 6], tokens=600, max_length=128, cache=tmp_path)[4].source == "cache"


def load_corpus_texts(n):
    from metake_fast.corpus import load_corpus

    for i, t in enumerate(load_corpus(None)):
        if i == n:
            return
        yield t


def test_disk_full_is_reported_and_result_still_correct(tok, model, tmp_path, monkeypatch, caplog):
    import errno

    import safetensors.torch

    kw = dict(tokens=300, max_length=40, progress=False)
    ref = second_moment(model, tok, [1], TEXTS, cache=False, **kw)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with caplog.at_level(logging.WARNING, logger="metake_fast.stats"):
        got = second_moment(model, tok, [1], TEXTS, cache=tmp_path, **kw)
    assert torch.equal(got[1].sum, ref[1].sum) and got[1].path is None
    assert any("disk full" in r.getMessage() and "No space left" in r.getMessage() for r in caplog.records)
    assert not [p for p in (tmp_path / "stats").iterdir()]  # no temporary or partial file left behind


_WORKER = r"""
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from _tiny import corpus_lines, tiny_model, tiny_tokenizer
from metake_fast.stats import second_moment
texts = [t for t in corpus_lines(60)[20:60]] + ["Short one.", "Tiny."]
out = second_moment(tiny_model("llama", layers=4, seed=0), tiny_tokenizer(), [0, 2], texts, tokens=1500,
                    max_length=40, batch_tokens=80, progress=False, checkpoint_every=100, cache={cache!r})
torch.save({{l: (m.sum, m.count, m.source) for l, m in out.items()}}, sys.argv[1])
"""


def test_two_processes_writing_the_same_cache(tok, model, tmp_path):
    """Two processes compute the same statistics into one cache at once: both results and the cache are exact."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    cache = tmp_path / "cache"
    script = _WORKER.format(tests=str(Path(__file__).parent), cache=str(cache))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"r{i}.pt")], env=env, stderr=subprocess.PIPE)
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-2000:]
    ref = second_moment(model, tok, [0, 2], TEXTS, tokens=1500, max_length=40, batch_tokens=80, progress=False,
                        cache=False)  # fmt: skip
    for i in range(2):
        got = torch.load(tmp_path / f"r{i}.pt")
        for l in (0, 2):
            assert got[l][1] == ref[l].count and torch.equal(got[l][0], ref[l].sum)
    again = second_moment(model, tok, [0, 2], TEXTS, tokens=1500, max_length=40, batch_tokens=80, progress=False,
                          cache=cache)  # fmt: skip
    for l in (0, 2):
        assert again[l].source == "cache" and torch.equal(again[l].sum, ref[l].sum)
    names = sorted(p.name for p in (cache / "stats").iterdir())
    assert len(names) == 2 and all(not n.startswith(".") and ".partial" not in n for n in names), names
