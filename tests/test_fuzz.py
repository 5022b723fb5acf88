"""Property-based fuzzing of everything that takes user input (issue: reliability).

Random and adversarial requests, files, hyperparameters and command lines go
through the loaders, :class:`Editor` and the CLI. The oracle for every case:

* a clear, documented error (``RequestError`` / ``DatasetError`` / ``HParamsError``;
  CLI: exit code 2 and exactly one ``metake-fast: error:`` line on stderr), after
  which every weight of the model is bit-for-bit what it was; or
* a correct result: loaded requests that pass validation, an edit that changed
  only the edited layers.

Never another exception, a traceback or a changed weight after an error. The
example counts below add up to more than 2,000 generated cases (``FUZZ_CASES``);
CI runs them all.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import string

import pytest

pytest.importorskip("transformers")
hypothesis = pytest.importorskip("hypothesis")

import torch  # noqa: E402
from _tiny import save_tiny, tiny_model, tiny_tokenizer  # noqa: E402
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from metake_fast.cli import main  # noqa: E402
from metake_fast.datasets import DatasetError, load_dataset, load_requests  # noqa: E402
from metake_fast.editor import EditError, Editor  # noqa: E402
from metake_fast.hparams import HParamsError, make_hparams  # noqa: E402
from metake_fast.requests import EditRequest, RequestError, validate_requests  # noqa: E402

CASES = {"files": 500, "hparams": 400, "editor": 600, "cli": 550}
FUZZ_CASES = sum(CASES.values())
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=False, database=None)

SMALL = {
    "v_num_grad_steps": 2,
    "stats_tokens": 1500,
    "stats_max_length": 48,
    "context_template_count": 1,
    "context_template_length": 3,
}


def test_fuzz_budget_is_at_least_2000():
    assert FUZZ_CASES >= 2000


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- strategies

NASTY_TEXT = [
    "", " ", "\n", "\t\t", "{}", "{} {}", "{0}", "{subject}", "%s", "\x00", "\ufeff", "\u200b",
    "é", "日本語", "🙂🙂", "ـــ", "a" * 5000, "The {} of", "NaN", "null", "\\u0000", "{{}}",
]  # fmt: skip
FIELDS = [
    "prompt", "subject", "target_new", "ground_truth", "target_true", "rephrase_prompt", "locality_prompt",
    "locality_ground_truth", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts",
    "generation_prompts", "src", "alt", "pred", "loc", "loc_ans", "rephrase", "answers", "case_id", "str", "id",
]  # fmt: skip

texts = st.one_of(st.sampled_from(NASTY_TEXT), st.text(max_size=40), st.text(string.ascii_letters + " {}", max_size=30))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), texts
)
json_values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), c, max_size=5),
    max_leaves=12,
)

FLAT = {
    "case_id": 7, "prompt": "Danielle Darrieux speaks", "subject": "Danielle Darrieux", "target_new": "English",
    "ground_truth": "French", "rephrase_prompt": "The language of Danielle Darrieux is",
    "locality_prompt": "Michel Rocard speaks", "locality_ground_truth": "French",
}  # fmt: skip
FULL = {
    "case_id": 3,
    "requested_rewrite": {"prompt": "{} is a native speaker of", "subject": "Danielle Darrieux",
                          "target_new": {"str": "English"}, "target_true": {"str": "French"}},
    "paraphrase_prompts": ["She was born in Paris. Danielle Darrieux speaks"],
    "neighborhood_prompts": ["Michel Rocard speaks"],
    "generation_prompts": ["Danielle Darrieux often talks about"],
}  # fmt: skip
ZSRE = {
    "subject": "Jay Leno's Garage", "src": "Which network hosted Jay Leno's Garage?", "pred": "NBC",
    "rephrase": "What network aired Jay Leno's Garage?", "alt": "Comedy Central", "answers": ["CNBC"],
    "loc": "nq question: who wrote the hobbit", "loc_ans": "Tolkien",
}  # fmt: skip
EASY = {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "ground_truth": "Paris"}


def _paths(obj, prefix=()):
    """Every (key path) inside nested dicts/lists."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated_record(draw):
    """A valid record of some format with a few of its fields deleted or replaced by random values."""
    rec = copy.deepcopy(draw(st.sampled_from([FLAT, FULL, ZSRE, EASY])))
    for _ in range(draw(st.integers(0, 3))):
        paths = [p for p in _paths(rec) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = rec
        for k in path[:-1]:
            parent = parent[k]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return rec


@st.composite
def file_bytes(draw):
    """Bytes of a requests / dataset file: JSON array, JSON lines, gzip, truncated or garbage."""
    records = draw(st.lists(mutated_record() | json_values, min_size=0, max_size=4))
    mode = draw(st.sampled_from(["array", "lines", "gzip", "truncated", "object", "garbage", "empty"]))
    if mode == "garbage":
        return draw(st.binary(max_size=200)), False
    if mode == "empty":
        return b"", False
    if mode == "object":
        text = json.dumps(draw(json_values))
    elif mode == "lines":
        text = "\n".join(json.dumps(r) for r in records)
    else:
        text = json.dumps(records)
    data = text.encode()  # json.dumps escapes everything outside ASCII
    if mode == "gzip":
        return gzip.compress(data), True
    if mode == "truncated" and data:
        return data[: draw(st.integers(0, len(data) - 1))], False
    return data, False


# --------------------------------------------------------------------------- loaders


@settings(max_examples=CASES["files"], **SETTINGS)
@given(content=file_bytes())
def test_fuzz_request_and_dataset_files(tmp_path_factory, content):
    data, gz = content
    path = tmp_path_factory.mktemp("fz") / ("cases.json.gz" if gz else "cases.json")
    path.write_bytes(data)
    tok = tiny_tokenizer()
    try:
        cases = load_dataset(path)
    except DatasetError as e:
        assert str(e).strip()
        with pytest.raises(DatasetError):
            load_requests(path)
        return
    reqs = load_requests(path)
    assert len(reqs) == len(cases) and all(isinstance(r, EditRequest) for r in reqs)
    for r in reqs:
        assert r.subject and r.subject in r.text() and r.target_new.strip()
    try:
        ok = validate_requests(reqs, tok)
    except RequestError as e:
        assert e.index is None or 0 <= e.index < len(reqs)
        return
    assert len(ok) == len(reqs)


# --------------------------------------------------------------------------- hyperparameters

HP_FIELDS = [
    "layers", "v_num_grad_steps", "v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor", "L2",
    "nullspace_threshold", "stats_tokens", "stats_max_length", "context_template_count",
    "context_template_length", "outer_steps", "outer_lr", "gamma", "omega", "gate", "gate_layers", "gate_keys",
    "mom2_update_weight",
    "safeguard", "safeguard_margin", "outer_kl", "target_chunk_tokens",
]  # fmt: skip
hp_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**12), st.booleans(), st.none(), texts,
    st.lists(st.integers(-40, 40), max_size=5), st.sampled_from(["norm", "full", "diag", "last", "spread", "product", "mean", "instance"]),
)  # fmt: skip


