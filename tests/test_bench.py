"""bench: every mode agrees with serial (a smoke test of agreement, never of speed)."""
import json

import numpy as np
import pytest

from pipeline.bench.calibration import bound, roofline
from pipeline.bench.peers import has_spdl as _has_spdl
from pipeline.bench.ray_modes import has_ray as _has_ray, has_ray_data as _has_ray_data
from pipeline.outputs import max_rel_diff
from pipeline.cli import main
from pipeline.kernels import spec_for


class Tiny:
    """24 samples ``{"x": float32 (4,), "label": int}``: the dataset every dataset mode of the bench takes."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        return {"x": np.arange(4, dtype=np.float32) * i, "label": i}


class Pairs(Tiny):
    """The same samples as ``(x, label)`` tuples (torch's default collate makes them a list)."""

    def __getitem__(self, i):
        s = Tiny.__getitem__(self, i)
        return s["x"], s["label"]


@pytest.mark.timeout(300)
def test_quick_all_modes_agree(tmp_path, capsys):
    """bench --quick --modes all exits 0, and its JSON has the documented fields for every mode."""
    path = tmp_path / "b.json"
    rc = main(["bench", "--quick", "--modes", "all", "--workers-list", "2", "--kernel", "matmul",
               "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    report = json.loads(path.read_text())
    assert set(report["machine"]) >= {"cpus", "python", "torch", "numpy", "devices"}
    modes = {(r["mode"], r["workers"]) for r in report["results"]}
    peers = ["pipeline", "mp.Pool", "ProcessPoolExecutor", "DataLoader"] + (["spdl"] if _has_spdl() else []) \
        + (["ray"] if _has_ray() else []) + (["ray.data"] if _has_ray_data() else [])
    assert modes == {("serial", 0)} | {(m, 2) for m in peers}
    for r in report["results"]:
        assert r["agrees"] and r["max_rel_diff_vs_serial"] <= 1e-3
        for k in ("batches_per_s", "mb_per_s", "speedup_vs_serial", "checksum", "startup_s"):
            assert k in r
    pipe = [r for r in report["results"] if r["mode"] == "pipeline"][0]
    assert set(pipe["breakdown_ms_per_batch"]) == {
        "build_ms", "dispatch_ms", "receive_ms", "stage_ms", "h2d_ms", "compute_ms", "d2h_ms",
        "slot_wait_ms", "worker_wait_ms", "idle_ms", "return_ms", "order_wait_ms", "build_cpu_ms"}
    assert report["roofline"]["limiting_stage"]["2"].startswith(("main build (", "kernel"))
    assert "roofline" in out and "pipeline" in out


def _dataset_bench(tmp_path, source, modes, *extra):
    path = tmp_path / "b.json"
    rc = main(["bench", "--quick", "--source", source, "--batch-size", "8", "--kernel", "sum", "--modes", modes,
               "--workers-list", "1", "--json", str(path), *extra])
    return rc, json.loads(path.read_text()) if path.exists() else None


@pytest.mark.timeout(120)
def test_dataset_modes_agree(tmp_path, capsys):
    """--source: serial, pipeline (threads), pipeline.procs, DataLoader (and spdl) batch the same samples alike."""
    modes = "serial,pipeline,pipeline.procs,DataLoader" + (",spdl" if _has_spdl() else "")
    rc, report = _dataset_bench(tmp_path, "test_bench:Tiny", modes, "--build-processes", "1")
    assert rc == 0, capsys.readouterr()
    rows = {r["mode"]: r for r in report["results"]}
    assert list(rows) == modes.split(",")
    assert all(r["agrees"] and r["samples_per_s"] > 0 for r in rows.values())
    assert rows["pipeline.procs"]["build_processes"] == 1 and not rows["pipeline"]["build_processes"]
    assert len({r["checksum"] for r in rows.values()}) == 1
    assert "samples/s" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_dataset_tuples_through_dataloader(tmp_path, capsys):
    """Tuple samples: DataLoader's default collate gives a list, turned back into the same tuple of fields."""
    rc, report = _dataset_bench(tmp_path, "test_bench:Pairs", "serial,DataLoader", "--drop-last")
    assert rc == 0, capsys.readouterr()
    assert all(r["agrees"] for r in report["results"]) and report["results"][0]["batches"] == 3


@pytest.mark.timeout(30)
def test_spdl_without_spdl_exit_2(monkeypatch, capsys):
    """--modes spdl without SPDL installed is a usage error, one line naming the extra."""
    import pipeline.bench as b
    monkeypatch.setattr(b, "has_spdl", lambda: False)
    assert main(["bench", "--quick", "--modes", "serial,spdl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SPDL" in err and ".[spdl]" in err


@pytest.mark.timeout(60)
def test_spdl_on_synthetic_batches(capsys):
    """spdl on synthetic batches (one batch per item) agrees with serial."""
    pytest.importorskip("spdl.pipeline")
    assert main(["bench", "--quick", "--modes", "serial,spdl", "--workers-list", "2"]) == 0, capsys.readouterr()


def test_bad_mode_exit_2(capsys):
    """An unknown mode is a usage error naming it."""
    assert main(["bench", "--quick", "--modes", "serial,nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_max_rel_diff_detects_disagreement():
    """max_rel_diff is 0 for equal results, large for different, inf for missing batches or shapes."""
    a = [np.ones(3), np.arange(3.0)]
    assert max_rel_diff(a, a) == 0
    assert max_rel_diff([np.ones(3), np.arange(3.0) + 1], a) == pytest.approx(0.5)
    assert max_rel_diff(a[:1], a) == float("inf") and max_rel_diff([np.ones(2), a[1]], a) == float("inf")


def test_roofline_names_the_slowest_stage():
    """The bound is the slowest stage: the kernel on the usable cores, then a slow main build."""
    from pipeline import Config
    cfg = Config().replace(**{"workers.threads": 1, "workers.build_threads": 1})
    cal = {"build_s_by_threads": {1: 0.05}, "kernel_s_by_threads": {1: 0.1}, "h2d_s": None,
           "device": "cpu", "cores": 4, "gpus": 0}
    r = roofline(cal, cfg, [1, 8])
    assert r["limiting_stage"] == {"1": "kernel x usable workers", "8": "main build (1 thread)"}
    assert r["bound_batches_per_s"] == {"1": 10.0, "8": 20.0}


def test_roofline_on_cuda_overlaps_copy_and_kernel():
    """On CUDA the GPU stage is the slower of kernel and host-to-device (they overlap), per GPU."""
    from pipeline import Config
    cfg = Config().replace(**{"workers.threads": 2, "workers.build_threads": 4, "handoff.in_flight": 16})
    cal = {"build_s_by_threads": {4: 0.001}, "kernel_s_by_threads": {2: 0.004}, "h2d_s": 0.002,
           "device": "cuda:0", "cores": 16, "gpus": 1}
    assert bound(cal, cfg, 4) == (250.0, "kernel on the GPU")
    cal["h2d_s"] = 0.01
    assert bound(cal, cfg, 4) == (100.0, "host-to-device")


def test_calibration_takes_each_build_thread_counts_best_try_in_turns(monkeypatch):
    """The build rate is the best of ``repeat`` tries per thread count, the counts taking turns (a slow
    moment of a shared machine sets neither the roofline nor the build's scaling)."""
    from pipeline.bench import calibration
    from pipeline.runner import resolve
    from pipeline.sources.factory import open_source as make_source
    cfg = resolve(None, {"workers": 2, "batches": 4, "rows": 4, "cols": 4, "kernel": "sum"})
    times = iter([0.5, 0.3, 0.2, 0.6, 0.4, 0.1])  # (1 thread, 2 threads) three times over
    tried = []
    monkeypatch.setattr(calibration, "_build_rate", lambda src, t: tried.append(t) or next(times))
    cal = calibration.calibrate(cfg, spec_for("sum", {}), make_source(cfg.source), [2], [1, 2], repeat=3)
    assert tried == [1, 2] * 3 and cal["build_s_by_threads"] == {1: 0.2, 2: 0.1} and cal["build_s"] == 0.2


def test_a_quick_build_is_timed_over_many_builds_from_when_the_threads_all_start():
    """A tiny batch's build takes microseconds: the calibration times many of them, from a barrier, so
    that the cost of starting a thread is not taken for the build's (it was: the roofline sat at 4% of
    what the pipeline then ran at, and the table called the calibration off)."""
    from pipeline.bench import calibration
    from pipeline.runner import resolve
    from pipeline.sources.factory import open_source as make_source
    src = make_source(resolve(None, {"batches": 50, "rows": 4, "cols": 4}).source)
    built = []
    batch = src.batch
    src.batch = lambda i: built.append(i) or batch(i)
    seconds = calibration._build_rate(src, 2)
    assert len(built) > 100 and 0 < seconds < 0.01, (len(built), seconds)


def test_a_row_bound_by_its_fixed_cost_says_so():
    """Far below the roofline, with the main's own work most of a batch's time: the table says what limits."""
    from pipeline.bench.report import table
    row = {"mode": "pipeline", "workers": 2, "batches_per_s": 10_000.0, "roofline_efficiency": 0.14,
           "roofline_batches_per_s": 70_000.0, "limiting_stage": "main build (2 threads)",
           "mb_per_s": 10.0, "speedup_vs_serial": 0.5, "startup_s": 2.0, "max_rel_diff_vs_serial": 0.0,
           "breakdown_ms_per_batch": {"build_ms": 0.03, "dispatch_ms": 0.01, "receive_ms": 0.02}}
    report = {"machine": {"cpus": 2, "devices": ["cpu"], "torch": "x", "python": "3"}, "results": [row],
              "calibration": {"batch_bytes": 1024, "build_s_by_threads": {"2": 1e-5}}}
    assert "60 us of it the main's own work" in table(report)
    row["breakdown_ms_per_batch"] = {"build_ms": 0.01, "dispatch_ms": 0.005, "receive_ms": 0.005}
    assert "main's own work" not in table(report)


def test_build_threads_rows_and_calibration_warning(tmp_path, capsys):
    """--build-threads-list gives a pipeline row per build-thread count; a row above the roofline is flagged."""
    path = tmp_path / "b.json"
    assert main(["bench", "--quick", "--modes", "pipeline", "--workers-list", "1", "--build-threads-list", "1,2",
                 "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert [(r["mode"], r["build_threads"]) for r in rows] == [("pipeline", 1), ("pipeline", 2)]
    assert all("roofline_batches_per_s" in r and "calibration_off" in r for r in rows)
    from pipeline.bench.report import table
    report = json.loads(path.read_text())
    report["results"][0].update(roofline_efficiency=1.5, calibration_off=True)
    assert "calibration is off" in table(report)


def test_disagreeing_mode_exits_1(monkeypatch, capsys):
    """A mode whose results differ from serial beyond tolerance makes bench exit 1, naming it."""
    import pipeline.bench as b

    def wrong(cfg, spec, src, repeat):
        results, seconds = b._serial(cfg, spec, src, 1)
        return [r * 1.01 for r in results], seconds, 0.0, {}
    monkeypatch.setitem(b.RUNNERS, "mp.Pool", wrong)
    assert main(["bench", "--quick", "--modes", "serial,mp.Pool", "--workers-list", "1"]) == 1
    assert "mp.Pool x1 disagrees with serial" in capsys.readouterr().err


def test_plot_written(tmp_path, capsys):
    """--plot writes a PNG (matplotlib, the [plot] extra)."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "b.png"
    assert main(["bench", "--quick", "--modes", "serial", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_fails_before_the_run(monkeypatch, capsys):
    """--plot without matplotlib: exit 2 naming [plot] at once, not after the whole bench has run."""
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", "--quick", "--modes", "serial", "--plot", "x.png"]) == 2
    out, err = capsys.readouterr()
    assert "pip install -e '.[plot]'" in err and "serial" not in out


def test_paired_runs_alternate_and_their_ratio_is_the_cost(monkeypatch):
    """paired.alternate runs plain and traced side by side, the first of each pair alternating (ABBA), and
    overhead is the median of the pairs' ratios with an interval around it."""
    from pipeline.bench import paired
    clock, calls = [0.0], []

    def once(on):
        calls.append(on)
        clock[0] += 1.1 if on else 1.0
    monkeypatch.setattr(paired.time, "perf_counter", lambda: clock[0])
    without, with_ = paired.alternate(once, 4)
    assert calls == [False, True, True, False, False, True, True, False]
    assert without == pytest.approx([1.0] * 4) and with_ == pytest.approx([1.1] * 4)
    cost = paired.overhead(without, with_)
    assert cost["overhead"] == pytest.approx(0.1) and cost["pairs"] == 4
    assert cost["interval"] == pytest.approx([0.1, 0.1])
    cost = paired.overhead([1.0, 1.0, 1.0], [1.0, 1.2, 1.5])
    assert cost["overhead"] == pytest.approx(0.2) and cost["interval"][0] <= 0.2 <= cost["interval"][1]


@pytest.mark.timeout(300)
def test_trace_mode_pairs_its_runs(tmp_path, capsys):
    """bench --modes pipeline.trace: its traced runs alternate with plain ones on its own workers; the row
    says what --trace cost (paired), the table prints it, and --trace FILE keeps the last traced run's file."""
    path, trace = tmp_path / "b.json", tmp_path / "t.json"
    assert main(["bench", "--quick", "--modes", "serial,pipeline.trace", "--workers-list", "1", "--repeat", "2",
                 "--trace", str(trace), "--json", str(path)]) == 0
    out = capsys.readouterr().out
    row = [r for r in json.loads(path.read_text())["results"] if r["mode"] == "pipeline.trace"][0]
    assert row["agrees"] and row["trace_pairs"] == 2 and row["trace"] == str(trace) and row["trace_events"] > 0
    lo, hi = row["trace_overhead_interval"]
    assert lo <= row["trace_overhead"] <= hi and row["trace_plain_s"] > 0 and row["trace_write_ms"] > 0
    assert len(row["trace_ratios"]) == 2
    assert json.loads(trace.read_text())["traceEvents"]
    assert "pipeline.trace x1: --trace costs" in out and "--repeat 15 or more" in out


@pytest.mark.timeout(300)
def test_trace_mode_leaves_no_file_of_its_own(tmp_path, capsys):
    """Without --trace FILE, pipeline.trace writes its traces to a temp file of its own: gone when the bench
    ends (the JSON row has no path to it), one pair of runs said as one."""
    import os
    import tempfile
    path = tmp_path / "b.json"
    own = os.path.join(tempfile.gettempdir(), f"pipeline-bench-{os.getpid()}.trace.json")
    assert main(["bench", "--quick", "--modes", "pipeline.trace", "--workers-list", "1", "--json", str(path)]) == 0
    assert "the median of 1 pair of runs" in capsys.readouterr().out
    row = json.loads(path.read_text())["results"][0]
    assert row["trace_pairs"] == 1 and "trace" not in row and not os.path.exists(own)


@pytest.mark.timeout(300)
def test_trace_mode_plot_draws_its_timeline(tmp_path, capsys):
    """--plot with pipeline.trace draws the traced run's timeline beside the bench's plot, before its temp
    file goes."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "b.png"
    assert main(["bench", "--quick", "--modes", "pipeline.trace", "--workers-list", "1", "--plot", str(path)]) == 0
    assert "the timeline of pipeline.trace x1" in capsys.readouterr().err
    for png in (path, tmp_path / "b-timeline.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
