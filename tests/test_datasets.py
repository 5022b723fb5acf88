"""Dataset loading: format detection, shipped files, corrupt input."""

from __future__ import annotations

import gzip
import json
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metake_fast.datasets import (
    DATA_DIR,
    DATASET_NAMES,
    DatasetError,
    EvalCase,
    cases_from_records,
    detect_format,
    load_dataset,
    load_requests,
)
from metake_fast.requests import EditRequest, validate_requests

FLAT = {
    "case_id": 7,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "subject": "Danielle Darrieux",
    "target_new": "English",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}
FULL = {
    "case_id": 106,
    "requested_rewrite": {
        "prompt": "{}'s domain of activity is",
        "relation_id": "P101",
        "target_new": {"str": "mathematics", "id": "Q395"},
        "target_true": {"str": "physics", "id": "Q413"},
        "subject": "John Henry Poynting",
    },
    "paraphrase_prompts": ["John Henry Poynting's domain of work is"],
    "neighborhood_prompts": ["Humphry Davy's area of work is", "Henry Cavendish works in"],
    "attribute_prompts": ["Alan Turing works in the field of"],
    "generation_prompts": ["John Henry Poynting is known for"],
}
ZSRE = {
    "subject": "Jay Leno's Garage",
    "src": "Which was the network that originally hosted Jay Leno's Garage?",
    "pred": "NBC",
    "rephrase": "What network originally housed Jay Leno's Garage?",
    "alt": "Comedy Central",
    "answers": ["CNBC"],
    "loc": "nq question: colby cheese is named after a town in what state",
    "loc_ans": "Wisconsin",
}
EASYEDIT = {"prompt": "Paris is the capital of", "subject": "Paris", "target_new": "Italy"}


def write(tmp_path, name, obj, *, lines=False, gz=False):
    text = "\n".join(json.dumps(o) for o in obj) + "\n" if lines else json.dumps(obj)
    data = text.encode()
    p = tmp_path / name
    p.write_bytes(gzip.compress(data) if gz else data)
    return p


# --------------------------------------------------------------------------- shipped files


@pytest.mark.parametrize(
    "name, n_total, fmt, dataset",
    [
        ("counterfact", 1000, "flat", "counterfact"),
        ("counterfact-full", 239, "full", "counterfact"),
        ("zsre", 737, "zsre", "zsre"),
    ],
)
def test_shipped(name, n_total, fmt, dataset):
    cases = load_dataset(name)
    assert len(cases) == n_total
    assert {c.format for c in cases} == {fmt} and {c.dataset for c in cases} == {dataset}
    assert all(isinstance(c, EvalCase) and isinstance(c.request, EditRequest) for c in cases)
    for c in cases:
        assert c.request.template().count("{}") == 1
        assert c.request.target_true and c.request.target_true != c.request.target_new
    assert len(load_dataset(name, n=5)) == 5
    assert load_dataset(name, n=3)[2].request == cases[2].request
    # the same file by path gives the same cases
    assert load_dataset(DATA_DIR / DATASET_NAMES[name], n=10) == cases[:10]
    # the shipped files are valid batches
    assert len(validate_requests([c.request for c in cases])) == n_total


def test_skip_takes_a_later_slice_of_the_records():
    whole = load_dataset("zsre", 30)
    part = load_dataset("zsre", 10, skip=20)
    assert [c.request for c in part] == [c.request for c in whole[20:30]]
    assert load_dataset("zsre", skip=0) == load_dataset("zsre")
    n = len(load_dataset("zsre"))
    for bad, needle in [(-1, "non-negative"), (1.5, "non-negative"), (True, "non-negative"), (n, "cannot skip")]:
        with pytest.raises(DatasetError, match=needle):
            load_dataset("zsre", 5, skip=bad)


def test_shipped_fields():
    flat = load_dataset("counterfact", n=1)[0]
    assert flat.request == EditRequest(
        "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French"
    )
    assert flat.paraphrase_prompts and flat.neighborhood_prompts and flat.neighborhood_true == "French"
    full = load_dataset("counterfact-full", n=1)[0]
    assert full.request.prompt == "{}'s domain of activity is"
    assert len(full.paraphrase_prompts) == 2 and len(full.neighborhood_prompts) == 10
    assert len(full.generation_prompts) == 10 and len(full.attribute_prompts) == 10
    assert full.neighborhood_true == full.request.target_true == "physics"
    z = load_dataset("zsre", n=1)[0]
    assert z.request.target_new == "Comedy Central" and z.request.target_true == "NBC"
    assert z.loc_prompts and z.loc_answers == ["Wisconsin"] and z.extra["answers"] == ["CNBC"]
    assert z.case_id == 0 and z.neighborhood_true is None
    assert load_requests("zsre", 2) == [c.request for c in load_dataset("zsre", 2)]


# --------------------------------------------------------------------------- tiny files, every format