def _finite_numbers(hp) -> bool:
    for v in vars(hp).values():
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(x, float) and not math.isfinite(x):
                return False
    return True


@settings(max_examples=CASES["hparams"], **SETTINGS)
@given(
    method=st.sampled_from(["rome", "memit", "alphaedit", "metake", "ROME", "nope", ""]),
    values=st.dictionaries(st.sampled_from(HP_FIELDS) | st.text(max_size=6), hp_values, max_size=4),
    num_layers=st.integers(1, 40),
)
def test_fuzz_hparams(method, values, num_layers):
    try:
        hp = make_hparams(method, values, num_layers=num_layers)
    except HParamsError as e:
        assert str(e).strip()
        return
    assert _finite_numbers(hp)
    assert all(0 <= layer < num_layers for layer in hp.layers or [])
    assert hp.v_num_grad_steps >= 1 and hp.stats_tokens >= 1 and hp.v_lr > 0


# --------------------------------------------------------------------------- Editor


@pytest.fixture(scope="module")
def fuzz_editor(tmp_path_factory):
    ed = Editor(
        tiny_model("llama", layers=4), tiny_tokenizer(), "memit", {**SMALL, "layers": [1, 2]},
        cache=tmp_path_factory.mktemp("fz_cache"), progress=False,
    )  # fmt: skip
    ed.edit([EASY], batch_size=1, score=False)  # statistics and templates once; weights now edited
    ed.restore()
    return ed


