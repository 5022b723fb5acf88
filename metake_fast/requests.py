"""Edit requests: the unit of work for every editor (ROME, MEMIT, AlphaEdit, MetaKE).

An :class:`EditRequest` says "in ``prompt``, about ``subject``, the model should
now complete ``target_new`` (instead of ``target_true``)".  ``prompt`` either
contains the subject verbatim (EasyEdit / flat CounterFact style) or a single
``"{}"`` placeholder that marks where the subject goes (ROME style).

Conventions
-----------
* **Targets are scored with a leading space.**  The target object is the
  continuation of the prompt, so its tokens are those of ``" " + target``
  (``tokenizer(" " + target, add_special_tokens=False)``).  Targets are stored
  without surrounding whitespace; :func:`validate_requests` strips it.
* The *template* of a request is the prompt with the first occurrence of the
  subject replaced by ``"{}"``; ``template().format(subject)`` (or
  :meth:`EditRequest.text`) gives back the full prompt.  Templates may therefore
  contain no ``{`` or ``}`` besides the single placeholder.
* Constructing an :class:`EditRequest` never validates; :func:`validate_requests`
  is the gate every editor should call before touching a model.  It raises
  :class:`RequestError` for the first problem found, naming the request index.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "EditRequest",
    "RequestError",
    "check_request",
    "fact_key",
    "from_easyedit",
    "validate_requests",
]

PLACEHOLDER = "{}"

# Accepted spellings in :meth:`EditRequest.from_dict`, highest priority first.
_PROMPT_KEYS = ("prompt", "src")
_SUBJECT_KEYS = ("subject",)
_TARGET_NEW_KEYS = ("target_new", "alt")
_TARGET_TRUE_KEYS = ("target_true", "ground_truth", "pred")


class RequestError(ValueError):
    """An invalid edit request.

    ``str(err)`` starts with ``"request <index>: "``.  Attributes: ``index``
    (``None`` when unknown), ``problem`` (the message without the prefix),
    ``field`` (the offending field, if any), ``other`` (the other index of a
    duplicate / conflict) and ``code`` (a short machine-readable tag such as
    ``"subject_not_in_prompt"``, ``"duplicate"``, ``"conflict"``).
    """

    def __init__(
        self,
        index: int | None,
        problem: str,
        *,
        field: str | None = None,
        other: int | None = None,
        code: str = "invalid",
    ) -> None:
        self.index = index
        self.problem = problem
        self.field = field
        self.other = other
        self.code = code
        prefix = "request" if index is None else f"request {index}"
        super().__init__(f"{prefix}: {problem}")

    def __reduce__(self):  # keep pickling (multiprocessing) working
        return (_rebuild_request_error, (self.index, self.problem, self.field, self.other, self.code))


def _rebuild_request_error(index, problem, field, other, code):
    return RequestError(index, problem, field=field, other=other, code=code)


@dataclass(frozen=True)
class EditRequest:
    """One counterfactual edit.  See the module docstring for conventions."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def template(self) -> str:
        """The prompt with the subject replaced by ``"{}"``.

        If the prompt already holds a ``"{}"`` placeholder it is returned
        unchanged; otherwise the *first* occurrence of the subject is replaced.
        Raises :class:`RequestError` if neither is possible.
        """
        if not isinstance(self.prompt, str) or not isinstance(self.subject, str):
            raise RequestError(None, "prompt and subject must be strings", code="type")
        if PLACEHOLDER in self.prompt:
            return self.prompt
        if self.subject and self.subject in self.prompt:
            return self.prompt.replace(self.subject, PLACEHOLDER, 1)
        raise RequestError(
            None,
            f"subject {self.subject!r} does not occur in prompt {self.prompt!r} and the prompt has no '{{}}'",
            field="subject",
            code="subject_not_in_prompt",
        )

    def text(self) -> str:
        """The full prompt text: the template with the subject filled in."""
        return self.template().replace(PLACEHOLDER, self.subject, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": self.target_new,
            "target_true": self.target_true,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, index: int | None = None) -> EditRequest:
        """Build a request from a mapping.

        Accepted keys (first present wins): ``prompt``/``src``, ``subject``,
        ``target_new``/``alt``, and optionally ``target_true``/``ground_truth``/``pred``.
        Target values may also be ROME-style ``{"str": ...}`` dicts.  Unknown
        keys are ignored.  Types are checked here (non-strings raise
        :class:`RequestError`); content is checked by :func:`validate_requests`.
        """
        return _coerce(d, index)


