"""Stream many big batches through the pipeline and report the main process's peak RSS.

    python scripts/bench_memory.py [--batches 300] [--mb 32] [--workers 2] [--json PATH]

The handoff issue's goal: 300 batches of 32 MB (9.6 GB) through 2 workers keep the main under 1 GB.
"""
import argparse
import json
import resource
import sys
import time

import pipeline

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--mb", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", metavar="PATH", dest="json_path", help="also write the result here")
    a = ap.parse_args()
    cols = 1024
    rows = a.mb * 2**20 // (4 * cols)
    t0 = time.perf_counter()
    s = pipeline.run(kernel="sum", workers=a.workers, batches=a.batches, rows=rows, cols=cols,
                     progress=False).summary
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"streamed_gb": round(s["bytes_in"] / 1e9, 2), "main_peak_rss_mb": round(peak),
           "batches_per_s": s["batches_per_s"], "slots": s["handoff"]["slots"],
           "slot_mb": s["handoff"]["slot_bytes"] / 2**20, "wall_s": round(wall, 1),
           "under_1gb": peak < 1024}
    print(json.dumps(out))
    if a.json_path:
        with open(a.json_path, "w") as f:
            json.dump({"command": " ".join(["python", "scripts/bench_memory.py"] + sys.argv[1:]), **out}, f,
                      indent=1)
            f.write("\n")
