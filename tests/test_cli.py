"""The ``metake-fast`` command line: bad input gives exit 2 and one line; a run on a tiny model dir works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from _tiny import save_tiny  # noqa: E402

from metake_fast.cli import SUBCOMMANDS, UsageError, main, parse_layers, register_subcommand  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", layers=4)


@pytest.fixture
def corpus_file(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(
        "".join(json.dumps({"text": f"Document number {i} says hello to the world."}) + "\n" for i in range(40))
    )
    return p


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_parse_layers():
    assert parse_layers("4-8") == [4, 5, 6, 7, 8]
    assert parse_layers("4,5,7") == [4, 5, 7]
    assert parse_layers("6") == [6]
    assert parse_layers(" 2, 4 - 5,2 ") == [2, 4, 5]
    for bad in ("", "a", "8-4", "-1", "1,,2", "1-2-3", "1.5"):
        with pytest.raises(UsageError):
            parse_layers(bad)
    with pytest.raises(UsageError, match="out of range"):
        parse_layers("2-5", num_layers=4)


def test_stats_success_then_cache_hit(capsys, model_dir, corpus_file, tmp_path):
    argv = ["stats", "--model", model_dir, "--layers", "1-2", "--corpus", corpus_file, "--tokens", "300",
            "--max-length", "64", "--cache-dir", tmp_path / "cache", "--no-progress"]  # fmt: skip
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    rows = [line for line in out.splitlines() if "mlp.down_proj" in line]
    assert len(rows) == 2 and all("computed" in r and " 300 " in r for r in rows)
    assert len(list((tmp_path / "cache" / "stats").glob("*.safetensors"))) == 2
    rc, out, err = run_cli(capsys, *argv, "--stats-dtype", "fp32")
    assert rc == 0 and out.count(" cache ") == 2


def test_stats_disk_full_exit_2(capsys, model_dir, corpus_file, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    rc, out, err = run_cli(
        capsys, "stats", "--model", model_dir, "--layers", "1", "--corpus", corpus_file, "--tokens", "200",
        "--max-length", "64", "--cache-dir", tmp_path / "cache", "--no-progress",
    )  # fmt: skip
    assert rc == 2 and "computed" in out
    assert "disk full" in err and "No space left on device" in err and "could not be written" in err
    assert "Traceback" not in err and not list((tmp_path / "cache" / "stats").iterdir())


def test_stats_no_cache_fp64_bf16(capsys, model_dir, corpus_file):
    rc, out, err = run_cli(
        capsys, "stats", "--model", model_dir, "--layers", "0,3", "--corpus", corpus_file, "--tokens", "1k",
        "--dtype", "bf16", "--stats-dtype", "fp64", "--no-cache", "--no-progress",
    )  # fmt: skip
    assert rc == 0, err
    assert out.count("computed") == 2


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "no-such-model", "--layers", "1"], "unknown model"),
        (["--layers", "9"], "out of range"),
        (["--layers", "3-1"], "--layers"),
        (["--layers", "x"], "--layers"),
        (["--layers", "1", "--tokens", "abc"], "--tokens"),
        (["--layers", "1", "--tokens", "0"], "--tokens"),
        (["--layers", "1", "--max-length", "-5"], "--max-length"),
        (["--layers", "1", "--dtype", "fp8"], "--dtype"),
        (["--layers", "1", "--corpus", "MISSING"], "not found"),
        (["--layers", "1", "--corpus", "EMPTY"], "empty"),
        (["--layers", "1", "--cache-dir", "BLOCKED"], "cache dir"),
        (["--layers", "1", "--cache-dir", "FILE"], "cache dir"),
        ([], "--layers"),
        (["--layers", "1", "--bogus"], "--bogus"),
    ],
)
def test_stats_bad_input_exit_2_one_line(capsys, model_dir, tmp_path, args, needle):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    (tmp_path / "empty.txt").write_text("\n\n")
    subst = {
        "MISSING": tmp_path / "missing.jsonl",
        "EMPTY": tmp_path / "empty.txt",
        "BLOCKED": blocker / "sub",
        "FILE": blocker,
    }
    args = [str(subst.get(a, a)) for a in args]
    if "--model" not in args:
        args = ["--model", str(model_dir), *args]
    if "--cache-dir" not in args:
        args += ["--cache-dir", str(tmp_path / "cache")]
    rc, out, err = run_cli(capsys, "stats", *args, "--no-progress")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("metake-fast: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in err


def test_no_command_and_unknown_command(capsys):
    assert main([]) == 2
    rc, out, err = run_cli(capsys, "nope")
    assert rc == 2 and len(err.strip().splitlines()) == 1


def test_register_subcommand(capsys):
    seen = {}

    def add_arguments(p):
        p.add_argument("--n", type=int, default=1)

    def run(args):
        seen["n"] = args.n
        return 0

    register_subcommand("test-echo", add_arguments, run, help="test only")
    try:
        assert main(["test-echo", "--n", "5"]) == 0 and seen == {"n": 5}
    finally:
        SUBCOMMANDS.pop("test-echo")


def test_python_dash_m(model_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "metake_fast", "stats", "--model", str(model_dir), "--layers", "7",
         "--cache-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "metake-fast: error: layer(s) [7] out of range: the model has layers 0-3"
    ]
