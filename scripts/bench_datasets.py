"""The benchmark goals on your own data: each measured in one run, on this machine.

    python scripts/bench_datasets.py [--json docs/bench/datasets.json] [--cache DIR]

  a. JPEG: 256 JPEGs (about 500x375, made here with Pillow, quality 90) decoded, RGB, resized to 224x224,
     {"image", "label"} samples in batches of 32, kernel bench_data:pixel_sums (cheap), 2 workers: images/s of serial, the pipeline
     (build threads and build processes), DataLoader (2 workers) and SPDL (2 threads), through
     ``pipeline.bench.run_bench``, as ``pipeline bench --source bench_data:Jpegs`` measures them.
     Goals: pipeline >= 1.8x serial, >= 1.5x DataLoader, >= 1.3x SPDL. Also measured: the decode ceiling,
     2 bare threads decoding every image with nothing else running (what the cores allow at all).
  b. GIL-bound: pure Python in ``__getitem__``: the pipeline with 2 build processes vs build threads only,
     through run_bench (each timed pass starts its build processes) and on a warm ``pipeline.Pipeline``
     (interleaved runs, medians). Goal: >= 1.6x.
  c. Per-sample overhead: ~10^6 samples of 16 float32, batches of 1024, 2 workers, kernel sum: the warm
     pipeline's samples/s (the best of its build settings) vs the bound, one Python loop that calls
     ``__getitem__`` and writes each sample into a preallocated (1024, 16) array; interleaved, medians.
     Goal: >= 70% of the bound.

The data is made once in the cache directory (default ``~/.cache/pipeline-bench/``). The datasets live in
``scripts/bench_data.py`` (numpy and Pillow only), which the workers import by name.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # bench_data: spawn children get this sys.path; PYTHONPATH for any other
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)
sys.path.insert(0, os.path.dirname(HERE))  # the package of this checkout

import numpy as np  # noqa: E402

import bench_data  # noqa: E402

WORKERS = 2
GOALS = {"jpeg_vs_serial": 1.8, "jpeg_vs_dataloader": 1.5, "jpeg_vs_spdl": 1.3, "gil_procs_vs_threads": 1.6,
         "per_sample_vs_bound": 0.7}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="PATH", help="write the measurements and goals as JSON")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/pipeline-bench"), metavar="DIR")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3, metavar="N", help="timed passes (medians)")
    args = ap.parse_args(argv)
    from pipeline.bench import machine
    from pipeline.bench.peers import has_spdl as _has_spdl
    root = os.path.join(args.cache, f"jpeg-{args.images}")
    t0 = time.perf_counter()
    bench_data.make_jpegs(root, args.images)
    print(f"data: {args.images} JPEGs in {root} ({time.perf_counter() - t0:.1f} s to make or find)", flush=True)
    report = {"machine": machine(), "workers": WORKERS, "repeat": args.repeat}
    report["jpeg"] = jpeg(root, args.repeat, _has_spdl())
    report["gil"] = gil(args.repeat)
    report["per_sample"] = per_sample(args.repeat)
    report["goals"] = goals(report)
    print(text(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


def _cfg(source: str, params: dict, batch_size: int, kernel: str = "sum", **more):
    from pipeline.runner import resolve
    over = {"source_object": source, "batch_size": batch_size, "kernel": kernel, "progress": False,
            **{f"source.params.{k}": v for k, v in params.items()}, **more}
    return resolve(None, over)


def _rows(report: dict) -> dict:
    return {r["mode"]: {k: r.get(k) for k in ("samples_per_s", "batches_per_s", "seconds", "startup_s",
                                              "build_threads", "build_processes", "agrees")}
            for r in report["results"]}


def jpeg(root: str, repeat: int, spdl: bool) -> dict:
    """a: every mode on the JPEG dataset through run_bench (as ``pipeline bench`` does)."""
    from pipeline.bench import run_bench
    modes = ["serial", "pipeline", "pipeline.procs", "DataLoader"] + (["spdl"] if spdl else [])
    cfg = _cfg("bench_data:Jpegs", {"root": root}, 32, kernel="bench_data:pixel_sums",
               **{"workers.build_processes": WORKERS})
    print(f"a. JPEG: {', '.join(modes)} ...", flush=True)
    rows = _rows(run_bench(cfg, modes, [WORKERS], repeat))
    ds = bench_data.Jpegs(root)
    return {"images": len(ds), "batch_size": 32, "modes": rows, "ceiling": ceiling(ds, repeat)}


def ceiling(ds, repeat: int) -> float:
    """What the cores can decode at all: ``WORKERS`` bare threads calling ``__getitem__`` over the whole
    dataset (Pillow releases the GIL), no kernel, no processes, nothing else running: images/s, median."""
    from concurrent.futures import ThreadPoolExecutor
    times = []
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(ds.__getitem__, range(min(32, len(ds)))))  # (warm: imports, caches)
        for _ in range(repeat):
            t0 = time.perf_counter()
            list(pool.map(ds.__getitem__, range(len(ds)), chunksize=8))
            times.append(time.perf_counter() - t0)
    return round(len(ds) / statistics.median(times), 1)


def gil(repeat: int, n: int = 4096, ops: int = 3000) -> dict:
    """b: pure Python samples: build processes vs threads, through run_bench and on a warm Pipeline."""
    from pipeline.bench import run_bench
    print("b. GIL-bound: pipeline, pipeline.procs ...", flush=True)
    cfg = _cfg("bench_data:Spin", {"n": n, "ops": ops}, 64, **{"workers.build_processes": WORKERS})
    rows = _rows(run_bench(cfg, ["pipeline", "pipeline.procs"], [WORKERS], repeat))
    import pipeline
    ds = bench_data.Spin(n, ops)
    settings = {"threads": {"build_threads": 0, "build_processes": 0},
                "processes": {"build_threads": 0, "build_processes": WORKERS}}
    times = {k: [] for k in settings}
    with pipeline.Pipeline(kernel="sum", workers=WORKERS, progress=False) as p:
        p.run(source=ds, batch_size=64, keep_results=False)  # workers up and warm
        for _ in range(repeat):
            for name, s in settings.items():
                t0 = time.perf_counter()
                p.run(source=ds, batch_size=64, keep_results=False, **s)
                times[name].append(time.perf_counter() - t0)
    warm = {k: round(n / statistics.median(v), 1) for k, v in times.items()}
    return {"samples": n, "ops_per_sample": ops, "batch_size": 64, "bench_modes": rows,
            "warm_samples_per_s": warm}


def per_sample(repeat: int, batches: int = 976, size: int = 1024) -> dict:
    """c: the warm pipeline's samples/s at its build settings vs the one-loop bound, interleaved."""
    import pipeline
    print("c. per-sample overhead: bound vs pipeline ...", flush=True)
    ds = bench_data.Small(batches * size)
    out = np.empty((size, 16), np.float32)

    def bound() -> float:
        get = ds.__getitem__
        t0 = time.perf_counter()
        for k in range(batches):
            base = k * size
            for j in range(size):
                out[j] = get(base + j)
        return time.perf_counter() - t0
    settings = {"threads=1": {"build_threads": 1}, "threads=2": {"build_threads": 2},
                "processes=2": {"build_processes": 2}}
    times = {"bound": [], **{k: [] for k in settings}}
    with pipeline.Pipeline(kernel="sum", workers=WORKERS, progress=False) as p:
        p.run(source=ds, batch_size=size, keep_results=False)  # workers up and warm
        for _ in range(repeat):
            for name in times:
                if name == "bound":
                    times[name].append(bound())
                    continue
                t0 = time.perf_counter()
                p.run(source=ds, batch_size=size, keep_results=False, **settings[name])
                times[name].append(time.perf_counter() - t0)
    rates = {k: round(batches * size / statistics.median(v)) for k, v in times.items()}
    best = max(settings, key=rates.get)
    return {"samples": batches * size, "batch_size": size, "samples_per_s": rates, "best": best,
            "ratio": round(rates[best] / rates["bound"], 3)}


