"""The Ray backend on a local Ray instance (2 CPUs): same checksum, retried lost actors, handoff rule."""
import os
import threading
import time

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
    # synthetic batches are built by the actors: no batch bytes through the driver (NOTE [ Actor builds ])
    assert r.summary["handoff"]["transport"] == "built by the actors" and r.summary["handoff"]["put_bytes"] == 0
    assert r.summary["notes"] == []
    r = pipeline.run(kernel=kernel, workers=2, ray_build="driver", **RAY)
    assert r.summary["checksum"] == pipeline.run(kernel=kernel, workers=0, **dict(RAY, backend="local")).summary["checksum"]
    assert r.summary["handoff"]["transport"] == "ray object store"
    assert r.summary["handoff"]["put_bytes"] == 6 * 16 * 8 * 4 and "run.ray_build = 'driver'" in r.summary["notes"][0]


@pytest.mark.timeout(180)
def test_killed_actor_batch_is_retried(tmp_path):
    """An actor killed mid-batch is restarted by Ray and its batch resubmitted; checksum unchanged. Its
    trace (NOTE [ Trace ]) has each actor's build and compute spans, and the loss."""
    s = pipeline.run(kernel="faulty", workers=2, trace=str(tmp_path / "ray.json"),
                     **{"kernel.params.crash_on": [2]}, **RAY).summary
    clean = pipeline.run(kernel="sum", workers=0, **dict(RAY, backend="local")).summary["checksum"]
    assert s["checksum"] == clean and s["failed"] == []
    import json
    with open(s["trace"]) as f:
        evs = json.load(f)["traceEvents"]
    actors = {e["pid"] for e in evs if e["ph"] == "M" and e["args"].get("name", "").startswith("ray actor")}
    for stage in ("build", "compute"):
        spans = [e for e in evs if e["ph"] == "X" and e.get("cat") == stage]
        assert {e["args"]["batch"] for e in spans} == set(range(6)) and {e["pid"] for e in spans} <= actors
    assert [e["cat"] for e in evs if e["ph"] == "i"].count("actor lost") == len(s["restarts"])
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


@pytest.mark.timeout(120)
def test_in_order_a_failed_batch_comes_after_the_batches_before_it_on_ray():
    """The local backend's rule on Ray: on_error = fail, in order, every batch before the failed one is
    yielded first, however long it takes, then the earliest failed batch's error is raised."""
    def slow_first(x):  # (sent by value: the actors can't import this module)
        i = pipeline.kernels.current["index"]
        if i == 0:
            time.sleep(0.5)
        if i > 0:
            raise RuntimeError(f"batch {i} fails")
        return x.sum(1)
    got = []
    with pytest.raises(RuntimeError, match="batch 1 fails"):
        for i, r in pipeline.imap(kernel=slow_first, workers=2, **dict(RAY, batches=8)):
            got.append(i)
    assert got == [0]


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


class Locked:
    """A map-style dataset that holds a lock: it can't be pickled, so the actors can't build from it."""

    def __init__(self):
        self.lock = threading.Lock()

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return np.full((2, 3), i, np.float32)


@pytest.mark.timeout(180)
def test_unpicklable_dataset_and_iterator_are_built_by_the_driver():
    """A dataset that can't be pickled, or a generator of batches, is built by the driver (put in the object
    store), same results, and the summary's notes say why in one line; ray_build='actors' refuses it."""
    ref = pipeline.run(source=Locked(), kernel="sum", workers=0, progress=False).summary["checksum"]
    s = pipeline.run(source=Locked(), kernel="sum", workers=2, backend="ray", progress=False).summary
    assert s["checksum"] == ref and s["handoff"]["put_bytes"] == 4 * 2 * 3 * 4
    assert len(s["notes"]) == 1 and "source (Locked) can't be pickled (TypeError" in s["notes"][0]
    assert "\n" not in s["notes"][0]
    s = pipeline.run(source=(Locked()[i] for i in range(4)), kernel="sum", workers=2, backend="ray",
                     progress=False).summary
    assert s["checksum"] == ref and "drawn in order" in s["notes"][0]
    with pytest.raises(pipeline.ConfigError, match="run.ray_build = 'actors': the source .Locked. can't be pickled"):
        pipeline.run(source=Locked(), kernel="sum", workers=2, backend="ray", ray_build="actors", progress=False)


