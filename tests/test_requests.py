"""EditRequest, validate_requests, from_easyedit."""

from __future__ import annotations

import math
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metake_fast.requests import EditRequest, RequestError, from_easyedit, validate_requests


def _tiny_tokenizer():
    """Offline word-level tokenizer; '#' is normalised away, so '#' tokenises to nothing."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = "[UNK] The mother tongue of Danielle Darrieux is English French Paris capital".split()
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Replace("#", "")
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def tok():
    return _tiny_tokenizer()


R = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French")


def test_template_and_text():
    assert R.template() == "The mother tongue of {} is"
    assert R.text() == R.prompt
    p = EditRequest("{} was born in", "Ada", "Paris")
    assert p.template() == "{} was born in" and p.text() == "Ada was born in"
    # only the first occurrence becomes the placeholder
    q = EditRequest("Ada and Ada", "Ada", "x")
    assert q.template() == "{} and Ada" and q.text() == "Ada and Ada"
    # subject containing braces is safe: we fill with replace, template.format works too
    b = EditRequest("{} is", "a{b}c", "x")
    assert b.text() == "a{b}c is" and b.template().format(b.subject) == b.text()
    with pytest.raises(RequestError, match="does not occur"):
        EditRequest("Hello", "Ada", "x").template()


def test_dict_round_trip_and_aliases():
    assert EditRequest.from_dict(R.to_dict()) == R
    assert EditRequest.from_dict({**R.to_dict(), "target_true": None}).target_true is None
    z = {"src": "Who owns Jay's Garage?", "subject": "Jay's Garage", "alt": "CBS", "pred": "NBC", "extra": 1}
    assert EditRequest.from_dict(z) == EditRequest("Who owns Jay's Garage?", "Jay's Garage", "CBS", "NBC")
    e = {"prompt": "p X", "subject": "X", "target_new": "a", "ground_truth": "b"}
    assert EditRequest.from_dict(e).target_true == "b"
    rome = {"prompt": "{} is", "subject": "X", "target_new": {"str": "a", "id": "Q1"}, "target_true": {"str": "b"}}
    assert EditRequest.from_dict(rome) == EditRequest("{} is", "X", "a", "b")
    with pytest.raises(RequestError, match=r"^request 3: missing field 'subject'"):
        EditRequest.from_dict({"prompt": "x", "target_new": "y"}, index=3)
    with pytest.raises(RequestError, match="must be a string, got int"):
        EditRequest.from_dict({"prompt": "x", "subject": "x", "target_new": 5})


def test_requests_hashable_and_error_picklable():
    assert len({R, EditRequest(**R.to_dict())}) == 1
    e = RequestError(4, "boom", field="prompt", other=1, code="conflict")
    e2 = pickle.loads(pickle.dumps(e))
    assert str(e2) == "request 4: boom" and e2.other == 1 and e2.code == "conflict"


def test_validate_normalises():
    out = validate_requests([{"prompt": "  The capital is Paris ", "subject": " Paris", "target_new": "  Rome\n"}])
    assert out == [EditRequest("The capital is Paris", "Paris", "Rome", None)]
    assert validate_requests([]) == []
    assert validate_requests(x for x in [R]) == [R]


def good(**kw):
    d = R.to_dict()
    d.update(kw)
    return d


@pytest.mark.parametrize(
    "bad, pattern",
    [
        (42, "expected an EditRequest or a dict, got int"),
        ("a prompt", "expected an EditRequest or a dict, got str"),
        (good(prompt=None), "'prompt' is None"),
        (good(subject=3), "'subject' must be a string, got int"),
        (good(target_new=["English"]), "'target_new' must be a string, got list"),
        (good(target_new=math.nan), "'target_new' is NaN"),
        (good(target_true=math.nan), "'target_true' is NaN"),
        (good(target_true=1.5), "'target_true' must be a string"),
        (good(prompt="   "), "'prompt' is empty"),
        (good(subject=""), "'subject' is empty"),
        (good(target_new=" \t"), "'target_new' is empty"),
        (good(target_true=""), "'target_true' is empty"),
        (good(subject="Marie Curie"), "does not occur in prompt"),
        (good(prompt="{} and {} is"), "2 '{}' placeholders"),
        (good(prompt="{} is {x}"), "contains '{' or '}'"),
        (good(target_new="French"), "target_new equals target_true"),
        (EditRequest(R.prompt, R.subject, None, None), "'target_new' is None"),  # type: ignore[arg-type]
    ],
)
def test_validation_errors_name_the_index(bad, pattern):
    with pytest.raises(RequestError) as ei:
        validate_requests([R, good(prompt="Danielle Darrieux speaks", target_new="Italian"), bad])
    assert str(ei.value).startswith("request 2: ")
    assert pattern in str(ei.value)
    assert ei.value.index == 2


def test_not_a_list():
    for bad in (R, R.to_dict(), "text", 5):
        with pytest.raises(RequestError):
            validate_requests(bad)


def test_duplicates_and_conflicts():
    same_template = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
    with pytest.raises(RequestError, match=r"^request 2: duplicate of request 0") as ei:
        validate_requests([R, good(subject="Darrieux", prompt="The mother tongue of Darrieux is"), same_template])
    assert ei.value.other == 0 and ei.value.code == "duplicate"
    with pytest.raises(RequestError, match=r"^request 1: conflicts with request 0") as ei:
        validate_requests([R, good(target_new=" German ")])
    assert ei.value.code == "conflict"
    # duplicate only after normalisation
    with pytest.raises(RequestError, match="duplicate of request 0"):
        validate_requests([R, good(target_new=" English ")])
    with pytest.warns(UserWarning, match="dropped 2"):
        out = validate_requests([R, good(target_new="German"), same_template], on_duplicate="drop")
    assert out == [R]
    with pytest.raises(ValueError):
        validate_requests([R], on_duplicate="ignore")


def test_tokenizer_checks(tok):
    assert validate_requests([R], tok) == [R]
    with pytest.raises(RequestError, match=r"^request 1: field 'target_new' \('#'\) tokenises to no tokens"):
        validate_requests([R, good(target_new="#")], tok)
    with pytest.raises(RequestError, match=r"^request 0: field 'target_true' .* tokenises to no tokens"):
        validate_requests([good(target_true="##")], tok)
    long = good(prompt="The mother tongue of Danielle Darrieux is " + "French " * 300)
    with pytest.raises(RequestError, match=r"^request 0: prompt is 307 tokens long, more than max_prompt_tokens=256"):
        validate_requests([long], tok)
    assert len(validate_requests([long], tok, max_prompt_tokens=400)) == 1
    assert len(validate_requests([long], tok, max_prompt_tokens=None)) == 1
    assert len(validate_requests([long])) == 1  # no tokenizer: no length check
    with pytest.raises(ValueError):
        validate_requests([R], tok, max_prompt_tokens=0)


def test_tokenizer_failure_is_request_error():
    def broken(text, add_special_tokens=False):
        raise RuntimeError("kaput")

    with pytest.raises(RequestError, match=r"^request 0: tokenizer failed"):
        validate_requests([R], broken)


def test_from_easyedit():
    reqs = from_easyedit(
        ["The mother tongue of Danielle Darrieux is", "Paris is the capital of"],
        ["English", "Italy"],
        ["Danielle Darrieux", "Paris"],
        ["French", None],
    )
    assert reqs == [R, EditRequest("Paris is the capital of", "Paris", "Italy", None)]
    assert from_easyedit(R.prompt, "English", R.subject, "French") == [R]
    assert from_easyedit(R.prompt, "English", R.subject) == [EditRequest(R.prompt, R.subject, "English")]
    with pytest.raises(RequestError, match=r"^request 1: length mismatch"):
        from_easyedit(["a X", "b X"], ["t"], ["X", "X"])
    with pytest.raises(RequestError, match=r"^request 0: length mismatch"):
        from_easyedit(["a X"], ["t"], ["X"], [])
    with pytest.raises(RequestError, match=r"^request 1: field 'target_new' must be a string"):
        from_easyedit(["a X", "b X"], ["t", 3], ["X", "X"])
    with pytest.raises(RequestError):
        from_easyedit(5, "t", "X")


# --------------------------------------------------------------------------- properties

_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.binary(max_size=5),
)
_value = st.recursive(
    _scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=6
)
_key = st.sampled_from(
    ["prompt", "src", "subject", "target_new", "alt", "target_true", "ground_truth", "pred", "other"]
)
_item = st.one_of(
    _value,
    st.dictionaries(_key, _value, max_size=6),
    st.builds(
        EditRequest, st.text(max_size=20), st.text(max_size=10), st.text(max_size=10), st.none() | st.text(max_size=10)
    ),
)


def _check_valid(out, n_in):
    assert isinstance(out, list) and len(out) == n_in
    for r in out:
        assert isinstance(r, EditRequest)
        assert r.target_new == r.target_new.strip() and r.target_new
        assert r.template().count("{}") == 1
        assert r.template().format(r.subject) == r.text()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_item, max_size=5))
def test_property_random_items(items):
    try:
        out = validate_requests(items)
    except RequestError as e:
        assert str(e).startswith("request")
        if e.index is not None:
            assert 0 <= e.index < len(items)
        return
    _check_valid(out, len(items))


@settings(max_examples=150, deadline=None)
@given(
    prefix=st.text(max_size=200),
    subject=st.text(min_size=0, max_size=40),
    suffix=st.text(max_size=2000),
    target=st.text(max_size=50),
    truth=st.none() | st.text(max_size=50),
)
def test_property_unicode_strings(prefix, subject, suffix, target, truth):
    d = {"prompt": prefix + subject + suffix, "subject": subject, "target_new": target, "target_true": truth}
    try:
        out = validate_requests([d, d])
    except RequestError as e:
        assert str(e).startswith(("request 0: ", "request 1: "))
        return
    raise AssertionError(f"a request twice must be a duplicate, got {out}")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    words=st.lists(
        st.sampled_from(["The", "capital", "of", "Paris", "is", "#", "ü", "{}", " "]), min_size=1, max_size=8
    ),
    target=st.text(alphabet="#ab French", max_size=8),
)
def test_property_with_tokenizer(tok, words, target):
    prompt = " ".join(words)
    d = {"prompt": prompt, "subject": "Paris", "target_new": target}
    try:
        out = validate_requests([d], tok, max_prompt_tokens=5)
    except RequestError as e:
        assert str(e).startswith("request 0: ")
        return
    _check_valid(out, 1)
    assert tok(" " + out[0].target_new, add_special_tokens=False)["input_ids"]