def goals(r: dict) -> dict:
    m = r["jpeg"]["modes"]
    pipe = m["pipeline"]["samples_per_s"]
    got = {"jpeg_vs_serial": pipe / m["serial"]["samples_per_s"],
           "jpeg_vs_dataloader": pipe / m["DataLoader"]["samples_per_s"]}
    if "spdl" in m:
        got["jpeg_vs_spdl"] = pipe / m["spdl"]["samples_per_s"]
    g = r["gil"]
    got["gil_procs_vs_threads"] = g["warm_samples_per_s"]["processes"] / g["warm_samples_per_s"]["threads"]
    got["gil_procs_vs_threads_bench"] = (g["bench_modes"]["pipeline.procs"]["samples_per_s"]
                                         / g["bench_modes"]["pipeline"]["samples_per_s"])
    got["per_sample_vs_bound"] = r["per_sample"]["ratio"]
    return {k: {"measured": round(v, 3), "goal": GOALS.get(k.replace("_bench", "")),
                "met": v >= GOALS[k.replace("_bench", "")]} for k, v in got.items()}


def text(r: dict) -> str:
    m = r["machine"]
    lines = [f"machine: {m['cpus']} cpus, {', '.join(m['devices'])}, torch {m['torch']}, python {m['python']}, "
             f"{m['platform']}",
             f"a. JPEG: {r['jpeg']['images']} images, batches of {r['jpeg']['batch_size']}, {WORKERS} workers, "
             f"kernel bench_data:pixel_sums",
             f"   {'mode':<16}{'build':>7}{'images/s':>10}{'startup s':>11}"]
    for mode, row in r["jpeg"]["modes"].items():
        build = f"{row['build_processes']}p" if row.get("build_processes") else row.get("build_threads") or "-"
        lines.append(f"   {mode:<16}{build:>7}{row['samples_per_s']:>10.1f}{row['startup_s']:>11.2f}"
                     + ("" if row["agrees"] else "  DISAGREES with serial"))
    lines.append(f"   {'decode ceiling':<16}{WORKERS:>7}{r['jpeg']['ceiling']:>10.1f}   (bare threads, nothing else)")
    g = r["gil"]
    lines.append(f"b. GIL-bound: {g['samples']} samples of {g['ops_per_sample']} Python steps, batches of "
                 f"{g['batch_size']}: samples/s")
    lines.append(f"   pipeline bench: threads "
                 f"{g['bench_modes']['pipeline']['samples_per_s']:.0f}, processes "
                 f"{g['bench_modes']['pipeline.procs']['samples_per_s']:.0f}")
    lines.append(f"   warm Pipeline: threads {g['warm_samples_per_s']['threads']:.0f}, processes "
                 f"{g['warm_samples_per_s']['processes']:.0f}")
    c = r["per_sample"]
    lines.append(f"c. per sample: {c['samples']} samples of 16 float32, batches of {c['batch_size']}: samples/s "
                 + ", ".join(f"{k} {v:,}" for k, v in c["samples_per_s"].items())
                 + f"; best {c['best']} = {c['ratio']:.0%} of the bound")
    lines.append("goals:")
    for k, v in r["goals"].items():
        lines.append(f"   {k:<30}{v['measured']:>7.2f}  (goal >= {v['goal']})  {'met' if v['met'] else 'MISSED'}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
