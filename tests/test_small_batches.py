"""Small batches (NOTE [ Small batches ] in local/worker.py): several tasks and results per message, builds on
the supervisor when they are quicker than a hand-off, and faults that still name the right batch."""
import multiprocessing as mp
import threading
import time

import numpy as np
import pytest
import torch

import pipeline
from pipeline import wire
from pipeline.compute import Computer
from pipeline.local import worker
from pipeline.fields import Layout, from_wire
from pipeline.local.ring import SlotRing
from pipeline.kernels import spec_for
from conftest import TINY


@pytest.mark.timeout(60)
def test_worker_sends_the_results_of_quick_batches_in_one_message(tmp_path, monkeypatch):
    """Three tasks in one message: the worker computes them in order and answers once, with three
    results; its status word says 'between batches' afterwards."""
    monkeypatch.setattr(worker, "HOLD_S", 60.0)  # nothing is sent early because of time on a busy machine
    ring = SlotRing(4, 4096, str(tmp_path))
    layout = Layout.make("array", (), [(4, 4)], [np.float32])
    tasks = []
    for i in range(3):
        views, desc = ring.view(i, layout)
        views[...] = i + 1
        tasks.append(wire.Task(i, 1, ring.path, ring.slot_bytes, desc))
    main_end, worker_end = mp.Pipe()
    computer = Computer(spec_for("sum", {}), torch.device("cpu"), False)
    words = np.zeros(1, np.int64)
    t = threading.Thread(target=worker._loop, args=(0, worker_end, computer, words), daemon=True)
    t.start()
    main_end.send(tasks)
    main_end.send(None)
    t.join(30)
    assert not t.is_alive()
    msgs = []
    while main_end.poll(0.5):
        msgs.append(main_end.recv())
    assert len(msgs) == 1 and msgs[0][0] == "several", [m[0] for m in msgs]
    results = msgs[0][1]
    assert [(m[0], m[1]) for m in results] == [("packed", 0), ("packed", 1), ("packed", 2)]  # (small: bytes)
    for i, m in enumerate(results):
        np.testing.assert_array_equal(from_wire(m[2]), np.full(4, 4.0 * (i + 1), np.float32))
    assert words[0] == 0
    del views
    ring.close()


@pytest.mark.timeout(60)
def test_without_status_words_every_result_goes_at_once(tmp_path, monkeypatch):
    """No status words (no room for the file): the main could not tell which batch a dead worker was
    computing, so nothing is held."""
    monkeypatch.setattr(worker, "HOLD_S", 60.0)
    ring = SlotRing(4, 4096, str(tmp_path))
    layout = Layout.make("array", (), [(2, 2)], [np.float32])
    tasks = []
    for i in range(2):
        views, desc = ring.view(i, layout)
        views[...] = 1
        tasks.append(wire.Task(i, 1, ring.path, ring.slot_bytes, desc))
    main_end, worker_end = mp.Pipe()
    computer = Computer(spec_for("sum", {}), torch.device("cpu"), False)
    t = threading.Thread(target=worker._loop, args=(0, worker_end, computer, None), daemon=True)
    t.start()
    main_end.send(tasks)
    main_end.send(None)
    t.join(30)
    msgs = []
    while main_end.poll(0.5):
        msgs.append(main_end.recv())
    assert [m[0] for m in msgs] == ["packed", "packed"]
    del views
    ring.close()


@pytest.mark.timeout(120)
def test_a_crash_among_held_results_blames_the_batch_it_was_computing():
    """A worker holding the results of quick batches dies computing batch 20: batch 20, and only it, is
    charged the attempt (with max_attempts 1 it alone is quarantined); the held ones are computed again."""
    kw = dict(TINY, batches=40)
    clean = pipeline.run(kernel="sum", workers=0, **kw).results
    r = pipeline.run(kernel="faulty", workers=2, max_attempts=1, on_error="skip",
                     **{"kernel.params.crash_on": [20]}, **kw)
    s = r.summary
    assert [f["batch"] for f in s["failed"]] == [20], s["failed"]
    assert len(s["restarts"]) == 1 and s["restarts"][0]["batch"] == 20
    for i, (a, b) in enumerate(zip(clean, r.results)):
        if i != 20:
            np.testing.assert_array_equal(a, b)


