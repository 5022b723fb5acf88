"""Scoring of object strings after prompts: the probabilities every report and metric uses.

``P(object | prompt)`` is the product of the object's token probabilities with a
leading space (the convention of ROME/MEMIT/AlphaEdit); only target positions
reach the unembedding (through the fused log-prob op).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .models import get_adapter
from .runner import (
    encode,
    encode_target,
    final_hidden,
    full_logprobs,
    make_batch,
    model_device,
    pad_id,
    target_logprobs,
)


@dataclass
class ObjectScores:
    """Per (prompt, object) pair: ``logprob`` sum over the object's tokens, ``ntokens``, and
    ``token_acc`` (share of object tokens that are the argmax under teacher forcing; ZsRE's metric)."""

    logprob: torch.Tensor
    ntokens: torch.Tensor
    token_acc: torch.Tensor | None


@torch.no_grad()
def score_objects(
    model, tok, prompts: Sequence[str], objects: Sequence[str], *, batch_size: int = 64, token_accuracy: bool = False
) -> ObjectScores:
    """Score ``objects[i]`` after ``prompts[i]`` for all i (teacher forcing, batched, right-padded)."""
    if len(prompts) != len(objects):
        raise ValueError("prompts and objects must have the same length")
    adapter = get_adapter(model)
    dev = model_device(model)
    n = len(prompts)
    lp = torch.zeros(n)
    nt = torch.zeros(n, dtype=torch.long)
    acc = torch.zeros(n) if token_accuracy else None
    pid = pad_id(tok)
    for s in range(0, n, batch_size):
        seqs, rows, cols, tgts, owner = [], [], [], [], []
        for j in range(s, min(n, s + batch_size)):
            p = encode(tok, prompts[j])
            t = encode_target(tok, objects[j])
            if not t:
                raise ValueError(f"object {objects[j]!r} tokenises to nothing")
            seqs.append(p + t[:-1])
            b = len(seqs) - 1
            for k, tid in enumerate(t):
                rows.append(b)
                cols.append(len(p) - 1 + k)
                tgts.append(tid)
                owner.append(j)
        batch = make_batch(seqs, pid, dev)
        hid = final_hidden(model, adapter, batch)
        r = torch.tensor(rows, device=dev)
        c = torch.tensor(cols, device=dev)
        t = torch.tensor(tgts, device=dev)
        h = hid[r, c]
        tok_lp = target_logprobs(model, adapter, h, t).cpu()
        own = torch.tensor(owner)
        lp.index_add_(0, own, tok_lp.double().float())
        nt.index_add_(0, own, torch.ones_like(own))
        if acc is not None:
            hit = torch.zeros(len(tgts))
            for q in range(0, h.shape[0], 512):
                hit[q : q + 512] = (
                    (full_logprobs(model, adapter, h[q : q + 512]).argmax(-1) == t[q : q + 512]).float().cpu()
                )
            acc.index_add_(0, own, hit)
    if acc is not None:
        acc = acc / nt.clamp_min(1)
    return ObjectScores(lp, nt, acc)
