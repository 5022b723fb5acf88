"""Closed-form lower-level solvers: ROME, MEMIT and AlphaEdit (see docs/METHOD.md).

Pure tensor math, no model code. Every solver returns the weight update in
low-rank factor form::

    ΔW = R Yᵀ        R: (d_v, u) planned residuals (the caller's),  Y: (d_k, u) (the solver's)

so the caller applies it with a single ``W += R Yᵀ``. Batched solvers also return
the *gate* ``G = Yᵀ K`` (u, u), what the solver actually realises on the edit keys:
``ΔW K = R G``. ``G`` is symmetric in exact arithmetic (``Yᵀ K = Kᵀ Y``); it is
computed as ``Yᵀ K`` so that ``ΔW K = R G`` holds to rounding.

The math runs in ``dtype`` (float64 by default, float32 optional); inputs may be
fp32 / bf16 / fp16. Outputs are converted to ``out_dtype`` (float32 by default,
``None`` keeps the solve dtype). Everything stays on the device of ``C``.
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = [
    "CovarianceSolver",
    "NullSpaceSolver",
    "SolverError",
    "SolverWarning",
    "cholesky_factor",
    "cholesky_rank_update",
    "gate_eigenvalues",
]


class SolverError(RuntimeError):
    """A solve failed: non-finite input, or a matrix that stays singular after jitter."""


class SolverWarning(RuntimeWarning):
    """A factorisation needed diagonal jitter (matrix not PD or badly conditioned)."""


def _where(layer) -> str:
    return f"layer {layer}: " if layer is not None else ""


def _check_finite(x: torch.Tensor, what: str, layer=None, *, columns: bool = False) -> None:
    """Raise :class:`SolverError` if ``x`` has a NaN/Inf (naming the first bad column if ``columns``)."""
    if x.numel() == 0:
        return
    ok = torch.isfinite(x)
    if bool(ok.all()):
        return
    if columns and x.dim() == 2:
        bad = (~ok.all(dim=0)).nonzero().flatten().tolist()
        shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
        raise SolverError(f"{_where(layer)}non-finite {what} in column(s) {shown} (of {x.shape[1]})")
    raise SolverError(f"{_where(layer)}non-finite values in {what}")


def _default_max_cond(dtype: torch.dtype) -> float:
    return 1e-2 / torch.finfo(dtype).eps  # ~4.5e13 in float64, ~8.4e4 in float32


def _cond_estimate(L: torch.Tensor) -> float:
    """Cheap lower bound on cond(L Lᵀ): (max diag L / min diag L)²."""
    d = L.detach().diagonal().abs()
    lo = float(d.min())
    if lo == 0.0 or not math.isfinite(lo):
        return math.inf
    return (float(d.max()) / lo) ** 2


def cholesky_factor(
    A: torch.Tensor,
    *,
    layer=None,
    max_jitter: float = 1e-2,
    max_cond: float | None = None,
) -> torch.Tensor:
    """Lower Cholesky factor ``L`` of a symmetric PSD matrix, ``L Lᵀ = A (+ jitter·I)``.

    Args:
        A: (n, n) symmetric, floating; factorised in its own dtype and device
            (only the lower triangle is read).
        layer: name used in warnings / errors.
        max_jitter: largest diagonal jitter tried, relative to ``mean(diag A)``.
        max_cond: condition-number threshold on the cheap estimate
            ``(max diag L / min diag L)²``; default ``1e-2 / eps(dtype)``.

    Returns:
        L: (n, n) lower triangular, same dtype/device as ``A``.

    If ``A`` is not numerically PD or its condition estimate exceeds ``max_cond``,
    jitter ``ε·mean(diag A)·I`` is added with ``ε = 10·eps, 100·eps, …`` up to
    ``max_jitter`` and a :class:`SolverWarning` names the layer and the condition
    estimate. Raises :class:`SolverError` on non-finite input or if no jitter works.
    """
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"{_where(layer)}expected a square matrix, got shape {tuple(A.shape)}")
    if not A.is_floating_point() or A.dtype in (torch.float16, torch.bfloat16):
        A = A.to(torch.float32)
    n = A.shape[0]
    if n == 0:
        return A.new_zeros(0, 0)
    _check_finite(A, "matrix", layer)
    if max_cond is None:
        max_cond = _default_max_cond(A.dtype)

    L, info = torch.linalg.cholesky_ex(A)
    cond = _cond_estimate(L) if int(info) == 0 else math.inf
    if cond <= max_cond:
        return L

    scale = float(A.diagonal().mean())
    if not scale > 0.0:
        scale = float(A.diagonal().abs().max()) or 1.0
    eps = torch.finfo(A.dtype).eps
    rel = 10.0 * eps
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    while rel <= max_jitter * (1 + 1e-9):
        L, info = torch.linalg.cholesky_ex(A + (rel * scale) * eye)
        new_cond = _cond_estimate(L) if int(info) == 0 else math.inf
        if new_cond <= max_cond:
            before = "not positive definite" if math.isinf(cond) else f"condition estimate {cond:.3g}"
            warnings.warn(
                f"{_where(layer)}matrix ({n}x{n}) {before}; added diagonal jitter "
                f"{rel:.1e}·mean(diag) = {rel * scale:.3g} (condition estimate now {new_cond:.3g})",
                SolverWarning,
                stacklevel=2,
            )
            return L
        rel *= 10.0
    raise SolverError(
        f"{_where(layer)}matrix ({n}x{n}) is singular or too badly conditioned "
        f"(condition estimate {cond:.3g}) even with jitter {max_jitter:.1e}·mean(diag)"
    )


def cholesky_rank_update(L: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Rank-``u`` Cholesky update: ``L2 L2ᵀ = L Lᵀ + V Vᵀ`` in ``O(r² u)``.

    Args:
        L: (r, r) lower triangular with positive diagonal (a Cholesky factor).
        V: (r, u) update vectors (converted to ``L``'s dtype and device).

    Returns:
        L2: (r, r) lower triangular with positive diagonal, ``L``'s dtype; ``L``
        is not modified.

    Column ``k`` of the factor and ``V`` form an (r-k) × (1+u) block whose row ``k``
    is ``[L_kk, V_k:]``; a Householder reflection (orthogonal on the right, so the
    Gram matrix of the rows is unchanged) maps that row onto ``[‖·‖, 0, …, 0]``
    and is applied to the trailing rows — one mat-vec and one rank-one update per
    column, vectorised over ``u``. No refactorisation.
    """
    if L.dim() != 2 or L.shape[0] != L.shape[1]:
        raise ValueError(f"L must be square, got {tuple(L.shape)}")
    if V.dim() == 1:
        V = V.unsqueeze(1)
    r = L.shape[0]
    if V.shape[0] != r:
        raise ValueError(f"V must have {r} rows, got {tuple(V.shape)}")
    L2 = L.clone()
    if V.shape[1] == 0 or r == 0:
        return L2
    W = V.to(dtype=L.dtype, device=L.device, copy=True)
    for k in range(r):
        lk = L2[k:, k]  # view: column k, rows k..r-1
        Vk = W[k:]  # view: rows k..r-1 of V
        x0 = lk[0].clone()
        v = Vk[0].clone()
        nv2 = v @ v
        norm = torch.sqrt(x0 * x0 + nv2)
        # Householder vector w = x - ‖x‖ e₁ with w₀ computed without cancellation (x0 > 0).
        w0 = -nv2 / (x0 + norm)
        wtw = w0 * w0 + nv2
        beta = torch.where(wtw > 0, 2.0 / torch.where(wtw > 0, wtw, torch.ones_like(wtw)), torch.zeros_like(wtw))
        s = beta * (lk * w0 + Vk @ v)  # (r-k,)
        lk.sub_(s * w0)
        Vk.sub_(torch.outer(s, v))
        lk[0] = norm  # exact values for the reduced row
        Vk[0].zero_()
    return L2


