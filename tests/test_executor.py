"""Faults: crashed workers, stuck batches, kernel errors, quarantine, Ctrl-C, SIGTERM, a dead parent."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import pipeline
from pipeline.local.ring import RING_PREFIX as PREFIX, SHM_DIR
from conftest import TINY, descendants, workers_of

ROOT = Path(__file__).resolve().parent.parent
SIX = dict(TINY, batches=6)


def clean_checksum(device="auto"):
    return pipeline.run(kernel="sum", workers=0, device=device, **SIX).summary["checksum"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("params, cause", [
    ({"crash_on": [2]}, "SIGKILL(-9)"),
    ({"crash_on": [2], "signal": 11}, "SIGSEGV(-11)"),
    ({"exit_on": [3]}, "exit code 0"),
    ({"hang_on": [1], "batch_timeout_s": 1.5}, "timeout"),
])
def test_lost_batch_is_retried_on_a_fresh_worker(params, cause):
    """A worker that dies (or hangs past the timeout) mid-batch: the batch is retried, checksum unchanged."""
    timeout = params.pop("batch_timeout_s", 0)
    t0 = time.monotonic()
    s = pipeline.run(kernel="faulty", workers=2, batch_timeout_s=timeout,
                     **{f"kernel.params.{k}": v for k, v in params.items()}, **SIX).summary
    assert s["checksum"] == clean_checksum() and s["failed"] == [] and s["completed"] == 6
    assert len(s["restarts"]) == 1 and cause in s["restarts"][0]["cause"]
    assert time.monotonic() - t0 < 60


@pytest.mark.timeout(120)
def test_batch_that_keeps_killing_workers_is_quarantined():
    """With faults on every attempt, the batch is quarantined after max_attempts; the others finish."""
    s = pipeline.run(kernel="faulty", workers=2, max_attempts=2, **{"kernel.params.crash_on": [1],
                     "kernel.params.only_first_attempt": False}, **SIX).summary
    assert s["completed"] == 5 and len(s["restarts"]) == 2
    assert s["failed"] == [{"batch": 1, "cause": "SIGKILL(-9) (killed: out of memory, or kill -9)",
                            "attempts": 2}]


@pytest.mark.timeout(120)
def test_on_error_skip_records_and_goes_on():
    """on_error=skip: a raising batch is recorded in failed and the run completes the rest."""
    r = pipeline.run(kernel="faulty", workers=2, on_error="skip", **{"kernel.params.raise_on": [0, 4]}, **SIX)
    assert [f["batch"] for f in sorted(r.summary["failed"], key=lambda f: f["batch"])] == [0, 4]
    assert r.results[0] is None and r.results[1] is not None and r.summary["completed"] == 4


@pytest.mark.timeout(120)
def test_kernel_system_exit_does_not_hang():
    """A kernel raising SystemExit in a worker becomes a WorkerError naming the batch; nothing hangs."""
    with pytest.raises(pipeline.WorkerError, match=r"batch 1 .*SystemExit"):
        pipeline.run(kernel="faulty", workers=1, **{"kernel.params.system_exit_on": [1]}, **SIX)


@pytest.mark.timeout(120)
def test_worker_dying_at_startup_fails_fast():
    """A kernel whose setup fails reports the setup error instead of restarting forever."""
    with pytest.raises(pipeline.KernelError, match="failed to set up kernel 'faulty'.*unknown params"):
        pipeline.run(kernel="faulty", workers=2, **{"kernel.params.explode_on": [1]}, **SIX)


def start_cli(*extra):
    """A real `python -m pipeline run` in its own process group, with slow batches."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "--kernel", "faulty", "--param", "sleep=0.2",
         "--batches", "400", "--rows", "16", "--cols", "8", "--workers", "2", "--no-progress",
         "--threads-per-worker", "1", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # Ctrl-C as from a terminal, even when these tests run in the background of a non-interactive shell
        # (which starts them with SIGINT ignored, and Python would then install no KeyboardInterrupt handler)
        preexec_fn=_sigint_default)