WORDS = ["France", "Paris", "Rome", "the river", "Bob", "Bob Bob", "é", "日本", "🙂", "", " ", "a" * 3000]
GOOD = ["France", "the river Nile", "Bob Smith", "Danielle Darrieux", "Toko Yasuda", "日本"]
OBJECTS = ["Rome", "Paris", "English", "the Baltic", "Google", "piano", "東京"]


def _request(pre, subj, post, new, true):
    return {"prompt": pre + subj + post, "subject": subj, "target_new": new, "target_true": true}


# Mostly well-formed requests (so that many cases run a real edit), mixed with adversarial ones.
good_requests = st.builds(
    _request, st.sampled_from(["The ", "", "In 1990 ", "Today "]), st.sampled_from(GOOD),
    st.sampled_from([" is", " lives in", " speaks", " works for"]), st.sampled_from(OBJECTS),
    st.none() | st.sampled_from(OBJECTS),
)  # fmt: skip
bad_requests = st.builds(
    _request, st.sampled_from(["The ", "", "{} ", "In {} {} "]) | texts, st.sampled_from(WORDS) | texts,
    st.sampled_from([" is", " lives in", "", " {}"]) | texts, st.sampled_from(WORDS) | texts,
    st.none() | st.sampled_from(WORDS) | st.floats(allow_nan=True),
)  # fmt: skip
request_items = st.one_of(good_requests, good_requests, good_requests, bad_requests, mutated_record(), json_values)
batch_sizes = st.sampled_from([1] * 6 + [2] * 3 + [3, 3, 100] + [0, -1, None, True, 2.5, "2"])


def _weights(ed: Editor) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in ed.model.state_dict().items()}


@settings(max_examples=CASES["editor"], **SETTINGS)
@given(items=st.lists(request_items, min_size=0, max_size=3) | request_items, batch_size=batch_sizes)
def test_fuzz_editor(fuzz_editor, items, batch_size):
    ed = fuzz_editor
    before = _weights(ed)
    try:
        report = ed.edit(items, batch_size=batch_size, score=False)
    except (RequestError, EditError) as e:
        event(f"error: {getattr(e, 'code', type(e).__name__)}")
        assert str(e).strip()
        after = ed.model.state_dict()
        for k, v in before.items():
            assert torch.equal(after[k], v), f"{k} changed after {type(e).__name__}: {e}"
        return
    event(f"edited {len(report.requests)}")
    try:
        after = ed.model.state_dict()
        changed = {k for k, v in before.items() if not torch.equal(after[k], v)}
        assert changed <= {k for k in before if any(f"layers.{i}.mlp" in k for i in (1, 2))}
        assert all(torch.isfinite(after[k]).all() for k in changed)
        assert len(report.requests) == (len(items) if isinstance(items, list) else 1)
        assert bool(changed) == bool(report.requests)
    finally:
        ed.restore()


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fz_cli")
    model = save_tiny(d / "model", layers=4)
    (d / "reqs.json").write_text(json.dumps([EASY]))
    (d / "cf.json").write_text(json.dumps([FLAT, {**FLAT, "case_id": 8, "target_new": "German"}]))
    (d / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": f"Document {i} speaks of the river and the town."}) + "\n" for i in range(40))
    )
    return d, model


