"""The Ray backend on a local Ray instance (2 CPUs): same checksum, retried lost actors, handoff rule."""
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pipeline  # noqa: E402
from conftest import TINY, local_ray  # noqa: E402

RAY = dict(TINY, backend="ray", batches=6)


pytestmark = pytest.mark.ray_daemons


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One local Ray instance for the module (2 CPUs)."""
    with local_ray(2):
        yield


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kernel", ["matmul", "fft"])
def test_checksum_equals_local_backend(kernel):
    """--backend ray gives the serial/local checksum and per-actor counts."""
    r = pipeline.run(kernel=kernel, workers=2, **RAY)
    assert r.summary["checksum"] == pipeline.run(kernel=kernel, workers=0, **dict(RAY, backend="local")).summary["checksum"]
    assert sum(w["batches"] for w in r.summary["workers"]) == 6
    assert r.summary["handoff"]["transport"] == "ray object store"


@pytest.mark.timeout(180)
def test_killed_actor_batch_is_retried():
    """An actor killed mid-batch is restarted by Ray and its batch resubmitted; checksum unchanged."""
    s = pipeline.run(kernel="faulty", workers=2, **{"kernel.params.crash_on": [2]}, **RAY).summary
    clean = pipeline.run(kernel="sum", workers=0, **dict(RAY, backend="local")).summary["checksum"]
    assert s["checksum"] == clean and s["failed"] == []
    # a death with several tasks queued on the actor is charged to nobody (batch None): they are
    # retried alone, and a death then is charged exactly (NOTE [ Ray attribution ])
    assert [r["batch"] for r in s["restarts"]] in ([2], [None, 2])
    assert all("ray actor lost" in r["cause"] for r in s["restarts"])


@pytest.mark.timeout(180)
def test_quarantine_after_max_attempts():
    """A batch that kills its actor every time is quarantined after max_attempts."""
    s = pipeline.run(kernel="faulty", workers=2, max_attempts=2, **{"kernel.params.crash_on": [1],
                     "kernel.params.only_first_attempt": False}, **RAY).summary
    assert s["completed"] == 5 and s["failed"][0]["batch"] == 1 and len(s["failed"]) == 1
    assert s["failed"][0]["attempts"] == 2


@pytest.mark.timeout(180)
def test_sticky_cuda_error_replaces_the_actor():
    """A sticky CUDA error (simulated on the CPU) on an actor: it is killed and restarted by Ray, the batch
    retried; every attempt sticky -> quarantined after max_attempts, as on the local backend."""
    s = pipeline.run(kernel="faulty", workers=2, device="cpu", **{"kernel.params.sticky_on": [2]}, **RAY).summary
    clean = pipeline.run(kernel="sum", workers=0, **dict(RAY, backend="local")).summary["checksum"]
    assert s["checksum"] == clean and s["failed"] == [] and s["completed"] == 6
    assert [r["batch"] for r in s["restarts"]] == [2] and "worker retired" in s["restarts"][0]["cause"]
    s = pipeline.run(kernel="faulty", workers=2, device="cpu", max_attempts=2, **{
        "kernel.params.sticky_on": [1], "kernel.params.only_first_attempt": False}, **RAY).summary
    assert s["completed"] == 5 and len(s["restarts"]) == 2
    assert [f["batch"] for f in s["failed"]] == [1] and "sticky CUDA error" in s["failed"][0]["cause"]


@pytest.mark.timeout(180)
def test_sticky_retire_waits_for_the_new_incarnation(monkeypatch):
    """ray.kill is asynchronous: when it lands late, the old actor still answers the first ping; the retried
    batch must not be sent to it (it would die with it and be charged a second time)."""
    import threading
    real = ray.kill
    monkeypatch.setattr(ray, "kill", lambda actor, **kw: threading.Timer(0.3, real, (actor,), kw).start())
    s = pipeline.run(kernel="faulty", workers=2, device="cpu", **{"kernel.params.sticky_on": [2],
                     "kernel.params.sleep": 0.2}, **RAY).summary  # the run outlasts the delay
    assert s["completed"] == 6 and [r["batch"] for r in s["restarts"]] == [2]


@pytest.mark.timeout(180)
def test_kernel_error_keeps_type_and_batch():
    """A kernel exception on an actor reaches the caller as its type, naming the batch."""
    with pytest.raises(RuntimeError, match="batch 3 .*raise_on batch 3"):
        pipeline.run(kernel="faulty", workers=2, **{"kernel.params.raise_on": [3]}, **RAY)


def test_handoff_rule_before_object_store():
    """A meta tensor in source raises HandoffError before it reaches Ray's object store."""
    with pytest.raises(pipeline.HandoffError, match="source batch 0"):
        pipeline.run(source=[torch.empty(2, 2, device="meta")], kernel="sum", workers=1, backend="ray",
                     progress=False)


@pytest.mark.timeout(180)
def test_callable_kernel_on_ray():
    """A lambda kernel (sent by value) runs on Ray actors."""
    src = [np.full((2, 3), i, np.float32) for i in range(4)]
    r = pipeline.run(source=src, kernel=lambda x: x.sum(1) + 1, workers=2, backend="ray", progress=False)
    assert [x.tolist() for x in r.results] == [[1, 1], [4, 4], [7, 7], [10, 10]]


@pytest.mark.timeout(180)
def test_imap_and_streaming_run_on_ray():
    """pipeline.imap with --backend ray yields every batch in order; run(keep_results=False) keeps none."""
    local = pipeline.run(kernel="fft", workers=0, **dict(RAY, backend="local"))
    got = list(pipeline.imap(kernel="fft", workers=2, **RAY))
    assert [i for i, _ in got] == list(range(6))
    assert [r.tobytes() for _, r in got] == [r.tobytes() for r in local.results]
    r = pipeline.run(kernel="fft", workers=2, keep_results=False, **RAY)
    assert r.results == [] and r.summary["checksum"] == local.summary["checksum"]