def gate_eigenvalues(G: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (ascending, float64) of the symmetrised gate ``(G + Gᵀ)/2``; G: (u, u).

    For the AlphaEdit / MEMIT gates they lie in ``[0, 1)``.
    """
    G = G.detach().to(torch.float64)
    return torch.linalg.eigvalsh(0.5 * (G + G.T))


def _prep_keys(K: torch.Tensor, d_k: int, dtype: torch.dtype, device: torch.device, layer) -> torch.Tensor:
    if K.dim() == 1:
        K = K.unsqueeze(1)
    if K.dim() != 2 or K.shape[0] != d_k:
        raise ValueError(f"{_where(layer)}keys must be (d_k={d_k}, u), got {tuple(K.shape)}")
    _check_finite(K, "key", layer, columns=True)
    return K.to(dtype=dtype, device=device)


def _out(x: torch.Tensor, out_dtype: torch.dtype | None) -> torch.Tensor:
    return x if out_dtype is None else x.to(out_dtype)


def _woodbury_core(L: torch.Tensor, Kt: torch.Tensor, lam: float, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """``X = (L Lᵀ)⁻¹ Kt (lam·I + Ktᵀ (L Lᵀ)⁻¹ Kt)⁻¹`` and ``Ktᵀ X``.

    Two triangular solves against the cached factor and one u×u Cholesky solve.
    L: (n, n), Kt: (n, u). Returns X (n, u) and Ktᵀ X (u, u).
    """
    B = torch.linalg.solve_triangular(L, Kt, upper=False)  # L⁻¹ Kt
    M = B.T @ B  # Ktᵀ A⁻¹ Kt
    u = Kt.shape[1]
    S = M + lam * torch.eye(u, dtype=M.dtype, device=M.device)
    Ls = cholesky_factor(S, layer=layer)
    Z = torch.linalg.solve_triangular(L.T, B, upper=True)  # A⁻¹ Kt
    X = torch.cholesky_solve(Z.T, Ls).T  # Z S⁻¹ (S symmetric)
    return X, X.T @ Kt


class _LayerSolver:
    """What both per-layer solvers share: validation of ``C``, dtypes, device and key preparation."""

    def _init_layer(self, C: torch.Tensor, layer, dtype: torch.dtype, out_dtype: torch.dtype | None) -> torch.Tensor:
        """Validate ``C`` and return it symmetrised in the solve dtype."""
        if C.dim() != 2 or C.shape[0] != C.shape[1]:
            raise ValueError(f"{_where(layer)}C must be square, got {tuple(C.shape)}")
        _check_finite(C, "second moment C", layer)
        self.layer = layer
        self.dtype = dtype
        self.out_dtype = out_dtype
        self.device = C.device
        self.d_k = C.shape[0]
        Cd = C.to(dtype)
        return 0.5 * (Cd + Cd.T)

    def _keys(self, K: torch.Tensor) -> torch.Tensor:
        return _prep_keys(K, self.d_k, self.dtype, self.device, self.layer)


def _rank_one_columns(U: torch.Tensor, denom: torch.Tensor, layer) -> torch.Tensor:
    """ROME's ``Y_i = u_i / (u_iᵀ k_i)`` given the directions ``U`` and ``u_iᵀ k_i`` (zero: a zero key)."""
    if not bool((denom > 0).all()):
        bad = (denom <= 0).nonzero().flatten().tolist()
        raise SolverError(f"{_where(layer)}zero key in column(s) {bad}")
    return U / denom


class CovarianceSolver(_LayerSolver):
    """ROME / MEMIT solves for one layer against a cached Cholesky factor of ``C``.

    Args:
        C: (d_k, d_k) mean uncentered second moment of keys (any float dtype).
        lam: MEMIT weight λ on ``C`` (≈1.5e4–2e4 with ``C`` the mean).
        layer: name used in warnings / errors.
        dtype: solve dtype (float64 default, float32 optional).
        out_dtype: dtype of returned ``Y`` / ``G`` (float32 default; ``None`` = ``dtype``).
    """

    def __init__(
        self,
        C: torch.Tensor,
        lam: float,
        *,
        layer=None,
        dtype: torch.dtype = torch.float64,
        out_dtype: torch.dtype | None = torch.float32,
    ):
        Cd = self._init_layer(C, layer, dtype, out_dtype)
        self.lam = float(lam)
        self.L = cholesky_factor(Cd, layer=layer)  # (d_k, d_k) lower, chol(C)

    def rome(self, K: torch.Tensor) -> torch.Tensor:
        """Column-wise rank-one ROME: ``Y_i = C⁻¹k_i / (k_iᵀ C⁻¹ k_i)``, each request independent.

        K: (d_k, u) keys. Returns Y: (d_k, u) in ``out_dtype``. With ``R = v* − W K``
        the update ``R_i Y_iᵀ`` realises ``(W + ΔW) k_i = v*_i`` for one request.
        """
        K = self._keys(K)
        if K.shape[1] == 0:
            return _out(K.new_zeros(self.d_k, 0), self.out_dtype)
        B = torch.linalg.solve_triangular(self.L, K, upper=False)  # L⁻¹K
        denom = (B * B).sum(dim=0)  # k_iᵀ C⁻¹ k_i
        U = torch.linalg.solve_triangular(self.L.T, B, upper=True)  # C⁻¹K
        return _out(_rank_one_columns(U, denom, self.layer), self.out_dtype)

    def memit(self, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MEMIT: ``Y = (λC + KKᵀ)⁻¹ K`` by Woodbury, ``C⁻¹K (λI + KᵀC⁻¹K)⁻¹``.

        K: (d_k, u). Returns Y: (d_k, u) and the gate G = Yᵀ K: (u, u), both in
        ``out_dtype``; ``ΔW = R Yᵀ`` satisfies ``ΔW (λC + KKᵀ) = R Kᵀ``.
        Cost: two triangular solves (d_k² u) plus one u×u Cholesky solve.
        """
        K = self._keys(K)
        u = K.shape[1]
        if u == 0:
            return _out(K.new_zeros(self.d_k, 0), self.out_dtype), _out(K.new_zeros(0, 0), self.out_dtype)
        Y, G = _woodbury_core(self.L, K, self.lam, self.layer)
        return _out(Y, self.out_dtype), _out(G, self.out_dtype)


class IdentityRomeSolver:
    """ROME without the covariance (``mom2_adjustment: false``): ``Y_i = k_i / (k_iᵀ k_i)``, which is
    :meth:`CovarianceSolver.rome` with ``C = I`` but keeps no ``d_k × d_k`` state and needs no
    statistics. Solves on the keys' device."""

    def __init__(
        self, d_k: int, *, layer=None, dtype: torch.dtype = torch.float64, out_dtype: torch.dtype | None = torch.float32
    ):
        self.d_k, self.layer, self.dtype, self.out_dtype = int(d_k), layer, dtype, out_dtype

    def rome(self, K: torch.Tensor) -> torch.Tensor:
        K = _prep_keys(K, self.d_k, self.dtype, K.device, self.layer)
        if K.shape[1] == 0:
            return _out(K.new_zeros(self.d_k, 0), self.out_dtype)
        return _out(_rank_one_columns(K, (K * K).sum(dim=0), self.layer), self.out_dtype)


def _history_scale(mu, layer) -> float:
    if not (math.isfinite(mu) and mu > 0):
        raise ValueError(f"{_where(layer)}history_scale must be a finite number > 0, got {mu!r}")
    return float(mu)


class NullSpaceSolver(_LayerSolver):
    """AlphaEdit null-space constrained solve for one layer, sequential over batches.

    ``U0`` (d_k, r): eigenvectors of ``C`` with eigenvalue ``< threshold`` (the
    threshold applies to ``C`` as given; normalise ``C`` beforehand if needed).
    ``A = μ U0ᵀ K_p K_pᵀ U0 + λ I_r`` is kept as its Cholesky factor, starting at
    ``sqrt(λ) I_r``, and grows by :meth:`add_history` with rank-``u`` updates.

    Args:
        C: (d_k, d_k) second moment of keys (any float dtype).
        threshold: eigenvalue threshold τ for the null space.
        lam: λ_a (10 in the reference code).
        history_scale: μ, the weight of the earlier edits' term ``μ‖ΔW K_p‖²`` in the
            objective (1 in AlphaEdit; larger protects earlier edits more).
        layer: name used in warnings / errors.
        dtype: solve dtype (float64 default, float32 optional).
        out_dtype: dtype of returned ``Y`` / ``G`` (float32 default; ``None`` = ``dtype``).
    """

    def __init__(
        self,
        C: torch.Tensor,
        threshold: float = 2e-2,
        lam: float = 10.0,
        *,
        history_scale: float = 1.0,
        layer=None,
        dtype: torch.dtype = torch.float64,
        out_dtype: torch.dtype | None = torch.float32,
    ):
        Cd = self._init_layer(C, layer, dtype, out_dtype)
        self.threshold = float(threshold)
        self.lam = float(lam)
        self.history_scale = _history_scale(history_scale, layer)
        evals, evecs = torch.linalg.eigh(Cd)
        self.U0 = evecs[:, evals < self.threshold].contiguous()  # (d_k, r)
        r = self.U0.shape[1]
        self.L_A = math.sqrt(self.lam) * torch.eye(r, dtype=dtype, device=self.device)  # chol(A)
        self.n_history = 0

    @property
    def rank(self) -> int:
        """r, the dimension of the null space."""
        return self.U0.shape[1]

    @property
    def projector(self) -> torch.Tensor:
        """P = U0 U0ᵀ: (d_k, d_k) in the solve dtype."""
        return self.U0 @ self.U0.T

    def solve(self, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``Y = U0 (A + K̃K̃ᵀ)⁻¹ K̃`` with ``K̃ = U0ᵀK``, by Woodbury ``A⁻¹K̃ (I + K̃ᵀA⁻¹K̃)⁻¹``.

        K: (d_k, u). Returns Y: (d_k, u) and the gate G = Yᵀ K = K̃ᵀ(A + K̃K̃ᵀ)⁻¹K̃:
        (u, u), both in ``out_dtype``. ``ΔW = R Yᵀ`` is AlphaEdit's
        ``R Kᵀ P (P M P + λ I)⁻¹`` with ``M = μK_pK_pᵀ + KKᵀ``. Does not change the history.
        """
        K = self._keys(K)
        u = K.shape[1]
        if u == 0:
            return _out(K.new_zeros(self.d_k, 0), self.out_dtype), _out(K.new_zeros(0, 0), self.out_dtype)
        if self.rank == 0:
            return _out(K.new_zeros(self.d_k, u), self.out_dtype), _out(K.new_zeros(u, u), self.out_dtype)
        Kt = self.U0.T @ K  # (r, u)
        X, G = _woodbury_core(self.L_A, Kt, 1.0, self.layer)
        return _out(self.U0 @ X, self.out_dtype), _out(G, self.out_dtype)

    def history_gram(self, K: torch.Tensor) -> torch.Tensor:
        """``H_p = Yᵀ K_p K_pᵀ Y`` (u, u) in the solve dtype, for ``Y`` of :meth:`solve` on keys ``K``.

        ``‖ΔW K_p‖²_F = tr(R H_p Rᵀ)`` (``ΔW = R Yᵀ``) is how far a write of residuals ``R``
        moves the outputs on the keys of every earlier edit (unweighted by μ). The keys are
        not stored: ``μU0ᵀK_pK_pᵀU0 = A − λI`` with ``A = L_A L_Aᵀ``, so
        ``H_p = ((L_AᵀX)ᵀ(L_AᵀX) − λXᵀX)/μ``, ``X = U0ᵀY``.
        """
        K = self._keys(K)
        u = K.shape[1]
        if u == 0 or self.rank == 0:
            return K.new_zeros(u, u)
        X, _ = _woodbury_core(self.L_A, self.U0.T @ K, 1.0, self.layer)
        T = self.L_A.T @ X
        return (T.T @ T - self.lam * (X.T @ X)) / self.history_scale

    def add_history(self, K: torch.Tensor) -> None:
        """``A ← A + μK̃K̃ᵀ`` (K̃ = U0ᵀK, K: (d_k, u) keys of a finished batch) by a rank-u update."""
        K = self._keys(K)
        if K.shape[1] == 0 or self.rank == 0:
            return
        self.L_A = cholesky_rank_update(self.L_A, math.sqrt(self.history_scale) * (self.U0.T @ K))
        self.n_history += K.shape[1]

    def set_history_scale(self, history_scale: float) -> None:
        """Re-weight the history already accumulated: ``A ← (μ'/μ)(A − λI) + λI``, then ``μ = μ'``.

        The same state as a solver built with ``μ'`` that saw the same batches (up to rounding)."""
        history_scale = _history_scale(history_scale, self.layer)
        if self.rank > 0 and self.n_history > 0:
            eye = torch.eye(self.rank, dtype=self.dtype, device=self.device)
            A = self.L_A @ self.L_A.T
            A = (history_scale / self.history_scale) * (A - self.lam * eye) + self.lam * eye
            self.L_A = torch.linalg.cholesky(0.5 * (A + A.T))
        self.history_scale = history_scale

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only: ``U0``, ``L_A`` and 0-d tensors ``lam``, ``history_scale``, ``threshold``, ``n_history``."""
        return {
            "U0": self.U0,
            "L_A": self.L_A,
            "lam": torch.tensor(self.lam, dtype=torch.float64),
            "history_scale": torch.tensor(self.history_scale, dtype=torch.float64),
            "threshold": torch.tensor(self.threshold, dtype=torch.float64),
            "n_history": torch.tensor(self.n_history, dtype=torch.int64),
        }

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict` (tensors moved to this solver's device and dtype)."""
        U0 = d["U0"].to(dtype=self.dtype, device=self.device)
        L_A = d["L_A"].to(dtype=self.dtype, device=self.device)
        if U0.shape[0] != self.d_k or L_A.shape != (U0.shape[1], U0.shape[1]):
            raise ValueError(
                f"{_where(self.layer)}state shapes U0 {tuple(U0.shape)}, L_A {tuple(L_A.shape)} do not fit d_k={self.d_k}"
            )
        self.U0 = U0
        self.L_A = L_A
        self.lam = float(d["lam"])
        self.history_scale = float(d["history_scale"]) if "history_scale" in d else 1.0
        self.threshold = float(d["threshold"])
        self.n_history = int(d["n_history"]) if "n_history" in d else 0