# --------------------------------------------------------------------------- helpers


def _is_nan(x: Any) -> bool:
    if isinstance(x, str):
        return False
    if isinstance(x, float):
        return math.isnan(x)
    try:  # numpy / torch scalars, pandas.NA
        return bool(x != x)
    except Exception:  # noqa: BLE001 - arrays, NA: "is NaN" is not well defined
        return x.__class__.__name__ in ("NAType", "NaTType")


def _pick(d: Mapping[str, Any], keys: Sequence[str]) -> tuple[str, Any, bool]:
    for k in keys:
        if k in d:
            return k, d[k], True
    return keys[0], None, False


def _as_str(value: Any, index: int | None, field: str, *, optional: bool = False) -> str | None:
    if isinstance(value, Mapping) and "str" in value:  # ROME {"str": ..., "id": ...}
        value = value["str"]
    if value is None:
        if optional:
            return None
        raise RequestError(index, f"field '{field}' is None (missing value)", field=field, code="missing")
    if _is_nan(value):
        raise RequestError(index, f"field '{field}' is NaN (missing value)", field=field, code="missing")
    if not isinstance(value, str):
        raise RequestError(
            index,
            f"field '{field}' must be a string, got {type(value).__name__}",
            field=field,
            code="type",
        )
    return str(value)  # plain str, also for str subclasses (numpy.str_)


def _coerce(item: Any, index: int | None) -> EditRequest:
    """EditRequest or mapping -> EditRequest with str fields (types only)."""
    if isinstance(item, EditRequest):
        fields = item.to_dict()
        names = {"prompt": "prompt", "subject": "subject", "target_new": "target_new", "target_true": "target_true"}
    elif isinstance(item, Mapping):
        fields, names = {}, {}
        for name, keys in (
            ("prompt", _PROMPT_KEYS),
            ("subject", _SUBJECT_KEYS),
            ("target_new", _TARGET_NEW_KEYS),
            ("target_true", _TARGET_TRUE_KEYS),
        ):
            key, value, found = _pick(item, keys)
            if not found and name != "target_true":
                raise RequestError(
                    index, f"missing field '{name}' (accepted keys: {', '.join(keys)})", field=name, code="missing"
                )
            fields[name], names[name] = value, key
    else:
        raise RequestError(index, f"expected an EditRequest or a dict, got {type(item).__name__}", code="type")
    prompt = _as_str(fields["prompt"], index, names["prompt"])
    subject = _as_str(fields["subject"], index, names["subject"])
    target_new = _as_str(fields["target_new"], index, names["target_new"])
    target_true = _as_str(fields["target_true"], index, names["target_true"], optional=True)
    if isinstance(item, EditRequest):
        return item
    return EditRequest(prompt, subject, target_new, target_true)  # type: ignore[arg-type]


def _tokens(tokenizer: Any, text: str, index: int, field: str) -> list[int]:
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    except Exception as e:  # noqa: BLE001 - any tokenizer failure is a bad request
        raise RequestError(index, f"tokenizer failed on field '{field}': {e}", field=field, code="tokenizer") from e
    if ids and isinstance(ids[0], list):  # batched output
        ids = ids[0]
    return list(ids)