def _sigint_default():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_running(p, timeout=60, workers=1):
    """Until the run's shared-memory ring exists and ``workers`` of its workers are up (computing); returns
    its workers. (A forkserver's workers are forked a moment after the ring is made.) The run is killed if
    it never gets there."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if any(n.startswith(f"{PREFIX}{p.pid}-") for n in os.listdir(SHM_DIR)):
                if len(workers_of(p.pid)) >= workers:
                    time.sleep(0.5)
                    return workers_of(p.pid)
            assert p.poll() is None, p.communicate()
            time.sleep(0.1)
        raise AssertionError("run never started")
    except BaseException:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
        raise


def _running(p) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_gone(pid, workers, within=5.0):
    """``workers`` (processes of the main's: its workers, or all it started) end within ``within`` s, and no
    segment of the main's is left."""
    deadline = time.monotonic() + within
    while True:  # (a zombie is gone: the orphan's reaper here may be a pid 1 that does not reap)
        alive = [w for w in workers if _running(w)]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not alive, f"still alive {within} s later: {alive}"
    assert not [n for n in os.listdir(SHM_DIR) if n.startswith(f"{PREFIX}{pid}-")], "segment left"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_and_sigterm(sig, code, word, method):
    """Ctrl-C (SIGINT to the whole process group) or SIGTERM: exit 130/143 within 5 s, one line, no leftovers
    (under forkserver too: its workers are the server's children, and the server goes as well)."""
    p = start_cli("--start-method", method)
    workers = wait_running(p, workers=2)
    assert len(workers) == 2
    tree = descendants(p.pid)  # (the workers, and the forkserver and resource tracker: all must go)
    t0 = time.monotonic()
    if sig == signal.SIGINT:
        os.killpg(p.pid, sig)  # what a terminal's Ctrl-C does
    else:
        p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    assert time.monotonic() - t0 < 5
    assert p.returncode == code and word in err and "Traceback" not in err and err.count("\n") == 1
    assert_gone(p.pid, tree, within=1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_dead_parent_workers_exit_and_unlink(method):
    """The main SIGKILLed: every worker exits by itself within 5 s and removes the segment (the forkserver
    too: nothing of the run outlives its main)."""
    p = start_cli("--start-method", method)
    workers = wait_running(p, workers=2)
    assert len(workers) == 2
    tree = descendants(p.pid)
    p.kill()
    p.communicate()
    assert_gone(p.pid, tree, within=5)


@pytest.mark.timeout(120)
def test_script_without_main_guard_gets_a_hint(tmp_path):
    """A script calling run() at import time: the error names the script and the __main__ guard fix."""
    script = tmp_path / "noguard.py"
    script.write_text("import pipeline\npipeline.run(kernel='sum', workers=1, batches=2, rows=4, cols=4, "
                      "progress=False)\n")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100)
    assert p.returncode != 0
    assert "bootstrapping phase" in p.stderr and "noguard.py calls pipeline at import time" in p.stderr
    assert 'if __name__ == "__main__":' in p.stderr.splitlines()[-1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("delay", [0.2, 1.5])
def test_ctrl_c_while_starting(delay):
    """Ctrl-C while the main or its workers still import torch: exit 130, one line, no traceback."""
    p = start_cli()
    time.sleep(delay)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=30)
    # exit 130, or (about one run in ten on a loaded 2-core box, since before this check existed; the cause is
    # not found yet) death by SIGINT after the one line, which a shell reports as the same status 130
    assert p.returncode in (130, -signal.SIGINT), (p.returncode, err)
    assert "Traceback" not in err and err.strip().count("\n") == 0 and "interrupted" in err, err


@pytest.mark.timeout(120)
def test_ctrl_c_while_torch_imports_is_held_until_the_import_is_done():
    """A KeyboardInterrupt inside torch's module set-up aborts the process (pybind11: 'terminate called
    after throwing an instance of pybind11::error_already_set', exit -6; seen on a Ctrl-C 0.8 s after the
    CLI started): the CLI imports torch with Ctrl-C held, then raises it, and exits 130 as always."""
    code = ("import os, signal, sys, threading\n"
            "from pipeline import cli\n"
            "threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
            "try:\n"
            "    cli.import_torch()\n"
            "except KeyboardInterrupt:\n"
            "    print('held', hasattr(sys.modules.get('torch'), 'Tensor'))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=100,
                       preexec_fn=_sigint_default)
    assert p.returncode == 0 and p.stdout.strip() == "held True", (p.returncode, p.stdout, p.stderr[-500:])


def _forkserver_of(pid):
    for c in descendants(pid):
        try:
            if "multiprocessing.forkserver" in " ".join(c.cmdline()):
                return c
        except psutil.NoSuchProcess:
            pass
    return None


@pytest.mark.timeout(120)
def test_ctrl_c_while_the_forkserver_imports_torch():
    """Under forkserver the main's first worker start waits while the server imports torch (seconds here): a
    Ctrl-C then is the main's (it was ignored there, and the run went on). Exit 130, one line, no
    traceback, and the server goes too."""
    p = start_cli("--start-method", "forkserver")
    deadline = time.monotonic() + 60
    server = _forkserver_of(p.pid)
    while server is None:
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.05)
        server = _forkserver_of(p.pid)
    time.sleep(0.1)
    os.killpg(p.pid, signal.SIGINT)
    try:
        out, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise AssertionError("Ctrl-C was lost: the run went on") from None
    assert p.returncode in (130, -signal.SIGINT), (p.returncode, err)  # (see test_ctrl_c_while_starting)
    assert "Traceback" not in err and err.strip().count("\n") == 0 and "interrupted" in err, err
    assert_gone(p.pid, [server], within=5)


