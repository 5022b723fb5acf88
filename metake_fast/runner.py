"""Model mechanics shared by the editors and the evaluation.

* tokenising prompts with the position of the subject's last token,
* reading keys (the edited module's input) or residual-stream outputs at given
  positions with a forward pass that stops after the last needed layer,
* :class:`SuffixRunner`: runs only the layers above an edited layer on cached
  activations (the target optimisation's inner loop),
* :func:`target_logprobs`: log-probabilities of target tokens from final hidden
  states through the fused op (no ``B×T×V`` logits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .models import ModelAdapter
from .ops import fused_kl, fused_target_logprob
from .ops.fused_kl import capped_logits


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early."""


@dataclass
class Batch:
    """Right-padded token batch. ``input_ids``/``attention_mask``: (B, T) int64."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: list[int]


def model_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=True)["input_ids"]


def encode_target(tok, target: str) -> list[int]:
    """Token ids of an object string scored after a prompt: leading space, no special tokens."""
    return tok(" " + target.strip(), add_special_tokens=False)["input_ids"]


def make_batch(seqs: Sequence[Sequence[int]], pad_id: int, device) -> Batch:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return Batch(ids.to(device), mask.to(device), [len(s) for s in seqs])


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def subject_last_index(tok, template: str, subject: str) -> tuple[list[int], int]:
    """Token ids of ``template.format(subject)`` and the index of the subject's last token."""
    i = template.index("{}")
    ids = encode(tok, template.replace("{}", subject, 1))
    head = encode(tok, template[:i] + subject)
    return ids, min(len(head), len(ids)) - 1


def fill(template: str, subject: str) -> str:
    return template.replace("{}", subject, 1)


@torch.no_grad()
def read_at_positions(
    model: nn.Module,
    adapter: ModelAdapter,
    batch: Batch,
    rows: torch.Tensor,
    cols: torch.Tensor,
    layers: Sequence[int],
    what: str = "key",
) -> dict[int, torch.Tensor]:
    """Vectors at ``(rows[i], cols[i])`` for each layer; the pass stops after the last layer.

    ``what="key"``: the input of the edited module (``(n, d_k)``);
    ``what="output"``: the decoder layer's output, i.e. the residual stream (``(n, d_v)``).
    Returned in float32.
    """
    out: dict[int, torch.Tensor] = {}
    last = max(layers)
    handles = []
    dec = adapter.decoder_layers(model)

    def make_hook(layer):
        def hook(module, args, output=None):
            x = args[0] if what == "key" else (output[0] if isinstance(output, tuple) else output)
            out[layer] = x[rows.to(x.device), cols.to(x.device)].float()
            if layer == last:
                raise _StopForward

        return hook

    try:
        for layer in layers:
            if what == "key":
                handles.append(adapter.edit_module(model, layer).register_forward_pre_hook(make_hook(layer)))
            else:
                h = make_hook(layer)
                handles.append(dec[layer].register_forward_hook(lambda m, a, o, h=h: h(m, a, o)))
        try:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
    return out


class SuffixRunner:
    """Cache a forward pass up to layer ``L`` and re-run only layers ``> L``.

    One full forward records the output of layer ``L`` (``hidden_L``: (B, T,
    d_v)) and the exact arguments every later decoder layer received (masks,
    rotary embeddings, ...), so :meth:`run` reproduces the model's final hidden
    states from a modified ``hidden_L`` with the gradient flowing to it.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, batch: Batch, layer: int):
        self.model, self.adapter, self.layer = model, adapter, layer
        dec = adapter.decoder_layers(model)
        self.layers = list(dec)[layer + 1 :]
        self.calls: list[tuple[tuple, dict]] = []
        captured: dict = {}
        handles = [
            dec[layer].register_forward_hook(
                lambda m, a, o: captured.__setitem__("h", (o[0] if isinstance(o, tuple) else o).detach())
            )
        ]
        for lyr in self.layers:
            handles.append(lyr.register_forward_pre_hook(self._capture, with_kwargs=True))
        try:
            with torch.no_grad():
                model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        self.hidden_L = captured["h"]

    def _capture(self, module, args, kwargs):
        kw = dict(kwargs)
        if args:
            rest = args[1:]
        else:
            kw.pop("hidden_states", None)
            rest = ()
        self.calls.append((rest, kw))

    def run(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final (un-normalised) hidden states for a given layer-``L`` output ``hidden`` (B, T, d_v)."""
        h = hidden
        for lyr, (rest, kw) in zip(self.layers, self.calls):
            o = lyr(h, *rest, **kw)
            h = o[0] if isinstance(o, tuple) else o
        return h