def check_request(
    item: Any, index: int = 0, tokenizer: Any = None, *, max_prompt_tokens: int | None = 256
) -> EditRequest:
    """Validate and normalise one request (see :func:`validate_requests`)."""
    req = _coerce(item, index)
    prompt, subject = req.prompt.strip(), req.subject.strip()
    target_new = req.target_new.strip()
    target_true = req.target_true.strip() if req.target_true is not None else None
    for field, value in (("prompt", prompt), ("subject", subject), ("target_new", target_new)):
        if not value:
            raise RequestError(index, f"field '{field}' is empty", field=field, code="empty")
    if target_true is not None and not target_true:
        raise RequestError(
            index, "field 'target_true' is empty (use None when unknown)", field="target_true", code="empty"
        )
    n_ph = prompt.count(PLACEHOLDER)
    if n_ph > 1:
        raise RequestError(
            index, f"prompt has {n_ph} '{{}}' placeholders, expected exactly one", field="prompt", code="placeholders"
        )
    if n_ph == 0 and subject not in prompt:
        raise RequestError(
            index,
            f"subject {subject!r} does not occur in prompt {prompt!r} and the prompt has no '{{}}' placeholder",
            field="subject",
            code="subject_not_in_prompt",
        )
    out = EditRequest(prompt, subject, target_new, target_true)
    template = out.template()
    rest = template.replace(PLACEHOLDER, "", 1)
    if "{" in rest or "}" in rest:
        raise RequestError(
            index,
            f"prompt template {template!r} contains '{{' or '}}' besides the single '{{}}' placeholder",
            field="prompt",
            code="braces",
        )
    if target_true is not None and target_true == target_new:
        raise RequestError(
            index, f"target_new equals target_true ({target_new!r}): nothing to edit", field="target_new", code="no_op"
        )
    if tokenizer is not None:
        for field, value in (("target_new", target_new), ("target_true", target_true)):
            if value is not None and not _tokens(tokenizer, " " + value, index, field):
                raise RequestError(
                    index, f"field '{field}' ({value!r}) tokenises to no tokens", field=field, code="empty_tokens"
                )
        if max_prompt_tokens is not None:
            n_tok = len(_tokens(tokenizer, out.text(), index, "prompt"))
            if n_tok > max_prompt_tokens:
                raise RequestError(
                    index,
                    f"prompt is {n_tok} tokens long, more than max_prompt_tokens={max_prompt_tokens}",
                    field="prompt",
                    code="too_long",
                )
    return out


def fact_key(req: EditRequest) -> tuple[str, str]:
    """What two requests must not share in one edit (a duplicate, or two new objects for one
    fact): the prompt template and the subject."""
    return (req.template(), req.subject)


