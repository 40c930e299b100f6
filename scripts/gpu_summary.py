"""The short table of a `scripts/gpu_check.sh` run: python scripts/gpu_summary.py OUTDIR (Markdown on stdout)."""
import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def best(report, mode):
    rows = [r for r in report["results"] if r["mode"] == mode]
    return max(rows, key=lambda r: r["batches_per_s"]) if rows else None


def bench_rows(name, report):
    if report is None:
        return [f"| {name} | (not run) | | | | |"]
    serial = best(report, "serial")
    pipe, dl, pool = best(report, "pipeline"), best(report, "DataLoader"), best(report, "mp.Pool")

    def cell(r):
        return f"{r['batches_per_s']:.1f} ({r['workers']} w)" if r else "-"
    extra = ""
    if pipe:
        extra = (f"h2d {pipe.get('h2d_gbps')} GB/s{' from the slots' if pipe.get('h2d_from_slot') else ''}, "
                 f"{pipe.get('roofline_efficiency', 0) or 0:.0%} of roofline ({pipe.get('limiting_stage')})")
    ratio = f"{pipe['batches_per_s'] / dl['batches_per_s']:.2f}x" if pipe and dl else "-"
    return [f"| {name} | {cell(serial)} | {cell(pipe)} | {cell(dl)} | {cell(pool)} | {ratio} | {extra} |"]


def main(out):
    lines = []
    tests = os.path.join(out, "tests.log")
    if os.path.exists(tests):
        tail = [x for x in open(tests).read().splitlines() if " passed" in x or " failed" in x]
        lines.append(f"tests: {tail[-1].strip('= ') if tail else '(no summary line)'}")
    lines += ["", "| workload (batches/s) | serial | pipeline best | DataLoader best | mp.Pool best | "
              "pipeline / DataLoader | pipeline notes |", "|---|---|---|---|---|---|---|"]
    for name, fn in (("bench-gpu (64 MB, matmul, cuda)", "bench-gpu.json"),
                     ("bench-handoff (32 MB, sum, cpu)", "bench-handoff.json"),
                     ("file input 64 x 64 MB .npy (cuda)", "bench-file.json")):
        lines += bench_rows(name, load(os.path.join(out, fn)))
    s0, s4 = load(os.path.join(out, "default-serial.json")), load(os.path.join(out, "default-w4.json"))
    if s0 and s4:
        lines += ["", f"default job: serial {s0['batches_per_s']} batches/s; --workers 4: {s4['batches_per_s']} "
                      f"({s4['steady_batches_per_s']} after a {s4['startup_s']} s start-up), "
                      f"{s4['steady_batches_per_s'] / s0['batches_per_s']:.2f}x serial steady; "
                      f"h2d {s4['handoff'].get('h2d_gbps')} GB/s, from the slots: {s4['handoff'].get('h2d_from_slot')}"]
    facts = os.path.join(out, "gpu-facts.md")
    if os.path.exists(facts):
        lines += ["", open(facts).read().strip()]
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu-check")
