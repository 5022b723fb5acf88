"""``metake-fast edit`` / ``metake-fast evaluate`` on tiny model dirs; bad input gives exit 2 and one line."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from _tiny import save_tiny  # noqa: E402

from metake_fast.cli import SUBCOMMANDS, main  # noqa: E402

HP_YAML = """\
v_num_grad_steps: 3
stats_tokens: 2000
stats_max_length: 64
context_template_count: 1
context_template_length: 3
"""

FLAT = [
    {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
     "target_new": "English", "ground_truth": "French",
     "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
     "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"},
    {"case_id": 1, "prompt": "The official religion of Edwin of Northumbria is", "subject": "Edwin of Northumbria",
     "target_new": "Islam", "ground_truth": "Christianity",
     "rephrase_prompt": "Edwin of Northumbria follows the religion of",
     "locality_prompt": "Jesus Christ is affiliated with the religion of", "locality_ground_truth": "Christianity"},
    {"case_id": 2, "prompt": "Toko Yasuda, the", "subject": "Toko Yasuda", "target_new": "piano", "ground_truth": "guitar",
     "rephrase_prompt": "Toko Yasuda plays the", "locality_prompt": "Jimi Hendrix, the",
     "locality_ground_truth": "guitar"},
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", layers=4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    (d / "hp.yaml").write_text(HP_YAML)
    (d / "bad.yaml").write_text("v_num_grad_steps: [1, 2\n")
    (d / "badfield.yaml").write_text("no_such_field: 3\n")
    (d / "cf.json").write_text(json.dumps(FLAT))
    (d / "bad_requests.json").write_text(json.dumps([{"prompt": "x is", "subject": 5, "target_new": "y"}]))
    (d / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": f"Document {i} speaks of the river and the town."}) + "\n" for i in range(60))
    )
    zsre = [{"subject": "Jay Leno's Garage", "src": "Which network hosted Jay Leno's Garage?", "pred": "NBC",
             "rephrase": "What network housed Jay Leno's Garage?", "alt": "Comedy Central", "answers": ["CNBC"],
             "loc": "nq question: who wrote the hobbit", "loc_ans": "Tolkien"}]  # fmt: skip
    (d / "zsre.json").write_text(json.dumps(zsre))
    return d


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_registered():
    assert "edit" in SUBCOMMANDS and "evaluate" in SUBCOMMANDS and "stats" in SUBCOMMANDS


def _evaluate_argv(model_dir, files, tmp_path, **over):
    a = {
        "--model": model_dir, "--method": "alphaedit", "--dataset": "counterfact", "--data": files / "cf.json",
        "--num-edits": 3, "--batch-size": 2, "--hparams": files / "hp.yaml", "--corpus": files / "corpus.jsonl",
        "--stats-tokens": 1500, "--out": tmp_path / "results.json",
    }  # fmt: skip
    a.update(over)
    argv = ["evaluate"]
    for k, v in a.items():
        if v is not None:
            argv += [k, v]
    return argv + ["--no-cache", "--no-progress"]


@pytest.mark.parametrize("method", ["alphaedit", "memit"])
def test_evaluate_success(capsys, model_dir, files, tmp_path, method):
    rc, out, err = run_cli(capsys, *_evaluate_argv(model_dir, files, tmp_path, **{"--method": method}))
    assert rc == 0, err
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["method"] == method and res["num_edits"] == 3 and res["batch_size"] == 2
    assert res["dataset"] == "counterfact" and res["format"] == "flat"
    assert res["hparams"]["stats_tokens"] == 1500 and res["hparams"]["v_num_grad_steps"] == 3
    for m in (res["metrics_pre"], res["metrics_post"]):
        for k in ("efficacy", "generalization", "specificity"):
            assert 0.0 <= m[k] <= 100.0
        for k in ("efficacy_magnitude", "generalization_magnitude", "specificity_magnitude"):
            assert -100.0 <= m[k] <= 100.0
    assert set(res["timing"]) >= {"stats_s", "edit_s", "eval_s", "edits_per_s"}
    lines = (tmp_path / "results.records.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert "efficacy" in out and "post" in out and " EM " in out


def test_evaluate_set_overrides_the_file(capsys, model_dir, files, tmp_path):
    argv = _evaluate_argv(model_dir, files, tmp_path, **{"--num-edits": 2})
    argv += ["--set", "v_num_grad_steps=2", "--set", "kl_factor=0.5", "--set", "layers=1-2"]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    hp = json.loads((tmp_path / "results.json").read_text())["hparams"]
    assert hp["v_num_grad_steps"] == 2 and hp["kl_factor"] == 0.5  # hp.yaml has 3 steps
    assert hp["layers"] == [1, 2]  # the --layers syntax of `stats`
    assert hp["context_template_count"] == 1 and hp["stats_tokens"] == 1500  # the file, then --stats-tokens
    src = json.loads((tmp_path / "results.json").read_text())["hparams_source"]
    assert src.endswith("hp.yaml + overrides (kl_factor, layers, stats_tokens, v_num_grad_steps)"), src


def test_evaluate_skip_takes_a_held_out_slice(capsys, model_dir, files, tmp_path):
    ck = tmp_path / "ck"
    argv = _evaluate_argv(model_dir, files, tmp_path, **{"--skip": 1, "--num-edits": 2, "--checkpoint": ck})
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["skip"] == 1 and res["num_edits"] == 2
    recs = [json.loads(ln) for ln in (tmp_path / "results.records.jsonl").read_text().splitlines()]
    assert [r["pre"]["prompt"] for r in recs] == [FLAT[1]["prompt"], FLAT[2]["prompt"]]
    # the checkpoint belongs to that slice: the first two records are another run
    rc, out, err = run_cli(capsys, *_evaluate_argv(model_dir, files, tmp_path, **{"--num-edits": 2,
                                                                                  "--checkpoint": ck}))  # fmt: skip
    assert rc == 2 and "belongs to another run" in err and "skip: saved 1, now 0" in err


def _with_conflict(files):
    """FLAT with case 1 followed by another new object for case 0's fact (a conflict), then case 2."""
    twin = {**FLAT[0], "case_id": 7, "target_new": "German"}
    path = files / "cf_conflict.json"
    path.write_text(json.dumps([FLAT[0], FLAT[1], twin, FLAT[2]]))
    return path