def validate_requests(
    requests: Iterable[Any],
    tokenizer: Any = None,
    *,
    max_prompt_tokens: int | None = 256,
    on_duplicate: str = "error",
) -> list[EditRequest]:
    """Check and normalise a batch of edit requests.

    ``requests`` holds :class:`EditRequest` objects or dicts (keys as in
    :meth:`EditRequest.from_dict`).  Returns new :class:`EditRequest` objects
    with surrounding whitespace stripped from every field (targets are scored
    with a leading space, so they must not carry their own).

    Raises :class:`RequestError` for the first problem found, naming its index:
    not an EditRequest/dict; a field that is not a string, or is None/NaN
    (``target_true`` may be None); an empty or whitespace-only prompt, subject,
    target_new or target_true; a subject that is not in the prompt when the
    prompt has no ``"{}"``; more than one ``"{}"``; stray ``{``/``}`` in the
    template; ``target_new == target_true``; and, when a ``tokenizer`` is given,
    a target for which ``tokenizer(" " + target, add_special_tokens=False)``
    yields no ids, or a prompt (:meth:`EditRequest.text`, no special tokens)
    longer than ``max_prompt_tokens`` (``None`` disables the length check).

    Across requests, two with the same template and subject are a *duplicate*
    (same target_new) or a *conflict* (different target_new); both indices are
    named.  ``on_duplicate="drop"`` instead keeps the first and drops later
    duplicates/conflicts with a :class:`UserWarning` (the returned list is then
    shorter than the input).
    """
    if on_duplicate not in ("error", "drop"):
        raise ValueError(f"on_duplicate must be 'error' or 'drop', got {on_duplicate!r}")
    if max_prompt_tokens is not None and (
        isinstance(max_prompt_tokens, bool) or not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1
    ):
        raise ValueError(f"max_prompt_tokens must be a positive int or None, got {max_prompt_tokens!r}")
    if isinstance(requests, (str, bytes, Mapping, EditRequest)):
        raise RequestError(None, f"expected a list of requests, got a single {type(requests).__name__}", code="type")
    try:
        items = list(requests)
    except TypeError as e:
        raise RequestError(None, f"expected a list of requests, got {type(requests).__name__}", code="type") from e
    out: list[EditRequest] = []
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    dropped: list[int] = []
    for i, item in enumerate(items):
        req = check_request(item, i, tokenizer, max_prompt_tokens=max_prompt_tokens)
        key = fact_key(req)
        if key in seen:
            j, target = seen[key]
            if on_duplicate == "drop":
                dropped.append(i)
                continue
            if target == req.target_new:
                raise RequestError(
                    i,
                    f"duplicate of request {j} (same prompt, subject {req.subject!r} and target {target!r})",
                    other=j,
                    code="duplicate",
                )
            raise RequestError(
                i,
                f"conflicts with request {j}: same prompt and subject {req.subject!r} but target "
                f"{req.target_new!r} vs {target!r}",
                other=j,
                field="target_new",
                code="conflict",
            )
        seen[key] = (i, req.target_new)
        out.append(req)
    if dropped:
        warnings.warn(
            f"dropped {len(dropped)} duplicate/conflicting request(s) (indices {dropped[:10]}"
            f"{'...' if len(dropped) > 10 else ''}); the first of each group was kept",
            UserWarning,
            stacklevel=2,
        )
    return out


def from_easyedit(
    prompts: str | Sequence[str],
    target_new: str | Sequence[str],
    subject: str | Sequence[str],
    ground_truth: str | Sequence[str | None] | None = None,
) -> list[EditRequest]:
    """Requests from EasyEdit-style parallel lists (each a str or a list).

    A single string stands for a one-element list.  Lists of different
    lengths raise :class:`RequestError` naming the first index that one of
    them lacks.  Types are checked; call :func:`validate_requests` for the rest.
    """

    def as_list(x: Any, name: str) -> list[Any]:
        if isinstance(x, str):
            return [x]
        if isinstance(x, (Mapping, bytes)) or not isinstance(x, Iterable):
            raise RequestError(
                None, f"'{name}' must be a string or a list of strings, got {type(x).__name__}", field=name, code="type"
            )
        return list(x)

    cols = {
        "prompts": as_list(prompts, "prompts"),
        "target_new": as_list(target_new, "target_new"),
        "subject": as_list(subject, "subject"),
    }
    if ground_truth is not None:
        cols["ground_truth"] = as_list(ground_truth, "ground_truth")
    lengths = {k: len(v) for k, v in cols.items()}
    if len(set(lengths.values())) > 1:
        short = min(lengths.values())
        desc = ", ".join(f"{k}={n}" for k, n in lengths.items())
        raise RequestError(short, f"length mismatch between parallel lists ({desc})", code="length_mismatch")
    n = lengths["prompts"]
    gts = cols.get("ground_truth", [None] * n)
    out = []
    for i in range(n):
        d = {
            "prompt": cols["prompts"][i],
            "subject": cols["subject"][i],
            "target_new": cols["target_new"][i],
            "target_true": gts[i],
        }
        out.append(_coerce(d, i))
    return out
