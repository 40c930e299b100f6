"""``--trace`` (NOTE [ Trace ]) and the summary's ``bottleneck`` (NOTE [ Verdict ]): the file opens as a
Chrome trace, every batch's stages are in it on one time base, a SIGKILLed worker's death, retry and
replacement show; the verdict names the stage that limits in four constructed runs."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import pipeline
from pipeline import sinks, trace, verdict
from pipeline.trace import Recorder
from pipeline.wire import Task

FAST = dict(progress=False, threads_per_worker=1)


class Slow(torch.utils.data.Dataset):
    """Samples that take ``sleep`` s each (a slow disk or network: the GIL is free meanwhile), or hold the
    GIL for ``spin`` iterations of pure Python."""

    def __init__(self, n=48, sleep=0.0, spin=0):
        self.n, self.sleep, self.spin = n, sleep, spin

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.sleep:
            time.sleep(self.sleep)
        x = 0
        for k in range(self.spin):
            x += k
        return np.full(8, i, dtype=np.float32)


def events(path):
    with open(path) as f:
        doc = json.load(f)
    return doc, doc["traceEvents"]


def spans_of(evs, cat):
    return [e for e in evs if e["ph"] == "X" and e.get("cat") == cat]


@pytest.mark.timeout(120)
def test_a_trace_has_every_batch_through_every_stage_on_one_clock(tmp_path):
    path = tmp_path / "run.trace.json"
    r = pipeline.run(kernel="sum", workers=2, batches=6, rows=64, cols=16, trace=str(path),
                     output=str(tmp_path / "out"), **FAST)
    s = r.summary
    assert s["trace"] == str(path) and s["completed"] == 6
    doc, evs = events(path)
    assert doc["otherData"]["bottleneck"] == s["bottleneck"] and doc["otherData"]["dropped_events"] == 0
    names = {e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "process_name"}
    assert "main" in names and sum(n.startswith("worker ") for n in names) == 2
    threads = {e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"pipeline-supervisor", "compute", "return", "consumer"} <= threads
    assert any(t.startswith("pipeline-build-") for t in threads) or "pipeline-supervisor" in threads
    by = {}
    for cat in ("build", "compute", "return", "write"):  # (d2h, stage: left out under 20 us)
        got = {e["args"]["batch"]: e for e in spans_of(evs, cat)}
        assert sorted(got) == list(range(6)), (cat, sorted(got))
        by[cat] = got
    assert spans_of(evs, "dispatch")
    for i in range(6):  # one time base: each stage after the one before it (to within a clock tick)
        assert by["build"][i]["ts"] + by["build"][i]["dur"] <= by["compute"][i]["ts"] + 1
        assert by["compute"][i]["ts"] + by["compute"][i]["dur"] <= by["return"][i]["ts"] + by["return"][i]["dur"] + 1
        assert by["compute"][i]["ts"] <= by["write"][i]["ts"]
    waits = [e for e in evs if e["ph"] in "be" and e.get("cat") == "waiting for a worker"]
    assert len(waits) == 12 and {e["ph"] for e in waits} == {"b", "e"}
    assert len([e for e in evs if e.get("cat") == "waiting for order"]) == 12
    counters = [e for e in evs if e["ph"] == "C"]
    assert counters and {"slots in use", "batches in flight", "main RSS MiB"} <= set(counters[0]["args"])
    assert all(e["args"]["main RSS MiB"] >= 0 for e in counters)


@pytest.mark.timeout(120)
def test_without_trace_nothing_is_recorded_or_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = pipeline.run(kernel="sum", workers=1, batches=3, rows=8, cols=8, **FAST)
    assert "trace" not in r.summary and list(tmp_path.iterdir()) == []
    assert r.summary["bottleneck"] is not None  # (the verdict needs no trace)


@pytest.mark.timeout(180)
def test_a_sigkilled_worker_shows_its_death_the_retry_and_the_replacement(tmp_path):
    path = tmp_path / "kill.json"
    r = pipeline.run(kernel="faulty", workers=3, batches=9, rows=32, cols=8, trace=str(path),
                     **{"kernel.params.crash_on": [4]}, **FAST)
    assert r.summary["completed"] == 9 and len(r.summary["restarts"]) == 1
    dead = r.summary["restarts"][0]["pid"]
    _, evs = events(path)
    died = [e for e in evs if e["ph"] == "i" and e.get("cat") == "worker died"]
    assert len(died) == 1 and died[0]["pid"] == dead and 4 in died[0]["args"]["held"]
    assert "SIGKILL" in died[0]["args"]["cause"]
    retry = [e for e in evs if e["ph"] == "i" and e.get("cat") == "retry"]
    assert [(e["args"]["batch"], e["args"]["attempt"]) for e in retry] == [(4, 2)]
    started = [e for e in evs if e["ph"] == "i" and e.get("cat") == "worker started"]  # its replacement
    assert len(started) == 1 and started[0]["args"]["replacing"] == dead and started[0]["ts"] >= died[0]["ts"]
    again = [e for e in spans_of(evs, "compute") if e["args"]["batch"] == 4]
    assert [e["args"]["attempt"] for e in again] == [2] and again[0]["pid"] != dead
    assert again[0]["name"] == "compute 4 (attempt 2)"
    # the project's own picture of it, and the text view
    pytest.importorskip("matplotlib")
    out = subprocess.run([sys.executable, "-m", "pipeline", "trace", str(path), "--plot", str(tmp_path / "t.png")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "worker died" in out.stdout and "retry" in out.stdout and (tmp_path / "t.png").stat().st_size > 10_000


def test_trace_command_refuses_a_bad_file_in_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for arg in (str(bad), str(tmp_path / "missing.json")):
        out = subprocess.run([sys.executable, "-m", "pipeline", "trace", arg], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and arg in out.stderr, out.stderr


def test_the_recorder_keeps_its_bound_and_counts_what_it_dropped(tmp_path):
    rec = Recorder(str(tmp_path / "t.json"), capacity=5)
    t = time.perf_counter()
    for i in range(8):
        rec.span("build", "b", t, t + 0.001, i)
    rec.write({"bottleneck": None})
    doc, evs = events(tmp_path / "t.json")
    assert len(spans_of(evs, "build")) == 5 and doc["otherData"]["dropped_events"] == 3 and rec.dropped == 3


def test_the_file_holds_each_recorded_event_as_written(tmp_path):
    """What the hot path stores compactly (a batch's worker stages and return in one event, waits as the
    ends of spans, a dispatch's count in its index) comes out as the spans and waits it stands for, in
    numbers exact to the microsecond, with a retry's attempt in its names and ids."""
    rec = Recorder(str(tmp_path / "t.json"))
    off = rec.offset
    t = time.perf_counter() + 1.0  # (1 s into the trace: ts are microseconds from its start)
    ms = 1e-3
    rec.span("build", "pipeline-build-0", t, t + 2 * ms, 7, 1)  # batch 7: built, then waits for a worker 3 ms
    stamps = (t + 5 * ms, t + 6 * ms, t + 8 * ms, t + 11 * ms, t + 12 * ms)  # start, decoded, copied, computed, back
    # decoded there, a CUDA copy; returned at 13 ms, received at 14 ms, then waits for its turn until 100 ms
    rec.worker(4242, (off, *stamps, 1 | 2, 1), 7, t + 13 * ms + off, None, t + 14 * ms, t + 100 * ms)
    rec.span("build", "pipeline-build-0", t, t + 1 * ms, 8, 2)  # a retry: attempt 2, on the CPU
    rec.worker(4242, (off, t + 2 * ms, t + 2 * ms, t + 2.5 * ms, t + 4 * ms, t + 4.005 * ms, 0, 2), 8)
    rec.span("dispatch", "pipeline-supervisor", t + 4 * ms, t + 5 * ms, 3)  # (its index: 3 batches)
    # batch 9: its build carried with its result (the local executor's way), on build thread 1
    rec.worker(4242, (off, t + 20 * ms, t + 20 * ms, t + 21 * ms, t + 22 * ms, t + 22 * ms, 0, 1), 9,
               built=(t + 10 * ms, t + 12 * ms, "pipeline-build-1", 0, 1))
    task = Task(10, 1)  # batch 10 built in build process 777, then no result: its build alone
    task.built = (t + 30 * ms, t + 31 * ms, "build", 777, 1)
    rec.built(task)
    rec.built(task)  # (once)
    rec.write()
    _, evs = events(tmp_path / "t.json")
    us = lambda x: round((x + off - rec.t0) * 1e6)  # noqa: E731
    x = {(e["name"], e["ph"]): e for e in evs if e["ph"] in "Xbe"}
    assert len(x) == len([e for e in evs if e["ph"] in "Xbe"])  # (no name twice)
    build = x[("build 7", "X")]
    assert (build["ts"], build["dur"], build["args"]) == (us(t), us(t + 2 * ms) - us(t), {"batch": 7, "attempt": 1})
    for name, a, b in (("decode 7", 0, 1), ("h2d 7", 1, 2), ("compute 7", 2, 3), ("d2h 7", 3, 4)):
        span = x[(name, "X")]
        assert (span["pid"], span["ts"], span["dur"]) == (4242, us(stamps[a]), us(stamps[b]) - us(stamps[a])), name
    back = x[("return 7", "X")]
    assert (back["ts"], back["dur"]) == (us(t + 13 * ms), us(t + 14 * ms) - us(t + 13 * ms))
    waited = x[("waiting for a worker 7", "b")], x[("waiting for a worker 7", "e")]
    assert [w["ts"] for w in waited] == [us(t + 2 * ms), us(stamps[0])] and waited[0]["id"] == waited[1]["id"]
    order = x[("waiting for order 7", "b")], x[("waiting for order 7", "e")]
    assert [w["ts"] for w in order] == [us(t + 14 * ms), us(t + 100 * ms)]
    assert order[0]["id"] == order[1]["id"] != waited[0]["id"]
    retry = x[("build 8 (attempt 2)", "X")]
    assert retry["args"] == {"batch": 8, "attempt": 2}
    assert ("stage 8 (attempt 2)", "X") in x and ("compute 8 (attempt 2)", "X") in x
    assert ("d2h 8 (attempt 2)", "X") not in x  # (5 us: under SHORT_S)
    assert ("return 8 (attempt 2)", "X") not in x  # (no return: recorded without one, as a Ray actor's)
    wait = x[("waiting for a worker 8 (attempt 2)", "b")]
    assert wait["ts"] == us(t + 1 * ms) and "-2" in wait["id"]
    assert x[("waiting for a worker 8 (attempt 2)", "e")]["ts"] == us(t + 2 * ms)
    ninth = x[("build 9", "X")]
    assert (ninth["ts"], ninth["pid"], ninth["args"]) == (us(t + 10 * ms), rec.pid, {"batch": 9, "attempt": 1})
    lanes = {(e["pid"], e["tid"]): e["args"]["name"] for e in evs if e["name"] == "thread_name"}
    assert lanes[(rec.pid, ninth["tid"])] == "pipeline-build-1"
    assert [x[("waiting for a worker 9", p)]["ts"] for p in "be"] == [us(t + 12 * ms), us(t + 20 * ms)]
    alone = [e for e in evs if e["name"] == "build 10"]
    assert len(alone) == 1 and alone[0]["pid"] == 777 and task.built is None
    dispatch = x[("dispatch", "X")]
    assert dispatch["args"] == {"batches": 3} and dispatch["dur"] == us(t + 5 * ms) - us(t + 4 * ms)


# -- the verdict: four constructed runs ------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_verdict_build_bound_says_more_build_threads():
    r = pipeline.run(source=Slow(n=48, sleep=0.02), batch_size=2, kernel="sum", workers=1, build_threads=2, **FAST)
    v = r.summary["bottleneck"]
    assert v["stage"] == "build" and "--build-threads" in v["advice"], v


@pytest.mark.timeout(120)
def test_verdict_gil_bound_build_says_build_processes():
    r = pipeline.run(source=Slow(n=96, spin=60000), batch_size=4, kernel="sum", workers=1, build_threads=2,
                     in_flight=2, **FAST)
    v = r.summary["bottleneck"]
    assert v["stage"] == "build" and "--build-processes" in v["advice"], v
    assert not any("--build-processes" in n for n in r.summary["notes"])  # (the note is now the verdict's)


@pytest.mark.timeout(120)
def test_verdict_compute_bound_says_more_workers():
    r = pipeline.run(kernel="faulty", workers=1, batches=12, rows=8, cols=8, **{"kernel.params.sleep": 0.05},
                     **FAST)
    v = r.summary["bottleneck"]
    assert v["stage"] == "compute" and "--workers 2" in v["advice"] and v["busy"]["compute"] > 0.8, v
    assert v["gain"] > 2 and "x before" in verdict.line(v)


@pytest.mark.timeout(120)
def test_verdict_output_bound_says_a_faster_disk(tmp_path, monkeypatch):
    real = sinks.OutputDir.write

    def slow_write(self, *a, **kw):
        time.sleep(0.05)
        return real(self, *a, **kw)
    monkeypatch.setattr(sinks.OutputDir, "write", slow_write)
    r = pipeline.run(kernel="sum", workers=1, batches=12, rows=8, cols=8, output=str(tmp_path / "o"), **FAST)
    v = r.summary["bottleneck"]
    assert v["stage"] == "output" and "--output" in v["advice"] and v["busy"]["output"] > 0.8, v
    assert r.summary["breakdown_ms_per_batch"]["write_ms"] >= 50


def _summary(**b):
    s = {"completed": 100, "skipped": 0, "wall_s": 10.0, "startup_s": 0.0, "workers": [{}, {}],
         "handoff": {"build_threads": 4, "built_inline": 0, "slots": 8}, "device": "cpu", "precision": "fp32",
         "config": {"source": {"kind": "synthetic"}}}
    s["breakdown_ms_per_batch"] = {f"{k}_ms": v for k, v in b.items()}
    return s


def test_verdict_cases_from_a_breakdown():
    v = verdict.bottleneck(_summary(h2d=190.0, compute=5.0, build=10.0), gpu={"source": "nvml", "util": 0.1})
    assert v["stage"] == "h2d" and "fewer bytes" in v["advice"] and "gpu_util" not in v
    cuda = dict(_summary(h2d=10.0, compute=190.0), device="cuda:0")
    v = verdict.bottleneck(cuda, gpu={"source": "nvml", "util": 0.93})
    assert v["stage"] == "compute" and "--precision bf16" in v["advice"] and v["gpu_util"]["util"] == 0.93
    assert verdict.bottleneck(cuda)["gpu_util"]["source"] == "package"
    v = verdict.bottleneck(_summary(dispatch=60.0, receive=30.0, compute=10.0))
    assert v["stage"] == "main" and "--batch-size" in v["advice"]
    v = verdict.bottleneck(_summary(compute=20.0, build=20.0))
    assert v["stage"] == "none" and "--in-flight 16" in v["advice"]
    v = verdict.bottleneck(dict(_summary(compute=1.0), startup_s=8.0))
    assert v["stage"] == "none" and "start-up" in v["advice"]
    assert verdict.bottleneck(dict(_summary(compute=1.0), breakdown_ms_per_batch=None)) is None


def test_gpu_utilisation_is_sampled_through_nvml_when_it_is_there(monkeypatch):
    class FakeNVML:
        def nvmlInit(self): pass
        def nvmlDeviceGetCount(self): return 2
        def nvmlDeviceGetHandleByIndex(self, i): return i
        def nvmlDeviceGetUtilizationRates(self, h): return type("U", (), {"gpu": 80 if h == 0 else 40})()
        def nvmlShutdown(self): pass
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML())
    g = verdict.GpuSampler(period=0.01)
    time.sleep(0.1)
    got = g.stop()
    assert got["source"] == "nvml" and got["per_gpu"] == [0.8, 0.4] and got["util"] == 0.6
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: the package's own figure
    assert verdict.GpuSampler().stop() is None


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_verdict_h2d_bound_on_cuda(tmp_path):
    """Large float32 batches read from a file (the build is a memcpy on every core) and summed on the GPU:
    the worker's time is the copy to the device, and the verdict says so. The trace has the copy lane."""
    rows, cols, n = 4096, 4096, 24  # 64 MB a batch
    data = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(rows * n, cols))
    data[:] = 1.0
    data.flush()
    r = pipeline.run(kernel="sum", workers=1, device="cuda", input=str(tmp_path / "big.npy"), rows=rows,
                     trace=str(tmp_path / "gpu.json"), progress=False)
    v = r.summary["bottleneck"]
    assert v["stage"] in ("h2d", "build"), v  # (which of the two depends on the host's memcpy rate)
    assert v["busy"]["h2d"] > 0, v  # the workers' time is named after its largest part: the copy
    assert v["gpu_util"]["source"] in ("nvml", "package")
    _, evs = events(tmp_path / "gpu.json")
    copies = [e for e in spans_of(evs, "h2d") + spans_of(evs, "h2d wait")]
    assert {e["args"]["batch"] for e in copies} == set(range(n))


