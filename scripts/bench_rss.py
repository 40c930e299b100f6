"""Peak RSS of the main process of the real CLI, at several batch counts: is it flat, and under 1 GB?

    python scripts/bench_rss.py [--batches 200,2000] [--workers 2] [--kernel fft] [--rows 2048]
                                [--cols 1024] [--no-output] [--dir PARENT] [--json PATH]

Each run is ``python -m pipeline run --kernel K --rows R --cols C --workers W --batches N
--output <tmp dir> --no-progress --json`` in a subprocess, under a small wrapper that reads the main
process's own peak RSS (VmHWM in /proc/self/status, ru_maxrss of RUSAGE_SELF elsewhere) as it exits; the
workers are other processes and are not counted (RUSAGE_CHILDREN would take the max over them too). The
output directory (about 4.2 MB a batch for fft 2048 x 1024: 8.4 GB at 2000) is deleted after each run;
``--dir`` picks where it goes (default: the system temp dir; it checks the free space first).
``--no-output`` runs the same job without ``--output``.

One JSON line per run, then a verdict line: the peak at the largest batch count within 10% of the peak
at the smallest, and every peak under 1 GB. Exit status 0 when both hold, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the CLI in this process exactly as ``python -m pipeline`` does, then writes its own peak RSS to the
# file named by argv[1]; the rest of argv is the CLI's.
WRAPPER = r"""
import json, os, resource, runpy, sys
report, sys.argv = sys.argv[1], ["pipeline"] + sys.argv[2:]
code = 0
try:
    runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
finally:
    peak = {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    peak[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    with open(report, "w") as f:
        json.dump(peak, f)
sys.exit(code)
"""

OUT_BYTES_PER_BATCH = {"fft": lambda r, c: r * (c // 2 + 1) * 4}


def one(n: int, a: argparse.Namespace) -> dict:
    out = None
    if not a.no_output:
        out = tempfile.mkdtemp(prefix="bench-rss-", dir=a.dir)
    fd, report = tempfile.mkstemp(prefix="bench-rss-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, "-c", WRAPPER, report, "run", "--kernel", a.kernel, "--rows", str(a.rows),
           "--cols", str(a.cols), "--workers", str(a.workers), "--batches", str(n), "--no-progress", "--json"]
    if out:
        cmd += ["--output", out]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        out_bytes = sum(e.stat().st_size for e in os.scandir(out)) if out else 0
        with open(report) as f:
            peak = json.load(f)
    finally:
        if out:
            shutil.rmtree(out, ignore_errors=True)
        os.unlink(report)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"run with {n} batches exited {p.returncode}")
    s = json.loads(p.stdout.strip().splitlines()[-1])
    mb = peak.get("VmHWM", peak["ru_maxrss_mb"])
    return {"batches": n, "kernel": a.kernel, "rows": a.rows, "cols": a.cols, "workers": a.workers,
            "output": not a.no_output, "main_peak_rss_mb": round(mb, 1),
            "ru_maxrss_mb": round(peak["ru_maxrss_mb"], 1),
            "output_gb": round(out_bytes / 1e9, 2), "completed": s["completed"], "wall_s": round(wall, 1),
            "run_wall_s": s["wall_s"], "batches_per_s": s["batches_per_s"], "main_pid": s["main_pid"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="200,2000", help="comma list of batch counts (default 200,2000)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kernel", default="fft")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--no-output", action="store_true", help="the same job without --output")
    ap.add_argument("--dir", default=None, help="parent of the output dirs (default: the temp dir)")
    ap.add_argument("--json", metavar="PATH", dest="json_path", help="also write all the results here")
    ap.add_argument("--limit-mb", type=float, default=1024.0, help="the ceiling for the verdict (1 GB)")
    a = ap.parse_args()
    counts = [int(x) for x in a.batches.split(",") if x.strip()]
    if not a.no_output:
        per = OUT_BYTES_PER_BATCH.get(a.kernel, lambda r, c: r * c * 4)(a.rows, a.cols)
        need = max(counts) * per * 1.05 + 2**30
        free = shutil.disk_usage(a.dir or tempfile.gettempdir()).free
        if free < need:
            raise SystemExit(f"{a.dir or tempfile.gettempdir()}: {free / 1e9:.1f} GB free, the largest run "
                             f"needs about {need / 1e9:.1f} GB: pick another --dir")
    runs = []
    for n in counts:
        r = one(n, a)
        print(json.dumps(r), flush=True)
        runs.append(r)
    lo, hi = runs[0], runs[-1]
    growth = hi["main_peak_rss_mb"] / lo["main_peak_rss_mb"] - 1
    flat = growth <= 0.10
    under = all(r["main_peak_rss_mb"] < a.limit_mb for r in runs)
    verdict = {"verdict": "ok" if flat and under else "FAIL",
               "growth_pct": round(100 * growth, 1), "within_10pct": flat,
               f"under_{a.limit_mb:g}_mb": under,
               "per_batch_mb": round((hi["main_peak_rss_mb"] - lo["main_peak_rss_mb"])
                                     / max(1, hi["batches"] - lo["batches"]), 4)}
    print(json.dumps(verdict), flush=True)
    if a.json_path:
        meta = {"command": " ".join(["python", "scripts/bench_rss.py"] + sys.argv[1:]),
                "python": sys.version.split()[0], "cores": os.cpu_count()}
        with open(a.json_path, "w") as f:
            json.dump({"meta": meta, "runs": runs, "verdict": verdict}, f, indent=1)
            f.write("\n")
    return 0 if flat and under else 1


if __name__ == "__main__":
    raise SystemExit(main())
