"""RayExecutor.stream: batch order or completion order, a bounded window with a slow consumer, early close."""
import time

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")

import numpy as np  # noqa: E402

from pipeline import kernels  # noqa: E402
from pipeline.contracts import Outcome  # noqa: E402
from pipeline.ray_backend import RayExecutor  # noqa: E402
from pipeline.sources.base import Work  # noqa: E402
from pipeline.runner import resolve  # noqa: E402
from pipeline.sources.datasets import FromIterable  # noqa: E402
from conftest import local_ray  # noqa: E402

N = 10


pytestmark = pytest.mark.ray_daemons


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One local Ray instance for the module: 4 CPUs, room for the shared executor and one more."""
    with local_ray(4):
        yield


class Counted:
    """The batches, counting how many the executor has pulled."""

    def __init__(self, n=N):
        self.pulled = 0
        self.src = FromIterable([np.full((2, 3), i, np.float32) for i in range(n)])

    def __iter__(self):
        for b in self.src:
            self.pulled += 1
            yield b


@pytest.fixture(scope="module")
def ex():
    """Two actors with in_flight 2, shared by the tests (stream runs many times on the same actors)."""
    cfg = resolve(None, {"workers": 2, "in_flight": 2, "threads_per_worker": 1, "progress": False,
                         "backend": "ray"})
    def slow_zero(x):  # local, so it is sent by value; batch 0 is slowest: completion order differs
        import time
        if x[0, 0] == 0:
            time.sleep(0.6)
        return x.sum(1)
    with RayExecutor(cfg, kernels.spec_for(slow_zero, {})) as e:
        yield e


def consume(stream, src, delay=0.05):
    """Drain slowly; at every item, how many batches were started and not yet yielded."""
    got, open_counts = [], []
    for o in stream:
        got.append(o)
        open_counts.append(src.pulled - len(got) + 1)
        time.sleep(delay)
    return got, open_counts


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ordered", [True, False])
def test_slow_consumer_holds_at_most_window(ex, ordered):
    """A slow consumer: at most `window` batches started and not yielded; results right, order as asked."""
    src = Counted()
    got, open_counts = consume(ex.stream(Work(src), ordered=ordered, window=3), src)
    assert max(open_counts) == 3  # the bound is reached and never passed
    assert all(isinstance(o, Outcome) and o.failure is None for o in got)
    indices = [o.index for o in got]
    assert sorted(indices) == list(range(N))
    assert (indices == list(range(N))) is ordered  # unordered: slow batch 0 comes after others
    for o in got:
        np.testing.assert_array_equal(o.result, np.full(2, 3 * o.index, np.float32))
        assert {"pid", "device", "node", "compute_s"} <= set(o.info)


@pytest.mark.timeout(120)
def test_default_window_is_twice_in_flight(ex):
    """Without `window`, at most 2 x in_flight batches are started and not yet yielded."""
    src = Counted()
    _, open_counts = consume(ex.stream(Work(src)), src, delay=0.1)
    assert max(open_counts) == 2 * ex.cfg.in_flight()


@pytest.mark.timeout(120)
def test_early_close_leaves_actors_clean(ex):
    """Breaking out of a stream pulls nothing more, and the next stream on the same actors is complete."""
    src = Counted()
    stream = ex.stream(Work(src), window=3)
    first = [next(stream).index for _ in range(2)]
    pulled = src.pulled
    stream.close()
    assert first == [0, 1] and pulled <= 2 + 3
    assert src.pulled == pulled
    got = {o.index: o.result for o in ex.stream(Work(Counted()), ordered=False)}
    assert sorted(got) == list(range(N))


@pytest.mark.timeout(120)
def test_failed_batch_is_an_outcome_and_fail_raises():
    """on_error=skip: a kernel error is yielded as Outcome(i, None, {}, failure); on_error=fail raises."""
    base = {"workers": 2, "threads_per_worker": 1, "progress": False, "backend": "ray", "batches": 4,
            "rows": 4, "cols": 2, "kernel.params.raise_on": [1]}
    spec = kernels.spec_for("faulty", {"raise_on": [1]})
    with RayExecutor(resolve(None, dict(base, on_error="skip")), spec) as e:
        got = list(e.stream(Work(Counted(4))))
        assert [o.index for o in got] == [0, 1, 2, 3]
        assert got[1].result is None and got[1].info == {}
        assert got[1].failure["batch"] == 1 and "raise_on batch 1" in got[1].failure["cause"]
        with pytest.raises(RuntimeError, match="batch 1 .*raise_on batch 1"):
            e.cfg = resolve(None, dict(base, on_error="fail"))
            list(e.stream(Work(Counted(4))))


@pytest.mark.timeout(120)
def test_a_dataset_of_dict_samples_on_ray():
    """A map-style dataset of dict samples on the Ray backend: the local checksum; a failing sample is skipped."""
    import pipeline
    from test_datasets import Records
    kw = dict(batch_size=4, kernel="sum", workers=2, progress=False)
    ref = pipeline.run(source=Records(n=18), workers=0, **{k: v for k, v in kw.items() if k != "workers"})
    r = pipeline.run(source=Records(n=18), backend="ray", **kw)
    assert r.summary["checksum"] == ref.summary["checksum"]
    # Records is pickled by reference to test_datasets, which the actors can't import: the driver builds
    assert len(r.summary["notes"]) == 1 and r.summary["handoff"]["transport"] == "ray object store"
    assert "the actors can't load the source (ModuleNotFoundError: No module named 'test_datasets')" \
        in r.summary["notes"][0]
    r = pipeline.run(source=Records(n=18, fail_at=9), backend="ray", on_error="skip", **kw)
    assert [f["batch"] for f in r.summary["failed"]] == [2] and "record 9.bin" in r.summary["failed"][0]["cause"]