def final_logits_spec(model: nn.Module, adapter: ModelAdapter):
    """(weight, bias, softcap) of the unembedding."""
    head = adapter.unembedding(model)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return head.weight, getattr(head, "bias", None), softcap


def target_logprobs(
    model: nn.Module, adapter: ModelAdapter, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 8192
) -> torch.Tensor:
    """Log-probabilities (n,) fp32 of ``targets`` given final *normed* hidden states ``hidden`` (n, d).

    Uses the fused op; architectures with an unembedding bias (GPT-J) or a logit
    soft-cap (Gemma-2) go through :class:`_BiasedTargetLogprob`, which is chunked
    over the vocabulary the same way (no n×V tensor, recomputed in the backward).
    """
    weight, bias, softcap = final_logits_spec(model, adapter)
    if bias is None and not softcap:
        return fused_target_logprob(hidden.to(weight.dtype), weight, targets, chunk)
    return _BiasedTargetLogprob.apply(hidden.to(weight.dtype), weight, bias, float(softcap or 0.0), targets, chunk)


class _BiasedTargetLogprob(torch.autograd.Function):
    """``log softmax(cap(W h + b))[target]`` chunked over the vocabulary (online log-sum-exp);
    the backward recomputes each chunk: ``∇h = c'_t W_t − Σ_v p_v c'_v W_v``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, softcap, targets, chunk):
        n = hidden.shape[0]
        lse = torch.full((n,), float("-inf"), device=hidden.device)
        with torch.no_grad():
            for v0 in range(0, weight.shape[0], chunk):
                b = None if bias is None else bias[v0 : v0 + chunk]
                z, _ = capped_logits(hidden, weight[v0 : v0 + chunk], b, softcap)
                lse = torch.logaddexp(lse, torch.logsumexp(z, 1))
            zt = (hidden.float() * weight[targets].float()).sum(1)
            if bias is not None:
                zt = zt + bias[targets].float()
            dcap_t = None
            if softcap:
                t = torch.tanh(zt / softcap)
                zt, dcap_t = t * softcap, 1 - t * t
        ctx.save_for_backward(hidden, weight, bias, targets, lse, dcap_t)
        ctx.softcap, ctx.chunk = softcap, chunk
        return zt - lse

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, lse, dcap_t = ctx.saved_tensors
        g = grad.float()
        gt = g if dcap_t is None else g * dcap_t
        gh = gt[:, None] * weight[targets].float()
        for v0 in range(0, weight.shape[0], ctx.chunk):
            w = weight[v0 : v0 + ctx.chunk]
            b = None if bias is None else bias[v0 : v0 + ctx.chunk]
            z, dcap = capped_logits(hidden, w, b, ctx.softcap)
            p = torch.exp(z - lse[:, None]) * g[:, None]
            if dcap is not None:
                p = p * dcap
            gh = gh - p @ w.float()
        return gh.to(hidden.dtype), None, None, None, None, None


def full_logprobs(model: nn.Module, adapter: ModelAdapter, hidden: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary log-probabilities (n, V) fp32 for a few rows (KL terms, argmax checks)."""
    weight, bias, softcap = final_logits_spec(model, adapter)
    logits = (hidden.to(weight.dtype) @ weight.T).float()
    if bias is not None:
        logits = logits + bias.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, -1)


class KLReference:
    """The unedited side of the essence KL for a few rows: just the hidden states ``h₀``;
    ``KL(p ‖ p₀)`` is computed chunk by chunk over the vocabulary by the ``fused_kl`` op
    (unembedding bias and logit soft-cap included), so no vocabulary-sized tensor is kept."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, hidden: torch.Tensor, chunk: int = 8192):
        self.weight, self.bias, self.softcap = final_logits_spec(model, adapter)
        self.chunk = chunk
        self.h0 = hidden.detach().to(self.weight.dtype)

    def kl(self, hidden: torch.Tensor) -> torch.Tensor:
        """``KL(p ‖ p₀)`` per row (as in ROME: current distribution first)."""
        return fused_kl(hidden.to(self.weight.dtype), self.h0, self.weight, self.chunk, bias=self.bias,
                        softcap=float(self.softcap or 0.0))  # fmt: skip


def final_hidden(model: nn.Module, adapter: ModelAdapter, batch: Batch) -> torch.Tensor:
    """Normed final hidden states (B, T, d) without computing logits."""
    out = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state