def test_evaluate_conflict_stops_before_the_model_loads(capsys, files, tmp_path):
    # the model path does not exist: the conflict must be reported before any loading is tried
    argv = _evaluate_argv(tmp_path / "no-model", files, tmp_path, **{"--data": _with_conflict(files)})
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "request 2: conflicts with request 0" in err and "--on-conflict skip" in err
    assert not (tmp_path / "results.json").exists()


def test_evaluate_on_conflict_skip_takes_the_next_record(capsys, model_dir, files, tmp_path):
    ck = tmp_path / "ck"
    argv = _evaluate_argv(model_dir, files, tmp_path, **{"--data": _with_conflict(files), "--checkpoint": ck})
    rc, out, err = run_cli(capsys, *argv + ["--on-conflict", "skip"])
    assert rc == 0, err
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["num_edits"] == 3 and res["on_conflict"] == "skip" and res["dropped_conflicts"] == [7]
    recs = [json.loads(ln) for ln in (tmp_path / "results.records.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in recs] == [0, 1, 2]
    # without `--on-conflict skip` the same data stops on the conflict again
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and "conflicts with request 0" in err


def test_evaluate_checkpoint_resume_and_mismatch(capsys, model_dir, files, tmp_path):
    ck = tmp_path / "ck"
    argv = _evaluate_argv(model_dir, files, tmp_path, **{"--checkpoint": ck})
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    first = json.loads((tmp_path / "results.json").read_text())
    assert (ck / "state.safetensors").is_file() and (ck / "pre.json").is_file()
    rc, out, err = run_cli(capsys, *argv)  # everything done: resumes past the last batch, same result
    assert rc == 0, err
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["metrics_post"] == first["metrics_post"] and again["sessions"][-1]["from_edit"] == 3
    rc, out, err = run_cli(capsys, *_evaluate_argv(model_dir, files, tmp_path, **{"--checkpoint": ck,
                                                                                  "--batch-size": 3}))  # fmt: skip
    assert rc == 2 and err.count("\n") == 1 and "belongs to another run" in err and "batch_size: saved" in err


def test_evaluate_zsre(capsys, model_dir, files, tmp_path):
    argv = _evaluate_argv(
        model_dir, files, tmp_path, **{"--dataset": "zsre", "--data": files / "zsre.json", "--num-edits": 1,
                                       "--method": "memit", "--records": tmp_path / "r.jsonl"}
    )  # fmt: skip
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["dataset"] == "zsre" and res["metrics_pre"]["specificity"] == 100.0
    assert res["metrics_post"]["efficacy_magnitude"] is None and " EM " not in out  # no P(true) in ZsRE
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 1


def test_edit_saves_delta(capsys, model_dir, files, tmp_path):
    out = tmp_path / "d.safetensors"
    rc, stdout, err = run_cli(
        capsys, "edit", "--model", model_dir, "--method", "memit", "--requests", files / "cf.json", "--batch-size", 2,
        "--hparams", files / "hp.yaml", "--corpus", files / "corpus.jsonl", "--stats-tokens", 1500,
        "--save-delta", out, "--no-progress", "--no-cache", "--set", "v_num_grad_steps=2",
    )  # fmt: skip
    assert rc == 0, err
    assert "P(new)" in stdout and "memit: 3 edits in 2 batch(es)" in stdout
    assert out.is_file()
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        assert meta["method"] == "memit" and len(json.loads(meta["requests"])) == 3
        hp = json.loads(meta["hparams"])
        assert hp["v_num_grad_steps"] == 2 and hp["stats_tokens"] == 1500  # --set over hp.yaml's 3
        assert all(k.startswith("delta.") for k in f.keys())
    # the delta loads onto a fresh editor of the same model
    from metake_fast.editor import Editor

    ed = Editor.from_pretrained(str(model_dir), "memit", str(files / "hp.yaml"), cache=False, progress=False)
    ed.load_delta(out)
    assert any(float(d.abs().max()) > 0 for d in ed.weight_deltas().values())


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"--data": "MISSING"}, "no such file"),
        ({"--method": "nosuch"}, "--method"),
        ({"--num-edits": 0}, "--num-edits"),
        ({"--num-edits": -3}, "--num-edits"),
        ({"--batch-size": 0}, "--batch-size"),
        ({"--num-edits": "x"}, "--num-edits"),
        ({"--hparams": "BAD_YAML"}, "not valid YAML"),
        ({"--hparams": "BAD_FIELD"}, "no_such_field"),
        ({"--hparams": "MISSING"}, "hparams"),
        ({"--dataset": "zsre"}, "does not match"),
        ({"--dataset": "mquake"}, "--dataset"),
        ({"--num-edits": 50}, "only 3"),
        ({"--model": "MISSING_MODEL"}, "unknown model"),
        ({"--corpus": "MISSING"}, "corpus"),
        ({"--out": "NO_DIR"}, "does not exist"),
        ({"--checkpoint": "A_FILE"}, "not a directory"),
        ({"--checkpoint": "BELOW_A_FILE"}, "cannot create checkpoint directory"),
        ({"--set": "no_such_field=3"}, "unknown hparams field 'no_such_field'"),
        ({"--set": "v_num_grad_steps=many"}, "expected an integer"),
        ({"--set": "v_num_grad_steps"}, "KEY=VALUE"),
        ({"--set": "layers=4-x"}, "--set layers=4-x: use e.g."),
        ({"--skip": -1}, "--skip"),
        ({"--skip": 2, "--num-edits": 2}, "only 1 usable cases after the first 2 records"),
        ({"--skip": 3}, "cannot skip 3"),
    ],
)
def test_evaluate_bad_input(capsys, model_dir, files, tmp_path, over, needle):
    subst = {
        "MISSING": tmp_path / "missing.json", "BAD_YAML": files / "bad.yaml", "BAD_FIELD": files / "badfield.yaml",
        "MISSING_MODEL": tmp_path / "no-model", "NO_DIR": tmp_path / "nodir" / "results.json",
        "A_FILE": files / "cf.json", "BELOW_A_FILE": files / "cf.json" / "ck",
    }  # fmt: skip
    over = {k: subst.get(v, v) if isinstance(v, str) else v for k, v in over.items()}
    rc, out, err = run_cli(capsys, *_evaluate_argv(model_dir, files, tmp_path, **over))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("metake-fast: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--requests", "MISSING"], "no such file"),
        (["--requests", "BAD_REQUESTS"], "subject"),
        (["--method", "nosuch"], "--method"),
        (["--batch-size", "0"], "--batch-size"),
        (["--hparams", "BAD_YAML"], "not valid YAML"),
        (["--set", "layers=[]"], "at least one layer"),
        (["--set", "outer_steps=3"], "unknown hparams field 'outer_steps' for method 'alphaedit'"),
        (["--save-delta", "NO_DIR"], "does not exist"),
    ],
)
def test_edit_bad_input(capsys, model_dir, files, tmp_path, args, needle):
    subst = {
        "MISSING": tmp_path / "missing.json", "BAD_REQUESTS": files / "bad_requests.json",
        "BAD_YAML": files / "bad.yaml", "NO_DIR": tmp_path / "nodir" / "d.safetensors",
    }  # fmt: skip
    base = {"--model": model_dir, "--requests": files / "cf.json", "--save-delta": tmp_path / "d.safetensors"}
    extra = dict(zip(args[::2], [subst.get(v, v) for v in args[1::2]]))
    argv = ["edit"]
    for k, v in {**base, **extra}.items():
        argv += [k, v]
    rc, out, err = run_cli(capsys, *argv, "--no-cache", "--no-progress")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "d.safetensors").exists()
