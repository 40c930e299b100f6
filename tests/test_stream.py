"""Parallel build, the ordered bounded stream (imap), warm Pipelines, slot safety."""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import pipeline
from pipeline import kernels
from pipeline.config import SourceConfig
from pipeline.sources.synthetic import Synthetic
from conftest import TINY, workers_alive, ours


class SeedCheck:
    """Fails a batch whose input is not exactly the bytes its seed and index define."""

    def setup(self, device, seed=0, rows=16, cols=8, sleep=0.0):
        self.src = Synthetic(SourceConfig(batches=1, rows=rows, cols=cols, seed=seed))
        self.sleep = sleep

    def __call__(self, x):
        want = torch.from_numpy(self.src.get(kernels.current["index"])).to(x.device)
        time.sleep(self.sleep)  # the slot stays in use: a rewrite now would show below
        if not torch.equal(x, want):
            raise AssertionError(f"batch {kernels.current['index']}: input differs from its seed's bytes")
        return x.sum(1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("build_threads, in_flight", [(1, 2), (3, 3), (2, 7)])
def test_results_identical_for_every_build_threads_and_in_flight(build_threads, in_flight):
    """Results, their order and the checksum do not depend on build threads or slots."""
    kw = dict(TINY, batches=12, kernel="fft")
    ref = pipeline.run(workers=0, **kw)
    r = pipeline.run(workers=2, build_threads=build_threads, in_flight=in_flight, **kw)
    assert r.summary["checksum"] == ref.summary["checksum"]
    assert [a.tobytes() for a in r.results] == [a.tobytes() for a in ref.results]
    assert r.summary["handoff"]["build_threads"] == min(build_threads, in_flight)
    assert r.summary["handoff"]["slots"] == in_flight


@pytest.mark.timeout(120)
def test_no_slot_is_rewritten_while_a_kernel_reads_it():
    """A tiny ring, many batches, slow kernels that check their input against the seed: every batch intact."""
    r = pipeline.run(kernel="test_stream:SeedCheck", workers=2, in_flight=2, build_threads=2,
                     **{"kernel.params.sleep": 0.02}, **dict(TINY, batches=40))
    assert r.summary["completed"] == 40 and r.summary["failed"] == []


@pytest.mark.timeout(120)
def test_source_that_raises_midway_is_one_clear_error():
    """A caller's iterator raising at batch 5 with 3 build threads: that error, once, no hang, nothing left."""
    def items():
        for i in range(20):
            if i == 5:
                raise ValueError("bad record 5")
            yield np.full((4, 3), i, np.float32)
    with pytest.raises(ValueError, match="bad record 5") as e:
        pipeline.run(source=items(), kernel="sum", workers=2, build_threads=3, progress=False)
    assert e.value.summary["error"] == "ValueError: bad record 5"


@pytest.mark.timeout(120)
def test_supervisor_delivers_while_a_build_blocks():
    """A build stuck in the caller's iterator does not stop results of earlier batches from arriving."""
    go = threading.Event()

    def items():
        yield np.ones((4, 3), np.float32)
        yield np.ones((4, 3), np.float32) * 2
        assert go.wait(60), "the consumer never got batches 0 and 1 while batch 2 was being drawn"
        yield np.ones((4, 3), np.float32) * 3
    got = []
    for i, r in pipeline.imap(source=items(), kernel="sum", workers=1, in_flight=3, build_threads=2):
        got.append((i, r.tolist()))
        if i == 1:
            go.set()
    assert got == [(0, [3.0] * 4), (1, [6.0] * 4), (2, [9.0] * 4)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ordered", [True, False])
def test_imap_yields_every_batch(ordered):
    """imap gives (index, result) for every batch: in order when ordered, the same set otherwise."""
    ref = pipeline.run(workers=0, kernel="sum", **dict(TINY, batches=10)).results
    got = list(pipeline.imap(kernel="faulty", workers=2, ordered=ordered,
                             **{"kernel.params.sleep": 0.01}, **dict(TINY, batches=10)))
    if ordered:
        assert [i for i, _ in got] == list(range(10))
    assert {i: r.tobytes() for i, r in got} == {i: r.tobytes() for i, r in enumerate(ref)}


@pytest.mark.timeout(120)
def test_imap_backpressure_bounds_what_is_started():
    """A consumer that stops taking: the source is drawn no further than the window (2 x in_flight)."""
    drawn = []

    def items():
        for i in range(100):
            drawn.append(i)
            yield np.full((4, 3), i, np.float32)
    it = pipeline.imap(source=items(), kernel="sum", workers=2, in_flight=3, build_threads=2)
    next(it)
    time.sleep(3)  # workers and builders would race ahead here if nothing held them
    assert len(drawn) <= 2 * 3 + 1, len(drawn)
    it.close()


@pytest.mark.timeout(120)
def test_breaking_out_of_imap_stops_workers_and_removes_shm():
    """Breaking out of an imap loop and closing it: no worker process and no ring file remain."""
    it = pipeline.imap(kernel="sum", workers=2, **dict(TINY, batches=50))
    for i, _ in it:
        if i == 2:
            break
    it.close()
    assert workers_alive() == [] and ours() == set()


@pytest.mark.timeout(120)
def test_imap_failed_batches_follow_on_error():
    """on_error=skip: a raising batch comes as (index, None) and is listed in stream.failed."""
    it = pipeline.imap(kernel="faulty", workers=2, on_error="skip", **{"kernel.params.raise_on": [3]},
                       **dict(TINY, batches=6))
    got = dict(it)
    assert got[3] is None and all(got[i] is not None for i in (0, 1, 2, 4, 5))
    assert [f["batch"] for f in it.failed] == [3] and it.summary["completed"] == 5


@pytest.mark.timeout(180)
def test_warm_pipeline_reuses_its_workers():
    """Several run/imap calls on one Pipeline: same worker pids, startup_s 0 after the first, right results."""
    kw = dict(TINY, batches=6)
    with pipeline.Pipeline(kernel="fft", workers=2, threads_per_worker=1, progress=False) as p:
        a = p.run(batches=6, rows=16, cols=8)
        b = p.run(batches=6, rows=16, cols=8, seed=1)
        streamed = dict(p.imap(batches=6, rows=16, cols=8))
        pids = {w["pid"] for w in a.summary["workers"]}
        assert pids == {w["pid"] for w in b.summary["workers"]} and len(pids) == 2
        assert b.summary["startup_s"] == 0
    assert a.summary["checksum"] == pipeline.run(kernel="fft", workers=0, **kw).summary["checksum"]
    assert b.summary["checksum"] == pipeline.run(kernel="fft", workers=0, seed=1, **kw).summary["checksum"]
    assert [streamed[i].tobytes() for i in range(6)] == [r.tobytes() for r in a.results]


@pytest.mark.timeout(180)
def test_warm_pipeline_after_an_early_break_and_an_error():
    """A run broken off early, a kernel error, a call with its own on_error and in_flight: the same Pipeline
    still computes the next run right."""
    with pipeline.Pipeline(kernel="faulty", workers=2, threads_per_worker=1, progress=False,
                           **{"kernel.params.raise_on": [7], "kernel.params.sleep": 0.01}) as p:
        it = p.imap(batches=6, rows=16, cols=8)  # (before batch 7: the error can't come first, whichever
        next(it)                                   # worker is quicker)
        it.close()
        with pytest.raises(RuntimeError, match="batch 7"):
            p.run(batches=20, rows=16, cols=8)
        # a call's own faults and handoff settings apply to its run (the workers stay as they are)
        s = p.run(batches=10, rows=16, cols=8, on_error="skip", in_flight=2).summary
        assert [f["batch"] for f in s["failed"]] == [7] and s["handoff"]["slots"] == 2
        r = p.run(batches=6, rows=16, cols=8)
    assert r.summary["checksum"] == pipeline.run(kernel="sum", workers=0, **dict(TINY, batches=6)).summary["checksum"]


class SlowFirst:
    """Batch 0 takes ``sleep`` seconds; every batch in ``fail`` raises at once."""

    def setup(self, device, sleep=0.5, fail=(), together="", workers=2):
        self.sleep, self.fail = sleep, set(fail)
        if together:  # every worker is ready at about the same time (spawned ones start seconds apart on a
            import glob  # loaded machine: one alone would compute batch 0 before anything could fail)
            open(f"{together}-{os.getpid()}", "w").close()
            deadline = time.monotonic() + 60
            while len(glob.glob(f"{together}-*")) < workers and time.monotonic() < deadline:
                time.sleep(0.01)

    def __call__(self, x):
        i = kernels.current["index"]
        if i == 0:
            time.sleep(self.sleep)
        if i in self.fail:
            raise RuntimeError(f"batch {i} fails")
        return x.sum(1)


@pytest.mark.timeout(120)
def test_in_order_a_failed_batch_comes_after_the_batches_before_it(tmp_path):
    """on_error = fail, in order: the batches before the failed one are all handed over, then its error is
    raised (the earliest failed batch's, whichever failed first), however long a batch before it takes."""
    got = []
    with pytest.raises(RuntimeError, match="batch 1 fails"):
        for i, r in pipeline.imap(kernel=SlowFirst, workers=2, batches=8, rows=16, cols=8, progress=False,
                                  **{"kernel.params.fail": list(range(1, 8))}):
            got.append(i)
    assert got == [0]
    done = []  # as done: the first failure ends the stream at once
    with pytest.raises(RuntimeError, match=r"batch \d fails"):
        for i, r in pipeline.imap(kernel=SlowFirst, workers=2, batches=8, rows=16, cols=8, progress=False,
                                  ordered=False, **{"kernel.params.fail": list(range(1, 8)),
                                                    "kernel.params.together": str(tmp_path / "ready")}):
            done.append(i)
    assert done == []


def test_pipeline_refuses_another_kernel_or_worker_count():
    """A call asking a running Pipeline for another kernel, device or worker count is a ConfigError."""
    small = dict(batches=4, rows=16, cols=8)
    with pipeline.Pipeline(kernel="sum", workers=0, progress=False) as p:
        with pytest.raises(pipeline.ConfigError, match=r"kernel.name = 'fft'.*make a new Pipeline"):
            p.run(kernel="fft", **small)
        with pytest.raises(pipeline.ConfigError, match=r"workers.count = 3"):
            p.run(workers=3, **small)
        assert p.run(**small).summary["completed"] == 4


RSS_SCRIPT = """
import resource, pipeline
if __name__ == "__main__":
    it = pipeline.imap(kernel="fft", workers=2, batches=8, rows=2048, cols=1024, threads_per_worker=1)
    for i, r in it:
        if i == 7:
            break
    it.close()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = 0
    for i, r in pipeline.imap(kernel="fft", workers=2, batches=256, rows=2048, cols=1024,
                              threads_per_worker=1):
        n += r.nbytes
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) // 1024, n // 2**20)
"""


@pytest.mark.timeout(300)
def test_imap_streams_a_gigabyte_with_bounded_memory():
    """1 GiB of fft results through imap grows the main's peak RSS by far less than what it streamed."""
    p = subprocess.run([sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stderr
    growth_mb, streamed_mb = map(int, p.stdout.split())
    assert streamed_mb >= 1024 and growth_mb < 200, (growth_mb, streamed_mb)
