"""The *published* ROME / MEMIT / AlphaEdit editing flow, re-implemented as a speed baseline.

:func:`reference_flow_edit` edits a model the way the public reference code of
ROME, MEMIT and AlphaEdit does it (written from the papers' algorithm
descriptions; no code copied), so that ``bench/bench_editor.py`` can compare
:class:`metake_fast.Editor` against it on the same requests, context templates,
hyperparameters and statistics. Steps followed:

1. **Statistics**: ``C_l`` is given (``C_by_layer``, the per-token mean second
   moment). The bench computes it with ``bench_second_moment.reference_layer_stats``
   (the ``layer_stats`` flow: one separate pass per layer).
2. **Preparation** (``timing["prep"]``): AlphaEdit's projector ``P_l = U₀U₀ᵀ``
   from a full SVD of ``C_l`` per layer (singular values below
   ``nullspace_threshold``), and the dense ``cache_c`` (``K_pK_pᵀ``, zero at the
   start, d_k×d_k per layer). ROME: ``C_l⁻¹`` once per layer (the
   ``inv_mom2_cache``). MEMIT needs nothing.
3. **Targets** (``compute_z``), one request at a time: a single ``δ`` (d_v)
   added to the output of layer ``L`` at the subject's last token of every
   rewriting prompt (``context + prompt + target[:-1]``) and of the KL prompt
   ``"{} is a"``; every step runs a *full* forward of all these prompts through
   every layer with full-vocabulary logits at every position (``log_softmax``
   over B×T×V, then ``gather``); loss ``NLL + kl_factor·KL(current‖initial) +
   v_weight_decay·‖δ‖/‖h‖²``; ``torch.optim.Adam`` on ``δ``; stop once the
   total loss is below ``early_stop_nll`` (5e-2) or at the last step (which, as
   in the reference code, takes no optimiser step); clamp ``‖δ‖ ≤ c·‖h‖``.
   (The MEMIT/AlphaEdit code recomputes ``ln_f(h) @ W_U`` a second time for the
   NLL; we reuse the model's logits for it, so this baseline is if anything
   slightly fast.)
4. **Keys** (``compute_ks``) per layer, on the current (partly edited) model:
   full forwards (all layers, with logits) of every context template filled
   with each prompt, in batches of 128 rows, reading the edited module's input
   at the subject's last token; mean within each template group, then over
   groups. The current residual ``H_cur`` at ``L`` is read by another full
   forward over the bare prompts.
5. **Solve** per layer and batch, fp64, from scratch (no factorisation is
   reused): MEMIT ``Y = solve(λC + KKᵀ, K)``, ``ΔW = R Yᵀ`` with
   ``R = (Z − H_cur)/(m − j)``; AlphaEdit ``ΔWᵀ = solve(P(KKᵀ + cache_c) + λ_a I,
   P K Rᵀ)``; ROME (one request at a time, each on the model edited by the
   previous ones) ``ΔW = (z − h)(C⁻¹k)ᵀ / (kᵀC⁻¹k)``.
6. **Apply**: ``W += ΔW`` right after each layer's solve (the reference code
   also copies/restores the weights around this; omitted).
7. AlphaEdit after each batch: the keys of the batch are recomputed per layer
   on the edited model (full forwards) and ``cache_c += KKᵀ``.

MetaKE has no published code; its reference flow here is AlphaEdit's with the
upper level of METHOD.md done the same naive way: the gate ``G = Yᵀ K`` of the
last layer from a fresh dense solve, then ``outer_steps`` of Adam on ``R``
(u×d_v) where each step runs one full forward per request with the virtual
residual ``(R G)_i`` injected, full-vocabulary logits, and the proxy gradient
``G ∇``; the refined ``Z = H + R`` is written by step 5.

Timing keys (seconds, accumulated into ``timing``): ``prep``, ``targets``,
``keys``, ``solve``, ``apply``. Everything runs on the model's device; GPU
work is synchronised before each clock read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from metake_fast.context import context_templates
from metake_fast.models import get_adapter
from metake_fast.requests import validate_requests
from metake_fast.runner import encode_target, make_batch, model_device, pad_id, subject_last_index

KL_PROMPT = "{} is a"
KEY_BATCH_ROWS = 128

__all__ = [
    "ReferenceState",
    "alphaedit_update",
    "memit_update",
    "projector",
    "reference_flow_edit",
    "reference_write",
]


# ---------------------------------------------------------------------------- closed forms (step 5)
def memit_update(C: torch.Tensor, K: torch.Tensor, R: torch.Tensor, lam: float) -> torch.Tensor:
    """MEMIT ``ΔW = R [(λC + KKᵀ)⁻¹K]ᵀ`` (d_v, d_k) in fp64, by a fresh dense solve."""
    Kd, Cd = K.double(), C.double().to(K.device)
    adj_k = torch.linalg.solve(lam * Cd + Kd @ Kd.T, Kd)
    return R.double().to(K.device) @ adj_k.T


def projector(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """AlphaEdit ``P = U₀U₀ᵀ`` from an SVD of ``C``: singular vectors with singular value < threshold."""
    U, S, _ = torch.linalg.svd(C.double(), full_matrices=False)
    U0 = U[:, S < threshold]
    return U0 @ U0.T


def alphaedit_update(
    P: torch.Tensor, cache_c: torch.Tensor, K: torch.Tensor, R: torch.Tensor, lam: float
) -> torch.Tensor:
    """AlphaEdit ``ΔW = [solve(P(KKᵀ + cache_c) + λI, P K Rᵀ)]ᵀ`` (d_v, d_k) in fp64."""
    Kd = K.double()
    d_k = Kd.shape[0]
    A = P @ (Kd @ Kd.T + cache_c) + lam * torch.eye(d_k, dtype=torch.float64, device=Kd.device)
    upd = torch.linalg.solve(A, P @ Kd @ R.double().to(Kd.device).T)
    return upd.T


# ---------------------------------------------------------------------------- state
@dataclass
class ReferenceState:
    """What persists across batches: projectors, ``cache_c`` (AlphaEdit), ``C⁻¹`` (ROME)."""

    P: dict[int, torch.Tensor] = field(default_factory=dict)
    cache_c: dict[int, torch.Tensor] = field(default_factory=dict)
    C_inv: dict[int, torch.Tensor] = field(default_factory=dict)
    target_steps: list[int] = field(default_factory=list)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _Clock:
    def __init__(self, timing: dict, dev: torch.device):
        self.timing, self.dev = timing, dev

    def __call__(self, key: str):
        clock = self

        class _Ctx:
            def __enter__(self):
                _sync(clock.dev)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                _sync(clock.dev)
                clock.timing[key] = clock.timing.get(key, 0.0) + time.perf_counter() - self.t0

        return _Ctx()


def _apply(W: torch.Tensor, dW: torch.Tensor, transposed: bool) -> None:
    with torch.no_grad():
        upd = (dW.T if transposed else dW).to(device=W.device, dtype=torch.float32)
        W.copy_((W.float() + upd).to(W.dtype))  # fp32 math, as ``weights + upd_matrix.float()``


# ---------------------------------------------------------------------------- keys (step 4)
@torch.no_grad()
def _keys(model, tok, adapter, requests, layer: int, templates) -> torch.Tensor:
    """``compute_ks``: (d_k, u) keys at ``layer``, mean within template groups then over groups."""
    dev = model_device(model)
    seqs, cols, owner, group = [], [], [], []
    for i, req in enumerate(requests):
        for g, grp in enumerate(templates):
            for ctx in grp:
                ids, s = subject_last_index(tok, ctx.replace("{}", req.template(), 1), req.subject)
                seqs.append(ids)
                cols.append(s)
                owner.append(i)
                group.append(g)
    rows_out = []
    for s in range(0, len(seqs), KEY_BATCH_ROWS):
        part = seqs[s : s + KEY_BATCH_ROWS]
        batch = make_batch(part, pad_id(tok), dev)
        got = {}

        def hook(module, args):
            got["k"] = args[0]

        h = adapter.edit_module(model, layer).register_forward_pre_hook(hook)
        try:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)  # full forward
        finally:
            h.remove()
        r = torch.arange(len(part), device=dev)
        rows_out.append(got["k"][r, torch.tensor(cols[s : s + KEY_BATCH_ROWS], device=dev)].float())
    allk = torch.cat(rows_out)
    # mean within each template group, then over groups: weight 1 / (n_groups · |group|) per row
    w = torch.tensor([1.0 / (len(templates) * len(templates[g])) for g in group], device=dev)
    K = torch.zeros(len(requests), allk.shape[1], device=dev)
    K.index_add_(0, torch.tensor(owner, device=dev), allk * w[:, None])
    return K.T.contiguous()


@torch.no_grad()
def _residual(model, tok, adapter, requests, layer: int) -> torch.Tensor:
    """(d_v, u) output of decoder layer ``layer`` at the subject's last token of the bare prompts (full forward)."""
    dev = model_device(model)
    seqs, cols = [], []
    for req in requests:
        ids, s = subject_last_index(tok, req.template(), req.subject)
        seqs.append(ids)
        cols.append(s)
    batch = make_batch(seqs, pad_id(tok), dev)
    got = {}

    def hook(module, args, output):
        got["h"] = output[0] if isinstance(output, tuple) else output

    h = adapter.decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        h.remove()
    r = torch.arange(len(seqs), device=dev)
    return got["h"][r, torch.tensor(cols, device=dev)].float().T.contiguous()


