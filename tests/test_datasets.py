"""Map-style datasets (sources.MapSource): samples into rows of the slot, fields, sample errors, build processes."""
import json
import os
import re
import signal
import threading
import time

import numpy as np
import pytest
import torch

import pipeline
from pipeline.cli import main
from pipeline.errors import SampleError
from pipeline.fields import Layout
from pipeline.local.ring import SlotRing
from pipeline.sources.datasets import MapSource, is_map_style
from conftest import ours, workers_of

FAST = dict(progress=False, threads_per_worker=1)


class Records(torch.utils.data.Dataset):
    """``n`` samples ``{"x": float32 (width,), "label": int}``; sample ``fail_at`` raises, ``kill_at`` kills
    the process that fetches it (once: a marker file says it happened), ``wrong_at`` has another shape."""

    def __init__(self, n=40, width=6, fail_at=-1, kill_at=-1, wrong_at=-1, marker="", sleep=0.0):
        self.n, self.width, self.fail_at, self.kill_at, self.wrong_at = n, width, fail_at, kill_at, wrong_at
        self.marker, self.sleep = marker, sleep
        self.owner = os.getpid()  # kill_at kills a build process, never the main (which probes a few samples)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.fail_at:
            raise FileNotFoundError(f"record {i}.bin")
        if i == self.kill_at and os.getpid() != self.owner and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        if self.sleep:
            time.sleep(self.sleep)
        width = self.width + 1 if i == self.wrong_at else self.width
        return {"x": np.arange(width, dtype=np.float32) * i, "label": i}


class Batched(Records):
    """Records with torch's batched fetch: ``__getitems__`` is called once per chunk, never ``__getitem__``."""

    def __getitems__(self, indices):
        return [Records.__getitem__(self, i) for i in indices]

    def __getitem__(self, i):
        raise AssertionError("__getitem__ called although __getitems__ exists")


class Rows(torch.utils.data.Dataset):
    """Sample i is row i of ``data``: a Python ``__getitem__`` returning a tiny array."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


class Python(Records):
    """A sample that holds the GIL for ``spin`` iterations of pure Python."""

    def __init__(self, n=64, spin=20000, **kw):
        super().__init__(n, **kw)
        self.spin = spin

    def __getitem__(self, i):
        x = 0
        for k in range(self.spin):
            x += k
        return super().__getitem__(i)


def reference(ds, batch_size):
    """What batch k must hold: the samples stacked by hand."""
    out = []
    for k in range(-(-len(ds) // batch_size)):
        rows = [Records.__getitem__(ds, i) for i in range(k * batch_size, min(len(ds), (k + 1) * batch_size))]
        out.append({"x": np.stack([r["x"] for r in rows]), "label": np.array([r["label"] for r in rows])})
    return out


def keep(x):
    """A kernel of our own: gets the batch's structure, each field a tensor; returns it as it is."""
    assert isinstance(x, dict) and list(x) == ["x", "label"], type(x)
    assert all(isinstance(v, torch.Tensor) for v in x.values())
    return {k: v.clone() for k, v in x.items()}


