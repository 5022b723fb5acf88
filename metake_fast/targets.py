"""Target optimisation for a whole batch of requests in one loop.

For request ``i`` a vector ``δ_i`` (d_v) is added to the residual stream after
layer ``L`` at the subject's last token of every rewriting prompt (each context
template + prompt + target[:-1]) and of the essence prompt ``"{} is a"``; we
minimise ``NLL(o*_i) + kl_factor·KL(essence) + w·‖δ_i‖/‖h_i‖²`` with Adam and
clamp ``‖δ_i‖ ≤ c·‖h_i‖`` (see METHOD.md).

What makes it fast:

* all requests of a chunk share every forward/backward (Adam is elementwise,
  and each ``δ_i`` only reaches its own prompts, so this is exactly ``u``
  separate optimisations; per-request early stop freezes a converged ``δ_i``, and
  its prompts then leave the forward/backward (``compact``: the chunk's rows are
  cut down to the requests still optimising, KV prefixes and replay included, so a
  chunk costs the sum of its requests' steps, not its slowest request's steps
  times its size);
* positions before the subject's last token do not depend on ``δ``: their keys
  and values are computed once (a KV cache of the prefixes) and each step runs
  only the remaining few tokens per prompt;
* layers ``0..L`` do not depend on ``δ`` either: their output for the step tokens
  is computed once per chunk and replayed, so each step runs only layers ``L+1..``
  (``skip_lower``; off where the weights of those layers change between forwards);
* log-probabilities only at target positions, through the fused op; the full
  vocabulary only at the one essence position per request (for the KL).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .models import ModelAdapter
from .ops.gated_delta_inject import gated_delta_inject
from .requests import EditRequest
from .runner import (
    KLReference,
    encode_target,
    make_batch,
    model_device,
    pad_id,
    subject_last_index,
    target_logprobs,
)

ESSENCE_TEMPLATE = "{} is a"


@dataclass
class TargetConfig:
    """The target-optimisation settings (a view of the method hyperparameters)."""

    steps: int = 25
    lr: float = 0.5
    weight_decay: float = 1e-3
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_nll: float = 5e-2
    chunk_tokens: int = 1024
    prefix_cache: bool = True
    compact: bool = True  # run only the requests still optimising (same result up to rounding)


@dataclass
class TargetResult:
    """``delta``: (u, d_v) planned residuals at layer L; ``h``: (u, d_v) pre-edit residual at the
    subject's last token (bare prompt); ``nll``: (u,) final mean target NLL; ``nll_init``: (u,) at δ = 0;
    ``steps``: (u,) optimisation steps taken. ``problems``: with ``keep_problems``, the
    chunks (request indices) and their :class:`ChunkProblem` (for MetaKE's outer loop,
    on the same unedited model)."""

    delta: torch.Tensor
    h: torch.Tensor
    nll: torch.Tensor
    nll_init: torch.Tensor
    steps: torch.Tensor
    problems: list | None = None


@dataclass
class _Layout:
    prefixes: list[list[int]]
    rests: list[list[int]]
    owner: list[int]  # request (chunk-local) of each prompt
    tgt_rows: list[int]
    tgt_cols: list[int]
    tgt_ids: list[int]
    tgt_weight: list[float]  # prompt's weight / len(target_i); prompts weigh 1 / n_prompts unless given
    kl_rows: list[int]
    kl_cols: list[int]
    bare_rows: list[int]  # the bare-prompt row of each request (for h)
    row_template: list[int] = field(default_factory=list)  # flat template of each row (-1: KL row)


def normalise_prompt_weights(n_prompts: int, weights: Sequence[float] | None = None) -> list[float]:
    """Each flattened prompt's share of a request's NLL: ``weights`` normalised to sum 1, or
    ``1 / n_prompts`` each (every prompt alike) when None."""
    if weights is None:
        return [1.0 / n_prompts] * n_prompts
    if len(weights) != n_prompts:
        raise ValueError(f"{len(weights)} prompt weights for {n_prompts} prompts")
    total = float(sum(weights))
    if not total > 0 or any(w < 0 for w in weights):
        raise ValueError(f"prompt weights must be >= 0 with a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def _layout(
    tok, requests: Sequence[EditRequest], templates: list[list[str]], weights: Sequence[float] | None = None
) -> _Layout:
    L = _Layout([], [], [], [], [], [], [], [], [], [])
    flat = [c for group in templates for c in group]
    pw = normalise_prompt_weights(len(flat), weights)
    for i, req in enumerate(requests):
        t = encode_target(tok, req.target_new)
        for j, ctx in enumerate(flat):
            ids, s = subject_last_index(tok, ctx.replace("{}", req.template(), 1), req.subject)
            full = ids + t[:-1]
            row = len(L.prefixes)
            if j == 0:
                L.bare_rows.append(row)
            L.prefixes.append(full[:s])
            L.rests.append(full[s:])
            L.owner.append(i)
            L.row_template.append(j)
            for k, tid in enumerate(t):
                L.tgt_rows.append(row)
                L.tgt_cols.append(len(ids) - 1 + k - s)
                L.tgt_ids.append(tid)
                L.tgt_weight.append(pw[j] / len(t))
        ids, s = subject_last_index(tok, ESSENCE_TEMPLATE, req.subject)
        row = len(L.prefixes)
        L.prefixes.append(ids[:s])
        L.rests.append(ids[s:])
        L.owner.append(i)
        L.row_template.append(-1)
        L.kl_rows.append(row)
        L.kl_cols.append(len(ids) - 1 - s)
    return L


def _cache_kwarg(module) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (older / other architectures)."""
    import inspect

    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _ChunkRunner:
    """Runs the prompts of one chunk with ``δ`` injected after layer ``L`` at remainder position 0."""

    def __init__(
        self, model, tok, adapter: ModelAdapter, lay: _Layout, layer: int, prefix_cache: bool, skip_lower: bool = True
    ):
        self.model, self.adapter, self.layer = model, adapter, layer
        self.skip_lower = skip_lower
        self.replay = None  # layer L's output for the step tokens, captured by the first forward(None)
        dev = model_device(model)
        self.dev = dev
        pid = pad_id(tok)
        self.owner = torch.tensor(lay.owner, device=dev)
        P = max(len(p) for p in lay.prefixes)
        T = max(len(p) + len(r) for p, r in zip(lay.prefixes, lay.rests))
        # a sliding-window layer's cache keeps only the last window of the (right-padded)
        # prefix batch: exact only while every sequence fits in the window
        window = getattr(getattr(model, "config", None), "sliding_window", None)
        fits = not isinstance(window, int) or window <= 0 or T < window
        self.use_cache = prefix_cache and P > 0 and fits
        if self.use_cache:
            pre = make_batch([p if p else [pid] for p in lay.prefixes], pid, dev)
            pre.attention_mask[[i for i, p in enumerate(lay.prefixes) if not p], 0] = 0
            rest = make_batch(lay.rests, pid, dev)
            plen = torch.tensor([len(p) for p in lay.prefixes], device=dev)
            self.rest_ids = rest.input_ids
            self.mask = torch.cat([pre.attention_mask, rest.attention_mask], 1)
            self.pos = plen[:, None] + torch.arange(rest.input_ids.shape[1], device=dev)[None]
            self.inject_col = torch.zeros(len(lay.prefixes), dtype=torch.long, device=dev)
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
            self.cache_kw = _cache_kwarg(model.base_model)
            with torch.no_grad():
                model.base_model(
                    input_ids=pre.input_ids,
                    attention_mask=pre.attention_mask,
                    position_ids=torch.arange(pre.input_ids.shape[1], device=dev)[None].expand_as(pre.input_ids),
                    **{self.cache_kw: cache},
                    use_cache=True,
                )
            self.cache = cache
            # every layer's whole state, not just keys/values: sliding-window layers also
            # count the tokens seen (``cumulative_length``), which decides their masks
            self.saved = [dict(vars(lyr)) for lyr in cache.layers]
            self.col_offset = 0
        else:
            full = make_batch([p + r for p, r in zip(lay.prefixes, lay.rests)], pid, dev)
            self.rest_ids = full.input_ids
            self.mask = full.attention_mask
            self.pos = None
            self.inject_col = torch.tensor([len(p) for p in lay.prefixes], device=dev)
            self.col_offset_t = self.inject_col
        self.rows = torch.arange(len(lay.prefixes), device=dev)

    def subset(self, rows: torch.Tensor, owner: torch.Tensor) -> _ChunkRunner | None:
        """A runner over the prompt ``rows`` (sorted indices) only, with chunk-local owners
        ``owner`` (one per kept row); it shares the KV prefixes and the layer-L replay of these
        rows, so its forward equals this runner's forward on them (the same tokens, masks and
        positions). None where some recorded state cannot be split by row."""
        n = self.rest_ids.shape[0]

        def take(x):
            if x is None or not torch.is_tensor(x):
                return x
            return x[rows.to(x.device)] if x.dim() >= 1 and x.shape[0] == n else None

        sub = object.__new__(_ChunkRunner)
        vars(sub).update(vars(self))
        if self.replay is not None:
            hs, tail = self.replay
            if tail is not None and any(t is not None and (not torch.is_tensor(t) or take(t) is None) for t in tail):
                return None
            sub.replay = (hs[rows.to(hs.device)], None if tail is None else tuple(take(t) for t in tail))
        if self.use_cache:
            import copy

            saved = []
            for state in self.saved:
                new = {}
                for k, v in state.items():
                    if torch.is_tensor(v) and v.dim() >= 3:  # per-sequence keys / values (B, heads, S, d)
                        if v.shape[0] != n:
                            return None
                        v = v[rows.to(v.device)]  # a sharded model's layers may sit on several devices
                    new[k] = v
                saved.append(new)
            sub.cache = copy.copy(self.cache)
            sub.cache.layers = [copy.copy(lyr) for lyr in self.cache.layers]
            sub.saved = saved
            sub.pos = self.pos[rows]
        sub.rest_ids, sub.mask, sub.inject_col = self.rest_ids[rows], self.mask[rows], self.inject_col[rows]
        if not self.use_cache:
            sub.col_offset_t = sub.inject_col
        sub.owner = owner
        sub.rows = torch.arange(len(rows), device=self.dev)
        return sub

    def hidden_cols(self, cols: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Map remainder-relative columns to this runner's columns."""
        return cols if self.use_cache else cols + self.inject_col[rows]

    def forward(
        self,
        delta: torch.Tensor | None,
        capture_h: bool = False,
        gate: torch.Tensor | None = None,
        per_row: bool = False,
    ):
        """Final hidden states (B, T, d) with ``(gateᵀ delta)[owner]`` injected after layer L.

        ``delta``: (u_in, d_v) or None; ``gate``: (u_in, u_chunk) or None (identity,
        ``delta`` is then the chunk's own (u_chunk, d_v) rows); with ``per_row`` the gate is
        (u_in, n_rows), one column per prompt row (``(gateᵀ delta)[row]``). Through the
        ``gated_delta_inject`` op: one pass over the hidden states, and the gradient
        w.r.t. ``delta`` is ``gate @ ∇`` (MetaKE's structural proxy).
        """
        captured = {}
        record = self.skip_lower and self.replay is None and delta is None

        def hook(module, args, output):
            hs = output[0] if isinstance(output, tuple) else output
            if record:
                self.replay = (hs.detach(), tuple(output[1:]) if isinstance(output, tuple) else None)
            if capture_h:
                captured["h"] = hs[self.rows, self.inject_col].detach().float()
            if delta is not None:
                owner = self.rows if per_row else self.owner
                hs = gated_delta_inject(hs, delta, self.rows, self.inject_col, owner, gate=gate)
                return (hs,) + tuple(output[1:]) if isinstance(output, tuple) else hs
            return output

        layers = self.adapter.decoder_layers(self.model)
        handle = layers[self.layer].register_forward_hook(hook)
        replaced = self._replay_lower(layers) if self.replay is not None and not record else []
        try:
            kwargs = {}
            if self.use_cache:
                for lyr, state in zip(self.cache.layers, self.saved):
                    vars(lyr).clear()
                    vars(lyr).update(state)
                kwargs = {self.cache_kw: self.cache, "use_cache": True, "position_ids": self.pos}
            out = self.model.base_model(input_ids=self.rest_ids, attention_mask=self.mask, **kwargs)
        finally:
            handle.remove()
            for module, old in replaced:
                if old is None:
                    del module.forward
                else:
                    module.forward = old
        hid = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return hid, captured.get("h")

    def _replay_lower(self, layers) -> list:
        """Make layers ``0..L`` return the recorded layer-L output (their result for these
        tokens never changes); returns ``(module, previous instance forward)`` to undo it.
        Layers above ``L`` read only their own KV cache, so the lower layers' cache
        entries for the step tokens are not needed."""
        hs, tail = self.replay

        def replay(*args, **kwargs):
            return hs if tail is None else (hs,) + tail

        replaced = []
        for module in list(layers)[: self.layer + 1]:
            replaced.append((module, module.__dict__.get("forward")))
            module.forward = replay  # instance attribute: hooks (and accelerate's wrappers) are kept around it
        return replaced


def optimize_targets(
    model,
    tok,
    adapter: ModelAdapter,
    requests: Sequence[EditRequest],
    layer: int,
    templates: list[list[str]],
    cfg: TargetConfig,
    *,
    progress: bool = True,
    desc: str = "targets",
    keep_problems: bool = False,
) -> TargetResult:
    """Optimise ``δ`` for every request (in chunks of at most ``cfg.chunk_tokens`` tokens)."""
    parts, problems = [], []
    chunks = _chunks(tok, requests, templates, cfg.chunk_tokens, cfg.prefix_cache)
    bar = tqdm(total=len(requests) * cfg.steps, desc=desc, disable=not progress, unit="req·step", leave=False)
    try:
        for idx in chunks:
            res, prob = _optimize_chunk(model, tok, adapter, [requests[i] for i in idx], layer, templates, cfg, bar)
            parts.append(res)
            if keep_problems:
                problems.append((idx, prob))
    finally:
        bar.close()
    perm = torch.tensor([i for idx in chunks for i in idx])
    fields = []
    for f in ("delta", "h", "nll", "nll_init", "steps"):
        part = torch.cat([getattr(p, f) for p in parts])
        out = torch.empty_like(part)
        out[perm.to(part.device)] = part  # back to the requests' order
        fields.append(out)
    return TargetResult(*fields, problems=problems if keep_problems else None)


def _step_tokens(tok, req: EditRequest, prefix_cache: bool) -> int:
    """Tokens one prompt of ``req`` runs per step: from the subject's last token on (prefix cache)
    or the whole prompt, plus ``target[:-1]``."""
    ids, s = subject_last_index(tok, req.template(), req.subject)
    n_target = len(encode_target(tok, req.target_new))
    return (len(ids) - s if prefix_cache else len(ids)) + n_target - 1


def _chunks(tok, requests, templates, chunk_tokens: int, prefix_cache: bool = True) -> list[list[int]]:
    """Group request indices into chunks of at most ``chunk_tokens`` padded tokens per step.

    Requests are sorted by how many tokens their prompts run per step, so each
    chunk is padded to a similar length (right padding to the longest remainder
    would otherwise waste 1.5–2× of every step on CounterFact).
    """
    nprompts = sum(len(g) for g in templates) + 1
    cost = [_step_tokens(tok, r, prefix_cache) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: (cost[i], i))
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * nprompts * cost[i] > chunk_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


class ChunkProblem:
    """The target loss of one chunk of requests as a function of the injected vectors.

    ``losses(delta)`` returns per-request ``(nll, kl)`` (each (u,)) for ``delta``
    (u, d_v) added after layer ``L`` at the subject's last token; differentiable in
    ``delta``. ``h`` is the pre-edit residual at the subject (bare prompt). ``prompt_weights``
    (one per flattened template; normalised by :func:`normalise_prompt_weights`) sets each
    prompt's share of a request's NLL; None (default) weighs every prompt alike.
    """

    def __init__(
        self,
        model,
        tok,
        adapter: ModelAdapter,
        requests,
        layer: int,
        templates,
        prefix_cache: bool = True,
        skip_lower: bool = True,
        prompt_weights: Sequence[float] | None = None,
    ):
        lay = _layout(tok, requests, templates, prompt_weights)
        self.model, self.adapter = model, adapter
        self.run = run = _ChunkRunner(model, tok, adapter, lay, layer, prefix_cache, skip_lower)
        dev = self.dev = run.dev
        self.u = len(requests)
        self.norm = adapter.norm(model)
        self.t_rows = torch.tensor(lay.tgt_rows, device=dev)
        self.t_cols = run.hidden_cols(torch.tensor(lay.tgt_cols, device=dev), self.t_rows)
        self.t_ids = torch.tensor(lay.tgt_ids, device=dev)
        self.t_w = torch.tensor(lay.tgt_weight, device=dev)
        self.t_own = run.owner[self.t_rows]
        self.k_rows = torch.tensor(lay.kl_rows, device=dev)
        self.k_cols = run.hidden_cols(torch.tensor(lay.kl_cols, device=dev), self.k_rows)
        bare = torch.tensor(lay.bare_rows, device=dev)
        self.row_owner = run.owner  # chunk-local request of each row
        self.row_template = torch.tensor(lay.row_template, device=dev)  # flat template of each row; -1: KL row
        with torch.no_grad():
            hid, h_all = run.forward(None, capture_h=True)
            self.kl_ref = KLReference(model, adapter, self.norm(hid[self.k_rows, self.k_cols]))
            lp0 = target_logprobs(model, adapter, self.norm(hid[self.t_rows, self.t_cols]), self.t_ids)
            self.nll_init = torch.zeros(self.u, device=dev).index_add_(0, self.t_own, -lp0 * self.t_w)
        self.h = h_all[bare]

    def subset(self, keep: torch.Tensor) -> ChunkProblem | None:
        """The same problem over the requests ``keep`` (sorted chunk-local indices) only: its
        ``losses`` on ``delta[keep]`` equal this problem's losses at ``keep`` (up to the rounding
        of smaller matrix products), at the cost of their prompts alone. None where the runner
        cannot be split (the caller then keeps the whole chunk)."""
        keep = keep.to(self.dev)
        req_map = torch.full((self.u,), -1, dtype=torch.long, device=self.dev)
        req_map[keep] = torch.arange(len(keep), device=self.dev)
        row_kept = req_map[self.row_owner] >= 0
        rows = row_kept.nonzero().squeeze(1)
        row_map = torch.full_like(self.row_owner, -1)
        row_map[rows] = torch.arange(len(rows), device=self.dev)
        run = self.run.subset(rows, req_map[self.row_owner[rows]])
        if run is None:
            return None
        sub = object.__new__(ChunkProblem)
        vars(sub).update(vars(self))
        sub.run, sub.u = run, len(keep)
        t = row_kept[self.t_rows]
        sub.t_rows, sub.t_cols, sub.t_ids, sub.t_w = row_map[self.t_rows[t]], self.t_cols[t], self.t_ids[t], self.t_w[t]
        sub.t_own = req_map[self.t_own[t]]
        sub.k_rows, sub.k_cols = row_map[self.k_rows[keep]], self.k_cols[keep]  # one KL row per request, in order
        sub.kl_ref = object.__new__(KLReference)
        vars(sub.kl_ref).update(vars(self.kl_ref))
        sub.kl_ref.h0 = self.kl_ref.h0[keep]
        sub.row_owner, sub.row_template = run.owner, self.row_template[rows]
        sub.nll_init, sub.h = self.nll_init[keep], self.h[keep]
        return sub

    def losses(
        self, delta: torch.Tensor, with_kl: bool = True, gate: torch.Tensor | None = None, per_row: bool = False
    ):
        hid, _ = self.run.forward(delta, gate=gate, per_row=per_row)
        lp = target_logprobs(self.model, self.adapter, self.norm(hid[self.t_rows, self.t_cols]), self.t_ids)
        nll = torch.zeros(self.u, device=self.dev, dtype=lp.dtype).index_add(0, self.t_own, -lp * self.t_w)
        if not with_kl:
            return nll, torch.zeros_like(nll)
        kl = self.kl_ref.kl(self.norm(hid[self.k_rows, self.k_cols]))  # KL(current ‖ initial), as in ROME
        return nll, kl


class MaskedAdam:
    """Adam on a (u, d) parameter where each row has its own step count and can be frozen."""

    def __init__(self, param: torch.Tensor, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.p, self.lr, self.b1, self.b2, self.eps = param, lr, b1, b2, eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = torch.zeros(param.shape[0], device=param.device)

    @torch.no_grad()
    def step(self, grad: torch.Tensor, active: torch.Tensor) -> None:
        a = active[:, None]
        self.t += active.float()
        self.m.copy_(torch.where(a, self.b1 * self.m + (1 - self.b1) * grad, self.m))
        self.v.copy_(torch.where(a, self.b2 * self.v + (1 - self.b2) * grad * grad, self.v))
        tt = self.t.clamp_min(1)[:, None]
        upd = self.lr * (self.m / (1 - self.b1**tt)) / ((self.v / (1 - self.b2**tt)).sqrt() + self.eps)
        self.p -= torch.where(a, upd, torch.zeros_like(upd))


def clamp_rows_(x: torch.Tensor, max_norm: torch.Tensor) -> None:
    """Scale each row of ``x`` in place so that ``‖x_i‖ ≤ max_norm_i``."""
    with torch.no_grad():
        x *= (max_norm / x.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)[:, None]


def _optimize_chunk(model, tok, adapter, requests, layer, templates, cfg: TargetConfig, bar):
    """One chunk's optimisation; returns ``(TargetResult, ChunkProblem)``."""
    prob = ChunkProblem(model, tok, adapter, requests, layer, templates, cfg.prefix_cache)
    u, h = prob.u, prob.h
    h_norm = h.norm(dim=1)
    max_norm = cfg.clamp_norm_factor * h_norm
    delta = torch.zeros(u, h.shape[1], device=prob.dev)
    opt = MaskedAdam(delta, cfg.lr)
    active = torch.ones(u, dtype=torch.bool, device=prob.dev)
    nll = prob.nll_init.clone()
    idx = torch.arange(u, device=prob.dev)  # the requests the current (sub)problem runs
    part, splittable = prob, cfg.compact
    for _ in range(cfg.steps):
        active &= nll > cfg.early_stop_nll
        n_active = int(active.sum())
        if n_active == 0:
            break
        if splittable and n_active < len(idx):  # converged requests leave the forward/backward
            keep = active.nonzero().squeeze(1)
            sub = prob.subset(keep)
            if sub is None:
                splittable = False  # this runner's state cannot be split by row: run it whole
            else:
                idx, part = keep, sub
        d = delta[idx].requires_grad_(True)
        nll_req, kl_req = part.losses(d, with_kl=cfg.kl_factor > 0)
        wd_req = cfg.weight_decay * d.norm(dim=1) / h_norm[idx].pow(2)
        loss = (nll_req + cfg.kl_factor * kl_req + wd_req)[active[idx]].sum()
        (g,) = torch.autograd.grad(loss, d)
        grad = torch.zeros_like(delta).index_copy_(0, idx, g)
        nll = nll.index_copy(0, idx, nll_req.detach())
        opt.step(grad, active)
        clamp_rows_(delta, max_norm)
        bar.update(n_active)
    del part
    with torch.no_grad():  # NLL after the last update
        nll, _ = prob.losses(delta, with_kl=False)
    if not torch.isfinite(delta).all():
        bad = int((~torch.isfinite(delta).all(1)).nonzero()[0])
        raise FloatingPointError(f"target optimisation produced a non-finite delta for request {bad} of the chunk")
    return TargetResult(delta.detach().float(), h.float(), nll.float(), prob.nll_init.float(), opt.t.long()), prob
