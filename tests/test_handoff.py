"""The handoff rule and the slot ring."""
import os
import pickle

import numpy as np
import pytest
import torch

import pipeline
from pipeline.fields import to_host
from pipeline.local.ring import SHM_DIR, SlotReader, SlotRing, remove_stale
from pipeline.fields import FIELD_ALIGN, Layout, copy_into
from conftest import TINY


def test_handoff_error_is_pickling_error():
    """HandoffError is a PipelineError and a pickle.PicklingError."""
    assert issubclass(pipeline.HandoffError, pickle.PicklingError)
    assert issubclass(pipeline.HandoffError, pipeline.PipelineError)


@pytest.mark.parametrize("make, fragment", [
    (lambda: torch.empty(2, 3, device="meta"), "device 'meta'"),
    (lambda: torch.ones(2, 3, requires_grad=True) * 2, "non-leaf"),
])
def test_to_host_refuses(make, fragment):
    """Device tensors and non-leaf grad tensors are refused, naming where and what to do."""
    with pytest.raises(pipeline.HandoffError, match=fragment) as e:
        to_host({"w": [1, make()]}, "kernel param")
    assert "kernel param.w[1]" in str(e.value)
    assert ".numpy()" in str(e.value)


def test_to_host_converts_cpu_tensors():
    """CPU tensors (leaf with grad too) are handed over as numpy."""
    out = to_host({"a": torch.arange(3), "b": torch.ones(2, requires_grad=True)}, "p")
    assert isinstance(out["a"], np.ndarray) and isinstance(out["b"], np.ndarray)


@pytest.mark.parametrize("bad", ["meta", "nonleaf"])
@pytest.mark.timeout(60)
def test_run_refuses_bad_source(bad):
    """run(source=...) raises HandoffError for a meta or non-leaf tensor, with the batch index."""
    t = torch.empty(4, 8, device="meta") if bad == "meta" else torch.ones(4, 8, requires_grad=True) + 1
    with pytest.raises(pipeline.HandoffError, match="source batch 1"):
        pipeline.run(source=[np.ones((4, 8), np.float32), t], kernel="sum", workers=1, progress=False)


@pytest.mark.parametrize("bad", ["meta", "nonleaf"])
def test_run_refuses_bad_params(bad):
    """Kernel params holding a meta or non-leaf tensor raise HandoffError naming the param."""
    t = torch.empty(2, device="meta") if bad == "meta" else torch.ones(2, requires_grad=True) * 3
    with pytest.raises(pipeline.HandoffError, match="kernel param.weights"):
        pipeline.run(kernel="sum", workers=1, **{"kernel.params.weights": t}, **TINY)


def test_slot_ring_views_without_copy():
    """A slot written by the main is seen in place by a reader (the worker's side): no copy either way."""
    ring = SlotRing(2, 100)
    try:
        a = np.arange(20, dtype=np.float32).reshape(4, 5)
        view, d = ring.view(1, Layout.of(a))
        view[...] = a
        reader = SlotReader(ring.path, ring.slot_bytes)
        v = reader.view(d)
        assert np.array_equal(v, a) and v.strides == (20, 4) and d.slot == 1
        view[0, 0] = 99  # written by the main, seen by the reader
        assert v[0, 0] == 99
        del v
        reader.close()
    finally:
        ring.close()
    assert not os.path.exists(ring.path)


def test_slot_ring_holds_several_fields_aligned():
    """A dict batch lies in one slot, each field on its own aligned region; the reader sees the same dict."""
    ring = SlotRing(2, 8192)
    try:
        batch = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "mask": np.array([True, False, True]),
                 "id": np.arange(3, dtype=np.int64)}
        layout = Layout.of(batch)
        assert all(o % FIELD_ALIGN == 0 for o in layout.offsets)
        views, d = ring.view(1, layout)
        copy_into(views, batch)
        reader = SlotReader(ring.path, ring.slot_bytes)
        got = reader.view(d)
        assert list(got) == ["x", "mask", "id"]
        assert all(np.array_equal(got[k], batch[k]) and got[k].dtype == batch[k].dtype for k in batch)
        views["id"][0] = 7  # the same memory
        assert got["id"][0] == 7
        del got
        reader.close()
    finally:
        ring.close()


def test_remove_stale_clears_dead_mains_only(tmp_path):
    """Ring files named after a dead pid are removed, in the ring dir and the temp dir; ours and
    look-alike names stay."""
    import tempfile
    dead = [os.path.join(SHM_DIR, "pipeline-999999999-0badc0de"),
            os.path.join(tempfile.gettempdir(), "pipeline-999999998-0badc0de"),
            str(tmp_path / "pipeline-999999997-0badc0de")]
    alike = [tmp_path / "pipeline-999999996-notaring", tmp_path / "pipeline-999999995-0badc0de.npy"]
    for p in dead + alike:
        open(p, "wb").close()
    ring = SlotRing(1, 10)
    try:
        removed = remove_stale(str(tmp_path))
        assert sorted(removed) == sorted(os.path.basename(p) for p in dead)
        assert not any(os.path.exists(p) for p in dead)
        assert all(p.exists() for p in alike) and os.path.exists(ring.path)
    finally:
        ring.close()
        for p in dead:
            if os.path.exists(p):
                os.unlink(p)


