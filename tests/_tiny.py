"""Tiny random transformers models and an offline tokenizer for tests.

``tiny_tokenizer()`` trains a byte-level BPE (vocab 512) in-process on a few
hundred lines of the shipped corpus, once per test session;
``tiny_model(arch)`` builds a random model of that vocabulary;
``save_tiny(path, ...)`` writes both as a loadable model directory.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

import torch

from metake_fast.corpus import default_corpus_path

VOCAB_SIZE = 512
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def corpus_lines(n: int = 300) -> list[str]:
    """The first ``n`` texts of the shipped corpus."""
    out = []
    with gzip.open(default_corpus_path(), "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["text"])
            if len(out) == n:
                break
    return out


@functools.cache
def tiny_tokenizer():
    """A ``PreTrainedTokenizerFast`` (byte-level BPE) with pad/bos/eos/unk tokens; no BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(300), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_config(arch: str = "llama", layers: int = 4, vocab_size: int = VOCAB_SIZE):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(
            vocab_size=vocab_size, hidden_size=48, intermediate_size=80, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        )  # fmt: skip
    if arch == "qwen2":
        return tf.Qwen2Config(
            vocab_size=vocab_size, hidden_size=48, intermediate_size=80, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab_size, n_embd=48, n_inner=80, n_layer=layers, n_head=4, n_positions=512,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=48, intermediate_size=80, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
    if arch == "gptj":  # unembedding with a bias
        return tf.GPTJConfig(
            vocab_size=vocab_size, n_embd=48, n_inner=80, n_layer=layers, n_head=4, rotary_dim=8, n_positions=512,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
    if arch == "gemma2":  # final logit soft-cap
        return tf.Gemma2Config(
            vocab_size=vocab_size, hidden_size=48, intermediate_size=80, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=512,
            sliding_window=16, final_logit_softcapping=3.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
    raise ValueError(f"unknown tiny arch {arch!r}")


def tiny_model(arch: str = "llama", layers: int = 4, seed: int = 0, dtype=torch.float32, **config_overrides):
    """A random ``*ForCausalLM`` (eval mode, no grads) with the tiny tokenizer's vocabulary;
    ``config_overrides`` are set on the config before the model is built."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, layers, len(tiny_tokenizer()))
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def save_tiny(path: str | Path, arch: str = "llama", layers: int = 4, seed: int = 0) -> Path:
    """Save a tiny model and the tokenizer as a transformers model directory."""
    path = Path(path)
    tiny_model(arch, layers, seed).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


#: six edit requests with distinct subjects (sequential-run tests)
SAMPLE_REQUESTS = [
    {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "target_true": "Paris"},
    {"prompt": "Bob Smith works for", "subject": "Bob Smith", "target_new": "Google", "target_true": "Apple"},
    {"prompt": "The river Nile flows into", "subject": "river Nile", "target_new": "the Baltic", "target_true": "Egypt"},
    {"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "piano", "target_true": "guitar"},
    {"prompt": "Danielle Darrieux speaks", "subject": "Danielle Darrieux", "target_new": "English", "target_true": "French"},
    {"prompt": "Michel Rocard was born in", "subject": "Michel Rocard", "target_new": "Tokyo", "target_true": "Paris"},
]  # fmt: skip