def dies_while_starting():
    """A kernel class (sent by value) whose setup exits the process while ``marker`` counts fewer than
    ``deaths`` starts; then it sums rows, as ``sum`` does."""
    class DiesWhileStarting:
        def setup(self, device, marker, deaths):
            n = int(open(marker).read()) if os.path.exists(marker) else 0
            with open(marker, "w") as f:
                f.write(str(n + 1))
            if n < deaths:
                os._exit(1)

        def __call__(self, x):
            return x.sum(1)
    return DiesWhileStarting


@pytest.mark.timeout(240)
def test_actor_dying_while_starting_is_restarted_until_max_attempts(tmp_path):
    """NOTE [ Ray restarts while starting ]: an actor that dies setting its kernel up is restarted and the
    run goes on; max_attempts deaths in a row fail the run in one line; a setup that raises fails at once."""
    clean = pipeline.run(kernel="sum", workers=0, **dict(RAY, backend="local")).summary["checksum"]
    kw = dict(RAY, workers=1, kernel=dies_while_starting())
    s = pipeline.run(**kw, **{"kernel.params.marker": str(tmp_path / "a"), "kernel.params.deaths": 1}).summary
    assert s["checksum"] == clean and s["failed"] == []
    assert [(r["rank"], r["batch"], r["cause"]) for r in s["restarts"]] == [
        (0, None, "ray actor died while starting (Ray restarted it)")]
    with pytest.raises(pipeline.WorkerError, match=r"^the Ray actor of worker 0 died while starting, 2 times in a "
                                                   r"row \(faults.max_attempts = 2\)") as e:
        pipeline.run(max_attempts=2, **kw, **{"kernel.params.marker": str(tmp_path / "b"),
                                              "kernel.params.deaths": 99})
    assert "\n" not in str(e.value) and int((tmp_path / "b").read_text()) >= 2
    t0 = time.monotonic()
    with pytest.raises(pipeline.KernelError, match="^a Ray actor failed to set up kernel 'faulty': kernel "
                                                   "'faulty': unknown params") as e:
        pipeline.run(kernel="faulty", workers=1, **{"kernel.params.bogus": 1}, **RAY)
    assert "\n" not in str(e.value) and time.monotonic() - t0 < 60