@pytest.mark.parametrize("lines", [False, True])
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "rec, fmt",
    [(FLAT, "flat"), (FULL, "full"), (ZSRE, "zsre"), (EASYEDIT, "flat")],
)
def test_tiny_files(tmp_path, rec, fmt, lines, gz):
    second = json.loads(json.dumps(rec).replace("Darrieux", "Darrieu").replace("Poynting", "Poyntin"))
    second = json.loads(json.dumps(second).replace("Garage", "Garag").replace("Paris", "Pari"))
    # a misleading name: detection is by content
    p = write(tmp_path, "data.txt", [rec, second], lines=lines, gz=gz)
    cases = load_dataset(p)
    assert [c.format for c in cases] == [fmt, fmt]
    assert detect_format(rec) == fmt
    assert cases[0].request.template().count("{}") == 1
    assert len(load_dataset(str(p), n=1)) == 1


def test_easyedit_lists_and_defaults(tmp_path):
    rec = {
        "prompt": "{} is the capital of",
        "subject": "Paris",
        "target_new": "  Italy ",
        "rephrase_prompt": ["The country whose capital is Paris is", "Paris, capital of"],
        "locality_prompt": ["Berlin is the capital of"],
        "locality_ground_truth": "Germany",
    }
    (c,) = load_dataset(write(tmp_path, "e.json", [rec]))
    assert c.request == EditRequest("{} is the capital of", "Paris", "Italy", None)
    assert len(c.paraphrase_prompts) == 2 and c.neighborhood_prompts == ["Berlin is the capital of"]
    assert c.neighborhood_true == "Germany" and c.case_id == 0 and c.format == "flat"
    (c,) = load_dataset(write(tmp_path, "e1.json", EASYEDIT))  # a single object
    assert c.request.target_true is None and c.paraphrase_prompts == []


def test_plain_json_and_jsonl_suffixes(tmp_path):
    a = load_dataset(write(tmp_path, "x.json", [FLAT]))
    b = load_dataset(write(tmp_path, "x.jsonl", [FLAT], lines=True))
    c = load_dataset(write(tmp_path, "x.json.gz", [FLAT], gz=True))
    assert a == b == c


def test_missing_subject_policy(tmp_path):
    bad = dict(ZSRE, subject="Jay Leno's Car Show")
    ci = dict(ZSRE, subject="jay leno's garage", alt="CBS")
    p = write(tmp_path, "z.json", [ZSRE, bad, ci])
    with pytest.warns(UserWarning, match=r"skipped 1 record.*\[1\]"):
        cases = load_dataset(p)
    assert [c.case_id for c in cases] == [0, 2]
    assert cases[1].request.subject == "Jay Leno's Garage"  # case-insensitive match -> span of the prompt
    with pytest.raises(DatasetError, match=r"record 1: field 'subject': .*does not occur"):
        load_dataset(p, on_missing_subject="error")
    with pytest.warns(UserWarning):
        assert len(load_dataset(p, n=2)) == 2  # n counts cases, skipping continues


# --------------------------------------------------------------------------- errors