class Slow:
    """A dataset whose samples take 3 ms each (I/O-like: the thread sleeps)."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        time.sleep(0.003)
        return np.full(4, i, np.float32)


@pytest.mark.timeout(120)
def test_quick_builds_run_on_the_supervisor_and_slow_ones_on_build_threads():
    with pipeline.Pipeline(kernel="sum", workers=2, progress=False, threads_per_worker=1) as p:
        tiny = p.run(batches=200, rows=4, cols=4)
        slow = p.run(source=Slow(), batch_size=2)
    # all but the first few (a build thread's measured builds decide): not the first 40 or so, as when the
    # moving averages started from a second
    assert tiny.summary["handoff"]["built_inline"] >= 180, tiny.summary["handoff"]
    assert tiny.summary["checksum"] == pipeline.run(kernel="sum", workers=0, batches=200, rows=4, cols=4,
                                                    progress=False).summary["checksum"]
    assert slow.summary["handoff"]["built_inline"] == 0
    ref = pipeline.run(source=Slow(), batch_size=2, kernel="sum", workers=0, progress=False)
    assert [a.tobytes() for a in slow.results] == [a.tobytes() for a in ref.results]


def test_one_slow_build_does_not_send_the_quick_ones_to_the_build_threads():
    """The supervisor builds here while the builds' moving averages are under the limits: from the first
    build measured, and a slow build counts as at most twice the limit, so one hiccup (a preempted thread, a
    GC pause) doesn't decide for the builds after it; a run of slow ones does, and quick ones bring it back."""
    from types import SimpleNamespace
    from pipeline.local.building import BuildSide
    side = SimpleNamespace(build_cpu=None, build_wall=0.0, source=object(), builders=SimpleNamespace(processes=0),
                           threads=2, run=SimpleNamespace(counts={"built": 4}))
    measured = BuildSide.measured.__get__(side)
    measured(20e-6, 30e-6)
    assert BuildSide.inline(side)  # (the first build decides: not a second's start that decays over 40 builds)
    measured(20e-6, 0.05)  # preempted for 50 ms
    assert BuildSide.inline(side)
    for _ in range(4):
        measured(20e-6, 0.05)  # slow builds (I/O): to the build threads
    assert not BuildSide.inline(side)
    for _ in range(8):
        measured(20e-6, 30e-6)
    assert BuildSide.inline(side)


def test_quick_builds_on_the_supervisor_do_not_suggest_build_processes():
    """The GIL note (the build limits and does not scale with threads) is about build threads: when the
    supervisor built the batches itself, their fixed cost is the limit, and build processes would not help."""
    from types import SimpleNamespace
    from pipeline import devices
    from pipeline.local.building import BuildSide
    if devices.usable_cpus() < 2:
        pytest.skip("the note needs 2 usable CPUs")
    run = SimpleNamespace(counts={"built": 100, "build_cpu_s": 0.01, "inline": 0},
                          breakdown={"build_s": 0.02, "idle_s": 1.0, "compute_s": 0.1})
    side = SimpleNamespace(threads=2, builders=SimpleNamespace(processes=0), run=run,
                           build_span=(5.0, 5.0098, 0.01, 0.02, 100))
    assert "--build-processes" in BuildSide.gil_note(side)
    run.counts["inline"] = 100
    assert BuildSide.gil_note(side) is None


@pytest.mark.timeout(120)
def test_workers_digest_results_when_the_caller_checksums_them():
    """``Work(digests=True)`` (the runner's runs): each result comes with its ``batch_digest``, computed by
    the worker, so the main's checksum costs a 32-byte update per batch; without it, no digest is made."""
    from pipeline.config import load_config
    from pipeline.outputs import batch_digest
    from pipeline.runner import make_executor
    from pipeline.sources.factory import open_source as make_source
    from pipeline.sources.base import Work
    cfg = load_config(None, {"source.rows": 4, "source.cols": 4, "source.batches": 6, "kernel.name": "sum",
                             "workers.count": 1})
    src = make_source(cfg.source)
    with make_executor(cfg, spec_for("sum", {})) as ex:
        outs = list(ex.stream(Work(src, src, src.max_nbytes, digests=True)))
        assert [o.index for o in outs] == list(range(6))
        for o in outs:
            assert o.info["digest"] == batch_digest(o.index, o.result)
        assert not any("digest" in o.info for o in ex.stream(Work(src, src, src.max_nbytes)))
