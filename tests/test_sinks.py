"""Output directory: atomic batch files, manifest, summary.json, resume, config identity, failures, kill -9."""
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import pipeline
from pipeline import sinks
from pipeline.cli import main
from pipeline.errors import OutputError
from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


def out_run(out, **kw):
    """A serial sum run of TINY batches into ``out``."""
    return pipeline.run(kernel="sum", output=str(out), **{"workers": 0, "device": "cpu", **TINY, **kw})


def manifest(out) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def batch_files(out) -> list[str]:
    return sorted(n for n in os.listdir(out) if n.startswith("batch-"))


def hidden(out) -> list[str]:
    return [n for n in os.listdir(out) if n.startswith(".")]


def test_output_files_manifest_and_summary(tmp_path):
    """Each result is DIR/batch-NNNNNN.npy; the manifest lists it with its sha256; summary.json at the end."""
    out = tmp_path / "out"
    r = out_run(out)
    assert batch_files(out) == [f"batch-{i:06d}.npy" for i in range(4)] and hidden(out) == []
    for i, rec in enumerate(manifest(out)):
        data = (out / rec["file"]).read_bytes()
        assert rec["batch"] == i and rec["sha256"] == hashlib.sha256(data).hexdigest()
        assert rec["bytes"] == len(data) and rec["shape"] == [16] and rec["dtype"] == "<f4"
        assert rec["pid"] == os.getpid() and rec["device"] == "cpu" and rec["seconds"] >= 0
        assert np.array_equal(np.load(out / rec["file"]), r.results[i])
    s = json.loads((out / "summary.json").read_text())
    assert s["checksum"] == r.summary["checksum"] and s["skipped"] == 0 and s["output"] == str(out)
    run = json.loads((out / "run.json").read_text())
    assert run["kernel"]["name"] == "sum" and run["source"]["seed"] == 0 and run["source"]["rows"] == 16
    assert r.summary["checksum"] == pipeline.run(kernel="sum", workers=0, device="cpu", **TINY).summary["checksum"]


@pytest.mark.timeout(90)
def test_worker_pids_in_manifest_and_resume_starts_no_worker(tmp_path):
    """With workers, manifest lines carry the worker's pid; a rerun with everything done starts no worker."""
    out = tmp_path / "out"
    r = pipeline.run(kernel="sum", output=str(out), workers=2, **TINY)
    pids = {w["pid"] for w in r.summary["workers"]}
    assert {rec["pid"] for rec in manifest(out)} <= pids and os.getpid() not in pids
    again = pipeline.run(kernel="sum", output=str(out), workers=2, **TINY)
    assert again.summary["skipped"] == 4 and again.summary["workers"] == [] and again.summary["bytes_in"] == 0
    assert again.summary["checksum"] == r.summary["checksum"]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(r.results, again.results))


def test_resume_skips_verified_batches_only(tmp_path):
    """A rerun skips batches whose file matches the manifest; a missing or altered file is computed again."""
    out = tmp_path / "out"
    ref = out_run(out).summary["checksum"]
    (out / "batch-000001.npy").unlink()
    b2 = out / "batch-000002.npy"
    b2.write_bytes(b2.read_bytes()[:-4] + b"\0\0\0\0")
    s = out_run(out).summary
    assert s["skipped"] == 2 and s["completed"] == 4 and s["checksum"] == ref
    assert s["bytes_in"] == 2 * 16 * 8 * 4
    assert sorted(rec["batch"] for rec in manifest(out)) == [0, 1, 2, 3]
    assert batch_files(out) == [f"batch-{i:06d}.npy" for i in range(4)]


