"""MetaKE's upper level: learn the planned residuals against the *virtual post-edit* model.

METHOD.md, "Upper level (adopted)". With the gate ``G`` (u×u) of the lower-level
solver, the write realises ``H + R G`` at the last edited layer rather than the
planned ``H + R``. The outer loop therefore minimises

    F(R) = Σ_i NLL(o*_i | H̃) + β·KL_loc + γ·Ω(R),      H̃ = H + R G

starting from the plain target optimisation's ``R = Δ``, with the structural
gradient proxy ``∇_R F ≈ (∇_H̃ F) Gᵀ`` (keys, projector and history frozen, so
``G`` does not depend on ``R``). In the row layout used here (``R`` is (u, d_v),
one row per request) the injected vectors are ``Gᵀ R`` and the proxy gradient
is ``G ∇_H̃``. The refined targets ``Z = H + R`` are then written once by the
standard multi-layer solver.

Safeguard (``safeguard``, on by default; not part of the adopted formulation): the
proxy models one layer's gate, but the write spreads the residual over several
layers whose keys move as earlier layers change, so for a few requests the refined
target can do worse than the plain one once really written. :func:`safeguarded_write`
checks each request on its own rewrite prompt and writes the plain target where the
refined one failed (margin below ``safeguard_margin``), keeping that write only if it
leaves at least as many of the batch's rewrite prompts succeeding. (Falling back
wherever the refined write merely scored lower than the plain one, failed or not,
undid the refinement for 39 of the first 100 CounterFact requests and lost its
generalization gain.) ``safeguard_history`` extends the check to the earlier edits of a
sequential run: a batch whose refined write leaves fewer earlier edits preferring their new
object than before is compared with the plain write from the same state, and the write with
more successes over all edits so far is kept.

Optional (``history_weight`` η > 0; not in METHOD.md): the outer objective also pays
``η·tr(Rᵀ H_p R)/mean‖h‖²``, the squared disturbance the last layer's write would cause on
the keys of every earlier edit of a sequential run, in closed form from AlphaEdit's factor
(:meth:`~metake_fast.solvers.NullSpaceSolver.history_gram`); F as written optimises the
current batch only, and its larger residuals were measured to disturb earlier edits more.

Optional (``outer_extra_templates``; not in METHOD.md): F also scores the new object after
extra context prefixes (other samples than the target loop's, see
:func:`metake_fast.context.with_extra_groups`). The write is unchanged: its keys are the target
loop's mean keys, and with ``gate_keys: instance`` each extra prompt sees the share the write
realises on its own key. F then asks the refined targets to hold in contexts the lower level
never fitted, as a paraphrase prompt's are. ``outer_extra_weight`` is each extra prompt's weight
relative to an own prompt's (1: all alike; a request's weights sum to 1 either way).

Choices (``MetaKEHParams``): ``outer_steps``, ``outer_lr``, ``gamma`` and
``omega`` (``"norm"``: ‖R_i‖/‖h_i‖²; ``"adaptive"``: the same times ``1 − g_ii``,
so the penalty is strongest where the solver truncates most and a large
residual would mostly be lost), ``gate`` (``"full"`` or ``"diag"``), ``outer_kl`` (the essence KL in F), ``gate_layers``:

* ``"last"`` — the adopted proxy: the last edited layer's gate only;
* ``"product"`` — the product of the per-layer gates ``G_{l_1} ⋯ G_{l_m}``;
* ``"spread"`` — the gate of MEMIT's residual spreading: layer ``j`` of ``m``
  writes ``1/(m−j)`` of what is left, so the realised share is
  ``I − Π_j (I − G_j/(m−j))`` (exact when each layer's write reaches layer L
  unchanged; reduces to ``G`` for one layer).

``gate_keys``: ``"mean"`` (METHOD.md: every prompt of a request sees ``G``'s column, the share
realised on the request's mean key) or ``"instance"``: the write is solved for the mean keys
``K̄`` but each context-template prompt reaches layer L with its own key ``k_t`` and gets
``R Yᵀ k_t``, so prompt ``t`` sees the column ``Γ_t = Yᵀ k_t`` (spread: composed over the
layers as ``G`` is). The template-weighted mean of a request's columns is its column of ``G``.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .context import with_extra_groups
from .keys import keys_and_residual
from .solvers import CovarianceSolver
from .targets import ChunkProblem, MaskedAdam, TargetResult, _chunks, clamp_rows_


def solver_gate(solver, K: torch.Tensor) -> torch.Tensor:
    """The gate ``G = Kᵀ Y`` (u, u) float32 the solver would realise for keys ``K`` (d_k, u)."""
    if isinstance(solver, CovarianceSolver):
        _, G = solver.memit(K)
    else:
        _, G = solver.solve(K)
    return G.float()


def _flat_weights(templates) -> torch.Tensor:
    """Each flattened template's weight in a request's mean key (groups weighted equally)."""
    return torch.tensor([1.0 / (len(templates) * len(group)) for group in templates for _ in group])


def _scored_weights(templates, scored, extra_weight: float) -> list[float]:
    """F's weight of each flattened prompt of ``scored`` (before normalisation): 1 for the target
    loop's own prompts, ``extra_weight`` for the extra ones (at 1, every prompt alike)."""
    n_own = sum(len(g) for g in templates)
    n_all = sum(len(g) for g in scored)
    return [1.0] * n_own + [float(extra_weight)] * (n_all - n_own)