def _yaml_value(v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return ".nan"
    if isinstance(v, float) and math.isinf(v):
        return ".inf" if v > 0 else "-.inf"
    return json.dumps(v)


arg_values = st.one_of(
    st.sampled_from(["0", "-1", "1", "2", "nan", "inf", "1e9", "", "x", "2.5", "0-3", "3-1", "99", "-2", "1,1"]),
    st.text(max_size=10).filter(lambda s: not s.startswith("-") and "\x00" not in s),
)  # fmt: skip
# steps / template settings are bounded so that a valid random file cannot start an hours-long edit
cheap_hp = st.dictionaries(
    st.sampled_from(HP_FIELDS) | st.text(max_size=6),
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-3, 3),
        st.none(),
        st.booleans(),
        texts,
        st.lists(st.integers(-6, 6), max_size=3),
    ),
    max_size=3,
)


@settings(max_examples=CASES["cli"], **SETTINGS)
@given(
    command=st.sampled_from(["edit", "evaluate", "stats"]),
    flags=st.dictionaries(
        st.sampled_from(
            ["--batch-size", "--num-edits", "--layers", "--stats-tokens", "--dtype", "--method", "--checkpoint"]
        ),
        arg_values, max_size=2,
    ),
    hp=st.one_of(st.none(), st.none(), cheap_hp),
    requests=st.one_of(st.none(), st.none(), file_bytes()),
    drop=st.sampled_from([None] * 6 + ["--model", "--out", "--data", "--requests", "--save-delta"]),
)  # fmt: skip
def test_fuzz_cli(capsys, tmp_path_factory, cli_files, command, flags, hp, requests, drop):
    d, model = cli_files
    work = tmp_path_factory.mktemp("run")
    base = {"--model": str(model), "--corpus": str(d / "corpus.jsonl"), "--cache-dir": str(d / "cache")}
    data_file = d / ("reqs.json" if command == "edit" else "cf.json")
    if requests is not None:
        data_file = work / "input.json"
        data_file.write_bytes(requests[0])
    if command == "edit":
        base |= {"--requests": str(data_file), "--save-delta": str(work / "delta.safetensors")}
    elif command == "evaluate":
        base |= {"--dataset": "counterfact", "--data": str(data_file), "--num-edits": "1", "--batch-size": "1",
                 "--out": str(work / "res.json"), "--fluency": "off"}  # fmt: skip
    else:
        base |= {"--layers": "1,2", "--tokens": "500", "--max-length": "32"}
    if hp is not None and command != "stats":
        hp = {k: v for k, v in hp.items() if not (k in ("v_num_grad_steps", "outer_steps") and v not in (1, 2))}
        (work / "hp.yaml").write_text("".join(f"{json.dumps(str(k))}: {_yaml_value(v)}\n" for k, v in hp.items()))
        base["--hparams"] = str(work / "hp.yaml")
    elif command != "stats":
        (work / "hp.yaml").write_text("".join(f"{k}: {v}\n" for k, v in SMALL.items()) + "layers: [1, 2]\n")
        base["--hparams"] = str(work / "hp.yaml")
    for k, v in flags.items():
        if command == "stats" and k in ("--num-edits", "--batch-size", "--method"):
            continue
        if command == "edit" and k == "--num-edits":
            continue
        if command != "stats" and k == "--layers":
            continue
        if k == "--checkpoint":
            if command != "evaluate":
                continue
            # an existing file, a fresh directory, or a path below a file
            v = {"0": str(d / "cf.json"), "1": str(work / "ck"), "2": str(d / "cf.json" / "ck")}.get(
                v[:1], str(work / v)
            )
        base[k] = v
    if drop:
        base.pop(drop, None)
    argv = [command, "--no-progress"]
    for k, v in base.items():
        argv += [k, v] if not v.startswith("-") else [f"{k}={v}"]
    rc = main(argv)
    out, err = capsys.readouterr()
    event(f"{command} rc={rc}")
    assert "Traceback" not in err and "Traceback" not in out
    assert rc in (0, 2), (rc, argv, err)
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("metake-fast: error: "), (argv, err)
    elif command == "edit":
        assert (work / "delta.safetensors").exists()
    elif command == "evaluate":
        assert json.loads((work / "res.json").read_text())["num_edits"] == 1