@pytest.mark.timeout(180)
def test_images_built_by_actors_report_bad_files(tmp_path):
    """A folder of images with a bad file, bad_samples = skip, built and written by the actors: checksum,
    summary's bad_samples and the manifest line's as serial's (the driver learns what the actors found)."""
    import json
    from test_images import folder
    root = folder(tmp_path / "imgs", n=5)
    (root / "im02.png").write_bytes(b"not a png")
    kw = dict(input=str(root), kernel="sum", progress=False, image_size=16, batch_size=2, bad_samples="skip",
              keep_results=False)
    ref = pipeline.run(workers=0, output=str(tmp_path / "serial"), **kw).summary
    s = pipeline.run(workers=2, backend="ray", output=str(tmp_path / "ray"), **kw).summary
    assert s["checksum"] == ref["checksum"] and s["handoff"]["written_by"] == "actors"
    assert s["bad_samples"] == ref["bad_samples"] and [b["file"] for b in s["bad_samples"]] == ["im02.png"]
    with open(tmp_path / "ray" / "manifest.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert {r["batch"]: r.get("bad_samples") for r in lines}[1] == {"im02.png": s["bad_samples"][0]["cause"]}


@pytest.mark.timeout(180)
def test_actor_restarted_unseen_gets_the_source_again():
    """An actor killed while idle (no task lost, so the driver did not see it) has lost the run's source:
    its next task answers 'reopen' and is sent again with the source; every batch computed, same checksum."""
    from pipeline import kernels
    from pipeline.ray_backend import RayExecutor
    from pipeline.sources.base import Work
    from pipeline.runner import resolve
    from pipeline.sources.factory import open_source as make_source
    from pipeline.outputs import checksum
    cfg = resolve(None, dict(RAY, workers=1, kernel="sum"))
    src = make_source(cfg.source)
    with RayExecutor(cfg, kernels.spec_for("sum", {})) as ex:
        got = {}
        for o in ex.stream(Work.of(src), window=1):  # one batch at a time: nothing in flight while we are here
            got[o.index] = o.result
            if o.index == 1:
                pid = o.info["pid"]
                ray.kill(ex.actors[0], no_restart=False)
                while True:  # until Ray has restarted it
                    try:
                        if ray.get(ex.actors[0].info.remote(), timeout=60)[1] != pid:
                            break
                    except ray.exceptions.RayActorError:
                        time.sleep(0.2)
        assert [(r["rank"], r["pid"], r["batch"]) for r in ex.restarts] == [(0, pid, None)]
        assert "restarted while idle" in ex.restarts[0]["cause"]
        done = {w["pid"]: w["batches"] for w in ex.worker_info()}
        assert done[pid] == 2 and sum(done.values()) == 6 and len(done) == 2  # the new incarnation: the rest
    assert checksum(got[i] for i in range(6)) == pipeline.run(kernel="sum", workers=0, **dict(RAY, backend="local")).summary["checksum"]


@pytest.mark.timeout(180)
def test_a_sample_that_fails_on_the_actor_fails_its_batch():
    """A sample that does not fit its batch, found by the actor building it: on_error=skip fails that batch
    alone (the rest computed, as serial); on_error=fail raises SampleError naming the sample and batch."""
    samples = [np.full(3, i, np.float32) for i in range(6)]
    samples[3] = np.zeros(3, np.float64)  # (another length would make the field ragged: another dtype)
    kw = dict(source=samples, batch_size=2, kernel="sum", progress=False)
    ref = pipeline.run(workers=0, on_error="skip", **kw).summary
    s = pipeline.run(workers=2, backend="ray", on_error="skip", **kw).summary
    assert s["handoff"]["transport"] == "built by the actors" and s["checksum"] == ref["checksum"]
    assert [f["batch"] for f in s["failed"]] == [1] and "sample 3 (batch 1)" in s["failed"][0]["cause"]
    with pytest.raises(pipeline.SampleError, match=r"^batch 1 \(ray actor pid \d+.*sample 3 \(batch 1\): shape"):
        pipeline.run(workers=2, backend="ray", **kw)



@pytest.mark.timeout(180)
def test_samples_of_their_own_length_on_ray_come_back_in_input_order(tmp_path):
    """order = length and a token budget on Ray, on a pyarrow Table with a list column of varying length:
    the actors build and write the parts (with their sample indices), the results and checksum are the
    local backend's, read_output gives input order."""
    pa = pytest.importorskip("pyarrow")
    L = np.random.default_rng(0).integers(1, 30, 40)
    table = pa.table({"ids": pa.array([list(range(1, int(n) + 1)) for n in L], pa.list_(pa.int64())),
                      "doc": np.arange(40, dtype=np.int64)})
    kw = dict(source=table, columns=["ids", "doc"], batch_size=8, order="length", max_tokens=96, progress=False,
              kernel=lambda b: {"s": b["ids"].sum(1), "n": b["lengths"], "doc": b["doc"]})
    local = pipeline.run(workers=0, **kw)
    r = pipeline.run(workers=2, backend="ray", output=str(tmp_path / "out"), **kw)
    assert r.summary["checksum"] == local.summary["checksum"]
    assert r.summary["handoff"]["transport"] == "built by the actors"
    back = pipeline.read_output(str(tmp_path / "out"))
    assert back["doc"].tolist() == list(range(40)) and back["n"].tolist() == L.tolist()
