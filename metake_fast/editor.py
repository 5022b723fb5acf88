"""The public editing API: :class:`Editor`.

    editor = Editor.from_pretrained("smollm2-135m", method="alphaedit")
    report = editor.edit(requests, batch_size=100)   # sequential batches, edits the model in place
    editor.save_delta("edits.safetensors"); editor.restore()

Every batch is atomic: the edited weights and the solver state are snapshot
before it and put back bit-for-bit if anything fails (an exception, a
non-finite key, target or update, a ``KeyboardInterrupt``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import __version__
from .context import context_templates
from .hparams import EditHParams, HParamsError, load_hparams, make_hparams, to_dict
from .keys import instance_keys_mean_and_history, keys_and_residual
from .models import get_adapter, load_model, weights_fingerprint
from .ops import apply_update_
from .requests import EditRequest, RequestError, from_easyedit, validate_requests
from .scoring import score_objects
from .solvers import CovarianceSolver, IdentityRomeSolver, NullSpaceSolver
from .targets import TargetConfig, TargetResult, optimize_targets

log = logging.getLogger("metake_fast")


class EditError(RuntimeError):
    """An edit batch failed; the model was rolled back to its state before the batch."""


@dataclass
class RequestReport:
    """Per request: probabilities of the new and old object before/after, and how much of the
    planned residual at the last edited layer the write realised (``realised``, 1.0 = all)."""

    index: int
    prompt: str
    subject: str
    target_new: str
    target_true: str | None
    p_new_pre: float
    p_new_post: float
    p_true_pre: float | None
    p_true_post: float | None
    realised: float
    target_nll: float
    target_steps: int
    fallback: bool = False  # MetaKE safeguard: the plain target was written for this request

    @property
    def success(self) -> bool:
        return self.p_true_post is None or self.p_new_post > self.p_true_post


def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _warn_unreached(report: EditReport, hp) -> None:
    """Log once per call when at least a fifth of the report's planned targets ran out of steps."""
    n = report.unreached
    if n and n >= max(2, len(report.requests) / 5):
        bad = sorted(r.target_nll for r in report.requests if r.target_nll > report.stop_nll)
        more = max(50, 2 * hp.v_num_grad_steps)
        hint = f" (e.g. to {more}: `--set v_num_grad_steps={more}` on the command line)"
        log.warning(
            "%d of %d planned targets stopped above the target NLL %g after v_num_grad_steps=%d (median %.2f "
            "per object token); their edits may not take. Objects of several tokens often need more steps: "
            "raise v_num_grad_steps%s",
            n, len(report.requests), report.stop_nll, hp.v_num_grad_steps, bad[len(bad) // 2], hint,
        )  # fmt: skip


@dataclass
class EditReport:
    """What :meth:`Editor.edit` did: per-request records, a time breakdown (seconds) and totals."""

    method: str
    requests: list[RequestReport] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    batches: int = 0
    running: dict | None = None
    stop_nll: float = 5e-2  # the target loop's per-request stop (hparams.early_stop_nll)

    @property
    def unreached(self) -> int:
        """Requests whose planned target stopped above ``stop_nll`` (the step budget ran out first)."""
        return sum(1 for r in self.requests if r.target_nll > self.stop_nll)

    @property
    def efficacy(self) -> float:
        """Share (0-1) of requests with P(new) > P(true) after the edit (or P(new) > 0.5 without a true object)."""
        if not self.requests:
            return float("nan")
        ok = [
            (r.p_new_post > r.p_true_post) if r.p_true_post is not None else r.p_new_post > 0.5 for r in self.requests
        ]
        return sum(ok) / len(ok)

    def summary(self) -> str:
        t = self.timing
        n = len(self.requests)
        return (
            f"{self.method}: {n} edits in {self.batches} batch(es); efficacy {100 * self.efficacy:.1f}%; "
            f"mean P(new) {_mean([r.p_new_pre for r in self.requests]):.3f} -> {_mean([r.p_new_post for r in self.requests]):.3f}; "
            f"realised {_mean([r.realised for r in self.requests]):.2f}; "
            f"targets unreached {self.unreached}/{n}; " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items())
        )

    def table(self, max_rows: int = 50) -> str:
        lines = [f"{'#':>4}  {'subject':24} {'new':16} {'P(new) pre→post':>17} {'P(true) pre→post':>17} {'real.':>5}"]
        for r in self.requests[:max_rows]:
            pt = f"{r.p_true_pre:.3f}→{r.p_true_post:.3f}" if r.p_true_pre is not None else "-"
            lines.append(
                f"{r.index:>4}  {r.subject[:24]:24} {r.target_new[:16]:16} {r.p_new_pre:.3f}→{r.p_new_post:.3f}".ljust(
                    64
                )
                + f" {pt:>17} {r.realised:5.2f}"
            )
        if len(self.requests) > max_rows:
            lines.append(f"... {len(self.requests) - max_rows} more")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "batches": self.batches,
            "efficacy": self.efficacy,
            "timing": self.timing,
            "running": self.running,
            "stop_nll": self.stop_nll,
            "unreached": self.unreached,
            "requests": [r.__dict__ for r in self.requests],
        }


