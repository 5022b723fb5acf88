"""Edit keys (the edited module's input at the subject's last token, averaged over context
templates) and the residual stream at the subject, read in one forward pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .models import ModelAdapter
from .requests import EditRequest
from .runner import _StopForward, make_batch, model_device, pad_id, subject_last_index


def _layout(tok, requests: Sequence[EditRequest], templates: list[list[str]]):
    seqs, cols, weights, owner, bare = [], [], [], [], []
    prompt_weights = instance_weights(templates).tolist()
    flat = [ctx for group in templates for ctx in group]
    for i, req in enumerate(requests):
        for t, ctx in enumerate(flat):
            ids, idx = subject_last_index(tok, ctx.replace("{}", req.template(), 1), req.subject)
            if t == 0:
                bare.append(len(seqs))
            seqs.append(ids)
            cols.append(idx)
            weights.append(prompt_weights[t])
            owner.append(i)
    return seqs, cols, weights, owner, bare


@torch.no_grad()
def keys_and_residual(
    model,
    tok,
    adapter: ModelAdapter,
    requests: Sequence[EditRequest],
    key_layer: int | None,
    out_layer: int | None,
    templates: list[list[str]],
    batch_rows: int = 256,
    per_instance: bool = False,
):
    """``(K, H)`` on the model as it is now, from one forward pass per ``batch_rows`` sequences.

    K: (d_k, u) float32 keys at ``key_layer`` (mean over each template group, groups
       weighted equally; MEMIT: half the bare prompt, half the generated prefixes), or None.
    H: (d_v, u) float32 residual stream after ``out_layer`` at the subject's last token of
       the first template (``templates[0][0]``, the bare prompt ``"{}"``), or None.
    The pass stops after the deeper of the two layers.
    ``per_instance``: K is instead (d_k, u·n) with every prompt's own key, request-major in
       the flattened template order (the rows of :func:`metake_fast.targets._layout`).
    """
    seqs, cols, weights, owner, bare = _layout(tok, requests, templates)
    dev = model_device(model)
    u = len(requests)
    w = torch.tensor(weights)
    own = torch.tensor(owner)
    is_bare = torch.zeros(len(seqs), dtype=torch.bool)
    is_bare[bare] = True
    K = H = None
    last = max(x for x in (key_layer, out_layer) if x is not None)
    # batches of similar length: the context-prefixed prompts are several times longer than
    # the bare ones, and padding every batch to its longest row wasted a third of the pass
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    for s in range(0, len(seqs), batch_rows):
        idx = order[s : s + batch_rows]
        part = [seqs[i] for i in idx]
        batch = make_batch(part, pad_id(tok), dev)
        rows = torch.arange(len(part), device=dev)
        c = torch.tensor([cols[i] for i in idx], device=dev)
        got = {}

        def key_hook(module, args):
            got["k"] = args[0][rows, c].float().cpu()
            if key_layer == last and (out_layer is None or out_layer < key_layer or "h" in got):
                raise _StopForward

        def out_hook(module, args, output):
            hs = output[0] if isinstance(output, tuple) else output
            got["h"] = hs[rows, c].float().cpu()
            if out_layer == last and (key_layer is None or "k" in got):
                raise _StopForward

        handles = []
        if key_layer is not None:
            handles.append(adapter.edit_module(model, key_layer).register_forward_pre_hook(key_hook))
        if out_layer is not None:
            handles.append(adapter.decoder_layers(model)[out_layer].register_forward_hook(out_hook))
        try:
            model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        sl = torch.tensor(idx)
        if key_layer is not None and per_instance:
            K = torch.zeros(len(seqs), got["k"].shape[1]) if K is None else K
            K[sl] = got["k"]
        elif key_layer is not None:
            K = torch.zeros(u, got["k"].shape[1]) if K is None else K
            K.index_add_(0, own[sl], got["k"] * w[sl, None])
        if out_layer is not None:
            H = torch.zeros(u, got["h"].shape[1]) if H is None else H
            sel = is_bare[sl]
            H[own[sl][sel]] = got["h"][sel]
    return (K.T.contiguous().to(dev) if K is not None else None, H.T.contiguous().to(dev) if H is not None else None)


def instance_weights(templates: list[list[str]]) -> torch.Tensor:
    """(n,) float64 weight of each prompt of one request in its mean key, in the flattened
    template order of :func:`_layout` (template groups weighted equally; sums to 1)."""
    return torch.tensor(
        [1.0 / (len(templates) * len(group)) for group in templates for _ in group], dtype=torch.float64
    )


def instance_keys_mean_and_history(K_all: torch.Tensor, templates: list[list[str]], u: int):
    """From every prompt's own key (``keys_and_residual(..., per_instance=True)``: (d_k, u·n),
    request-major) the write's mean keys ``K`` (d_k, u) and the history columns ``K_h`` (d_k, u·n),
    each prompt's key times the square root of its weight, so that ``K_h K_hᵀ`` is the sum over
    requests of the weighted mean of ``k_t k_tᵀ`` (``K Kᵀ`` plus the keys' spread across contexts)."""
    w = instance_weights(templates)
    n = w.numel()
    if K_all.dim() != 2 or K_all.shape[1] != u * n:
        raise ValueError(f"expected per-prompt keys (d_k, {u}·{n}), got {tuple(K_all.shape)}")
    wd = w.to(device=K_all.device, dtype=K_all.dtype)
    K = (K_all.reshape(K_all.shape[0], u, n) * wd).sum(-1)
    K_h = K_all * wd.sqrt().repeat(u)
    return K, K_h