# -- the source alone (no processes) ---------------------------------------------------------------------
def test_map_style_detection():
    """Lists, tuples of batches and Datasets are map-style; generators, dicts, strings, IterableDataset are not."""
    class It(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([])
    assert is_map_style([1]) and is_map_style(Records()) and is_map_style(np.zeros((2, 2)))
    assert not any(is_map_style(x) for x in (iter([1]), {"a": 1}, "ab", It()))


def test_batches_group_samples_and_the_last_is_shorter():
    """Batch k holds samples kB..kB+B-1, written into its rows; the last one is shorter, or dropped."""
    ds = Records(n=10)
    src = MapSource(ds, batch_size=4)
    assert len(src) == 3 and len(MapSource(ds, batch_size=4, drop_last=True)) == 2
    for got, want in zip((src.get(k) for k in range(3)), reference(ds, 4)):
        assert got["x"].dtype == np.float32 and got["label"].dtype == np.int64
        assert np.array_equal(got["x"], want["x"]) and np.array_equal(got["label"], want["label"])
    assert src.batch(2).layout.shapes == ((2, 6), (2,))


def test_samples_are_written_straight_into_the_slot_in_chunks():
    """fill_rows writes a chunk of rows into the slot's own views: no batch is allocated apart."""
    src = MapSource(Records(n=8), batch_size=8)
    ring = SlotRing(1, src.max_nbytes)
    try:
        b = src.batch(0)
        views, _ = ring.view(0, b.layout)
        b.fill_rows(views, 0, 3)
        b.fill_rows(views, 3, 8)
        assert np.array_equal(views["label"], np.arange(8)) and views["x"][5, 1] == 5.0
        del views
    finally:
        ring.close()


def test_getitems_is_called_once_per_chunk():
    """A dataset with __getitems__ is fetched through it (its __getitem__ raises if called)."""
    got = MapSource(Batched(n=9), batch_size=4).get(1)
    assert np.array_equal(got["label"], [4, 5, 6, 7])


def test_without_batch_size_each_item_is_a_batch():
    """No batch size: item k is batch k, and items may differ in shape (the first sizes the slots)."""
    items = [np.ones((3, 2)), np.ones((5, 2)) * 2, (np.zeros(4), np.ones(4, dtype=np.int8))]
    src = MapSource(items)
    assert len(src) == 3 and src.get(1).shape == (5, 2)
    assert isinstance(src.get(2), tuple) and src.get(2)[1].dtype == np.int8


def test_a_sample_of_another_shape_names_sample_field_and_fix():
    """A sample that doesn't fit its field: one line with the sample, batch, field, both shapes, the fix."""
    src = MapSource(Records(n=100, wrong_at=9), batch_size=4)  # (9: not one of the samples probed on open)
    with pytest.raises(SampleError) as e:
        src.get(2)
    msg = str(e.value)
    assert "sample 9 (batch 2), field 'x'" in msg and "(7,)" in msg and "(6,)" in msg
    assert "pad" in msg and "collate=" in msg


@pytest.mark.parametrize("odd, found", [
    # (samples whose lengths alone differ are ragged: tests/test_sequences.py)
    ({2: np.zeros((6, 1), np.float32)}, "(6, 1)"),  # one more dimension
    ({3: np.zeros(6, np.float64)}, "float64"),  # another dtype
])
def test_the_one_call_write_checks_every_sample(odd, found):
    """The fast path writes a field in one numpy call: a batch whose samples do not all fit falls back to
    the sample-by-sample check, which names the first that differs; samples that fit are written as they are."""
    samples = [np.arange(6, dtype=np.float32) + i for i in range(4)]
    src = MapSource([odd.get(i, s) for i, s in enumerate(samples)], batch_size=4)
    with pytest.raises(SampleError, match=rf"sample {min(odd)} \(batch 0\).*{re.escape(found)}"):
        src.get(0)
    assert (MapSource(samples, batch_size=4).get(0) == np.stack(samples)).all()


def test_a_sample_that_raises_names_it_and_keeps_the_cause():
    """__getitem__ raising: SampleError 'sample i (batch k): FileNotFoundError: ...', the original as cause."""
    with pytest.raises(SampleError, match=r"sample 6 \(batch 1\): FileNotFoundError: record 6.bin") as e:
        MapSource(Records(n=12, fail_at=6), batch_size=4).get(1)
    assert isinstance(e.value.__cause__, FileNotFoundError)


def test_device_tensors_in_a_field_are_refused_naming_the_field():
    """The handoff rule per field: a meta tensor in 'mask' is a HandoffError naming the batch and field."""
    batches = [{"x": np.ones(3), "mask": torch.empty(3, device="meta")}]
    with pytest.raises(pipeline.HandoffError, match=r"source batch 0, field 'mask': a torch.Tensor on device 'meta'"):
        pipeline.run(source=iter(batches), kernel="sum", workers=0, progress=False)


def test_fields_are_aligned_in_one_slot():
    """Each field of a batch starts on its own aligned offset; the layout reads back what was written."""
    layout = Layout.of({"a": np.zeros((3, 5), np.uint8), "b": np.zeros(3, np.float64)})
    assert layout.offsets[1] % 256 == 0 and layout.offsets[1] >= 15


def test_not_a_dataset_is_one_line():
    """An object without __len__/__getitem__ given with batch_size is refused with one clear line."""
    with pytest.raises(pipeline.ConfigError, match="map-style dataset"):
        pipeline.run(source=iter([np.ones(3)]), batch_size=2, kernel="sum", workers=0, progress=False)


# -- through the workers ---------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_results_identical_for_threads_processes_slots_and_workers():
    """The same dataset gives the same results and checksum whatever builds it and however many run it."""
    ds = Records(n=30)
    ref = pipeline.run(source=ds, batch_size=4, kernel=keep, workers=0, **FAST)
    for k, want in enumerate(reference(ds, 4)):
        assert np.array_equal(ref.results[k]["x"], want["x"]) and np.array_equal(ref.results[k]["label"], want["label"])
    with pipeline.Pipeline(kernel="sum", workers=2, **FAST) as p:
        sums = p.run(source=ds, batch_size=4, workers=2).summary["checksum"]
        for kw in (dict(build_threads=1, in_flight=2), dict(build_threads=2, in_flight=7),
                   dict(build_processes=2, in_flight=3)):
            assert p.run(source=ds, batch_size=4, **kw).summary["checksum"] == sums, kw
    assert pipeline.run(source=ds, batch_size=4, kernel="sum", workers=1, **FAST).summary["checksum"] == sums
    assert pipeline.run(source=ds, batch_size=4, kernel="sum", workers=0, **FAST).summary["checksum"] == sums


@pytest.mark.timeout(120)
def test_a_batch_lost_with_its_worker_is_computed_again():
    """A worker killed on batch 2 of a dataset: a restart, the batch computed again, serial's checksum."""
    ds = Records(n=20)
    ref = pipeline.run(source=ds, batch_size=4, kernel="sum", workers=0, **FAST)
    r = pipeline.run(source=ds, batch_size=4, kernel="faulty", workers=2, **{"kernel.params.crash_on": 2}, **FAST)
    assert r.summary["checksum"] == ref.summary["checksum"]
    assert [x["batch"] for x in r.summary["restarts"]] == [2]


@pytest.mark.timeout(120)
def test_kernel_gets_the_structure_and_output_keeps_every_field(tmp_path):
    """A dict batch reaches a kernel of our own as a dict of tensors; --output writes every field, resumes."""
    ds = Records(n=10)
    out = tmp_path / "out"
    r = pipeline.run(source=ds, batch_size=4, kernel=keep, workers=1, output=str(out), **FAST)
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [ln["batch"] for ln in lines] == [0, 1, 2] and set(lines[0]["arrays"]) == {"x", "label"}
    run = json.loads((out / "run.json").read_text())
    assert run["source"]["kind"] == "dataset" and run["source"]["dataset"]["samples"] == 10
    again = pipeline.run(source=ds, batch_size=4, kernel=keep, workers=1, output=str(out), **FAST)
    assert again.summary["skipped"] == 3 and again.summary["checksum"] == r.summary["checksum"]


@pytest.mark.timeout(120)
def test_a_failing_sample_fails_its_batch_under_on_error():
    """fail: the run raises SampleError naming the sample; skip: that batch is in 'failed', the rest computed."""
    ds = Records(n=20, fail_at=9)
    with pytest.raises(SampleError, match=r"sample 9 \(batch 2\): FileNotFoundError"):
        pipeline.run(source=ds, batch_size=4, kernel="sum", workers=1, **FAST)
    r = pipeline.run(source=ds, batch_size=4, kernel="sum", workers=1, on_error="skip", **FAST)
    assert [f["batch"] for f in r.summary["failed"]] == [2] and "record 9.bin" in r.summary["failed"][0]["cause"]
    assert r.summary["completed"] == 4 and r.results[2] is None


@pytest.mark.timeout(120)
def test_collate_runs_on_the_build_threads():
    """collate= gets the samples of a batch as a list; its batch is what the kernel sees."""
    seen = []

    def collate(samples):
        seen.append(threading.current_thread().name)
        return np.stack([s["x"] for s in samples]) + 1

    r = pipeline.run(source=Records(n=8), batch_size=4, collate=collate, kernel="sum", workers=1, **FAST)
    assert np.allclose(r.results[1], (np.arange(6) * np.arange(4, 8)[:, None] + 1).sum(1))
    assert all(name.startswith("pipeline-build") for name in seen[1:])  # (batch 0 also sized the slots)


@pytest.mark.timeout(60)
def test_build_threads_share_one_batch():
    """An idle build thread joins another's batch: two threads fill one batch, each a chunk of rows."""
    from pipeline.local.builders import Builders
    who = []

    class Where(Records):
        def __getitem__(self, i):
            who.append(threading.get_ident())
            time.sleep(0.002)
            return super().__getitem__(i)

    src = MapSource(Where(n=16), batch_size=16)
    who.clear()
    ring = SlotRing(1, src.max_nbytes)
    events = []
    done = threading.Event()
    b = Builders(iter([src.batch(0)]), None, ring, 2, lambda e: (events.append(e), done.set()))
    try:
        b.submit(0)
        assert done.wait(10)
        time.sleep(0.05)  # a second event would be a bug
        assert [e[0] for e in events] == ["built"] and events[0][1].index == 0
        assert len(set(who)) == 2 and len(who) == 16
        views, _ = ring.view(0, src.batch(0).layout)
        assert np.array_equal(views["label"], np.arange(16))
        del views
    finally:
        b.close()
        ring.close()


@pytest.mark.timeout(120)
def test_a_killed_build_process_is_replaced_and_nothing_is_lost(tmp_path):
    """SIGKILL in a build process: a restart entry names it, its batches are built again, the checksum holds."""
    marker = str(tmp_path / "killed")
    ref = pipeline.run(source=Records(n=24), batch_size=4, kernel="sum", workers=0, **FAST)
    r = pipeline.run(source=Records(n=24, kill_at=13, marker=marker), batch_size=4, kernel="sum",
                     workers=1, build_processes=2, **FAST)
    assert r.summary["checksum"] == ref.summary["checksum"]
    assert [(x["builder"], x["batch"]) for x in r.summary["restarts"]] == [(x["builder"], 3) for x in r.summary["restarts"]]
    assert len(r.summary["restarts"]) == 1 and "SIGKILL" in r.summary["restarts"][0]["cause"]


@pytest.mark.timeout(120)
def test_build_processes_stay_for_the_next_run_of_the_same_dataset():
    """A warm Pipeline keeps its build processes for a run of the same dataset, also across a run on build
    threads (which asks for fewer slots: the ring is kept, and the processes map it); a changed dataset gets
    new ones."""
    ds = Records(n=16)
    with pipeline.Pipeline(kernel="sum", workers=1, **FAST) as p:
        pids, slots = [], []
        for n, procs in ((16, 2), (16, 0), (16, 2), (20, 2)):
            ds.n = n
            r = p.run(source=ds, batch_size=4, build_processes=procs, build_threads=2 if procs else 1)
            assert r.summary["batches"] == n // 4 and r.summary["handoff"]["build_processes"] == procs
            slots.append(r.summary["handoff"]["slots"])
            if procs:
                pids.append(sorted(proc.process.pid for proc in p.executor.build_pool.procs))
        assert pids[0] == pids[1] != pids[2]
        assert slots[1] < slots[0] == slots[2]  # (the threads' run used as many slots as it asked for)


@pytest.mark.timeout(120)
def test_a_sample_error_in_a_build_process_names_the_sample():
    """The sample's error crosses from the build process with the process and the sample named."""
    with pytest.raises(SampleError, match=r"build process \d \(pid \d+\): sample 9 \(batch 2\): FileNotFoundError"):
        pipeline.run(source=Records(n=20, fail_at=9), batch_size=4, kernel="sum", workers=1, build_processes=1, **FAST)


@pytest.mark.timeout(120)
def test_build_processes_with_an_iterator_say_why_not():
    """A caller's iterator can't be built in processes: the run is built on threads, and a note says so."""
    r = pipeline.run(source=iter([np.ones((2, 3))] * 3), kernel="sum", workers=1, build_processes=2, **FAST)
    assert r.summary["completed"] == 3 and any("build_processes" in n for n in r.summary["notes"])


@pytest.mark.timeout(120)
def test_a_gil_bound_build_suggests_build_processes():
    """Pure-Python samples on two build threads: the verdict's advice names the rates and --build-processes.
    (Two slots: most batches are built once the worker is up, so the build is the limit while it runs.)"""
    r = pipeline.run(source=Python(n=96, spin=30000), batch_size=4, kernel="sum", workers=1, build_threads=2,
                     in_flight=2, **FAST)
    assert "--build-processes" in r.summary["bottleneck"]["advice"] and "CPUs" in r.summary["bottleneck"]["advice"], \
        r.summary["bottleneck"]
    rows = np.random.default_rng(0).random((120 * 1024, 16), dtype=np.float32)  # tiny samples, shared in chunks
    r = pipeline.run(source=Rows(rows), batch_size=1024, kernel="sum", workers=1, build_threads=2, in_flight=8,
                     **FAST)  # (each chunk holds the GIL alone: the CPU is counted over the builds' span)
    v = r.summary["bottleneck"]  # (a run this short is at times judged below the limit: build the busiest then)
    assert ("--build-processes" in v["advice"] and "CPUs" in v["advice"]) or (
        v["stage"] == "none" and max(v["busy"], key=v["busy"].get) == "build"), v
    r = pipeline.run(source=Records(n=96, sleep=0.003), batch_size=4, kernel="sum", workers=1, build_threads=2,
                     in_flight=2, **FAST)  # waiting (I/O), not holding the GIL: no such note
    assert "--build-processes" not in r.summary["bottleneck"]["advice"], r.summary["bottleneck"]


# -- the command line ------------------------------------------------------------------------------------
def make(n=12, **kw):
    """``--source test_datasets:make``: a function that returns a dataset."""
    return Records(n=n, **kw)


def slow_in_a_child(n=12):
    """``--source test_datasets:slow_in_a_child``: quick to make in the main, a minute in any other process
    (a large dataset that a build process loads)."""
    import multiprocessing
    if multiprocessing.parent_process() is not None:
        time.sleep(60)
    return Records(n=n)


@pytest.mark.timeout(120)
def test_ctrl_c_while_build_processes_load_the_dataset():
    """Ctrl-C while the build processes are still making the dataset: exit 130 at once (they have nothing
    to finish), one line, no process or shared memory left."""
    import subprocess
    import sys
    from test_executor import ROOT, _sigint_default, assert_gone, wait_running
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--source", "test_datasets:slow_in_a_child",
                          "--batch-size", "4", "--kernel", "sum", "--workers", "1", "--build-processes", "2",
                          "--no-progress", "--threads-per-worker", "1"], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         preexec_fn=_sigint_default)
    wait_running(p)
    deadline = time.monotonic() + 30  # until the worker is up and both build processes are loading
    while len(workers_of(p.pid)) < 3:
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.1)
    children = workers_of(p.pid)
    time.sleep(1.0)
    t0 = time.monotonic()
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert time.monotonic() - t0 < 3, err
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert_gone(p.pid, children, within=1)


