"""Target optimisation: the prefix-KV-cache runner equals the plain full-sequence runner,
batched optimisation equals per-request optimisation, and the norm clamp holds."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from _tiny import tiny_model, tiny_tokenizer  # noqa: E402

from metake_fast.keys import keys_and_residual  # noqa: E402
from metake_fast.models import get_adapter  # noqa: E402
from metake_fast.requests import validate_requests  # noqa: E402
from metake_fast.targets import ChunkProblem, TargetConfig, _layout, optimize_targets  # noqa: E402

# bare prompt first (as the editor's templates), then two context prefixes of different lengths
TEMPLATES = [["{}"], ["Once upon a time. {}", "He said. {}"]]
REQS = [
    {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "target_true": "Paris"},
    {"prompt": "Bob Smith works for", "subject": "Bob Smith", "target_new": "Google"},
    {"prompt": "A the river Nile flows into", "subject": "A", "target_new": "the Baltic Sea"},
]
LAYER = 1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reqs():
    out = validate_requests(REQS, tiny_tokenizer())
    # "A" is a single token at the very start of the bare prompt: an empty KV prefix for that row
    lay = _layout(tiny_tokenizer(), out, TEMPLATES)
    assert any(len(p) == 0 for p in lay.prefixes) and all(len(r) >= 1 for r in lay.rests)
    return out


def _problem(model, reqs, prefix_cache):
    return ChunkProblem(model, tiny_tokenizer(), get_adapter(model), reqs, LAYER, TEMPLATES, prefix_cache)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gpt_neox", "gptj", "gemma2", "gemma2-window16"])
def test_prefix_cache_runner_equals_full_runner(arch, reqs):
    if arch == "gemma2-window16":
        # sliding window shorter than the prompts: the prefix cache would drop keys, so the
        # runner must fall back to full sequences (and still give the same results)
        model = tiny_model("gemma2", layers=3, seed=1, sliding_window=16)
        cached, plain = _problem(model, reqs, True), _problem(model, reqs, False)
        assert not cached.run.use_cache
        torch.testing.assert_close(cached.nll_init, plain.nll_init, rtol=0, atol=0)
        return
    # gemma2: sliding-window layers wider than the prompts (their cache state must be restored every step)
    model = tiny_model(arch, layers=3, seed=1, **({"sliding_window": 128} if arch == "gemma2" else {}))
    cached, plain = _problem(model, reqs, True), _problem(model, reqs, False)
    assert cached.run.use_cache and not plain.run.use_cache
    # the cached runner really skips the prefixes
    assert cached.run.rest_ids.shape[1] < plain.run.rest_ids.shape[1]
    torch.testing.assert_close(cached.h, plain.h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.nll_init, plain.nll_init, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.kl_ref.h0, plain.kl_ref.h0, rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    delta = (0.5 * cached.h.norm(dim=1, keepdim=True) / cached.h.shape[1] ** 0.5) * torch.randn(
        cached.h.shape, generator=g
    )
    grads = []
    outs = []
    for prob in (cached, plain):
        d = delta.clone().requires_grad_(True)
        nll, kl = prob.losses(d)
        (grad,) = torch.autograd.grad((nll + kl).sum(), d)
        outs.append((nll.detach(), kl.detach()))
        grads.append(grad)
    assert outs[0][1].abs().max() > 0  # δ moved the essence prompt
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5 * float(grads[1].abs().max()))
    # a δ on one request moves only that request's losses
    d1 = torch.zeros_like(delta)
    d1[1] = delta[1]
    nll1, kl1 = cached.losses(d1)
    assert torch.equal(nll1[[0, 2]], cached.losses(torch.zeros_like(delta))[0][[0, 2]])
    assert float(kl1[0]) == pytest.approx(0.0, abs=1e-6) and float(kl1[2]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gpt_neox", "gptj", "gemma2"])
def test_replaying_lower_layers_equals_running_them(arch, prefix_cache, reqs):
    """Layers 0..L replayed from the recorded output: the same losses and gradients as running
    them, the lower layers' MLPs really not run during the steps, and the model untouched after."""
    model = tiny_model(arch, layers=4, seed=3, **({"sliding_window": 128} if arch == "gemma2" else {}))
    adapter = get_adapter(model)
    tok = tiny_tokenizer()
    layer = 2
    fast = ChunkProblem(model, tok, adapter, reqs, layer, TEMPLATES, prefix_cache, skip_lower=True)
    slow = ChunkProblem(model, tok, adapter, reqs, layer, TEMPLATES, prefix_cache, skip_lower=False)
    assert fast.run.replay is not None and slow.run.replay is None
    torch.testing.assert_close(fast.h, slow.h, rtol=0, atol=0)
    calls = []
    lower = adapter.decoder_layers(model)[0]
    leaves = [m for m in lower.modules() if not list(m.children()) and list(m.parameters(recurse=False))]
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in leaves]
    g = torch.Generator().manual_seed(0)
    delta = 0.3 * fast.h.norm(dim=1, keepdim=True) * torch.randn(fast.h.shape, generator=g) / fast.h.shape[1] ** 0.5
    res = []
    try:
        for prob in (fast, slow):
            calls.clear()
            d = delta.clone().requires_grad_(True)
            nll, kl = prob.losses(d)
            (grad,) = torch.autograd.grad((nll + kl).sum(), d)
            res.append((nll.detach(), kl.detach(), grad, len(calls)))
    finally:
        for h in hooks:
            h.remove()
    assert res[0][3] == 0 and res[1][3] > 0
    for a, b in zip(res[0][:3], res[1][:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    assert float(res[0][2].abs().max()) > 0
    assert all("forward" not in m.__dict__ for m in adapter.decoder_layers(model))  # the replay was undone


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_h_matches_keys_and_residual(arch, reqs):
    model = tiny_model(arch, layers=3, seed=1)
    prob = _problem(model, reqs, True)
    _, H = keys_and_residual(model, tiny_tokenizer(), get_adapter(model), reqs, None, LAYER, [["{}"]])
    torch.testing.assert_close(prob.h, H.T, rtol=1e-5, atol=1e-5)


CFG = dict(steps=6, lr=0.5, weight_decay=1e-3, clamp_norm_factor=0.75, kl_factor=0.0625, early_stop_nll=5e-2)


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_equals_per_request(arch, prefix_cache, reqs):
    """Adam is elementwise and δ_i only reaches its own prompts: one batched run == u separate runs."""
    model = tiny_model(arch, layers=3, seed=2)
    adapter = get_adapter(model)
    cfg = TargetConfig(**CFG, prefix_cache=prefix_cache)
    together = optimize_targets(model, tiny_tokenizer(), adapter, reqs, LAYER, TEMPLATES, cfg, progress=False)
    assert together.delta.shape == (3, model.config.hidden_size if arch != "gpt2" else model.config.n_embd)
    for i, r in enumerate(reqs):
        alone = optimize_targets(model, tiny_tokenizer(), adapter, [r], LAYER, TEMPLATES, cfg, progress=False)
        assert int(alone.steps[0]) == int(together.steps[i])
        scale = float(alone.delta.norm())
        assert scale > 0
        torch.testing.assert_close(together.delta[i : i + 1], alone.delta, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(together.h[i : i + 1], alone.h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together.nll[i : i + 1], alone.nll, rtol=1e-4, atol=1e-5)
    # and the optimisation did something: the target NLL went down
    assert bool((together.nll < together.nll_init).all())


def test_chunking_equals_one_chunk(reqs):
    """Splitting the batch into several chunks (a small ``chunk_tokens``) changes nothing."""
    model = tiny_model("llama", layers=3, seed=2)
    adapter = get_adapter(model)
    one = optimize_targets(
        model, tiny_tokenizer(), adapter, reqs, LAYER, TEMPLATES, TargetConfig(**CFG), progress=False
    )
    many = optimize_targets(
        model, tiny_tokenizer(), adapter, reqs, LAYER, TEMPLATES, TargetConfig(**CFG, chunk_tokens=1), progress=False
    )
    torch.testing.assert_close(one.delta, many.delta, rtol=1e-5, atol=1e-5 * float(one.delta.abs().max()))


@pytest.mark.parametrize("c", [0.05, 0.75])
def test_clamp(reqs, c):
    """‖δ_i‖ ≤ c‖h_i‖ after every run; with a small c and a large lr the bound is reached."""
    model = tiny_model("llama", layers=3, seed=3)
    cfg = TargetConfig(**{**CFG, "clamp_norm_factor": c, "lr": 5.0, "early_stop_nll": 0.0})
    res = optimize_targets(model, tiny_tokenizer(), get_adapter(model), reqs, LAYER, TEMPLATES, cfg, progress=False)
    ratio = res.delta.norm(dim=1) / res.h.norm(dim=1)
    assert bool((ratio <= c * (1 + 1e-5)).all()), ratio
    if c == 0.05:
        torch.testing.assert_close(ratio, torch.full_like(ratio, c), rtol=1e-4, atol=0)


def test_early_stop_freezes_request(reqs):
    """A request whose target NLL is already below early_stop_nll takes no step; δ stays 0."""
    model = tiny_model("llama", layers=3, seed=2)
    cfg = TargetConfig(**{**CFG, "early_stop_nll": 1e9})
    res = optimize_targets(model, tiny_tokenizer(), get_adapter(model), reqs, LAYER, TEMPLATES, cfg, progress=False)
    assert res.steps.tolist() == [0, 0, 0] and torch.equal(res.delta, torch.zeros_like(res.delta))


def _biased_capped_llama(bias: bool, softcap):
    """A tiny llama given a GPT-J-style unembedding bias and/or a Gemma-2-style logit soft-cap."""
    model = tiny_model("llama", layers=3, seed=1)
    if bias:
        model.lm_head.bias = torch.nn.Parameter(0.5 * torch.randn(model.lm_head.out_features))
    model.config.final_logit_softcapping = softcap
    return model


@pytest.mark.parametrize("bias, softcap", [(False, None), (True, None), (False, 3.0), (True, 3.0)])
def test_kl_reference_equals_full_vocabulary_path(bias, softcap):
    """The essence KL through fused_kl (chunked) equals the explicit full log-probabilities,
    also with an unembedding bias (GPT-J) and a logit soft-cap (Gemma-2)."""
    from metake_fast.runner import KLReference, full_logprobs

    model = _biased_capped_llama(bias, softcap)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(3)
    h0 = torch.randn(4, model.config.hidden_size, generator=g)
    h = (h0 + 0.7 * torch.randn(h0.shape, generator=g)).requires_grad_(True)
    ref = KLReference(model, adapter, h0, chunk=100)
    got = ref.kl(h)
    lq = full_logprobs(model, adapter, h0)
    x = h.detach().clone().requires_grad_(True)
    lp = full_logprobs(model, adapter, x)
    want = (lp.exp() * (lp - lq)).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (gg,) = torch.autograd.grad(got.sum(), h)
    (gw,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(gg, gw, rtol=1e-4, atol=1e-6)
    assert ref.kl(h0).abs().max() < 1e-5


@pytest.mark.parametrize("bias, softcap", [(True, None), (False, 3.0), (True, 3.0)])
def test_target_logprobs_with_bias_and_softcap_equal_full_vocabulary(bias, softcap):
    """The vocabulary-chunked path for GPT-J-style biases and Gemma-2 soft-caps, value and gradient."""
    from metake_fast.runner import full_logprobs, target_logprobs

    model = _biased_capped_llama(bias, softcap)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, model.config.hidden_size, generator=g).requires_grad_(True)
    t = torch.randint(0, model.lm_head.out_features, (6,), generator=g)
    got = target_logprobs(model, adapter, h, t, chunk=100)
    x = h.detach().clone().requires_grad_(True)
    want = full_logprobs(model, adapter, x).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    w = torch.rand(6, generator=g)
    (gg,) = torch.autograd.grad((got * w).sum(), h)
    (gw,) = torch.autograd.grad((want * w).sum(), x)
    torch.testing.assert_close(gg, gw, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_keys_batched_by_length_equal_one_sequence_at_a_time(arch, reqs):
    """keys_and_residual sorts the sequences by length into batches: the keys and residuals must
    equal those of running every sequence alone (no padding), in the requests' order."""
    model = tiny_model(arch, layers=3, seed=4)
    adapter, tok = get_adapter(model), tiny_tokenizer()
    K, H = keys_and_residual(model, tok, adapter, reqs, 1, 2, TEMPLATES, batch_rows=4)
    K1, H1 = keys_and_residual(model, tok, adapter, reqs, 1, 2, TEMPLATES, batch_rows=1)
    torch.testing.assert_close(K, K1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(H, H1, rtol=1e-5, atol=1e-6)
    for i, r in enumerate(reqs):  # each request alone: the columns are in the requests' order
        Ki, Hi = keys_and_residual(model, tok, adapter, [r], 1, 2, TEMPLATES, batch_rows=1)
        torch.testing.assert_close(K[:, i : i + 1], Ki, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(H[:, i : i + 1], Hi, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "gpt_neox", "gptj", "qwen2"])
def test_subset_problem_equals_rows_of_whole_problem(arch, prefix_cache, reqs):
    """``ChunkProblem.subset(keep)`` (what the loop runs once some requests converged): its losses
    and gradient on ``delta[keep]`` are the whole problem's at ``keep``, KV prefixes, replayed lower
    layers and sliding-window cache state included."""
    model = tiny_model(arch, layers=3, seed=1, **({"sliding_window": 128} if arch == "gemma2" else {}))
    prob = _problem(model, reqs, prefix_cache)
    g = torch.Generator().manual_seed(3)
    delta = 0.3 * prob.h.norm(dim=1, keepdim=True) * torch.randn(prob.h.shape, generator=g) / prob.h.shape[1] ** 0.5
    d = delta.clone().requires_grad_(True)
    nll, kl = prob.losses(d)
    (grad,) = torch.autograd.grad((nll + kl).sum(), d)
    for keep in ([0, 2], [1], [2]):
        k = torch.tensor(keep)
        sub = prob.subset(k)
        assert sub is not None and sub.u == len(keep)
        assert sub.run.rest_ids.shape[0] == (len(TEMPLATES[0]) + len(TEMPLATES[1]) + 1) * len(keep)
        ds = delta[k].clone().requires_grad_(True)
        nll_s, kl_s = sub.losses(ds)
        (grad_s,) = torch.autograd.grad((nll_s + kl_s).sum(), ds)
        torch.testing.assert_close(nll_s, nll[k].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kl_s, kl[k].detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grad_s, grad[k], rtol=1e-4, atol=1e-5 * float(grad.abs().max()))
        torch.testing.assert_close(sub.nll_init, prob.nll_init[k], rtol=0, atol=0)
        torch.testing.assert_close(sub.h, prob.h[k], rtol=0, atol=0)
    # a subset of a subset is the same as the direct subset; the whole problem is untouched
    two = prob.subset(torch.tensor([1, 2])).subset(torch.tensor([1]))
    nll_2, _ = two.losses(delta[2:3])
    torch.testing.assert_close(nll_2, nll[2:3].detach(), rtol=1e-5, atol=1e-6)
    nll_again, _ = prob.losses(delta)
    torch.testing.assert_close(nll_again, nll.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_compacted_loop_equals_full_loop(arch, prefix_cache, reqs, monkeypatch):
    """Dropping converged requests from the forward/backward (``compact``) changes no result: the
    same steps, targets and NLLs as running every request of the chunk until the last converges;
    and it does drop them (later steps run fewer requests)."""
    model = tiny_model(arch, layers=3, seed=2, **({"sliding_window": 128} if arch == "gemma2" else {}))
    adapter, tok = get_adapter(model), tiny_tokenizer()
    # an early-stop threshold that one request reaches well before the others
    probe = optimize_targets(
        model, tok, adapter, reqs, LAYER, TEMPLATES, TargetConfig(**{**CFG, "steps": 3, "early_stop_nll": 0.0}),
        progress=False,
    )  # fmt: skip
    low = probe.nll.sort().values
    threshold = float(low[0] + low[1]) / 2
    cfg = {**CFG, "steps": 10, "early_stop_nll": threshold, "prefix_cache": prefix_cache}
    sizes = []
    losses = ChunkProblem.losses

    def spy(self, delta, *a, **k):
        sizes.append(self.u)
        return losses(self, delta, *a, **k)

    monkeypatch.setattr(ChunkProblem, "losses", spy)
    full = optimize_targets(model, tok, adapter, reqs, LAYER, TEMPLATES, TargetConfig(**cfg, compact=False),
                            progress=False)  # fmt: skip
    full_sizes, sizes[:] = list(sizes), []
    comp = optimize_targets(model, tok, adapter, reqs, LAYER, TEMPLATES, TargetConfig(**cfg, compact=True),
                            progress=False)  # fmt: skip
    assert len(set(full.steps.tolist())) > 1, full.steps  # requests converged at different steps
    assert set(full_sizes) == {3}
    assert min(sizes[1:-1]) < 3  # later steps ran only the unconverged requests (the last call: final NLL)
    assert comp.steps.tolist() == full.steps.tolist()
    scale = float(full.delta.abs().max())
    torch.testing.assert_close(comp.delta, full.delta, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(comp.nll, full.nll, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(comp.nll_init, full.nll_init, rtol=0, atol=0)


def test_prompt_weights_are_normalised_and_checked():
    from metake_fast.targets import normalise_prompt_weights

    assert normalise_prompt_weights(4) == [0.25] * 4
    assert normalise_prompt_weights(3, [1, 1, 2]) == [0.25, 0.25, 0.5]
    for bad in ([1, 1], [1, -1, 1], [0, 0, 0]):
        with pytest.raises(ValueError, match="prompt weights"):
            normalise_prompt_weights(3, bad)


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_weighted_prompts_nll_is_the_weighted_mean_of_single_prompt_problems(arch, prefix_cache, reqs):
    """With ``prompt_weights`` a request's NLL is ``Σ_j w_j · NLL_j / Σ w``, ``NLL_j`` that of the
    problem over prompt ``j`` alone (per-token mean over the target); no weights: all alike. The
    subset of a weighted problem keeps its weights."""
    model = tiny_model(arch, layers=3, seed=2)
    tok, adapter = tiny_tokenizer(), get_adapter(model)
    flat = [c for group in TEMPLATES for c in group]
    singles = [ChunkProblem(model, tok, adapter, reqs, LAYER, [[c]], prefix_cache) for c in flat]
    g = torch.Generator().manual_seed(5)
    h = singles[0].h
    delta = 0.3 * h.norm(dim=1, keepdim=True) * torch.randn(h.shape, generator=g) / h.shape[1] ** 0.5
    per = torch.stack([p.losses(delta, with_kl=False)[0] for p in singles]).double()  # (n_prompts, u)
    for w in (None, [3.0, 1.0, 0.5], [1.0, 0.0, 0.0]):
        prob = ChunkProblem(model, tok, adapter, reqs, LAYER, TEMPLATES, prefix_cache, prompt_weights=w)
        ww = torch.ones(len(flat), dtype=torch.float64) if w is None else torch.tensor(w, dtype=torch.float64)
        want = (ww[:, None] * per).sum(0) / ww.sum()
        nll, _ = prob.losses(delta, with_kl=False)
        torch.testing.assert_close(nll.double(), want, rtol=1e-5, atol=1e-6)
        sub = prob.subset(torch.tensor([1, 2]))
        torch.testing.assert_close(sub.losses(delta[1:], with_kl=False)[0].double(), want[1:], rtol=1e-5, atol=1e-6)