def test_missing_and_unknown(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "nope.json")
    with pytest.raises(DatasetError, match="not a known dataset name"):
        load_dataset("counterfact-huge")
    with pytest.raises(DatasetError, match="not a regular file"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset format"):
        load_dataset(write(tmp_path, "u.json", [{"question": "q", "answer": "a"}]))
    with pytest.raises(DatasetError, match="top-level JSON must be a list"):
        load_dataset(write(tmp_path, "s.json", "just a string"))
    with pytest.raises(DatasetError, match="record 0: expected a JSON object"):
        load_dataset(write(tmp_path, "l.json", [[1, 2]]))
    with pytest.raises(DatasetError, match="file is empty"):
        (tmp_path / "e.json").write_text("  \n")
        load_dataset(tmp_path / "e.json")
    assert load_dataset(write(tmp_path, "empty_list.json", [])) == []
    with pytest.raises(DatasetError, match="n must be"):
        load_dataset("zsre", n=-1)
    with pytest.raises(DatasetError):
        load_dataset(123)  # type: ignore[arg-type]


def test_truncated_and_corrupt(tmp_path):
    text = json.dumps([FLAT, FLAT])
    (tmp_path / "t.json").write_text(text[: len(text) // 2])
    with pytest.raises(DatasetError, match="truncated JSON"):
        load_dataset(tmp_path / "t.json")
    (tmp_path / "c.json").write_text(text.replace(":", ";", 1))
    with pytest.raises(DatasetError, match="invalid JSON.*line 1 column"):
        load_dataset(tmp_path / "c.json")
    # JSON lines with a truncated last line, and a corrupt middle line
    lines = json.dumps(FLAT) + "\n" + json.dumps(dict(FLAT, case_id=8, subject="Darrieux"))
    (tmp_path / "t.jsonl").write_text(lines[:-10])
    with pytest.raises(DatasetError, match="truncated JSON lines: line 2"):
        load_dataset(tmp_path / "t.jsonl")
    (tmp_path / "c.jsonl").write_text(json.dumps(FLAT) + "\n{oops\n" + json.dumps(FLAT))
    with pytest.raises(DatasetError, match="invalid JSON lines: line 2"):
        load_dataset(tmp_path / "c.jsonl")
    gz = gzip.compress(text.encode())
    (tmp_path / "t.json.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DatasetError, match="truncated gzip"):
        load_dataset(tmp_path / "t.json.gz")
    (tmp_path / "c.json.gz").write_bytes(gz[:12] + b"\x00" * 20 + gz[32:])
    with pytest.raises(DatasetError, match="gzip"):
        load_dataset(tmp_path / "c.json.gz")
    (tmp_path / "b.json").write_bytes(b"[\xff\xfe]")
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_dataset(tmp_path / "b.json")


@pytest.mark.parametrize(
    "records, pattern",
    [
        ([FLAT, dict(FLAT, target_new=5)], r"record 1: field 'target_new': expected a string, got int"),
        ([FLAT, dict(FLAT, prompt=None)], r"record 1: field 'prompt': is null"),
        ([FLAT, {k: v for k, v in FLAT.items() if k != "subject"}], r"record 1: field 'subject': missing"),
        ([FLAT, dict(FLAT, rephrase_prompt=[1])], r"record 1: field 'rephrase_prompt\[0\]': expected a string"),
        ([FLAT, dict(FLAT, locality_prompt={"a": 1})], r"record 1: field 'locality_prompt': expected a list"),
        ([FLAT, dict(FLAT, case_id=1.5)], r"record 1: field 'case_id'"),
        ([FLAT, dict(FLAT, target_new=" ")], r"record 1: field 'target_new': field 'target_new' is empty"),
        ([FLAT, dict(FLAT, ground_truth="English")], r"record 1: field 'target_new'.*equals target_true"),
        ([FULL, dict(FULL, requested_rewrite=[])], r"record 1: field 'requested_rewrite': expected a JSON object"),
        (
            [FULL, dict(FULL, requested_rewrite=dict(FULL["requested_rewrite"], target_new={"id": "Q1"}))],
            r"record 1: field 'requested_rewrite.target_new': expected a string, got dict",
        ),
        (
            [FULL, dict(FULL, requested_rewrite=dict(FULL["requested_rewrite"], prompt="{} {} is"))],
            r"record 1: field 'requested_rewrite.prompt': prompt has 2",
        ),
        ([FULL, dict(FULL, neighborhood_prompts="x")], None),  # a lone string is accepted
        ([ZSRE, dict(ZSRE, alt=["a"])], r"record 1: field 'alt': expected a string, got list"),
        ([ZSRE, dict(ZSRE, loc=["a", "b"], loc_ans=["c"])], r"record 1: field 'loc_ans'"),
        ([ZSRE, FLAT], r"record 1: field 'src': missing"),  # mixed formats
        ([ZSRE, 3], r"record 1: expected a JSON object, got int"),
    ],
)
def test_record_errors_name_index_and_field(tmp_path, records, pattern):
    p = write(tmp_path, "r.json", records)
    if pattern is None:
        assert len(load_dataset(p)) == 2
        return
    with pytest.raises(DatasetError, match=pattern):
        load_dataset(p, on_missing_subject="error")
    assert len(load_dataset(p, n=1)) == 1  # only the first n records are read


# --------------------------------------------------------------------------- properties

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=8,
)
_keys = st.sampled_from(
    [
        "prompt",
        "subject",
        "target_new",
        "ground_truth",
        "rephrase_prompt",
        "locality_prompt",
        "locality_ground_truth",
        "case_id",
        "requested_rewrite",
        "paraphrase_prompts",
        "neighborhood_prompts",
        "generation_prompts",
        "src",
        "alt",
        "pred",
        "rephrase",
        "loc",
        "loc_ans",
        "answers",
        "str",
    ]
)
_record = st.recursive(_json, lambda c: st.dictionaries(_keys, c, max_size=8), max_leaves=12)


def _mutations():
    base = st.sampled_from([FLAT, FULL, ZSRE, EASYEDIT])
    return st.builds(lambda b, upd: {**b, **upd}, base, st.dictionaries(_keys, _json, max_size=3))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_record | _mutations(), max_size=4), st.none() | st.integers(0, 5))
def test_property_records_never_crash(records, n):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cases = cases_from_records(records, n=n)
        except DatasetError as e:
            assert str(e)
            return
    assert n is None or len(cases) <= n
    for c in cases:
        assert isinstance(c, EvalCase) and c.format in ("flat", "full", "zsre")
        assert c.request.template().count("{}") == 1
        assert all(isinstance(s, str) for s in c.paraphrase_prompts + c.neighborhood_prompts)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode), st.booleans())
def test_property_random_bytes_never_crash(tmp_path, data, gz):
    p = tmp_path / "rnd.bin"
    p.write_bytes(gzip.compress(data) if gz else data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cases = load_dataset(p)
        except DatasetError:
            return
    assert isinstance(cases, list)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(st.integers(0, 10_000), st.booleans())
def test_property_truncation(tmp_path, cut, gz):
    data = json.dumps([FLAT, FULL, ZSRE][:1] * 3).encode()
    data = gzip.compress(data) if gz else data
    cut = cut % len(data)
    p = tmp_path / "cut.json"
    p.write_bytes(data[:cut])
    with pytest.raises(DatasetError):
        load_dataset(p)
