"""Hyperparameter files as the published code bases write them (MEMIT / AlphaEdit JSON, EasyEdit
YAML): exponent floats are numbers, their bookkeeping fields are accepted, and the two ROME
settings they carry (``mom2_adjustment: false``, ``context_template_length_params``) act as
published. The values below are the published Llama-3-8B settings (AlphaEdit paper's code and
EasyEdit)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from _tiny import tiny_model, tiny_tokenizer  # noqa: E402

from metake_fast import hparams as hparams_mod  # noqa: E402
from metake_fast import stats as stats_mod  # noqa: E402
from metake_fast.editor import Editor  # noqa: E402
from metake_fast.hparams import (  # noqa: E402
    HParamsError,
    hparams_differences,
    load_hparams,
    make_hparams,
    parse_overrides,
    read_yaml,
    shipped_hparams_file,
    to_dict,
)
from metake_fast.models import get_adapter  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# the module paths and dataset names these files carry have no meaning here
BOOKKEEPING = {
    "fact_token": "subject_last",
    "layer_selection": "all",
    "v_loss_layer": 31,
    "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
    "layer_module_tmp": "model.layers.{}",
    "mlp_module_tmp": "model.layers.{}.mlp",
    "attn_module_tmp": "model.layers.{}.self_attn",
    "ln_f_module": "model.norm",
    "lm_head_module": "lm_head",
    "mom2_dataset": "wikipedia",
    "mom2_dtype": "float32",
}
ALPHAEDIT_LLAMA3 = {
    "model_name": "Llama3-8B",
    "layers": [4, 5, 6, 7, 8],
    "clamp_norm_factor": 0.75,
    "v_num_grad_steps": 25,
    "v_weight_decay": 0.5,
    "kl_factor": 0.0625,
    "mom2_adjustment": True,
    "mom2_update_weight": 15000,
    "mom2_n_samples": 100000,
    **BOOKKEEPING,
    "L2": 10,
}
# written as the published files write them: exponent floats without a decimal point
EXP_FLOATS = '"v_lr": 1e-1,\n  "nullspace_threshold": 2e-2'


def _json_file(tmp_path, fields: dict, extra: str = "") -> str:
    body = json.dumps(fields, indent=2)[1:-2]  # no braces, no trailing newline
    p = tmp_path / "published.json"
    p.write_text("{" + body + (",\n  " + extra if extra else "") + "\n}\n")
    return str(p)


def _yaml_file(tmp_path, text: str) -> str:
    p = tmp_path / "published.yaml"
    p.write_text(text)
    return str(p)


def test_exponent_floats_are_numbers_in_yaml(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-1` as a string; YAML 1.2 and JSON read a number
    p = _yaml_file(tmp_path, "v_lr: 1e-1\nnullspace_threshold: 2e-2\nL2: 1E+1\nkl_factor: .5e-1\nalg_name: 1e5x\n")
    d = read_yaml(p)
    assert d["v_lr"] == pytest.approx(0.1) and isinstance(d["v_lr"], float)
    assert d["nullspace_threshold"] == pytest.approx(0.02)
    assert d["L2"] == pytest.approx(10.0) and d["kl_factor"] == pytest.approx(0.05)
    assert d["alg_name"] == "1e5x"  # not a number: stays a string
    hp = load_hparams("alphaedit", path=p, num_layers=12, overrides={"layers": [1]})
    assert (hp.v_lr, hp.nullspace_threshold, hp.L2) == (pytest.approx(0.1), pytest.approx(0.02), 10.0)


def test_set_overrides_read_values_as_the_files_do():
    d = parse_overrides(["v_num_grad_steps=50", "v_lr=1e-1", "layers=[4, 5,6]", "outer_kl=false",
                         "gate_layers = spread", "v_num_grad_steps=60"])  # fmt: skip
    assert d == {"v_num_grad_steps": 60, "v_lr": 0.1, "layers": [4, 5, 6], "outer_kl": False, "gate_layers": "spread"}
    assert isinstance(d["v_lr"], float) and isinstance(d["v_num_grad_steps"], int)
    hp = load_hparams("metake", "smollm2-135m", num_layers=30, overrides=d)  # on top of the shipped file
    shipped = load_hparams("metake", "smollm2-135m", num_layers=30)
    assert (hp.v_num_grad_steps, hp.v_lr, hp.layers, hp.outer_kl) == (60, 0.1, [4, 5, 6], False)
    assert hp.L2 == shipped.L2 and hp.safeguard == shipped.safeguard  # the rest stays the shipped file's


@pytest.mark.parametrize(
    "item, needle",
    [("v_num_grad_steps", "KEY=VALUE"), ("=3", "KEY=VALUE"), ("v_lr=", "no value"), ("layers=[1, 2", "not a valid")],
)
def test_set_overrides_bad_syntax_is_one_clear_error(item, needle):
    with pytest.raises(HParamsError, match=needle) as e:
        parse_overrides([item])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["alphaedit", "metake"])
def test_published_alphaedit_json_loads(tmp_path, method):
    hp = load_hparams(method, path=_json_file(tmp_path, ALPHAEDIT_LLAMA3, EXP_FLOATS), num_layers=32)
    assert hp.layers == [4, 5, 6, 7, 8]
    assert hp.v_lr == pytest.approx(0.1) and hp.nullspace_threshold == pytest.approx(0.02)
    assert (hp.v_weight_decay, hp.clamp_norm_factor, hp.L2, hp.stats_tokens) == (0.5, 0.75, 10.0, 100000)


def test_published_alphaedit_json_for_memit_names_the_foreign_field(tmp_path):
    with pytest.raises(HParamsError, match="(L2|nullspace_threshold).*a field of alphaedit"):
        load_hparams("memit", path=_json_file(tmp_path, ALPHAEDIT_LLAMA3, EXP_FLOATS), num_layers=32)


def test_easyedit_yaml_with_its_run_fields_loads(tmp_path):
    text = (
        'alg_name: "AlphaEdit"\nmodel_name: "./hugging_cache/llama-3-8b"\nstats_dir: "./data/stats"\n'
        'P_loc: "./null_space_project.pt"\ndevice: 0\nlayers: [4, 5, 6, 7, 8]\nv_lr: 1e-1\n'
        "nullspace_threshold: 2e-2\nmom2_adjustment: true\nmom2_update_weight: 15000\nfp16: false\n"
    )
    hp = load_hparams("alphaedit", path=_yaml_file(tmp_path, text), num_layers=32)
    assert hp.v_lr == pytest.approx(0.1) and hp.layers == [4, 5, 6, 7, 8]


def test_invalid_json_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"v_lr": 0.1,}')
    with pytest.raises(HParamsError, match="not valid JSON"):
        read_yaml(p)


@pytest.mark.parametrize("method", ["memit", "alphaedit", "metake"])
def test_mom2_adjustment_false_is_rome_only(method):
    assert make_hparams(method, {"mom2_adjustment": True}).method == method
    with pytest.raises(HParamsError, match="mom2_adjustment.*ROME only"):
        make_hparams(method, {"mom2_adjustment": False})


@pytest.mark.parametrize(
    "bad", [[[5]], [[5, -1]], [[5, 2.5]], "5,10", [[True, 3]]], ids=["short", "negative", "float", "str", "bool"]
)
def test_context_template_length_params_are_validated(bad):
    with pytest.raises(HParamsError, match="context_template_length_params"):
        make_hparams("rome", {"context_template_length_params": bad})


def test_checkpoints_saved_before_the_new_fields_still_match():
    # a checkpoint written by a version without context_template_length_params / mom2_adjustment
    for method in ("rome", "alphaedit"):
        hp = make_hparams(method, {"layers": [1]})
        stored = to_dict(hp)
        stored.pop("context_template_length_params")
        stored.pop("mom2_adjustment", None)
        assert hparams_differences(stored, hp) == []
        hp.context_template_length_params = [[5, 2]]
        assert hparams_differences(stored, hp)


# ------------------------------------------------------------------ the two ROME settings, acting


REQS = [
    {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "target_true": "Paris"},
    {"prompt": "Bob Smith works for", "subject": "Bob Smith", "target_new": "Google"},
]
SMALL = {"layers": [2], "v_num_grad_steps": 4, "stats_tokens": 2000, "stats_max_length": 64}


def _rome(hp: dict, cache=False) -> Editor:
    return Editor(tiny_model("llama", layers=4, seed=3), tiny_tokenizer(), "rome", {**SMALL, **hp}, cache=cache,
                  progress=False)  # fmt: skip


def test_rome_without_covariance_is_rome_with_identity_covariance(monkeypatch):
    # Oracle: the covariance path fed C = I. mom2_adjustment: false must give the same write and
    # must not compute any statistics.
    def identity_moments(model, tok, layers, *args, **kwargs):
        d_k = get_adapter(model).key_dim(model)
        return {layer: SimpleNamespace(mean=torch.eye(d_k)) for layer in layers}

    monkeypatch.setattr(stats_mod, "second_moment", identity_moments)
    ref = _rome({"context_template_count": 2, "context_template_length": 3})
    ref.edit(REQS, score=False)

    def no_stats(*args, **kwargs):
        raise AssertionError("mom2_adjustment: false must not compute key statistics")

    monkeypatch.setattr(stats_mod, "second_moment", no_stats)
    ed = _rome({"context_template_count": 2, "context_template_length": 3, "mom2_adjustment": False})
    ed.edit(REQS, score=False)
    assert ed.stats_seconds == 0.0
    d_ref, d = ref.weight_deltas()[2].double(), ed.weight_deltas()[2].double()
    assert d.abs().max() > 0
    torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-7)
    # and it differs from ROME with the real covariance
    monkeypatch.undo()
    cov = _rome({"context_template_count": 2, "context_template_length": 3})
    cov.edit(REQS, score=False)
    assert (cov.weight_deltas()[2].double() - d).abs().max() > 1e-3 * d.abs().max()


def test_context_template_length_params_build_one_group_per_pair():
    ed = _rome({"context_template_length_params": [[3, 2], [5, 3]]})
    templates = ed._templates()
    assert [len(g) for g in templates] == [1, 2, 3] and templates[0] == ["{}"]
    assert all(t.endswith(". {}") for g in templates[1:] for t in g)
    # one pair is the count/length form, prefix for prefix
    one = _rome({"context_template_length_params": [[4, 2]]})._templates()
    assert one == _rome({"context_template_count": 2, "context_template_length": 4})._templates()
    # the groups are used: the edit runs and its keys average over all three groups
    ed.edit(REQS[:1], score=False)
    assert ed.weight_deltas()[2].abs().max() > 0


# ------------------------------------------------------------------ shipped files for published models

# decoder layers of each model the shipped files are written for
DEPTH = {"smollm2-135m": 30, "gpt2-xl": 48, "gpt-j-6b": 28, "llama3-8b": 32, "qwen2.5-7b": 28}
SHIPPED = sorted((Path(hparams_mod.__file__).parent / "hparams").glob("*/*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[f"{p.parent.name}/{p.stem}" for p in SHIPPED])
def test_every_shipped_file_loads_for_its_model(path):
    method, model = path.parent.name, path.stem
    assert model in DEPTH, f"{path}: add the model's depth to DEPTH"
    hp = load_hparams(method, model, num_layers=DEPTH[model])
    assert hp.source == f"shipped {method}/{model}.yaml"
    assert max(hp.layers) < DEPTH[model] - 1  # at least one layer above the band


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3-8b"),
        ("/models/Meta-Llama-3-8B/", "llama3-8b"),
        ("EleutherAI/gpt-j-6B", "gpt-j-6b"),
        ("gpt2-xl", "gpt2-xl"),
        ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
        ("smollm2-135m", "smollm2-135m"),
        ("gpt2", None),
        ("/models/my-llama3-8b-finetune", None),
        ("", None),
    ],
)
def test_model_names_find_their_shipped_file(name, stem):
    f = shipped_hparams_file("alphaedit", name)
    assert (f.stem if f else None) == stem


# the published values (the AlphaEdit paper's code / EasyEdit / ROME's code) the files carry
PUBLISHED = [
    ("alphaedit", "llama3-8b", {"layers": [4, 5, 6, 7, 8], "v_lr": 0.1, "v_weight_decay": 0.5, "L2": 10.0}),
    ("alphaedit", "gpt-j-6b", {"layers": [3, 4, 5, 6, 7, 8], "v_lr": 0.5, "nullspace_threshold": 0.02}),
    ("alphaedit", "gpt2-xl", {"layers": [13, 14, 15, 16, 17], "v_num_grad_steps": 20}),
    ("alphaedit", "qwen2.5-7b", {"clamp_norm_factor": 4.0, "v_weight_decay": 1e-3, "L2": 1.0}),
    ("memit", "gpt2-xl", {"mom2_update_weight": 20000.0, "v_weight_decay": 0.5}),
    ("memit", "llama3-8b", {"mom2_update_weight": 15000.0, "v_lr": 0.1}),
    ("rome", "gpt2-xl", {"layers": [17], "clamp_norm_factor": 4.0, "mom2_adjustment": True}),
    ("rome", "llama3-8b", {"layers": [5], "mom2_adjustment": False,
                           "context_template_length_params": [[5, 10], [10, 10]]}),
    ("metake", "llama3-8b", {"v_lr": 0.1, "v_weight_decay": 0.5, "gate_layers": "spread", "outer_lr": 0.04}),
]  # fmt: skip


@pytest.mark.parametrize(("method", "model", "values"), PUBLISHED, ids=[f"{m}/{n}" for m, n, _ in PUBLISHED])
def test_shipped_files_carry_the_published_values(method, model, values):
    hp = load_hparams(method, model, num_layers=DEPTH[model])
    assert {k: getattr(hp, k) for k in values} == values


def test_a_model_named_like_a_published_one_gets_its_file():
    # a local directory named Meta-Llama-3-8B: the published ROME setting, with overrides on top
    model = tiny_model("llama", layers=8, seed=1)
    ed = Editor(model, tiny_tokenizer(), "rome", {"v_num_grad_steps": 3, "stats_tokens": 2000},
                model_name="/models/Meta-Llama-3-8B", cache=False, progress=False)  # fmt: skip
    assert ed.describe()["hparams_source"] == "shipped rome/llama3-8b.yaml + overrides (stats_tokens, v_num_grad_steps)"
    assert ed.layers == [5] and ed.hparams.mom2_adjustment is False
    assert [len(g) for g in ed._templates()] == [1, 10, 10]
    ed.edit(REQS[:1], score=False)
    assert ed.stats_seconds == 0.0 and ed.weight_deltas()[5].abs().max() > 0


def test_a_shipped_file_that_does_not_fit_the_model_names_itself():
    with pytest.raises(HParamsError, match=r"out of range.*shipped alphaedit/gpt2-xl.yaml"):
        Editor(tiny_model("gpt2", layers=4), tiny_tokenizer(), "alphaedit", model_name="gpt2-xl", cache=False,
               progress=False)  # fmt: skip


@pytest.mark.parametrize(
    ("arch", "name", "method"),
    [
        ("gptj", "EleutherAI/gpt-j-6B", "metake"),
        ("gpt2", "gpt2-xl", "alphaedit"),
        ("llama", "meta-llama/Meta-Llama-3-8B-Instruct", "metake"),
        ("qwen2", "Qwen/Qwen2.5-7B-Instruct", "memit"),
    ],
)
def test_shipped_published_files_edit_a_model_of_that_depth(arch, name, method):
    # a tiny random model with the published model's depth, named like it: its shipped file
    # (GPT-J: a six-layer band; MetaKE: the spread gate with per-prompt keys) edits and restores
    stem = shipped_hparams_file("alphaedit", name).stem
    model = tiny_model(arch, layers=DEPTH[stem], seed=2)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    small = {"v_num_grad_steps": 3, "stats_tokens": 1500, "stats_max_length": 64, "context_template_count": 2,
             "context_template_length": 3}  # fmt: skip
    if method == "metake":
        small["outer_steps"] = 2
    if method == "memit" and stem == "qwen2.5-7b":  # no published MEMIT file for Qwen2.5: defaults
        assert shipped_hparams_file("memit", name) is None
    ed = Editor(model, tiny_tokenizer(), method, small, model_name=name, cache=False, progress=False)
    shipped = shipped_hparams_file(method, name)
    if shipped is not None:
        assert ed.hparams.source.startswith(f"shipped {method}/{stem}.yaml")
        assert ed.layers == read_yaml(shipped)["layers"]
    report = ed.edit(REQS, score=True)
    assert len(report.requests) == len(REQS)
    deltas = ed.weight_deltas()
    assert set(deltas) == set(ed.layers) and all(d.abs().max() > 0 for d in deltas.values())
    ed.restore()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
