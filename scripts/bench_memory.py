"""Stream many big batches through the pipeline and report the main process's peak RSS.

    python scripts/bench_memory.py [--batches 300] [--mb 32] [--workers 2]

The handoff issue's goal: 300 batches of 32 MB (9.6 GB) through 2 workers keep the main under 1 GB.
"""
import argparse
import json
import resource

import pipeline

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--mb", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    cols = 1024
    rows = a.mb * 2**20 // (4 * cols)
    s = pipeline.run(kernel="sum", workers=a.workers, batches=a.batches, rows=rows, cols=cols,
                     progress=False).summary
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"streamed_gb": round(s["bytes_in"] / 1e9, 2), "main_peak_rss_mb": round(peak),
                      "batches_per_s": s["batches_per_s"], "slots": s["handoff"]["slots"],
                      "slot_mb": s["handoff"]["slot_bytes"] / 2**20}))