def _layer_gates(editor, reqs, templates, per_instance: bool, scored=None):
    """Per gate layer: ``(G_l, Γ_l)``; ``Γ_l = Y_lᵀ K_inst`` (u, u·n) realises the write on every
    prompt's own key (``per_instance``), else None. ``Y_l`` is the solve for the mean keys over
    ``templates`` (the write's); ``scored`` (default ``templates``) are the prompts Γ has columns
    for, ``templates`` followed by any extra groups (:func:`metake_fast.context.with_extra_groups`)."""
    hp = editor.hparams
    scored = templates if scored is None else scored
    layers = editor.layers if hp.gate_layers in ("product", "spread") else editor.layers[-1:]
    out = []
    u = len(reqs)
    n_own = sum(len(g) for g in templates)
    for layer in layers:
        if per_instance:
            Ki, _ = keys_and_residual(
                editor.model, editor.tok, editor.adapter, reqs, layer, None, scored, per_instance=True
            )
            n = Ki.shape[1] // max(u, 1)
            w = _flat_weights(templates).to(Ki)
            K = (Ki.reshape(Ki.shape[0], u, n)[:, :, :n_own] * w).sum(-1)
            Y, G = solver_solve(editor._solvers[layer], K)
            out.append((G.float().cpu(), (Y.float().T @ Ki.to(Y.device).float()).cpu()))
        else:
            K, _ = keys_and_residual(editor.model, editor.tok, editor.adapter, reqs, layer, None, templates)
            out.append((solver_gate(editor._solvers[layer], K).cpu(), None))
    editor.last_gate_keys = K  # the last edited layer's keys (history term)
    return out


def structural_gate(editor, reqs, templates, per_instance: bool | None = None, scored=None):
    """The gate used by the proxy (see the module docstring), on the model as it is now.

    Returns ``G`` (u, u). With ``per_instance`` (default: ``hparams.gate_keys == "instance"``)
    returns ``(G, Γ)``: ``Γ`` (u, u·n) has one column per (request, flattened template) prompt,
    request-major, the share of each planned residual the write realises on that prompt's own
    key; ``scored`` (default ``templates``) names those prompts when F scores extra ones.
    ``spread`` composes it like ``G``: ``Γ = Σ_j P_j Γ_j / (m−j)``, ``P_j = Π_{i<j} (I − G_i/(m−i))``,
    which is ``G``'s columns when every prompt has the mean key.
    """
    hp = editor.hparams
    if per_instance is None:
        per_instance = hp.gate_keys == "instance"
    parts = _layer_gates(editor, reqs, templates, per_instance, scored)
    gates = [g for g, _ in parts]
    u = gates[0].shape[0]
    eye = torch.eye(u)
    Gam = None
    if hp.gate_layers == "last":
        G, Gam = parts[-1]
    elif hp.gate_layers == "product":
        if per_instance:
            raise ValueError("gate_keys: instance needs gate_layers last or spread")
        G = eye
        for g in gates:
            G = G @ g
    else:  # spread
        m = len(gates)
        left = eye
        if per_instance:
            Gam = torch.zeros_like(parts[0][1])
        for j, (g, gam) in enumerate(parts):
            if per_instance:
                Gam += left @ gam / (m - j)
            left = left @ (eye - g / (m - j))
        G = eye - left
    if hp.gate == "diag":
        G = torch.diag(torch.diagonal(G))
        if per_instance:
            n = Gam.shape[1] // max(u, 1)
            own = torch.arange(u).repeat_interleave(n)
            keep = torch.zeros_like(Gam, dtype=torch.bool)
            keep[own, torch.arange(Gam.shape[1])] = True
            Gam = torch.where(keep, Gam, torch.zeros_like(Gam))
    return (G, Gam) if per_instance else G


