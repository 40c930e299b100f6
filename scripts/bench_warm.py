"""Warm workers vs a cold start: a 16-batch job as `pipeline.run(...)` (workers started for it) and as a
second `p.run(...)` on a `Pipeline` whose workers are already up. Prints one JSON object.

    python scripts/bench_warm.py [--batches 16] [--workers 2] [--repeat 3]
"""
import argparse
import json
import statistics
import time

import pipeline

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    job = dict(kernel="matmul", batches=a.batches, rows=1024, cols=512, device="cpu", progress=False)
    cold, warm = [], []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        ref = pipeline.run(workers=a.workers, **job).summary["checksum"]
        cold.append(time.perf_counter() - t0)
    with pipeline.Pipeline(workers=a.workers, **job) as p:
        p.run()  # the first call waits for the workers' start-up
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            s = p.run().summary
            warm.append(time.perf_counter() - t0)
            assert s["checksum"] == ref and s["startup_s"] == 0
    c, w = statistics.median(cold), statistics.median(warm)
    print(json.dumps({"batches": a.batches, "workers": a.workers, "cold_run_s": round(c, 3),
                      "warm_run_s": round(w, 3), "warm_speedup": round(c / w, 1)}))
