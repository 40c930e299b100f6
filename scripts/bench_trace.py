"""What ``--trace`` costs (issue 38's goals: <= 2% on 16 MB batches, <= 10% on tiny 16 x 16 batches).

The same warm workers run the same batches with and without a trace recorder, alternating (plain then
traced, then traced then plain, and so on: a drift in the machine's speed cancels out), ``--rounds``
times each (this machine's speed drifts: a ratio is only meaningful between runs side by side); the traced
run's time includes writing its JSON file, as a user's would. Prints one line per size and a JSON list.

    python scripts/bench_trace.py [--rounds 7] [--workers 2] [--only tiny|16mb] [--scale 1] [--json out.json]

``--scale N`` runs N times the batches (longer runs: a short stall of the machine weighs less in each).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline import devices, kernels  # noqa: E402
from pipeline.bench import paired  # noqa: E402
from pipeline.runner import make_executor, resolve  # noqa: E402
from pipeline.sources.base import Work  # noqa: E402
from pipeline.sources.factory import open_source  # noqa: E402
from pipeline.trace import Recorder  # noqa: E402

SIZES = {"16 MB (4096 x 1024 float32)": dict(rows=4096, cols=1024, batches=96),
         "tiny (16 x 16 float32)": dict(rows=16, cols=16, batches=4000)}


def cpu_s(pids: list[int]) -> tuple[float, float]:
    """CPU seconds used so far by this process (every thread, those ended too) and by ``pids``' live threads
    (Linux: /proc/PID/task/*/schedstat, in nanoseconds; /proc/PID/stat counts 10 ms ticks, too coarse for a
    run of 0.2 s)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    theirs = 0.0
    for pid in pids:
        for stat in glob.glob(f"/proc/{pid}/task/*/schedstat"):
            try:
                with open(stat) as f:
                    theirs += int(f.read().split()[0]) / 1e9
            except OSError:  # (a thread that ended meanwhile)
                pass
    return me.ru_utime + me.ru_stime, theirs


def measure(name: str, size: dict, workers: int, rounds: int, kernel: str) -> dict:
    cfg = resolve(None, dict(size, workers=workers, kernel=kernel, progress=False))
    spec = kernels.spec_for(cfg.kernel.name, dict(cfg.kernel.params), cfg.kernel.precision)
    src = open_source(cfg.source)
    path = os.path.join(tempfile.gettempdir(), f"bench-trace-{os.getpid()}.json")
    writes: list[float] = []
    cpu: dict[bool, list] = {False: [], True: []}  # (main, workers) seconds of each run
    events = 0
    with make_executor(cfg, spec) as ex:
        for _ in ex.stream(Work.of(src), ordered=True):  # warm: every worker up, the ring mapped
            pass
        pids = [w.pid for w in ex.workers]

        def once(trace: bool) -> None:
            nonlocal events
            rec = Recorder(path) if trace else None
            c0 = cpu_s(pids)
            for _ in ex.stream(Work.of(src, trace=rec), ordered=True):
                pass
            if rec is not None:
                t1 = time.perf_counter()
                rec.write()
                writes.append(time.perf_counter() - t1)
                events = rec.recorded
            c1 = cpu_s(pids)
            cpu[trace].append((c1[0] - c0[0], c1[1] - c0[1]))
        plain, traced = paired.alternate(once, rounds)  # (ABBA: a drift cancels out)
    os.unlink(path)
    cost = paired.overhead(plain, traced)
    ratios, (low, high) = cost["ratios"], cost["interval"]
    print("  paired ratios:", " ".join(f"{x:.3f}" for x in ratios), flush=True)
    print(f"  median paired overhead {cost['overhead']:+.1%}, 95% bootstrap interval {low:+.1%} .. "
          f"{high:+.1%}", flush=True)

    def cpu_cost(part):  # (the median of the pairs' ratios of CPU seconds: the main's, the workers', both)
        return statistics.median(part(t) / part(p) for p, t in zip(cpu[False], cpu[True])) - 1
    used, used_main, used_workers = cpu_cost(sum), cpu_cost(lambda c: c[0]), cpu_cost(lambda c: c[1])
    print(f"  CPU time, traced against plain: {used:+.1%}, the main {used_main:+.1%}, its workers {used_workers:+.1%} "
          f"(medians; time stolen by the machine's host is not in it)", flush=True)
    runs = [(t - w) / p for p, t, w in zip(plain, traced, writes)]
    fastest = min(traced) / min(plain) - 1  # (the least disturbed run of each: a stall only adds time)
    print(f"  the fastest traced run against the fastest plain one: {fastest:+.1%}", flush=True)
    print(f"  of which writing the file: {statistics.median(writes) * 1e3:.1f} ms (median); the run without it: "
          f"{statistics.median(runs) - 1:+.1%} (median)", flush=True)
    row = {"size": name, "batches": cfg.source.batches, "workers": workers, "kernel": kernel, "rounds": rounds,
           "plain_s": round(statistics.median(plain), 4), "traced_s": round(statistics.median(traced), 4),
           "overhead": round(cost["overhead"], 4), "events": events,
           "overhead_interval": [round(low, 4), round(high, 4)], "overhead_fastest": round(fastest, 4),
           "overhead_cpu": round(used, 4), "overhead_cpu_main": round(used_main, 4),
           "overhead_cpu_workers": round(used_workers, 4), "write_s": round(statistics.median(writes), 4),
           "overhead_without_write": round(statistics.median(runs) - 1, 4),
           "batches_per_s_plain": round(cfg.source.batches / statistics.median(plain), 1),
           "batches_per_s_traced": round(cfg.source.batches / statistics.median(traced), 1),
           "ratios": [round(x, 4) for x in ratios]}
    print(f"{name:30} {row['batches_per_s_plain']:>9} batches/s plain, {row['batches_per_s_traced']:>9} traced: "
          f"overhead {row['overhead']:+.1%} (median of {rounds} paired rounds; {events} events)", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kernel", default="sum")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--only", choices=["16mb", "tiny"], help="measure one size")
    ap.add_argument("--scale", type=int, default=1, help="N times the batches of each size")
    a = ap.parse_args()
    rows = [measure(n, dict(s, batches=s["batches"] * a.scale), a.workers, a.rounds, a.kernel) for n, s in SIZES.items()
            if a.only is None or n.lower().startswith(a.only.replace("mb", " mb"))]
    out = {"machine": {"cpus": devices.usable_cpus()}, "results": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