@pytest.mark.timeout(120)
def test_slots_are_reused_and_pickled_fallback_is_bit_identical(monkeypatch):
    """100 batches use one ring of in_flight slots; batches too big for a slot are pickled, same bytes."""
    import pipeline.local.executor as ex
    rings = []
    real = ex.open_ring
    monkeypatch.setattr(ex, "open_ring", lambda *a: rings.append(real(*a)) or rings[-1])
    kw = dict(TINY, batches=100, kernel="fft", workers=2, in_flight=3)
    slots = pipeline.run(**kw).summary
    assert len(rings) == 1 and slots["handoff"]["slots"] == 3 and slots["handoff"]["pickled_fallbacks"] == 0
    big = dict(kw, batches=10, rows=256)  # 8 KiB batches, 4 KiB slots (the smallest: one page)
    pickled = pipeline.run(**dict(big, slot_mb=0.001)).summary
    assert pickled["handoff"]["pickled_fallbacks"] == 10 and pickled["handoff"]["slot_bytes"] == 4096
    assert pickled["checksum"] == pipeline.run(**dict(big, workers=0)).summary["checksum"]
    assert slots["checksum"] == pipeline.run(**dict(kw, workers=0)).summary["checksum"]


def doubled(x):
    return x * 2


@pytest.mark.timeout(90)
def test_pickled_batches_with_big_results_do_not_deadlock():
    """Batches larger than a slot travel pickled through the worker's pipe; with results larger than a pipe's
    buffer too, sending the next batch to a worker that is computing would block both ends for ever. They go
    to idle workers only: the run completes, same checksum as serial."""
    kw = dict(kernel=doubled, workers=1, batches=6, rows=512, cols=512, slot_mb=0.001, device="cpu",
              threads_per_worker=1)  # 1 MiB batches and results, 4 KiB slots
    s = pipeline.run(**kw).summary
    assert s["completed"] == 6 and s["handoff"]["pickled_fallbacks"] == 6
    assert s["checksum"] == pipeline.run(**dict(kw, workers=0)).summary["checksum"]


@pytest.mark.timeout(120)
def test_closing_a_stream_while_a_send_is_stuck_ends_the_workers(monkeypatch):
    """A send to a worker that does not read (stopped, wedged) must not hang the end of a run: stop() waits
    STUCK_SEND_S for the supervisor, kills the workers (the send then fails), and the warm pipeline runs on."""
    import threading
    import time

    import pipeline.local.executor as executor
    from pipeline import wire as worker_module
    monkeypatch.setattr(executor, "STUCK_SEND_S", 1.0)
    real = worker_module.send  # tasks go through it (packed: wire.pack)
    with pipeline.Pipeline(kernel="sum", workers=1, **TINY) as p:
        p.run(batches=1)
        worker = p.executor.workers[0].process

        stuck = threading.Event()

        def send(conn, obj):
            if obj[0] == "tasks" and any(item[0] == 1 for item in obj[-1]):  # one slot: after batch 0 came back
                stuck.set()
                while worker.is_alive():  # blocks as a full pipe would, until the reader is gone
                    time.sleep(0.05)
                raise BrokenPipeError
            return real(conn, obj)
        monkeypatch.setattr(worker_module, "send", send)
        stream = p.imap(batches=6, in_flight=1)
        assert next(iter(stream))[0] == 0
        assert stuck.wait(30)
        t0 = time.monotonic()
        stream.close()
        assert time.monotonic() - t0 < 8 and not worker.is_alive()
        monkeypatch.setattr(worker_module, "send", real)
        assert p.run(batches=3).summary["completed"] == 3  # a fresh worker took its place


RSS_SCRIPT = """
import resource, sys, pipeline
if __name__ == "__main__":
    pipeline.run(kernel="sum", workers=2, batches=2, rows=1024, cols=1024, progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    s = pipeline.run(kernel="sum", workers=2, batches=60, rows=2048, cols=1024, progress=False).summary
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) // 1024, s["bytes_in"] // 2**20)
"""


@pytest.mark.timeout(120)
def test_main_memory_stays_bounded_while_streaming():
    """Streaming 480 MiB of 8 MiB batches grows the main's peak RSS by far less than the stream."""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True, timeout=110)
    assert p.returncode == 0, p.stderr
    growth_mb, streamed_mb = map(int, p.stdout.split())
    assert streamed_mb == 480 and growth_mb < 120, (growth_mb, streamed_mb)
    assert "leaked" not in p.stderr and "resource_tracker" not in p.stderr