def test_torn_manifest_orphan_file_and_temp_file(tmp_path):
    """What a kill leaves (a torn last line, a file without its line, a temp file) resumes cleanly."""
    out = tmp_path / "out"
    ref = out_run(out).summary["checksum"]
    lines = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    (out / "manifest.jsonl").write_text(lines[0] + lines[2] + lines[3][:25])  # 1: orphan, 3: torn
    (out / ".tmp-99999-batch-000003.npy").write_bytes(b"half")
    (out / "summary.json").unlink()
    s = out_run(out).summary
    assert s["skipped"] == 2 and s["checksum"] == ref
    recs = manifest(out)
    assert [r["batch"] for r in recs] == [0, 2, 1, 3]  # every line parses, one per batch
    assert hidden(out) == [] and (out / "summary.json").exists()


def test_different_config_refused_then_overwrite(tmp_path, capsys):
    """Another config against an existing output dir: exit 2 naming the difference; --overwrite replaces it."""
    out = tmp_path / "out"
    out_run(out)
    argv = ["run", "--output", str(out), "--kernel", "sum", "--workers", "0", "--batches", "2", "--rows", "16",
            "--cols", "8", "--seed", "7", "--no-progress", "--json"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "written by a different config" in err and "source.seed: 0 -> 7" in err and "--overwrite" in err
    assert err.count("\n") == 1 and len(batch_files(out)) == 4
    assert main([*argv, "--overwrite"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["skipped"] == 0 and batch_files(out) == ["batch-000000.npy", "batch-000001.npy"]
    assert [r["batch"] for r in manifest(out)] == [0, 1]
    assert json.loads((out / "run.json").read_text())["source"]["seed"] == 7


def test_settings_that_do_not_change_results_resume(tmp_path):
    """Worker count, threads, in-flight and progress are not part of the identity: a rerun still resumes."""
    out = tmp_path / "out"
    out_run(out)
    assert out_run(out, in_flight=3, threads_per_worker=2).summary["skipped"] == 4


def test_changed_input_file_refused(tmp_path):
    """Rewriting the input file (size or mtime) makes its output dir a different config."""
    a = tmp_path / "a.npy"
    np.save(a, np.ones((8, 4), np.float32))
    kw = dict(input=str(a), kernel="sum", workers=0, rows=4, progress=False, output=str(tmp_path / "out"))
    pipeline.run(**kw)
    assert pipeline.run(**kw).summary["skipped"] == 2
    np.save(a, np.zeros((8, 4), np.float32))
    os.utime(a, ns=(1, 1))
    with pytest.raises(pipeline.ConfigError, match="source.mtime_ns"):
        pipeline.run(**kw)
    assert pipeline.run(**kw, overwrite=True).summary["skipped"] == 0


def test_foreign_output_without_run_json_refused(tmp_path):
    """A directory holding batch files but no run.json is refused unless overwrite."""
    out = tmp_path / "out"
    out.mkdir()
    np.save(out / "batch-000000.npy", np.zeros(3))
    with pytest.raises(pipeline.ConfigError, match="no run.json"):
        out_run(out)
    assert out_run(out, overwrite=True).summary["completed"] == 4


def test_second_run_on_same_dir_is_locked_out(tmp_path):
    """Two runs cannot share an output directory at once."""
    ident = {"source": {"kind": "x"}}
    first = sinks.OutputDir(str(tmp_path / "out"), ident)
    try:
        with pytest.raises(pipeline.ConfigError, match="in use by another run"):
            sinks.OutputDir(str(tmp_path / "out"), ident)
    finally:
        first.close()
    sinks.OutputDir(str(tmp_path / "out"), ident).close()


def test_output_under_a_file_exit_1_one_line(tmp_path, capsys):
    """An output path that cannot be a directory: exit 1, one line naming it, before any work."""
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "file" / "sub", tmp_path / "file"):
        assert main(["run", "--output", str(target), "--workers", "0", "--no-progress", "--batches", "2",
                     "--rows", "4", "--cols", "4"]) == 1
        err = capsys.readouterr().err
        assert "OutputError" in err and str(target) in err and err.count("\n") == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_dir(tmp_path):
    """A directory without write permission: OutputError naming it."""
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="permission|Permission"):
            out_run(out)
    finally:
        out.chmod(0o700)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to tell files apart")
@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_exit_1_no_half_written_file(tmp_path, capsys, monkeypatch, where):
    """ENOSPC writing batch 2 (on write or on fsync): exit 1, one line; no temp file, no partial batch file."""
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "write":
        real = sinks._Hashing.write

        def write(self, data):
            if "batch-000002" in os.readlink(f"/proc/self/fd/{self.f.fileno()}") and self.n:
                raise full
            return real(self, data)
        monkeypatch.setattr(sinks._Hashing, "write", write)
    else:
        real = os.fsync

        def fsync(fd):
            if "batch-000002" in os.readlink(f"/proc/self/fd/{fd}"):
                raise full
            return real(fd)
        monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    assert main(["run", "--output", str(out), "--kernel", "sum", "--workers", "0", "--no-progress",
                 "--batches", "4", "--rows", "16", "--cols", "8"]) == 1
    err = capsys.readouterr().err
    assert "OutputError" in err and "No space left on device" in err and "batch-000002.npy" in err
    assert err.count("\n") == 1
    assert batch_files(out) == ["batch-000000.npy", "batch-000001.npy"] and hidden(out) == []
    assert [r["batch"] for r in manifest(out)] == [0, 1] and not (out / "summary.json").exists()
    monkeypatch.undo()
    s = out_run(out, rows=16, cols=8).summary
    assert s["skipped"] == 2 and s["completed"] == 4


def test_output_error_is_an_oserror_with_errno():
    """OutputError is a PipelineError and an OSError that keeps the errno."""
    e = sinks._error("cannot write /x", OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(e, pipeline.PipelineError) and isinstance(e, OSError) and e.errno == errno.ENOSPC
    assert str(e).startswith("cannot write /x: No space left on device")


def test_cli_help_lists_the_flags(capsys):
    """run --help documents --input, --input-key, --output and --overwrite."""
    assert main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--input PATH", "--input-key KEY", "--output DIR", "--overwrite"):
        assert flag in text


@pytest.mark.timeout(180)
def test_kill_9_mid_run_then_resume(tmp_path):
    """SIGKILL the main mid-run, run again: every batch written once, manifest one line each, same checksum."""
    a = tmp_path / "in.npy"
    np.save(a, (np.arange(40 * 8) % 13).astype(np.float32).reshape(40, 8))
    out = tmp_path / "out"
    p = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "--kernel", "faulty", "--param", "sleep=0.2", "--input", str(a),
         "--rows", "2", "--output", str(out), "--workers", "2", "--no-progress", "--threads-per-worker", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = out / "manifest.jsonl"
        if m.exists() and len(m.read_bytes().splitlines()) >= 3:
            break
        assert p.poll() is None, p.communicate()
        time.sleep(0.05)
    else:
        raise AssertionError("the run never wrote 3 batches")
    workers = psutil.Process(p.pid).children()
    p.send_signal(signal.SIGKILL)
    p.communicate()
    psutil.wait_procs(workers, timeout=10)  # they notice the dead main and exit by themselves
    assert not (out / "summary.json").exists()
    before = len(manifest(out))
    assert 3 <= before < 20
    r = pipeline.run(input=str(a), rows=2, output=str(out), kernel="faulty", workers=2, progress=False,
                     threads_per_worker=1, **{"kernel.params.sleep": 0.2})
    assert r.summary["skipped"] >= 3 and r.summary["completed"] == 20
    recs = manifest(out)
    assert sorted(x["batch"] for x in recs) == list(range(20))
    assert batch_files(out) == [f"batch-{i:06d}.npy" for i in range(20)] and hidden(out) == []
    clean = pipeline.run(input=str(a), rows=2, kernel="sum", workers=0, progress=False)
    assert r.summary["checksum"] == clean.summary["checksum"]
    assert json.loads((out / "summary.json").read_text())["checksum"] == clean.summary["checksum"]
