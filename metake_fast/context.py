"""Context templates: the bare prompt plus short model-generated prefixes.

As in MEMIT, keys and targets are averaged over ``"{}"`` (the bare prompt) and
``count`` prefixes of ``length`` tokens sampled from the model itself (top-k
sampling from a fixed seed, so the result is deterministic), each ending in
``". {}"``. Results are cached per model object and settings.
"""

from __future__ import annotations

import weakref

import torch

from .runner import encode, model_device

START_WORDS = ("The", "Therefore", "Because", "I", "You")

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def generate_prefixes(
    model, tok, count: int = 5, length: int = 10, seed: int = 0, top_k: int = 5, generator=None
) -> list[str]:
    """``count`` short texts sampled from the model (seeded top-k sampling, no KV cache needed).
    ``generator`` (a ``torch.Generator``) replaces ``seed`` to continue one random stream."""
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    dev = model_device(model)
    out = []
    for i in range(count):
        ids = encode(tok, START_WORDS[i % len(START_WORDS)])
        n0 = len(ids)
        for _ in range(length):
            logits = model(input_ids=torch.tensor([ids], device=dev), use_cache=False).logits[0, -1].float().cpu()
            k = min(top_k, logits.shape[0])
            vals, idx = logits.topk(k)
            probs = torch.softmax(vals, -1)
            ids.append(int(idx[torch.multinomial(probs, 1, generator=gen)]))
        text = tok.decode(ids[n0 - 1 :] if n0 else ids, skip_special_tokens=True)
        out.append(text)
    return out


def context_templates(
    model, tok, count: int = 5, length: int = 10, seed: int = 0, groups: list[list[int]] | None = None
) -> list[list[str]]:
    """``[["{}"], [prefix_1 + ". {}", ...]]`` (groups averaged equally).

    ``groups``: ``[[length, count], ...]`` (EasyEdit's ``context_template_length_params``), one
    group of ``count`` prefixes of ``length`` tokens per pair, in place of ``count`` / ``length``;
    the prefixes are drawn one after another from the one seeded generator.
    """
    pairs = [(int(n), int(c)) for n, c in groups] if groups else [(length, count)]
    pairs = [(n, c) for n, c in pairs if c > 0]
    if not pairs:
        return [["{}"]]
    key = (id(tok), tuple(pairs), seed)
    per_model = _CACHE.setdefault(model, {})
    if key not in per_model:
        gen = torch.Generator().manual_seed(seed)
        out = [["{}"]]
        for n, c in pairs:
            prefixes = generate_prefixes(model, tok, c, n, generator=gen)
            out.append([p.replace("{", " ").replace("}", " ").strip() + ". {}" for p in prefixes])
        per_model[key] = out
    return per_model[key]


def with_extra_groups(model, tok, templates: list[list[str]], groups: list[list[int]], seed: int) -> list[list[str]]:
    """``templates`` followed by the prefix groups ``groups`` (``[[length, count], ...]``) sampled
    from ``seed``: the upper level's extra contexts (``outer_extra_templates``). The originals keep
    their places, so a prompt's flattened index among ``templates`` is the same in the result."""
    extra = context_templates(model, tok, seed=seed, groups=groups)[1:] if groups else []
    return [*templates, *extra]
