"""The command line, driven in-process through main(argv) and once as a real subprocess."""
import json
import subprocess
import sys

from pathlib import Path

import pytest

from pipeline.cli import main

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--batches", "4", "--rows", "16", "--cols", "8", "--no-progress", "--threads-per-worker", "1"]


def run_json(capsys, *argv):
    rc = main(["run", *argv, *SMALL, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_serial_json(capsys):
    """run --workers 0 --json prints one JSON object with the summary keys and the effective config."""
    rc, s = run_json(capsys, "--workers", "0", "--kernel", "sum")
    assert rc == 0 and s["batches"] == 4 and s["kernel"] == "sum" and s["config"]["workers"]["count"] == 0


@pytest.mark.timeout(90)
def test_parallel_json_matches_serial(capsys):
    """--workers 2 gives the same checksum as --workers 0."""
    _, a = run_json(capsys, "--workers", "0", "--kernel", "fft")
    rc, b = run_json(capsys, "--workers", "2", "--kernel", "fft")
    assert rc == 0 and a["checksum"] == b["checksum"] and len(b["workers"]) == 2


def test_human_summary(capsys):
    """Without --json a readable summary is printed."""
    assert main(["run", "--workers", "0", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "checksum" in out and "batches/s" in out and "main pid" in out


def test_set_and_param(capsys):
    """--set and --param parse TOML values into the config."""
    rc, s = run_json(capsys, "--workers", "0", "--set", "source.seed=5", "--kernel", "matmul",
                     "--param", "hidden=4", "--param", "seed=2")
    assert rc == 0 and s["config"]["source"]["seed"] == 5
    assert s["config"]["kernel"]["params"] == {"hidden": 4, "seed": 2}


@pytest.mark.parametrize("argv, fragment", [
    (["--start-method", "fork"], "Cannot re-initialize CUDA in forked subprocess"),
    (["--rows", "0"], "source.rows = 0 (from --rows): must be >= 1"),
    (["--workers", "-1"], "workers.count = -1"),
    (["--set", "source.rowz=3"], "unknown key 'source.rowz'"),
    (["--set", "nonsense"], "expected SECTION.KEY=VALUE"),
    (["--kernel", "nope"], "unknown kernel"),
    (["--config", "missing.toml"], "config file not found: missing.toml"),
    (["--param", "bogus=1", "--kernel", "sum", "--workers", "0"], "takes no params"),
])
def test_usage_errors_exit_2_one_line(capsys, argv, fragment):
    """Config and usage errors exit 2 with one line on stderr and no traceback."""
    assert main(["run", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and err.count("\n") == 1


def test_device_cuda_without_cuda_exit_2(capsys):
    """--device cuda on a machine without CUDA: exit 2, one line."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert main(["run", "--device", "cuda", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and err.count("\n") == 1


def test_argparse_usage_error_exit_2(capsys):
    """An unknown flag is a usage error (2)."""
    assert main(["run", "--frobnicate"]) == 2


def test_help_lists_exit_codes(capsys):
    """--help documents the exit codes."""
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for code in ("130", "143", "quarantined"):
        assert code in out


@pytest.mark.timeout(90)
def test_kernel_error_exit_1_json_summary(capsys):
    """A kernel exception: exit 1, one line naming the batch; --json still prints the summary."""
    rc = main(["run", "--workers", "1", "--kernel", "faulty", "--param", "raise_on=[1]", *SMALL, "--json"])
    out, err = capsys.readouterr()
    assert rc == 1 and "batch 1" in err and "Traceback" not in err
    assert json.loads(out)["error"].startswith("RuntimeError")


def test_traceback_flag(capsys):
    """--traceback prints the full traceback."""
    assert main(["run", "--workers", "0", "--kernel", "faulty", "--param", "raise_on=[0]", *SMALL,
                 "--traceback"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_devices(capsys):
    """devices prints versions, cores and start method."""
    assert main(["devices", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpus"] >= 1 and "torch" in info and info["pipeline_start_method"] == "spawn"


@pytest.mark.timeout(120)
def test_python_dash_m_subprocess():
    """A real `python -m pipeline run` with the CI config exits 0 and prints JSON."""
    p = subprocess.run([sys.executable, "-m", "pipeline", "run", "--config", "configs/cpu-ci.toml",
                        "--batches", "3", "--json"], capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["completed"] == 3


@pytest.mark.timeout(90)
def test_skipped_batches_exit_3_with_json(capsys):
    """on_error=skip with a failing batch: exit 3, and the JSON summary lists it in failed."""
    rc = main(["run", "--workers", "2", "--kernel", "faulty", "--param", "raise_on=[2]", "--on-error", "skip",
               *SMALL, "--json"])
    s = json.loads(capsys.readouterr().out)
    assert rc == 3 and [f["batch"] for f in s["failed"]] == [2] and s["completed"] == 3


def test_run_settings_are_one_list():
    """``config.OVERRIDES`` is the one list of run settings: every flag of ``run`` (but the config file, the
    --set/--param/--source-param keys and output switches) is one of its names, and every name is a flag
    (but those set with --set: SET_ONLY); each flag sets the key the name maps to."""
    import argparse

    from pipeline import config
    from pipeline.cli import _overrides, build_parser
    run = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "run")[1]
    dests = {a.dest: a for a in run._actions if not isinstance(a, argparse._HelpAction)}
    own = {"config", "param", "set", "source_param", "json", "traceback"}
    assert set(dests) - own == set(config.OVERRIDES) - set(config.SET_ONLY)
    for name in set(config.OVERRIDES) - set(config.SET_ONLY):
        assert config.flag(name) in dests[name].option_strings, name
    args = run.parse_args(["--workers", "3", "--no-progress", "--overwrite", "--batch-timeout", "2"])
    assert _overrides(args) == {"workers": 3, "progress": False, "overwrite": True, "batch_timeout_s": 2.0}
    assert _overrides(run.parse_args([])) == {}


def test_ctrl_c_while_the_parser_is_made_is_one_line(capsys, monkeypatch):
    """A Ctrl-C that lands while the flags are still being set up (a fraction of a second after the start)
    exits 130 with one line, as one later does, not with a traceback."""
    import pipeline.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    try:
        code = main(["run", "--batches", "2"])
    except KeyboardInterrupt:  # (not raised: it would stop pytest itself)
        pytest.fail("a Ctrl-C while the parser was made escaped main(): a traceback for the user")
    assert code == 130
    err = capsys.readouterr().err
    assert err.strip() == "pipeline: interrupted"