# ---------------------------------------------------------------------------- targets (step 3)
class _RequestPrompts:
    """The rewriting prompts + KL prompt of one request; ``run(vec)`` = full forward with ``vec`` injected."""

    def __init__(self, model, tok, adapter, req, layer: int, templates):
        self.model, self.adapter, self.layer = model, adapter, layer
        dev = self.dev = model_device(model)
        t = encode_target(tok, req.target_new)
        seqs, idx, tgt_pos = [], [], []
        for grp in templates:
            for ctx in grp:
                ids, s = subject_last_index(tok, ctx.replace("{}", req.template(), 1), req.subject)
                seqs.append(ids + t[:-1])
                idx.append(s)
                tgt_pos.append(len(ids) - 1)
        self.n_rw = len(seqs)
        ids, s = subject_last_index(tok, KL_PROMPT, req.subject)
        seqs.append(ids)
        idx.append(s)
        self.kl_col = len(ids) - 1
        self.batch = make_batch(seqs, pad_id(tok), dev)
        T = self.batch.input_ids.shape[1]
        targets = torch.full((self.n_rw, T), -100, dtype=torch.long)
        for r, p in enumerate(tgt_pos):
            targets[r, p : p + len(t)] = torch.tensor(t)
        self.targets = targets.to(dev)
        self.mask = (self.targets != -100).float()
        self.n_tgt = len(t)
        self.rows = torch.arange(len(seqs), device=dev)
        self.cols = torch.tensor(idx, device=dev)
        self.kl_init = None
        self.h = None

    def run(self, vec: torch.Tensor):
        """Returns (nll, kl) (0-d) for ``vec`` (d_v) added after ``layer`` at the subject positions."""

        def hook(module, args, output):
            hs = output[0] if isinstance(output, tuple) else output
            if self.h is None:
                self.h = hs[0, self.cols[0]].detach().float().clone()
            add = torch.zeros_like(hs).index_put((self.rows, self.cols), vec.to(hs.dtype).expand(len(self.rows), -1))
            hs = hs + add
            return (hs,) + tuple(output[1:]) if isinstance(output, tuple) else hs

        handle = self.adapter.decoder_layers(self.model)[self.layer].register_forward_hook(hook)
        try:
            logits = self.model(
                input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask, use_cache=False
            ).logits  # (B, T, V): lm_head at every position
        finally:
            handle.remove()
        kl_lp = torch.log_softmax(logits[self.n_rw, self.kl_col].float()[None], dim=-1)
        if self.kl_init is None:
            self.kl_init = kl_lp.detach().clone()
        log_probs = torch.log_softmax(logits[: self.n_rw].float(), dim=2)  # B×T×V
        lp = torch.gather(log_probs, 2, self.targets.clamp_min(0)[..., None])[..., 0]
        nll = (-(lp * self.mask).sum(1) / self.n_tgt).mean()
        kl = F.kl_div(self.kl_init, kl_lp, log_target=True, reduction="batchmean")
        return nll, kl