@pytest.mark.timeout(120)
def test_a_stream_closed_early_still_writes_its_trace(tmp_path):
    path = tmp_path / "early.json"
    with pipeline.imap(kernel="sum", workers=1, batches=40, rows=8, cols=8, trace=str(path), **FAST) as stream:
        for i, _ in stream:
            if i == 3:
                break
    _, evs = events(path)  # (no summary: written when the stream closed)
    assert {0, 1, 2, 3} <= {e["args"]["batch"] for e in spans_of(evs, "compute")}


def test_an_unwritable_trace_path_fails_before_the_run_in_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    out = subprocess.run([sys.executable, "-m", "pipeline", "run", "--workers", "1", "--batches", "2",
                          "--trace", str(tmp_path / "file" / "t.json")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--trace" in out.stderr, out.stderr


# -- the file: made the fast way, and in the background as the run goes ----------------------------------
def record(rec, n=40):
    """``n`` batches' events of every shape into ``rec``, at the same microseconds from its start whatever
    recorder: decoded there or not, CUDA copies (started ahead or not), staging copies and copies back long
    and short, builds carried or not, retries, returns (handed over or never), waits long and short; and one
    with a stamp before the trace began (clocks that disagree: written the general way)."""
    t = rec.t0 - rec.offset + 1.0  # (1 s into the trace, in the main's perf_counter)
    off, ms = rec.offset, 1e-3
    for i in range(n):
        a = t + i * 10 * ms
        gap = (0.01 if i % 5 == 0 else 1.0) * ms  # (some waits under SHORT_S)
        stamps = (a + gap, a + gap + (i % 3) * ms, a + gap + 2 * ms + (i % 2) * 0.005 * ms, a + gap + 3 * ms,
                  a + gap + 3 * ms + (i % 4) * 0.01 * ms)
        if i == n - 1:
            stamps = (t - 2.0, *stamps[1:])
        built = None if i % 7 == 3 else (a - 2 * ms, a, f"pipeline-build-{i % 2}", 0 if i % 3 else 777, 1 + i % 2)
        sent, received = ((a + 5 * ms + off), a + 5.5 * ms) if i % 6 != 1 else (0.0, 0.0)
        then = 0.0 if i % 9 == 8 else a + (9 if i % 4 else 5.505) * ms
        rec.worker(4242 + i % 2, (off, *stamps, i % 8, 1 + (i % 11 == 10)), i, sent, built, received, then)


def normal(path):
    """A trace file's events, each lane named rather than numbered: files alike but for how the lanes were
    numbered compare equal."""
    _, evs = events(path)
    lanes = {(e["pid"], e["tid"]): e["args"]["name"] for e in evs if e["name"] == "thread_name"}
    out = [dict(e, tid=lanes.get((e["pid"], e.get("tid")), e.get("tid"))) for e in evs
           if e["ph"] != "M" or e["name"] == "process_name"]
    return sorted(json.dumps(e, sort_keys=True) for e in out)


def test_the_fast_way_writes_what_the_general_way_does(tmp_path, monkeypatch):
    """Batches' events written straight from their stamps (``_File.batches``) come out as the general way
    (``stages`` and ``format``) writes them, for every shape of batch."""
    fast = Recorder(str(tmp_path / "fast.json"))
    record(fast)
    fast.write()
    monkeypatch.setattr(trace._File, "batches", lambda self, rec, w: ([], w))
    general = Recorder(str(tmp_path / "general.json"))
    record(general)
    general.write()
    a, b = normal(tmp_path / "fast.json"), normal(tmp_path / "general.json")
    assert a == b
    cats = {json.loads(e)["name"].split(" ")[0] for e in a}
    assert {"build", "decode", "h2d", "stage", "compute", "d2h", "return", "waiting"} <= cats, cats


def test_a_long_run_is_written_as_it_goes_and_the_file_is_the_same(tmp_path, monkeypatch):
    """Past ``CHUNK`` events a background thread writes the batches' events as the run goes; the file it
    finishes holds what a file written at the end holds."""
    whole = Recorder(str(tmp_path / "whole.json"))
    record(whole, 120)
    whole.write()
    monkeypatch.setattr(trace, "CHUNK", 8)
    monkeypatch.setattr(trace, "POLL_S", 0.002)
    rec = Recorder(str(tmp_path / "chunks.json"))
    record(rec, 120)
    deadline = time.monotonic() + 10
    while rec.file.done < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rec.file.done >= 100
    rec.span("dispatch", "pipeline-supervisor", rec.t0 - rec.offset + 2.0, rec.t0 - rec.offset + 2.001, 3)
    whole.file = trace._File(whole.path)  # (written again, with the same last event)
    whole.span("dispatch", "pipeline-supervisor", whole.t0 - whole.offset + 2.0, whole.t0 - whole.offset + 2.001, 3)
    whole.write()
    assert rec.write() == str(tmp_path / "chunks.json")
    assert normal(tmp_path / "chunks.json") == normal(tmp_path / "whole.json")
    assert not rec.file.thread.is_alive()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunks.json", "whole.json"]  # (no temp file left)


def test_a_failure_of_the_background_writer_is_raised_by_write(tmp_path, monkeypatch):
    monkeypatch.setattr(trace, "CHUNK", 8)
    monkeypatch.setattr(trace, "POLL_S", 0.002)

    def full(self, rec):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(trace._File, "open", full)
    rec = Recorder(str(tmp_path / "t.json"))
    record(rec, 40)
    rec.file.thread.join(10)
    with pytest.raises(OSError, match="No space left"):
        rec.write()
    assert list(tmp_path.iterdir()) == []


def test_a_recorder_dropped_unwritten_stops_its_writer_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(trace, "CHUNK", 8)
    monkeypatch.setattr(trace, "POLL_S", 0.002)
    rec = Recorder(str(tmp_path / "t.json"))
    record(rec, 40)
    deadline = time.monotonic() + 10
    while rec.file.done == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rec.file.done > 0 and len(list(tmp_path.iterdir())) == 1  # (its temp file, begun)
    thread = rec.file.thread
    del rec
    thread.join(10)
    assert not thread.is_alive() and list(tmp_path.iterdir()) == []


@pytest.mark.timeout(120)
def test_writing_a_trace_imports_nothing_more(tmp_path):
    """A traced CLI run writes its file once, in a fresh process: nothing the write calls may import a module
    on first use (np.unique imports numpy.ma: 7 to 14 ms added to every traced run on a 2-core VM)."""
    code = f"""
import sys
sys.path[:0] = {sys.path!r}
from test_trace import record
from pipeline.trace import Recorder
rec = Recorder({str(tmp_path / "t.json")!r})
record(rec)
before = set(sys.modules)
rec.write()
print(sorted(set(sys.modules) - before))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"the write imported {out.stdout.strip()}"


def test_digits_are_the_numbers_decimal_digits():
    """``_digits`` (four digits at a time from tables made at import) writes each number as ``str`` does,
    right-aligned after spaces, for numbers of every length, zeros inside them included."""
    xs = np.array([0, 7, 10, 99, 100, 1000, 9999, 10000, 10001, 20030, 1_000_000, 12_345_678, 100_000_000,
                   987_654_321_012, 2**40 + 5], np.int64)
    rows = trace._digits(xs)
    width = len(str(int(xs.max())))
    assert rows.shape == (len(xs), width)
    assert [bytes(r).decode() for r in rows] == [str(int(x)).rjust(width) for x in xs]
    small = trace._digits(np.array([5, 0, 42]))
    assert [bytes(r).decode() for r in small] == [" 5", " 0", "42"]