@pytest.mark.timeout(120)
def test_sticky_cuda_error_retires_and_replaces_the_worker():
    """A sticky CUDA error (simulated on the CPU): the worker is replaced, the batch retried, checksum kept."""
    s = pipeline.run(kernel="faulty", workers=2, device="cpu", **{"kernel.params.sticky_on": [2]}, **SIX).summary
    assert s["checksum"] == clean_checksum("cpu") and s["failed"] == [] and s["completed"] == 6
    assert len(s["restarts"]) == 1 and s["restarts"][0]["batch"] == 2
    assert "CUDA error" in s["restarts"][0]["cause"] and "worker retired" in s["restarts"][0]["cause"]


@pytest.mark.timeout(120)
def test_sticky_cuda_error_every_attempt_is_quarantined():
    """A batch whose sticky error recurs on every attempt is quarantined after max_attempts, like a crash."""
    s = pipeline.run(kernel="faulty", workers=2, device="cpu", max_attempts=2,
                     **{"kernel.params.sticky_on": [1], "kernel.params.only_first_attempt": False}, **SIX).summary
    assert s["completed"] == 5 and len(s["restarts"]) == 2
    assert [f["batch"] for f in s["failed"]] == [1] and "sticky CUDA error" in s["failed"][0]["cause"]


@pytest.mark.timeout(120)
def test_out_of_memory_follows_on_error_and_the_worker_carries_on():
    """Out of memory (simulated on the CPU) fails only its batch under on_error=skip; no worker replaced."""
    s = pipeline.run(kernel="faulty", workers=1, device="cpu", on_error="skip",
                     **{"kernel.params.oom_on": [1, 3]}, **SIX).summary
    assert [f["batch"] for f in s["failed"]] == [1, 3] and s["restarts"] == [] and s["completed"] == 4
    assert s["failed"][0]["cause"].startswith("OutOfMemoryError")


class ZeroThenDie:
    """On a batch's first attempt: zero the input in place, then die (as a kernel with ``x.mul_(0)`` that
    then crashes would); later attempts: per-row sums."""

    def setup(self, device):
        pass

    def __call__(self, x):
        from pipeline import kernels
        if kernels.current["attempt"] == 1:
            x.mul_(0)
            os._exit(1)
        return x.sum(1)


def full_batches():
    import numpy as np
    return [np.full((4, 4), 1.0 + i, dtype=np.float32) for i in range(3)]


class FullDataset:
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return full_batches()[i]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["iterable", "dataset", "synthetic", "file"])
def test_a_retry_sees_the_batch_as_it_was_built(kind, tmp_path):
    """A kernel that zeroes its input in place and dies: the retry computes on the batch as built."""
    import numpy as np
    kw = dict(kernel="test_executor:ZeroThenDie", progress=False, threads_per_worker=1)
    if kind == "iterable":
        kw["source"] = iter(full_batches())
    elif kind == "dataset":
        kw["source"] = FullDataset()
    elif kind == "synthetic":
        kw.update(batches=3, rows=4, cols=4)
    else:
        np.save(tmp_path / "x.npy", np.concatenate(full_batches()))
        kw.update(input=str(tmp_path / "x.npy"), rows=4)
    r = pipeline.run(workers=2, **kw)
    assert len(r.summary["restarts"]) == 3 and r.summary["failed"] == []
    if kind == "synthetic":
        ref = pipeline.run(workers=0, kernel="sum", batches=3, rows=4, cols=4, progress=False)
        assert r.summary["checksum"] == ref.summary["checksum"]
    else:
        assert [x.tolist() for x in r.results] == [[4.0 * (1 + i)] * 4 for i in range(3)]


class DieInSetup:
    """A kernel whose setup kills its own worker: every time (``always``), or on a rank's first start
    only (a marker file per rank says it happened)."""

    def setup(self, device, marker="", always=False):
        import torch
        rank = torch.multiprocessing.current_process().name.rsplit("-", 1)[-1]
        if always or not os.path.exists(f"{marker}-{rank}"):
            open(f"{marker}-{rank}", "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

    def __call__(self, x):
        return x.sum(1)


@pytest.mark.timeout(120)
def test_a_worker_killed_while_starting_is_started_again(tmp_path):
    """Each of four workers is SIGKILLed while setting its kernel up: started again, the run succeeds."""
    marker = str(tmp_path / "started")
    s = pipeline.run(kernel="test_executor:DieInSetup", workers=4, **{"kernel.params.marker": marker},
                     **SIX).summary
    assert s["checksum"] == clean_checksum() and s["failed"] == []
    assert sorted(r["rank"] for r in s["restarts"]) == [0, 1, 2, 3]
    assert all(r["cause"].endswith("while starting") and "SIGKILL" in r["cause"] for r in s["restarts"])


@pytest.mark.timeout(120)
def test_a_worker_that_always_dies_while_starting_fails_the_run(tmp_path):
    """A rank that dies before it is ready max_attempts times in a row: one line with every start's end."""
    with pytest.raises(pipeline.WorkerError, match=r"died while starting, 2 times in a row .*SIGKILL.*; SIGKILL"):
        pipeline.run(kernel="test_executor:DieInSetup", workers=1, max_attempts=2,
                     **{"kernel.params.marker": str(tmp_path / "m"), "kernel.params.always": True}, **SIX)