def _compute_z(model, tok, adapter, req, layer: int, templates, hp) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``compute_z`` for one request: returns (z, h, optimiser steps), z/h (d_v,) fp32."""
    prob = _RequestPrompts(model, tok, adapter, req, layer, templates)
    d_v = adapter.value_dim(model, layer)
    delta = torch.zeros(d_v, device=prob.dev, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    steps = 0
    with torch.enable_grad():
        for it in range(hp.v_num_grad_steps):
            opt.zero_grad()
            nll, kl = prob.run(delta)
            wd = hp.v_weight_decay * (delta.norm() / prob.h.norm() ** 2)
            loss = nll + hp.kl_factor * kl + wd
            if float(loss.detach()) < hp.early_stop_nll:
                break
            if it == hp.v_num_grad_steps - 1:
                break
            loss.backward()
            opt.step()
            steps += 1
            max_norm = hp.clamp_norm_factor * prob.h.norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
    return (prob.h + delta.detach()), prob.h, steps


def _metake_outer(model, tok, adapter, reqs, L, templates, hp, Z, H, G) -> torch.Tensor:
    """Naive upper level: one full forward per request per outer step; returns refined Z (d_v, u)."""
    dev = Z.device
    R = (Z - H).T.contiguous().clone().requires_grad_(True)  # (u, d_v)
    h_norm = H.norm(dim=0)
    max_norm = hp.outer_clamp_norm_factor * h_norm
    opt = torch.optim.Adam([R], lr=hp.outer_lr)
    probs = [_RequestPrompts(model, tok, adapter, r, L, templates) for r in reqs]
    kl_on = hp.outer_kl and hp.kl_factor > 0
    with torch.enable_grad():
        for _ in range(hp.outer_steps):
            virt = (G.T @ R).detach()
            g_virt = torch.zeros_like(virt)
            nlls = []
            for i, prob in enumerate(probs):
                x = virt[i].clone().requires_grad_(True)
                nll, kl = prob.run(x)
                loss = nll + (hp.kl_factor * kl if kl_on else 0.0)
                (g_virt[i],) = torch.autograd.grad(loss, x)
                nlls.append(float(nll))
            if max(nlls) < hp.early_stop_nll:
                break
            opt.zero_grad()
            reg = hp.gamma * (R.norm(dim=1) / h_norm.pow(2)).sum()
            (g_reg,) = torch.autograd.grad(reg, R)
            R.grad = G @ g_virt + g_reg
            opt.step()
            with torch.no_grad():
                R *= (max_norm / R.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)[:, None]
    return (H + R.detach().T).to(dev)


# ---------------------------------------------------------------------------- write (steps 4-7)
def reference_write(model, tok, adapter, reqs, method: str, hp, Z, C_by_layer, templates, state, timing) -> None:
    """Write targets ``Z`` (d_v, u) with the reference MEMIT/AlphaEdit multi-layer flow (steps 4-7)."""
    dev = model_device(model)
    clock = _Clock(timing, dev)
    layers = list(hp.layers)
    L, m = layers[-1], len(layers)
    Z = Z.to(dev)
    nullspace = method in ("alphaedit", "metake") and getattr(hp, "base_solver", "alphaedit") == "alphaedit"
    for j, layer in enumerate(layers):
        with clock("keys"):
            K = _keys(model, tok, adapter, reqs, layer, templates)
            H_cur = _residual(model, tok, adapter, reqs, L)
        R = (Z - H_cur) / (m - j)
        with clock("solve"):
            if nullspace:
                dW = alphaedit_update(state.P[layer], state.cache_c[layer], K, R, hp.L2)
            else:
                dW = memit_update(C_by_layer[layer].to(dev), K, R, hp.mom2_update_weight)
        with clock("apply"):
            _apply(adapter.edit_weight(model, layer), dW, adapter.transposed)
    if nullspace:
        for layer in layers:
            with clock("keys"):
                K = _keys(model, tok, adapter, reqs, layer, templates)
            with clock("solve"):
                Kd = K.double()
                state.cache_c[layer] += Kd @ Kd.T


def _rome_batch(model, tok, adapter, reqs, hp, templates, state, clock) -> None:
    layer = hp.layers[-1]
    for req in reqs:  # one full ROME edit per request, each on the model edited by the previous ones
        with clock("targets"):
            z, _, steps = _compute_z(model, tok, adapter, req, layer, templates, hp)
        state.target_steps.append(steps)
        with clock("keys"):
            k = _keys(model, tok, adapter, [req], layer, templates)[:, 0].double()
            h = _residual(model, tok, adapter, [req], layer)[:, 0]
        with clock("solve"):
            left = state.C_inv[layer] @ k
            dW = torch.outer((z.to(h.device) - h).double(), left) / (left @ k)
        with clock("apply"):
            _apply(adapter.edit_weight(model, layer), dW, adapter.transposed)


def reference_flow_edit(
    model,
    tok,
    requests,
    method: str,
    hparams,
    C_by_layer: dict,
    *,
    batch_size: int | None = None,
    state: ReferenceState | None = None,
    timing: dict | None = None,
) -> dict:
    """Edit ``model`` in place with the published flow (see the module docstring).

    requests: EditRequests or dicts; method: rome | memit | alphaedit | metake; hparams: the
    ``EditHParams`` the metake_fast run uses; C_by_layer: ``{layer: C}`` (d_k, d_k) per-token
    mean second moments. Requests are edited in sequential batches of ``batch_size`` (all at
    once if None). Returns ``{"timing": {...}, "target_steps": [...], "state": ReferenceState}``.
    """
    method = method.lower()
    adapter = get_adapter(model)
    dev = model_device(model)
    reqs = validate_requests(requests, tok)
    timing = {} if timing is None else timing
    for k in ("prep", "targets", "keys", "solve", "apply"):
        timing.setdefault(k, 0.0)
    clock = _Clock(timing, dev)
    layers = list(hparams.layers)
    templates = context_templates(model, tok, hparams.context_template_count, hparams.context_template_length)
    if state is None:
        state = ReferenceState()
        with clock("prep"):
            for layer in layers:
                C = C_by_layer[layer].to(dev).double()
                if method == "rome":
                    state.C_inv[layer] = torch.linalg.inv(C)
                elif method in ("alphaedit", "metake") and getattr(hparams, "base_solver", "alphaedit") == "alphaedit":
                    state.P[layer] = projector(C, hparams.nullspace_threshold)
                    state.cache_c[layer] = torch.zeros_like(C)
    bs = batch_size or len(reqs)
    L = layers[-1]
    for b in range(0, len(reqs), bs):
        part = reqs[b : b + bs]
        if method == "rome":
            _rome_batch(model, tok, adapter, part, hparams, templates, state, clock)
            continue
        zs, hs = [], []
        with clock("targets"):
            for req in part:
                z, h, steps = _compute_z(model, tok, adapter, req, L, templates, hparams)
                zs.append(z)
                hs.append(h)
                state.target_steps.append(steps)
        Z, H = torch.stack(zs, 1), torch.stack(hs, 1)
        if method == "metake":
            with clock("keys"):
                K = _keys(model, tok, adapter, part, L, templates)
            with clock("solve"):
                if L in state.P:
                    Kd = K.double()
                    d_k = Kd.shape[0]
                    A = state.P[L] @ (Kd @ Kd.T + state.cache_c[L]) + hparams.L2 * torch.eye(
                        d_k, dtype=torch.float64, device=dev
                    )
                    Y = torch.linalg.solve(A, state.P[L] @ Kd)  # ΔW = R Yᵀ
                else:
                    Kd = K.double()
                    C = C_by_layer[L].to(dev).double()
                    Y = torch.linalg.solve(hparams.mom2_update_weight * C + Kd @ Kd.T, Kd)
                G = (Y.T @ Kd).float()
            with clock("targets"):
                Z = _metake_outer(model, tok, adapter, part, L, templates, hparams, Z, H, G)
        reference_write(model, tok, adapter, part, method, hparams, Z, C_by_layer, templates, state, timing)
    return {"timing": timing, "target_steps": list(state.target_steps), "state": state}
