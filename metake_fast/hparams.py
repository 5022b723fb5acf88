"""Typed hyperparameters per method, YAML files per method and model, validated on load.

Files live in ``metake_fast/hparams/<method>/<model>.yaml``. EasyEdit field
names are accepted (``layers``, ``v_num_grad_steps``, ``v_lr``,
``clamp_norm_factor``, ``kl_factor``, ``mom2_update_weight``,
``nullspace_threshold``, ``L2``, ``mom2_n_samples``, ...); unknown fields,
wrong types, NaN/inf and out-of-range values are errors naming the field.

For a model without a file, :func:`default_layers` picks the edited layers by
a rule that works from 2-layer test models to 80-layer models: a band of up to
five consecutive layers ending at ~27% of the depth (Llama-3-8B: 4-8, GPT-J
3-8 in the published settings), leaving at least one layer above it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

import yaml

METHODS = ("rome", "memit", "alphaedit", "metake")


class HParamsError(ValueError):
    """Invalid hyperparameters (the message names the field)."""


@dataclass
class EditHParams:
    """Settings shared by every method.

    layers: edited layers (ascending). Targets are optimised at the last one.
    v_num_grad_steps / v_lr / v_weight_decay / clamp_norm_factor / kl_factor:
        target optimisation (METHOD.md "Target (z) optimisation").
    early_stop_nll: a request stops optimising once its mean target NLL is below this.
    context_template_count / context_template_length: generated context prefixes.
    context_template_length_params: the EasyEdit / ROME form of the prefixes, a list of
        ``[length, count]`` pairs, one group of ``count`` prefixes of ``length`` tokens per pair
        (ROME's published ``[[5, 10], [10, 10]]``); when given it replaces
        ``context_template_count`` / ``context_template_length``. Empty (default): one group.
    context_template_seed: seed of their sampling (0 as shipped). Another seed gives another
        set of prefixes and so an independent replicate of a run: the way to measure how much a
        result moves between runs of the same method (docs/RESULTS.md, "N = 1000 on an H200").
    stats_tokens / stats_max_length / stats_dtype: key second-moment statistics.
    solve_dtype: float64 or float32 for the closed-form solves.
    target_chunk_tokens: padded tokens run per target-optimisation step and chunk (bounds memory).
        Requests are sorted by length, so smaller chunks also pad less: on SmolLM2 (CPU,
        100 CounterFact requests) a step over all chunks took 207 s at 4096 tokens and
        140 s at 1024, with the same NLL. Raise it on a GPU to fill the device.
    """

    layers: list[int] = field(default_factory=list)
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_nll: float = 5e-2
    context_template_count: int = 5
    context_template_length: int = 10
    context_template_seed: int = 0
    context_template_length_params: list[list[int]] = field(default_factory=list)
    stats_tokens: int = 100_000
    stats_max_length: int = 512
    stats_dtype: str = "float32"
    solve_dtype: str = "float64"
    target_chunk_tokens: int = 1024

    method = "base"


@dataclass
class RomeHParams(EditHParams):
    """ROME: one layer, rank one per request (requests of a batch applied in sequence).

    mom2_adjustment: weight the rank-one direction by the key covariance, ``C⁻¹k`` (true, as
        published for GPT-2 XL / GPT-J), or use the key itself, ``k`` (false, the published
        Llama-3-8B setting); false needs no key statistics.
    """

    mom2_adjustment: bool = True
    method = "rome"


@dataclass
class MemitHParams(EditHParams):
    """MEMIT: ``mom2_update_weight`` is λ in ``(λC + KKᵀ)`` with C the per-token mean second moment."""

    mom2_update_weight: float = 15000.0
    method = "memit"


@dataclass
class AlphaEditHParams(EditHParams):
    """AlphaEdit: null space of C (eigenvalues below ``nullspace_threshold``), ``L2`` = λ_a.

    history_scale: μ, the weight of the earlier edits' term in the solver's objective,
        ``‖ΔW K − R‖² + μ‖ΔW K_p‖² + λ_a‖ΔW‖²`` over the null space (1 = AlphaEdit as published;
        larger keeps a sequential run's earlier edits more and realises less of each new batch).
    history_keys: which keys of a finished batch join the earlier edits' term ``K_p``:
        ``"mean"`` (AlphaEdit as published: each request's write key, the weighted mean of its
        context-template prompts' keys) or ``"contexts"`` (each of those prompts' own keys, each
        scaled by the square root of its template weight, so a request adds the mean over its
        prompts of ``k_t k_tᵀ``: its mean key's ``k̄k̄ᵀ`` plus the spread of its keys across
        contexts). Later writes then also keep the earlier edits' outputs on keys that differ
        from the mean key, as a paraphrase's does. The write itself is unchanged (mean keys).
        Measured worse on SmolLM2 after 1,000 CounterFact edits (docs/RESULTS.md, session 22).
    """

    nullspace_threshold: float = 2e-2
    L2: float = 10.0
    history_scale: float = 1.0
    history_keys: str = "mean"
    method = "alphaedit"


@dataclass
class MetaKEHParams(AlphaEditHParams):
    """MetaKE upper level (METHOD.md "Upper level"): outer steps on the planned residual against the
    virtual post-edit hidden state ``H + R G``.

    outer_steps / outer_lr: Adam steps of the upper level.
    gamma / omega: regulariser weight and form (``"norm"``: ‖R_i‖/‖h_i‖², ``"adaptive"``: weighted by 1 - g_ii).
    gate: ``"full"`` (u×u G) or ``"diag"``.
    outer_kl: include the essence KL term in F.
    gate_layers: ``"last"`` (the adopted proxy), ``"product"`` (product of per-layer gates) or
        ``"spread"`` (the gate of MEMIT's residual spreading over the layers; see :mod:`metake_fast.metake`).
        The default is the adopted ``"last"``; the shipped SmolLM2 file sets ``"spread"``, whose proxy
        keeps its agreement with the exact gradient in long sequential runs (docs/RESULTS.md).
    gate_keys: ``"mean"`` (the adopted proxy: every prompt of a request sees the share ``G`` realises
        on the request's mean key) or ``"instance"`` (each of the request's context-template prompts
        sees the share realised on its own key, ``Y_Lᵀ k_t``; the write is solved for the mean keys,
        so prompts whose key differs from the mean get less, which is what a paraphrase faces).
        ``"instance"`` needs ``gate_layers`` ``last`` or ``spread``.
    outer_clamp_norm_factor: ``‖R_i‖ ≤ c·‖h_i‖`` during the outer loop.
    base_solver: ``"alphaedit"`` or ``"memit"`` for the gate and the final write.
    safeguard / safeguard_margin: after the write, score each request on its own rewrite prompt
        (``log P(new) − log P(true)``); where some score below ``safeguard_margin``, rewrite the
        batch with the plain (lower-level) target for those requests, and keep that write unless
        it leaves fewer rewrite prompts at the margin (see
        :func:`metake_fast.metake.safeguarded_write`). ``safeguard: false`` gives the adopted
        formulation exactly.
    history_weight: η of an extra term ``η·tr(Rᵀ H_p R)/mean‖h‖²`` in the outer objective, the
        squared disturbance ``‖ΔW K_p‖²`` the last layer's write would cause on the keys of every
        earlier edit (exact for the AlphaEdit solver, :meth:`NullSpaceSolver.history_gram`);
        0 (default) leaves F as in METHOD.md. Needs ``base_solver: alphaedit``. Measured after
        1,000 sequential edits (docs/RESULTS.md, session 16): 15 makes a write cost the earlier
        edits no more than AlphaEdit's and keeps three quarters of the new batch's gain; 30
        keeps a fifth of it. Over a whole N = 1000 run at 50 target steps (session 17), 15 gave
        94.6 / 85.0 / 60.4 against 94.9 / 84.4 / 60.6 at 0: the same within one run's noise,
        and its later batches still generalize better than its earlier ones.
    safeguard_history: with the safeguard, also score the earlier edits' rewrite prompts before
        and after the write; if fewer prefer their new object afterwards, compare with the plain
        targets' write from the same state and keep the write with more successes over all edits
        so far (the refined one on a tie). ``safeguard_history_max`` caps the earlier edits scored
        (evenly spaced; 0 = all): each check costs two scoring passes over them.
    outer_extra_templates: ``[[length, count], ...]`` groups of context prefixes that the upper
        level's objective F scores *in addition to* the target loop's templates (not in METHOD.md;
        empty, the default, leaves F as written). They are sampled from the model like the
        others, from seed ``context_template_seed + 1``, so they are different prefixes; the
        write's keys stay the target loop's. With ``gate_keys: instance``
        each extra prompt sees the share the write realises on its own key: F then asks the
        refined targets to hold in contexts the lower level never optimised for, which is what
        a paraphrase prompt is. Measured at N = 1000 on SmolLM2-135M (docs/RESULTS.md, session
        23): paraphrases gain, but specificity falls 2.9 points below AlphaEdit's, so it is off.
    outer_extra_weight: each extra prompt's weight in F relative to one of the target loop's
        prompts (a request's weights are then normalised to sum 1). 1 (default) weighs every
        prompt alike, so ten extras beside six own prompts hold 10/16 of F; 0.2 gives them a
        quarter (10·0.2 / (6 + 10·0.2)) and leaves the rewrite prompt 1/8 instead of 1/16.
    """

    outer_steps: int = 10
    outer_lr: float = 0.2
    gamma: float = 1e-3
    omega: str = "norm"
    gate: str = "full"
    outer_kl: bool = True
    gate_layers: str = "last"
    gate_keys: str = "mean"
    outer_clamp_norm_factor: float = 1.5
    base_solver: str = "alphaedit"
    mom2_update_weight: float = 15000.0
    safeguard: bool = True
    safeguard_margin: float = 0.0
    history_weight: float = 0.0
    safeguard_history: bool = False
    safeguard_history_max: int = 1000
    outer_extra_templates: list[list[int]] = field(default_factory=list)
    outer_extra_weight: float = 1.0
    method = "metake"


HPARAM_CLASSES: dict[str, type[EditHParams]] = {
    "rome": RomeHParams,
    "memit": MemitHParams,
    "alphaedit": AlphaEditHParams,
    "metake": MetaKEHParams,
}

#: EasyEdit / reference-code names -> our field names. ``mom2_n_samples`` counts Wikipedia texts
#: in the published code and is read here as a token budget: the published 100,000 is this
#: library's default budget, and a text corpus of that many documents is rarely at hand.
ALIASES = {
    "mom2_n_samples": "stats_tokens",
    "mom2_dtype": "stats_dtype",
    "lr": "v_lr",
    "num_steps": "v_num_grad_steps",
}

#: EasyEdit fields that have no meaning here and are accepted but ignored
IGNORED = {
    "alg_name",
    "model_name",
    "device",
    "model_parallel",
    "fact_token",
    "v_loss_layer",
    "rewrite_module_tmp",
    "layer_module_tmp",
    "mlp_module_tmp",
    "attn_module_tmp",
    "ln_f_module",
    "lm_head_module",
    "mom2_dataset",
    "layer_selection",
    "stats_dir",
    "max_length",
    "P_loc",  # a precomputed null-space projector: here it is computed from this run's statistics
    "fp16",  # EasyEdit's model dtype: here the dtype the model was loaded in (--dtype)
}

#: fields that only ROME uses; for the other methods the published value is accepted (the
#: published MEMIT / AlphaEdit code always weights by the key covariance) and anything else refused
_ROME_ONLY = {"mom2_adjustment": True}

#: fields a method's published files carry but its solve does not use: the AlphaEdit files keep
#: MEMIT's ``mom2_update_weight`` (AlphaEdit's solve has ``L2`` in its place)
_UNUSED_BY = {"alphaedit": {"mom2_update_weight"}}

_CHOICES = {
    "stats_dtype": ("float32", "float64"),
    "solve_dtype": ("float32", "float64"),
    "omega": ("norm", "adaptive"),
    "gate": ("full", "diag"),
    "gate_layers": ("last", "product", "spread"),
    "gate_keys": ("mean", "instance"),
    "history_keys": ("mean", "contexts"),
    "base_solver": ("alphaedit", "memit"),
}
_POSITIVE = {
    "v_num_grad_steps",
    "v_lr",
    "clamp_norm_factor",
    "stats_tokens",
    "stats_max_length",
    "target_chunk_tokens",
    "mom2_update_weight",
    "L2",
    "history_scale",
    "nullspace_threshold",
    "outer_lr",
    "outer_clamp_norm_factor",
}
_NONNEG = {
    "v_weight_decay",
    "kl_factor",
    "early_stop_nll",
    "context_template_count",
    "context_template_length",
    "context_template_seed",
    "outer_steps",
    "safeguard_history_max",
    "history_weight",
    "gamma",
    "outer_extra_weight",
}


def default_layers(num_layers: int, method: str = "memit") -> list[int]:
    """The documented layer rule (see the module docstring); ROME gets the last layer of the band."""
    if num_layers <= 0:
        raise HParamsError("the model has no decoder layers")
    m = max(1, min(5, num_layers // 6))
    end = max(0, min(num_layers - 2, round(0.27 * num_layers))) if num_layers >= 2 else 0
    start = max(0, end - m + 1)
    layers = list(range(start, end + 1))
    return layers[-1:] if method == "rome" else layers


def _coerce(name: str, typ, value):
    if isinstance(typ, str):
        typ = {"int": int, "float": float, "str": str, "bool": bool, "list[int]": list}.get(typ, typ)
    if typ == "list[list[int]]":
        return _coerce_pairs(name, value)
    if typ is bool:
        if not isinstance(value, bool):
            raise HParamsError(f"hparams field {name!r}: expected true/false, got {value!r}")
        return value
    if typ is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (isinstance(value, float) and (not math.isfinite(value) or value != int(value)))
        ):
            raise HParamsError(f"hparams field {name!r}: expected an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise HParamsError(f"hparams field {name!r}: expected a finite number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise HParamsError(f"hparams field {name!r}: expected a string, got {value!r}")
        return value
    if typ is list:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise HParamsError(f"hparams field {name!r}: expected a list of layer indices, got {value!r}")
        if not value:
            raise HParamsError(f"hparams field {name!r}: give at least one layer (or leave it out for the default)")
        return sorted(set(int(v) for v in value))
    return value


def _coerce_pairs(name: str, value) -> list[list[int]]:
    """``[[length, count], ...]`` with non-negative integers (EasyEdit's context_template_length_params)."""

    def nonneg_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(value, (list, tuple)) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(nonneg_int(v) for v in p) for p in value
    ):
        raise HParamsError(f"hparams field {name!r}: expected a list of [length, count] pairs, got {value!r}")
    return [[int(a), int(b)] for a, b in value]


def make_hparams(method: str, values: dict | None = None, *, num_layers: int | None = None) -> EditHParams:
    """Build and validate the dataclass for ``method`` from a dict (EasyEdit names accepted)."""
    method = str(method).lower()
    if method not in HPARAM_CLASSES:
        raise HParamsError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    cls = HPARAM_CLASSES[method]
    types = {f.name: f.type for f in fields(cls)}
    kwargs = {}
    for key, value in (values or {}).items():
        name = ALIASES.get(key, key)
        if name in IGNORED or name in _UNUSED_BY.get(method, ()):
            continue
        if name in _ROME_ONLY and method != "rome":
            if value != _ROME_ONLY[name]:
                raise HParamsError(
                    f"hparams field {key!r}: {value!r} applies to ROME only; {method} always weights by the key "
                    f"covariance (leave it out or set {str(_ROME_ONLY[name]).lower()})"
                )
            continue
        if name not in types:
            owners = [m for m, c in HPARAM_CLASSES.items() if name in {f.name for f in fields(c)}]
            hint = f" (a field of {', '.join(owners)}: is the file for another method?)" if owners else ""
            raise HParamsError(f"unknown hparams field {key!r} for method {method!r}{hint}")
        if value is None:
            raise HParamsError(f"hparams field {key!r} is empty")
        kwargs[name] = _coerce(name, types[name], value)
    hp = cls(**kwargs)
    validate_hparams(hp, num_layers=num_layers)
    return hp


def validate_hparams(hp: EditHParams, *, num_layers: int | None = None) -> EditHParams:
    for name in _POSITIVE:
        if hasattr(hp, name) and not getattr(hp, name) > 0:
            raise HParamsError(f"hparams field {name!r} must be > 0, got {getattr(hp, name)!r}")
    for name in _NONNEG:
        if hasattr(hp, name) and not getattr(hp, name) >= 0:
            raise HParamsError(f"hparams field {name!r} must be >= 0, got {getattr(hp, name)!r}")
    for name, choices in _CHOICES.items():
        if hasattr(hp, name) and getattr(hp, name) not in choices:
            raise HParamsError(f"hparams field {name!r} must be one of {choices}, got {getattr(hp, name)!r}")
    if num_layers is not None:
        bad = [layer for layer in hp.layers if not 0 <= layer < num_layers]
        if bad:
            raise HParamsError(f"hparams field 'layers': {bad} out of range for a model with {num_layers} layers")
    _coerce_pairs("context_template_length_params", hp.context_template_length_params)
    if hasattr(hp, "outer_extra_templates"):
        _coerce_pairs("outer_extra_templates", hp.outer_extra_templates)
    if getattr(hp, "gate_keys", "mean") == "instance" and getattr(hp, "gate_layers", "last") == "product":
        raise HParamsError("hparams field 'gate_keys': 'instance' needs gate_layers 'last' or 'spread', not 'product'")
    if getattr(hp, "history_weight", 0.0) > 0 and getattr(hp, "base_solver", "alphaedit") != "alphaedit":
        raise HParamsError("hparams field 'history_weight' needs base_solver 'alphaedit' (MEMIT keeps no history)")
    if getattr(hp, "history_scale", 1.0) != 1.0 and getattr(hp, "base_solver", "alphaedit") != "alphaedit":
        raise HParamsError("hparams field 'history_scale' needs base_solver 'alphaedit' (MEMIT keeps no history)")
    if getattr(hp, "history_keys", "mean") != "mean" and getattr(hp, "base_solver", "alphaedit") != "alphaedit":
        raise HParamsError("hparams field 'history_keys' needs base_solver 'alphaedit' (MEMIT keeps no history)")
    if hp.method == "rome" and len(hp.layers) > 1:
        raise HParamsError(f"ROME edits one layer; got layers {hp.layers}")
    return hp


#: a model's name (a hub id's or local directory's last part, lower case) -> the stem of its shipped
#: files, for the models the published settings were written for
MODEL_FILE_NAMES = {
    "smollm2-135m": "smollm2-135m",
    "gpt2-xl": "gpt2-xl",
    "gpt-j-6b": "gpt-j-6b",
    "eleutherai_gpt-j-6b": "gpt-j-6b",
    **dict.fromkeys(
        [
            "llama3-8b",
            "llama-3-8b",
            "meta-llama-3-8b",
            "llama3-8b-instruct",
            "llama-3-8b-instruct",
            "meta-llama-3-8b-instruct",
        ],
        "llama3-8b",
    ),
    "qwen2.5-7b": "qwen2.5-7b",
    "qwen2.5-7b-instruct": "qwen2.5-7b",
}


def shipped_hparams_file(method: str, model_name: str | None) -> Path | None:
    """The shipped ``hparams/<method>/<model>.yaml`` for a model name or path, if there is one:
    ``"meta-llama/Meta-Llama-3-8B-Instruct"`` or ``/models/Meta-Llama-3-8B`` find ``llama3-8b.yaml``."""
    if not model_name:
        return None
    name = str(model_name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
    stem = MODEL_FILE_NAMES.get(name)
    return _package_file(str(method).lower(), stem) if stem else None


def _package_file(method: str, model: str) -> Path | None:
    try:
        p = resources.files("metake_fast") / "hparams" / method / f"{model}.yaml"
        return Path(str(p)) if p.is_file() else None
    except (FileNotFoundError, ModuleNotFoundError):
        return None


def load_hparams(
    method: str,
    model_name: str | None = None,
    path: str | Path | None = None,
    *,
    num_layers: int | None = None,
    overrides: dict | None = None,
) -> EditHParams:
    """Hyperparameters for ``method``: from ``path`` if given, else the shipped file for
    ``model_name`` if there is one, else defaults with :func:`default_layers`; then ``overrides``."""
    values: dict = {}
    source = "defaults"
    if path is not None:
        values, source = read_yaml(path), str(path)
    elif f := shipped_hparams_file(method, model_name):
        values, source = read_yaml(f), f"shipped {f.parent.name}/{f.name}"
    if overrides:
        source += f" + overrides ({', '.join(sorted(overrides))})"
    values = {**values, **(overrides or {})}
    try:
        hp = make_hparams(method, values, num_layers=num_layers)
    except HParamsError as exc:
        raise HParamsError(f"{exc} ({source})" if not source.startswith("defaults") else str(exc)) from None
    hp.source = source
    if not hp.layers:
        if num_layers is None:
            raise HParamsError("no layers given and the model's depth is unknown")
        hp.layers = default_layers(num_layers, hp.method)
    return hp


class _Yaml12FloatLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-1`` / ``2e-2`` are numbers (YAML 1.2 and JSON), not strings:
    the published hparams files (EasyEdit, MEMIT, AlphaEdit) write ``v_lr: 1e-1``."""


_Yaml12FloatLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(path: str | Path) -> dict:
    """A YAML or (by suffix) JSON hparams file as a dict."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise HParamsError(f"cannot read hparams file {p}: {exc.strerror or exc}") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HParamsError(f"hparams file {p} is not valid JSON: {exc}") from None
    else:
        try:
            data = yaml.load(text, Loader=_Yaml12FloatLoader)
        except yaml.YAMLError as exc:
            raise HParamsError(f"hparams file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HParamsError(f"hparams file {p} must hold a mapping of fields, got {type(data).__name__}")
    return data


def parse_overrides(items, flag: str = "--set") -> dict:
    """``["v_num_grad_steps=50", "layers=[4, 5]"]`` -> ``{"v_num_grad_steps": 50, "layers": [4, 5]}``.

    Each item is ``KEY=VALUE``; the value is read as YAML (the hparams files' syntax: ``50``,
    ``1e-1``, ``true``, ``[4, 5, 6]``, ``spread``). A later item for the same key wins. The
    fields themselves are checked by :func:`make_hparams`."""
    out: dict = {}
    for item in items or ():
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise HParamsError(f"{flag} expects KEY=VALUE (e.g. {flag} v_num_grad_steps=50), got {item!r}")
        try:
            value = yaml.load(text, Loader=_Yaml12FloatLoader) if text.strip() else None
        except yaml.YAMLError as exc:
            raise HParamsError(f"{flag} {key}: {text!r} is not a valid value ({str(exc).splitlines()[0]})") from None
        if value is None:
            raise HParamsError(f"{flag} {key}: no value given")
        out[key] = value
    return out


def hparams_differences(stored: dict | None, hp: EditHParams) -> list[str]:
    """How hyperparameters saved earlier (``to_dict`` output, as stored in a checkpoint) differ
    from ``hp``, one ``"field: saved X, now Y"`` per field; empty when they describe the same run.
    Every stored field must be equal; a field that ``hp`` has and the stored dict lacks (added by
    a later version) must hold its default, which is the behaviour the run had before the field
    existed."""
    if not isinstance(stored, dict):
        return ["no hyperparameters were saved"]
    cur = json.loads(json.dumps(to_dict(hp), sort_keys=True))
    stored = json.loads(json.dumps(stored, sort_keys=True))
    out = [
        f"{k}: saved {v!r}, now {cur[k]!r}" if k in cur else f"{k}: saved {v!r}, not a field of this version"
        for k, v in stored.items()
        if k not in cur or cur[k] != v
    ]
    # ``layers`` is resolved per model and always saved: it has no default to fall back on
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in fields(type(hp))
        if f.name != "layers" and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
    }
    for k in sorted(cur.keys() - stored.keys()):
        if k not in defaults or json.loads(json.dumps(defaults[k])) != cur[k]:
            out.append(f"{k}: not saved (so {defaults.get(k)!r} then), now {cur[k]!r}")
    return out


def same_hparams(stored: dict | None, hp: EditHParams) -> bool:
    """Whether hyperparameters saved earlier describe the same run as ``hp`` (no
    :func:`hparams_differences`)."""
    return not hparams_differences(stored, hp)


def to_dict(hp: EditHParams) -> dict:
    d = dataclasses.asdict(hp)
    d["method"] = hp.method
    return d