@pytest.mark.timeout(120)
def test_cli_source_with_params(capsys, tmp_path):
    """--source NAME --source-param runs a dataset from the command line, like the same run from Python."""
    rc = main(["run", "--source", "test_datasets:make", "--source-param", "n=10", "--batch-size", "4",
               "--kernel", "sum", "--workers", "1", "--no-progress", "--json"])
    s = json.loads(capsys.readouterr().out)
    assert rc == 0 and s["batches"] == 3 and s["config"]["source"]["kind"] == "dataset"
    want = pipeline.run(source=Records(n=10), batch_size=4, kernel="sum", workers=0, **FAST).summary["checksum"]
    assert s["checksum"] == want
    toml = tmp_path / "ds.toml"
    toml.write_text('[source]\nobject = "test_datasets:make"\nbatch_size = 4\n[source.params]\nn = 10\n'
                    '[workers]\ncount = 0\n')
    assert main(["run", "--config", str(toml), "--kernel", "sum", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checksum"] == want


@pytest.mark.parametrize("name, said", [
    ("test_datasets:nope", "has no attribute 'nope'"),
    ("no_such_module:x", "cannot import module 'no_such_module'"),
    ("os:sep", "not a map-style dataset"),
    ("test_datasets", "expected 'package.module:name'"),
])
def test_cli_bad_source_is_one_line_exit_2(capsys, name, said):
    """A name that doesn't import, or an object that is no dataset: exit 2, one line naming it."""
    assert main(["run", "--source", name, "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0] and "source.object" in err[0]
    assert ours() == set()


def test_source_params_without_a_source_object_are_refused(capsys):
    """--source-param without --source would be silently ignored: exit 2, one line."""
    assert main(["run", "--source-param", "root=1", "--workers", "0", "--no-progress"]) == 2
    assert "source.params (root)" in capsys.readouterr().err