class Editor:
    """Locate-then-edit with ROME, MEMIT, AlphaEdit or MetaKE on a transformers causal LM.

    model, tokenizer: a supported model (see :mod:`metake_fast.models`) and its tokenizer.
    method: ``"rome" | "memit" | "alphaedit" | "metake"``.
    hparams: a dataclass, a dict of fields, a YAML path, or None (the shipped file for
        ``model_name`` if any, else defaults with the documented layer rule).
    corpus: text for the key statistics (None: the shipped default corpus).
    cache: statistics cache (True: the user cache dir; a path; False: none).
    """

    def __init__(
        self,
        model,
        tokenizer,
        method: str = "alphaedit",
        hparams=None,
        *,
        model_name: str | None = None,
        corpus=None,
        cache=True,
        progress: bool = True,
    ):
        self.model = model
        self.tok = tokenizer
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.adapter = get_adapter(model)
        self.num_layers = self.adapter.num_layers(model)
        self.model_name = (
            model_name or getattr(model, "metake_name", None) or getattr(model.config, "_name_or_path", "model")
        )
        self.hparams = self._resolve_hparams(method, hparams)
        self.method = self.hparams.method
        self.corpus = corpus
        self.cache = cache
        self.progress = progress
        self.layers = list(self.hparams.layers)
        self._check_resident()
        self.fingerprint = weights_fingerprint(model)
        self._original = {layer: self.adapter.edit_weight(model, layer).detach().clone() for layer in self.layers}
        self._solvers: dict[int, object] = {}
        self.stats_seconds = 0.0
        self.history: list[EditRequest] = []

    def _check_resident(self) -> None:
        """Edited weights must live on a device: an offloaded one (``meta``) cannot be written in place."""
        for layer in self.layers:
            w = self.adapter.edit_weight(self.model, layer)
            if w.is_meta:
                raise EditError(
                    f"layer {layer}: {self.adapter.edit_module_name(layer)}.weight is offloaded (device_map 'disk' or "
                    "CPU offload) and cannot be edited in place; map the edited layers to a device (other layers "
                    "may stay offloaded)"
                )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = "smollm2-135m",
        method: str = "alphaedit",
        hparams=None,
        *,
        dtype="fp32",
        device="cpu",
        **kwargs,
    ) -> Editor:
        model, tok = load_model(name_or_path, dtype=dtype, device=device)
        return cls(model, tok, method, hparams, model_name=str(name_or_path), **kwargs)

    def _resolve_hparams(self, method, hparams) -> EditHParams:
        if isinstance(hparams, EditHParams):
            if hparams.method != str(method).lower() and method is not None:
                raise HParamsError(f"hparams are for {hparams.method!r}, method is {method!r}")
            hp = hparams
            if not hp.layers:
                from .hparams import default_layers

                hp.layers = default_layers(self.num_layers, hp.method)
            from .hparams import validate_hparams

            return validate_hparams(hp, num_layers=self.num_layers)
        if isinstance(hparams, dict):
            return load_hparams(method, self.model_name, num_layers=self.num_layers, overrides=hparams)
        return load_hparams(method, self.model_name, path=hparams, num_layers=self.num_layers)

    # ------------------------------------------------------------------ statistics and solvers
    def _ensure_solvers(self) -> None:
        if self._solvers:
            return
        from .stats import second_moment

        hp = self.hparams
        dt = torch.float64 if hp.solve_dtype == "float64" else torch.float32
        if self.method == "rome" and not hp.mom2_adjustment:
            # ROME without the covariance: direction k / (kᵀk); no statistics needed
            for layer in self.layers:
                self._solvers[layer] = IdentityRomeSolver(
                    self.adapter.key_dim(self.model, layer), layer=layer, dtype=dt
                )
            return
        t0 = time.perf_counter()
        moments = second_moment(
            self.model, self.tok, self.layers, self.corpus, tokens=hp.stats_tokens, max_length=hp.stats_max_length,
            dtype=hp.stats_dtype, cache=self.cache, progress=self.progress,
        )  # fmt: skip
        self.stats_seconds += time.perf_counter() - t0
        for layer in self.layers:
            C = moments[layer].mean
            if self.method in ("rome", "memit") or (self.method == "metake" and hp.base_solver == "memit"):
                lam = getattr(hp, "mom2_update_weight", 1.0)
                self._solvers[layer] = CovarianceSolver(C, lam, layer=layer, dtype=dt)
            else:
                self._solvers[layer] = NullSpaceSolver(
                    C, hp.nullspace_threshold, hp.L2, history_scale=hp.history_scale, layer=layer, dtype=dt
                )

    # ------------------------------------------------------------------ editing
    def edit(
        self,
        requests: Sequence[EditRequest | dict] | None = None,
        *,
        batch_size: int = 100,
        prompts=None,
        target_new=None,
        subject=None,
        ground_truth=None,
        score: bool = True,
        track: bool = False,
    ) -> EditReport:
        """Apply ``requests`` in sequential batches of ``batch_size``; returns an :class:`EditReport`.

        EasyEdit-style keyword lists (``prompts``, ``target_new``, ``subject``,
        ``ground_truth``) are accepted instead of ``requests``. All requests are
        validated before any weight changes; each batch is applied atomically.
        ``track=True`` also scores every edit made so far by this editor (all calls)
        after the last batch and puts the running efficacy in ``report.running``, so
        a collapse over many sequential calls is visible as it happens.
        """
        if requests is None:
            if prompts is None:
                raise RequestError(None, "no requests given", code="missing")
            requests = from_easyedit(prompts, target_new, subject, ground_truth)
        elif prompts is not None:
            raise RequestError(None, "give either requests or prompts/target_new/subject, not both", code="type")
        if isinstance(requests, (EditRequest, dict)):
            requests = [requests]
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise RequestError(None, f"batch_size must be a positive integer, got {batch_size!r}", code="batch_size")
        reqs = validate_requests(requests, self.tok)
        self._check_resident()
        report = EditReport(self.method, stop_nll=self.hparams.early_stop_nll)
        if not reqs:
            return report
        timing = {"stats": 0.0, "keys": 0.0, "targets": 0.0, "solve": 0.0, "apply": 0.0, "score": 0.0}
        s0 = self.stats_seconds
        self._ensure_solvers()
        timing["stats"] = self.stats_seconds - s0

        t0 = time.perf_counter()
        pre = self._score(reqs) if score else None
        timing["score"] += time.perf_counter() - t0
        batch_info: list[tuple[TargetResult, torch.Tensor]] = []
        nb = (len(reqs) + batch_size - 1) // batch_size
        bar = tqdm(total=len(reqs), desc=f"{self.method} edits", unit="edit", disable=not self.progress)
        try:
            for b in range(nb):
                part = reqs[b * batch_size : (b + 1) * batch_size]
                batch_info.append(self._edit_batch_atomic(part, timing))
                self.history.extend(part)  # a later batch failing leaves this one applied: keep it on record
                bar.update(len(part))
        finally:
            bar.close()
        t0 = time.perf_counter()
        post = self._score(reqs) if score else None
        timing["score"] += time.perf_counter() - t0
        i = 0
        for tres, realised, fallback in batch_info:
            for j in range(tres.delta.shape[0]):
                r = reqs[i]
                report.requests.append(
                    RequestReport(
                        index=i, prompt=r.text(), subject=r.subject, target_new=r.target_new, target_true=r.target_true,
                        p_new_pre=pre[0][i] if pre else float("nan"), p_new_post=post[0][i] if post else float("nan"),
                        p_true_pre=pre[1][i] if pre and r.target_true else None,
                        p_true_post=post[1][i] if post and r.target_true else None,
                        realised=float(realised[j]), target_nll=float(tres.nll[j]), target_steps=int(tres.steps[j]),
                        fallback=bool(fallback[j]),
                    )
                )  # fmt: skip
                i += 1
        report.batches = nb
        _warn_unreached(report, self.hparams)
        if track:
            t0 = time.perf_counter()
            p_new, p_true = self._score(self.history)
            ok = [pn > pt for pn, pt in zip(p_new, p_true) if pt is not None]
            report.running = {
                "edits": len(self.history),
                "efficacy": sum(ok) / len(ok) if ok else float("nan"),
                "mean_p_new": _mean(p_new),
            }
            timing["score"] += time.perf_counter() - t0
        report.timing = timing
        return report

    def _score(self, reqs: list[EditRequest]) -> tuple[list[float], list[float | None]]:
        lp_new, lp_true = self._rewrite_logprobs(reqs)
        p_true = [float(v) if r.target_true else None for r, v in zip(reqs, lp_true.exp())]
        return lp_new.exp().tolist(), p_true

    def _rewrite_logprobs(self, reqs: list[EditRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log P(new), log P(true))`` (each (u,)) on each request's own prompt; NaN where no true object."""
        prompts = [r.text() for r in reqs]
        lp_new = score_objects(self.model, self.tok, prompts, [r.target_new for r in reqs]).logprob
        lp_true = torch.full_like(lp_new, float("nan"))
        with_true = [i for i, r in enumerate(reqs) if r.target_true]
        if with_true:
            lp_true[torch.tensor(with_true)] = score_objects(
                self.model, self.tok, [prompts[i] for i in with_true], [reqs[i].target_true for i in with_true]
            ).logprob
        return lp_new, lp_true

    def _snapshot(self):
        weights = {layer: self.adapter.edit_weight(self.model, layer).detach().clone() for layer in self.layers}
        solvers = {layer: s.state_dict() for layer, s in self._solvers.items() if hasattr(s, "add_history")}
        return weights, solvers

    def _rollback(self, snap) -> None:
        weights, solvers = snap
        with torch.no_grad():
            for layer, w in weights.items():
                self.adapter.edit_weight(self.model, layer).copy_(w)
        for layer, state in solvers.items():
            self._solvers[layer].load_state_dict(state)

    def _edit_batch_atomic(self, reqs: list[EditRequest], timing: dict):
        snap = self._snapshot()
        try:
            return self._edit_batch(reqs, timing)
        except BaseException as exc:
            self._rollback(snap)
            if isinstance(exc, (KeyboardInterrupt, EditError)):
                raise
            raise EditError(f"edit batch failed and was rolled back: {type(exc).__name__}: {exc}") from exc

    def _target_config(self) -> TargetConfig:
        hp = self.hparams
        return TargetConfig(
            steps=hp.v_num_grad_steps, lr=hp.v_lr, weight_decay=hp.v_weight_decay,
            clamp_norm_factor=hp.clamp_norm_factor, kl_factor=hp.kl_factor, early_stop_nll=hp.early_stop_nll,
            chunk_tokens=hp.target_chunk_tokens,
        )  # fmt: skip

    def _templates(self):
        hp = self.hparams
        return context_templates(
            self.model, self.tok, hp.context_template_count, hp.context_template_length, hp.context_template_seed,
            groups=hp.context_template_length_params,
        )  # fmt: skip

    def _edit_batch(self, reqs: list[EditRequest], timing: dict):
        """Targets at the last layer, then the write (multi-layer for MEMIT/AlphaEdit)."""
        templates = self._templates()
        L = self.layers[-1]
        t0 = time.perf_counter()
        tres = optimize_targets(
            self.model, self.tok, self.adapter, reqs, L, templates, self._target_config(), progress=self.progress,
            keep_problems=self.method == "metake",
        )  # fmt: skip
        timing["targets"] += time.perf_counter() - t0
        dev = self.adapter.edit_weight(self.model, L).device
        Z = (tres.h + tres.delta).T.to(dev)  # (d_v, u)
        fallback = torch.zeros(len(reqs), dtype=torch.bool)
        if self.method == "metake":
            from .metake import refine_targets, safeguarded_write

            t0 = time.perf_counter()
            try:
                Z_meta = refine_targets(self, reqs, templates, tres, timing).to(dev)
            finally:
                tres.problems = None  # their KV caches must not outlive the batch (tres stays in the report)
            timing["targets"] += time.perf_counter() - t0
            if self.hparams.safeguard:
                fallback = safeguarded_write(self, reqs, templates, Z, Z_meta, timing)
            else:
                self._write(reqs, templates, Z_meta, timing)
        else:
            self._write(reqs, templates, Z, timing)
        # realised share of the planned residual at L (one forward over the bare prompts)
        t0 = time.perf_counter()
        _, H_post = keys_and_residual(self.model, self.tok, self.adapter, reqs, None, L, [["{}"]])
        R = tres.delta.T.to(H_post.device)
        realised = ((H_post - tres.h.T.to(H_post.device)) * R).sum(0) / R.pow(2).sum(0).clamp_min(1e-12)
        timing["keys"] += time.perf_counter() - t0
        return tres, realised.cpu(), fallback

    def _write(self, reqs, templates, Z: torch.Tensor, timing: dict) -> None:
        """Write targets ``Z`` (d_v, u) at the last edited layer with the method's solver."""
        layers = self.layers
        L = layers[-1]
        m = len(layers)
        keys_used = {}
        context_history = getattr(self.hparams, "history_keys", "mean") == "contexts"
        for j, layer in enumerate(layers):
            t0 = time.perf_counter()
            if context_history:
                # every prompt's own key: the mean is the write's key, the scaled columns the history's
                K_all, H_cur = keys_and_residual(
                    self.model, self.tok, self.adapter, reqs, layer, L, templates, per_instance=True
                )
                K, K_hist = instance_keys_mean_and_history(K_all, templates, len(reqs))
            else:
                K, H_cur = keys_and_residual(self.model, self.tok, self.adapter, reqs, layer, L, templates)
                K_hist = K
            timing["keys"] += time.perf_counter() - t0
            if not torch.isfinite(K).all():
                col = int((~torch.isfinite(K).all(0)).nonzero()[0])
                raise EditError(f"request {col}: non-finite key at layer {layer}")
            R = (Z - H_cur) / (m - j)
            t0 = time.perf_counter()
            W = self.adapter.edit_weight(self.model, layer)
            solver = self._solvers[layer]
            if self.method == "rome":
                Y = solver.rome(K).to(W.device)
                timing["solve"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                transposed = self.adapter.transposed
                W_start = W.detach().float().clone()
                Kd = K.to(W.device)
                for i in range(K.shape[1]):
                    # sequential rank-one writes: each sees the residual left by the previous ones
                    k = Kd[:, i : i + 1]
                    moved = ((W.float() - W_start).T @ k) if transposed else ((W.float() - W_start) @ k)
                    r = R[:, i : i + 1].to(W.device) - moved
                    self._check_finite(r, layer, "residual")
                    apply_update_(W, r, Y[:, i : i + 1], transposed)
            else:
                if isinstance(solver, CovarianceSolver):
                    Y, _G = solver.memit(K)
                else:
                    Y, _G = solver.solve(K)
                Y = Y.to(W.device)
                timing["solve"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                self._check_finite(Y, layer, "update")
                self._check_finite(R, layer, "residual")
                apply_update_(W, R.to(W.device), Y, self.adapter.transposed)
            keys_used[layer] = K_hist
            if not torch.isfinite(W).all():
                raise EditError(f"layer {layer}: the update made the weight non-finite")
            timing["apply"] += time.perf_counter() - t0
        for layer, K in keys_used.items():
            solver = self._solvers[layer]
            if hasattr(solver, "add_history"):
                solver.add_history(K)

    @staticmethod
    def _check_finite(t: torch.Tensor, layer: int, what: str) -> None:
        if not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).nonzero()[0].tolist()
            raise EditError(f"layer {layer}: non-finite {what} (request {bad[-1]})")

    # ------------------------------------------------------------------ restore / deltas
    def restore(self) -> None:
        """Put every edited weight back bit-for-bit and forget the edit history."""
        with torch.no_grad():
            for layer, w in self._original.items():
                self.adapter.edit_weight(self.model, layer).copy_(w)
        self._solvers = {}
        self.history = []

    def weight_deltas(self) -> dict[int, torch.Tensor]:
        """``{layer: W_now - W_original}`` in float32, in the stored orientation."""
        return {
            layer: self.adapter.edit_weight(self.model, layer).detach().float() - w.float()
            for layer, w in self._original.items()
        }

    def save_delta(self, path) -> None:
        """Write the edits as safetensors (never pickle) with provenance (see :mod:`metake_fast.delta`)."""
        from .delta import save_delta

        save_delta(self, path)

    def save_checkpoint(self, path, extra: dict | None = None) -> None:
        """Write the full editing state (weights, solver state, requests) to resume later
        (see :mod:`metake_fast.checkpoint`); ``extra``: JSON-able data stored with it."""
        from .checkpoint import save_checkpoint

        save_checkpoint(self, path, extra)

    def load_checkpoint(self, path) -> dict:
        """Restore a :meth:`save_checkpoint` state (same model, method, hparams); returns its ``extra``."""
        from .checkpoint import load_checkpoint

        return load_checkpoint(self, path)

    def load_delta(self, path) -> None:
        from .delta import load_delta

        load_delta(self, path)

    @property
    def hparams_source(self) -> str:
        """Where the hyperparameters came from (a file, a shipped file, defaults, + overrides), as
        :func:`~metake_fast.hparams.load_hparams` recorded it; ``"given"`` for a dataclass built elsewhere."""
        return getattr(self.hparams, "source", "given")

    def describe(self) -> dict:
        return {
            "method": self.method,
            "model": self.model_name,
            "fingerprint": self.fingerprint,
            "hparams": to_dict(self.hparams),
            "hparams_source": self.hparams_source,
            "version": __version__,
            "requests": [r.to_dict() for r in self.history],
        }

    def describe_json(self) -> str:
        return json.dumps(self.describe())


__all__ = ["EditError", "EditReport", "Editor", "RequestReport", "make_hparams"]