def chunk_gate(G: torch.Tensor, Gam: torch.Tensor | None, prob, idx: torch.Tensor) -> torch.Tensor:
    """The gate one chunk's forward takes: ``G[:, idx]`` (u, u_chunk) for mean keys, or with the
    per-prompt ``Γ`` (u, u, n) one column per row of the chunk (``per_row``): the prompt's own
    column, and ``G``'s column of its request for the KL rows (the essence prompt has no template key).
    ``idx``: the chunk's requests (global indices), on ``G``'s device."""
    if Gam is None:
        return G[:, idx]
    req = idx[prob.row_owner]
    t = prob.row_template
    return torch.where((t >= 0)[None], Gam[:, req, t.clamp_min(0)], G[:, req])


def _omega(R: torch.Tensor, h_norm: torch.Tensor, gdiag: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-request regulariser Ω: ``‖R_i‖/‖h_i‖²`` (norm) or that times ``(1 − g_ii)`` (adaptive)."""
    base = R.norm(dim=1) / h_norm.pow(2)
    return base if kind == "norm" else base * (1 - gdiag).clamp_min(0)


def _active_parts(parts: list, active: torch.Tensor, per_instance: bool) -> list:
    """Each ``(requests, problem, gate)`` part cut down to its requests still in the upper level's
    objective, with :meth:`ChunkProblem.subset` and the gate's matching columns (one per prompt
    row with per-prompt keys, one per request otherwise); parts with none left are dropped, and
    a part whose problem cannot be split is kept whole. The parts given are not kept, so their
    KV caches are freed once the caller lets go of them."""
    out = []
    for idx, prob, gate in parts:
        on = active[idx]
        keep = on.nonzero().squeeze(1)
        if len(keep) == 0:
            continue
        sub = prob.subset(keep) if len(keep) < len(idx) else None
        if sub is None:
            out.append((idx, prob, gate))
            continue
        cols = on[prob.row_owner].nonzero().squeeze(1) if per_instance else keep
        out.append((idx[keep], sub, gate[:, cols]))
    return out


def refine_targets(editor, reqs, templates, tres: TargetResult, timing: dict) -> torch.Tensor:
    """Run the upper level; returns the refined targets ``Z = H + R`` as (d_v, u) float32.

    ``tres.problems`` (the target loop's chunk problems, if kept) is consumed: set to None, so
    their KV caches are freed as soon as the outer loop lets go of them."""
    hp = editor.hparams
    model, tok, adapter = editor.model, editor.tok, editor.adapter
    L = editor.layers[-1]
    per_instance = hp.gate_keys == "instance"
    extra = getattr(hp, "outer_extra_templates", []) if hp.outer_steps > 0 else []  # no outer loop: no F to score
    scored = (
        with_extra_groups(model, tok, templates, extra, hp.context_template_seed + 1) if extra else templates
    )  # the prompts F scores: the target loop's, then any extra contexts
    G = structural_gate(editor, reqs, templates, scored=scored)  # (u, u) on CPU; with per_instance (G, Γ)
    Gam = None
    if per_instance:
        G, Gam = G
    editor.last_gate = G
    dev = tres.delta.device
    G = G.to(dev)
    gdiag = torch.diagonal(G)
    R = tres.delta.clone().requires_grad_(False)
    u = R.shape[0]
    if hp.outer_steps == 0 or u == 0:
        return (tres.h + R).T
    cfg = editor._target_config()
    if tres.problems is not None and scored is templates:  # the target loop's chunks, on this same model
        chunks = [idx for idx, _ in tres.problems]
        problems = [prob for _, prob in tres.problems]
        tres.problems = None  # consumed: compaction frees each chunk's caches as its requests converge
    else:
        tres.problems = None  # the target loop's prompts are not F's: free their KV caches first
        chunks = _chunks(tok, reqs, scored, cfg.chunk_tokens, cfg.prefix_cache)
        weights = _scored_weights(templates, scored, getattr(hp, "outer_extra_weight", 1.0))
        problems = [
            ChunkProblem(
                model, tok, adapter, [reqs[i] for i in idx], L, scored, cfg.prefix_cache, prompt_weights=weights
            )
            for idx in chunks
        ]
    chunks = [torch.tensor(idx, device=dev) for idx in chunks]
    Gam = None if Gam is None else Gam.to(dev).reshape(u, u, -1)  # (u, u, n): request, prompt's request, prompt
    gates = [chunk_gate(G, Gam, prob, idx) for idx, prob in zip(chunks, problems)]
    h_norm = tres.h.norm(dim=1).to(dev)
    max_norm = hp.outer_clamp_norm_factor * h_norm
    Hp = None
    if hp.history_weight > 0:  # η·tr(Rᵀ H_p R)/mean‖h‖²: disturbance of the earlier edits' keys at L
        Hp = editor._solvers[L].history_gram(editor.last_gate_keys).to(device=dev, dtype=R.dtype)
        Hp = hp.history_weight * Hp / h_norm.pow(2).mean()
    opt = MaskedAdam(R, hp.outer_lr)
    active = torch.ones(u, dtype=torch.bool, device=dev)
    parts = list(zip(chunks, problems, gates))  # what each step runs: (requests, problem, gate)
    del chunks, problems, gates  # compaction below replaces parts, and with them their caches
    n_active = u
    nll_all = torch.zeros(u, device=dev)
    bar = tqdm(total=hp.outer_steps, desc="metake outer", disable=not editor.progress, leave=False)
    for _ in range(hp.outer_steps):
        if cfg.compact and int(active.sum()) < n_active:
            # a converged request's prompts enter no loss, so they leave the forward/backward;
            # the others still see its (frozen) residual through the gate
            parts, n_active = _active_parts(parts, active, per_instance), int(active.sum())
        # Each chunk sees the virtual residuals (Gᵀ R)[idx] = G[:, idx]ᵀ R through the
        # gated_delta_inject op, whose gradient w.r.t. R is G[:, idx] ∇_virt; summed over
        # the chunks this is the structural gradient proxy G ∇_H̃ F (row layout).
        Rg = R.detach().clone().requires_grad_(True)
        g_proxy = torch.zeros_like(R)
        for idx, prob, gate in parts:
            nll, kl = prob.losses(Rg, with_kl=hp.outer_kl and hp.kl_factor > 0, gate=gate, per_row=per_instance)
            loss = (nll + hp.kl_factor * kl)[active[idx]].sum()
            if loss.requires_grad:
                (g,) = torch.autograd.grad(loss, Rg)
                g_proxy += g
            nll_all[idx] = nll.detach()
        active &= nll_all > cfg.early_stop_nll
        if not bool(active.any()):
            break
        reg = hp.gamma * _omega(Rg, h_norm, gdiag, hp.omega)[active].sum()
        if Hp is not None:
            reg = reg + (Rg * (Hp @ Rg)).sum()
        (g_reg,) = torch.autograd.grad(reg, Rg)
        grad = g_proxy + g_reg  # structural gradient proxy + regulariser
        opt.step(grad, active)
        clamp_rows_(R, max_norm)
        bar.update(1)
    bar.close()
    editor.last_outer_nll = nll_all.detach().cpu()
    return (tres.h + R).T.contiguous()


def _rewrite_margin(editor, reqs) -> torch.Tensor:
    """Per request, on its own rewrite prompt: ``log P(new) − log P(true)`` (``log P(new)`` without a true object)."""
    lp_new, lp_true = editor._rewrite_logprobs(reqs)
    return lp_new - torch.nan_to_num(lp_true, nan=0.0)


def _at_margin(editor, reqs, margin: float, timing: dict) -> int:
    """How many of ``reqs`` have ``log P(new) − log P(true) ≥ margin`` on their own rewrite prompt."""
    if not reqs:
        return 0
    t0 = time.perf_counter()
    n = int((_rewrite_margin(editor, reqs) >= margin).sum())
    timing["targets"] += time.perf_counter() - t0
    return n


def _history_sample(history: list, limit: int) -> list:
    """The earlier edits the history safeguard scores: all of them, or ``limit`` evenly spaced ones."""
    n = len(history)
    if limit <= 0 or n <= limit:
        return list(history)
    return [history[(i * n) // limit] for i in range(limit)]


def safeguarded_write(editor, reqs, templates, Z_base: torch.Tensor, Z_meta: torch.Tensor, timing: dict):
    """Write the refined targets; give the plain target to requests whose refined write failed.

    The refined targets ``Z_meta`` (d_v, u) are written and every request is scored on its
    own rewrite prompt only (``log P(new) − log P(true)``: never paraphrase or
    neighbourhood prompts). If every margin reaches ``hparams.safeguard_margin`` (0: the
    new object is preferred) that write stays: one scoring pass is the whole cost.
    Otherwise the batch is written once more from the same state with the plain target
    ``Z_base`` for the failed requests, and that write is kept unless it leaves fewer of
    the batch's rewrite prompts at or above the margin than the refined write did.

    With ``hparams.safeguard_history`` the earlier edits (``editor.history``; at most
    ``safeguard_history_max`` of them, evenly spaced) are scored on their rewrite prompts
    before and after. If the write kept above leaves fewer of them at
    the margin than before, the batch is also written with the plain targets alone (the
    base solver's own write from the same state), and the write with more rewrite prompts at
    the margin over the earlier edits and this batch together is kept (the refined one on a
    tie). Returns the (u,) bool mask of the requests that got their plain target.
    """
    hp = editor.hparams
    margin = hp.safeguard_margin
    prev = _history_sample(editor.history, hp.safeguard_history_max) if hp.safeguard_history else []
    snap = editor._snapshot()
    n_prev_before = _at_margin(editor, prev, margin, timing)
    editor._write(reqs, templates, Z_meta, timing)
    t0 = time.perf_counter()
    m_meta = _rewrite_margin(editor, reqs)
    timing["targets"] += time.perf_counter() - t0
    failed = m_meta < margin
    info = {"margin_meta": m_meta, "margin_mixed": None, "failed": failed, "history": None}
    fallback = torch.zeros_like(failed)
    n_own = int((m_meta >= margin).sum())
    if bool(failed.any()):
        snap_meta = editor._snapshot()
        editor._rollback(snap)
        Z = torch.where(failed.to(Z_meta.device)[None, :], Z_base, Z_meta)
        editor._write(reqs, templates, Z, timing)
        t0 = time.perf_counter()
        m_mixed = _rewrite_margin(editor, reqs)
        timing["targets"] += time.perf_counter() - t0
        info["margin_mixed"] = m_mixed
        if int((m_mixed >= margin).sum()) >= n_own:
            fallback = failed
            n_own = int((m_mixed >= margin).sum())
        else:
            editor._rollback(snap_meta)  # the plain targets did not help: back to the refined write
        del snap_meta
    if prev:
        n_prev = _at_margin(editor, prev, margin, timing)
        hist = {"before": n_prev_before, "kept": n_prev, "plain": None, "plain_own": None, "chose_plain": False}
        if n_prev < n_prev_before and not bool(fallback.all()):
            snap_kept = editor._snapshot()
            editor._rollback(snap)
            editor._write(reqs, templates, Z_base, timing)
            n_plain_own = _at_margin(editor, reqs, margin, timing)
            n_plain = _at_margin(editor, prev, margin, timing)
            hist.update(plain=n_plain, plain_own=n_plain_own)
            if n_plain + n_plain_own > n_prev + n_own:
                fallback = torch.ones_like(failed)
                hist["chose_plain"] = True
            else:
                editor._rollback(snap_kept)
            del snap_kept
        info["history"] = hist
    info["fallback"] = fallback
    editor.last_safeguard = info
    return fallback


def _differentiable_write(editor, reqs, templates, Z: torch.Tensor):
    """The real multi-layer write of targets ``Z`` (d_v, u) as a differentiable function.

    Returns ``{param_name: W_l + ΔW_l}`` for every edited layer, where each
    layer's keys and the current residual are recomputed through the model as
    already edited at the earlier layers (exactly what :meth:`Editor._write`
    does, but without ``no_grad`` so autograd sees the whole chain).
    """
    from torch.nn.utils.stateless import _reparametrize_module

    keys_fn = keys_and_residual.__wrapped__  # the undecorated function (no torch.no_grad)
    model, adapter = editor.model, editor.adapter
    L = editor.layers[-1]
    m = len(editor.layers)
    names = {layer: adapter.edit_module_name(layer) + ".weight" for layer in editor.layers}
    params: dict[str, torch.Tensor] = {}
    for j, layer in enumerate(editor.layers):
        with _reparametrize_module(model, params):
            K, H_cur = keys_fn(model, editor.tok, adapter, reqs, layer, L, templates)
        Rj = (Z - H_cur) / (m - j)
        Y, _ = solver_solve(editor._solvers[layer], K)
        W = adapter.edit_weight(model, layer)
        delta = Rj @ Y.T
        params[names[layer]] = W + (delta.T if adapter.transposed else delta).to(W.dtype)
    return params


def solver_solve(solver, K: torch.Tensor):
    return solver.memit(K) if isinstance(solver, CovarianceSolver) else solver.solve(K)


def proxy_gradient_cosine(editor, reqs, templates, tres: TargetResult, per_instance: bool | None = None) -> dict:
    """Compare the structural gradient proxy with the exact gradient at ``R = tres.delta``.

    Exact: autograd of ``F(R) = Σ_i NLL_i`` of the *really* edited model (the
    multi-layer write of ``Z = H + R`` through :func:`_differentiable_write`, no
    injection). Proxy: ``G ∇_H̃ F`` evaluated at the virtual hidden ``H + R G``
    with the configured gate (row layout; ``per_instance``: each prompt's own realised share,
    default ``hparams.gate_keys == "instance"``). For small models only (it
    differentiates through several full forward passes). Returns the cosine
    similarity overall and per request, and both gradient norms.
    """
    from torch.nn.utils.stateless import _reparametrize_module

    model, tok, adapter = editor.model, editor.tok, editor.adapter
    L = editor.layers[-1]
    R = tres.delta.clone().requires_grad_(True)
    Z = (tres.h + R).T
    params = _differentiable_write(editor, reqs, templates, Z)
    # no replay of the lower layers: the write changes them between construction and use
    prob_exact = ChunkProblem(model, tok, adapter, reqs, L, templates, prefix_cache=False, skip_lower=False)
    with _reparametrize_module(model, params):
        nll, _ = prob_exact.losses(torch.zeros_like(tres.delta), with_kl=False)
    (g_exact,) = torch.autograd.grad(nll.sum(), R)

    if per_instance is None:
        per_instance = editor.hparams.gate_keys == "instance"
    prob = ChunkProblem(model, tok, adapter, reqs, L, templates, prefix_cache=False)
    u = len(reqs)
    if per_instance:  # one gate column per prompt row (KL rows: their request's G column)
        G, Gam = structural_gate(editor, reqs, templates, per_instance=True)
        G, Gam = G.to(R.device), Gam.to(R.device).reshape(u, u, -1)
    else:
        G, Gam = structural_gate(editor, reqs, templates, per_instance=False).to(R.device), None
    gate = chunk_gate(G, Gam, prob, torch.arange(u, device=R.device))
    x = (gate.T @ tres.delta).clone().requires_grad_(True)
    nll_v, _ = prob.losses(x, with_kl=False, per_row=per_instance)
    (g_virt,) = torch.autograd.grad(nll_v.sum(), x)
    g_proxy = gate @ g_virt
    flat = torch.nn.functional.cosine_similarity(g_proxy.reshape(1, -1), g_exact.reshape(1, -1))[0]
    per = torch.nn.functional.cosine_similarity(g_proxy, g_exact, dim=1)
    return {
        "cosine": float(flat),
        "cosine_per_request": per.tolist(),
        "norm_exact": float(g_exact.norm()),
        "norm_proxy": float(g_proxy.norm()),
        "gate_eigenvalues": torch.linalg.eigvalsh((G + G.T).double() / 2).tolist(),
    }
