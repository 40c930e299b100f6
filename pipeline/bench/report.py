"""Reporting: the machine, the table, the pipeline's per-batch breakdown and the plot of a bench report."""
from __future__ import annotations

import os
import platform

import torch

from .. import devices
from ..errors import ConfigError


def machine() -> dict:
    import numpy
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "platform": platform.platform(),
            "devices": [torch.cuda.get_device_name(i) for i in range(devices.gpu_count())] or ["cpu"]}


def table(report: dict) -> str:
    cal = report["calibration"]
    m = report["machine"]
    builds = ", ".join(f"{1 / v:.1f}/s on {t} thread{'s' if int(t) > 1 else ''}"
                       for t, v in sorted(cal["build_s_by_threads"].items(), key=lambda kv: int(kv[0])))
    per_sample = any(r.get("samples_per_s") for r in report["results"])
    lines = [f"machine: {m['cpus']} cpus, {', '.join(m['devices'])}, torch {m['torch']}, "
             f"python {m['python']}",
             f"batch {cal['batch_bytes'] / 1e6:.2f} MB; the main builds {builds}",
             f"{'mode':<20}{'workers':>8}{'build':>6}{'batch/s':>10}{'MB/s':>10}"
             + (f"{'samples/s':>11}" if per_sample else "")
             + f"{'speedup':>9}{'startup s':>10}{'roofline':>10}{'rel diff':>10}"]
    for r in report["results"]:
        eff = f"{r['roofline_efficiency']:.0%}" if r.get("roofline_efficiency") else "-"
        build = f"{r['build_processes']}p" if r.get("build_processes") else r.get("build_threads") or "-"
        lines.append(f"{r['mode']:<20}{r['workers']:>8}{build:>6}"
                     f"{r['batches_per_s']:>10.2f}{r['mb_per_s']:>10.1f}"
                     + (f"{r.get('samples_per_s', 0):>11.1f}" if per_sample else "")
                     + f"{r['speedup_vs_serial']:>8.2f}x{r['startup_s']:>10.2f}{eff:>10}"
                     f"{r['max_rel_diff_vs_serial']:>10.1e}")
    seen = set()
    for r in report["results"]:
        key = (r["workers"], r.get("roofline_batches_per_s"), r.get("limiting_stage"))
        if r["workers"] and key not in seen:
            seen.add(key)
            lines.append(f"roofline at {r['workers']} worker(s): {r['roofline_batches_per_s']} batches/s, "
                         f"limited by {r['limiting_stage']}")
    for r in report["results"]:
        if r["mode"] == "pipeline" and r.get("breakdown_ms_per_batch"):
            lines.append(f"pipeline x{r['workers']} (build {r.get('build_threads')}) ms/batch: "
                         + breakdown_text(r["breakdown_ms_per_batch"])
                         + (f"; host-to-device {r['h2d_gbps']} GB/s"
                            f"{' from the slots' if r.get('h2d_from_slot') else ''}" if r.get("h2d_gbps") else ""))
    for r in report["results"]:  # what --trace costs: paired runs (bench/paired.py), not this row against another
        if r.get("trace_overhead") is not None:
            lo, hi, n = *r["trace_overhead_interval"], r["trace_pairs"]
            lines.append(f"pipeline.trace x{r['workers']}: --trace costs {r['trace_overhead']:+.1%} (95% interval "
                         f"{lo:+.1%} .. {hi:+.1%}), the median of {n} pair{'s' * (n > 1)} of runs on its own "
                         f"workers, traced and plain alternating ({r['batches'] / r['trace_plain_s']:.2f} "
                         f"batches/s plain); its file's write: {r['trace_write_ms']:.1f} ms"
                         + ("; --repeat 15 or more for a figure that noise moves less" if n < 15 else ""))
    if report.get("images"):  # the image bench: --decode device's pixels vs main's, and the goals
        im = report["images"]
        a = im["decode_agreement_cpu"]
        lines.append(f"--decode device vs main on the CPU, {a['images']} images: max {a['max_abs']} grey levels, "
                     f"mean {a['mean_abs']}; rows with another decoder agree within {im['decode_tolerance']:g}")
        alone = im.get("decode_alone")
        if alone:  # the limit: the decoder alone on every core, and each row's share of it
            lines.append(f"the decoder alone ({alone['decoder']}, {alone['threads']} threads, bytes in memory): "
                         f"{alone['images_per_s']} images/s; share of it: " + ", ".join(
                             f"{r['mode']} x{r['workers']} {r['share_of_decode_alone']:.0%}"
                             for r in report["results"] if r.get("share_of_decode_alone")))
        lines += [f"goal {k:<20}{v['measured']:>7.2f}  (>= {v['goal']})  {'met' if v['met'] else 'MISSED'}"
                  for k, v in im["goals"].items()]
    for r in report["results"]:  # tiny batches: the roofline's stages are not what limits
        b, eff = r.get("breakdown_ms_per_batch") or {}, r.get("roofline_efficiency")
        own = sum(b.get(k, 0.0) for k in ("build_ms", "dispatch_ms", "receive_ms")) / 1000
        if r["mode"] == "pipeline" and eff and eff < 0.5 and r["batches_per_s"] and own * r["batches_per_s"] > 0.5:
            lines.append(f"note: pipeline x{r['workers']} ran at {eff:.0%} of the roofline: a batch took "
                         f"{1e6 / r['batches_per_s']:.0f} us, {own * 1e6:.0f} us of it the main's own work (build, "
                         f"dispatch, receive): batches this small are bounded by their fixed cost, which the "
                         f"stages measured alone leave out; larger batches (--rows) spread it")
    off = [r for r in report["results"] if r.get("calibration_off")]
    for r in off:
        lines.append(f"warning: {r['mode']} x{r['workers']} ran at {r['roofline_efficiency']:.0%} of the roofline: "
                     f"the calibration is off (a stage measured alone ran slower than in the pipeline)")
    return "\n".join(lines)


def breakdown_text(b: dict) -> str:
    """The per-batch breakdown in three groups: the main's own work, the worker's, and waits."""
    main = ("build", "dispatch", "receive", "write")
    work = ("decode", "stage", "h2d", "compute", "d2h")
    waits = ("slot_wait", "worker_wait", "idle", "return", "order_wait")

    def part(keys):
        return ", ".join(f"{k} {b[k + '_ms']}" for k in keys if k + "_ms" in b)
    return f"main [{part(main)}] worker [{part(work)}] waits [{part(waits)}]"


PLOT_EXTRA = "--plot needs matplotlib: pip install -e '.[plot]'"


def plot(report: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(PLOT_EXTRA) from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = report["results"]
    for mode in dict.fromkeys(r["mode"] for r in rows if r["mode"] != "serial"):
        pts = [(r["workers"], r["batches_per_s"]) for r in rows if r["mode"] == mode]
        ax.plot(*zip(*pts), marker="o", label=mode)
    serial = [r["batches_per_s"] for r in rows if r["mode"] == "serial"]
    if serial:
        ax.axhline(serial[0], color="grey", linestyle="--", label="serial")
    roof = report["roofline"]["bound_batches_per_s"]
    ax.plot([int(w) for w in roof], list(roof.values()), color="black", linestyle=":", label="roofline")
    cfg = report["config"]["source"]
    what = (f"{cfg['image_size']}px images, batches of {cfg['batch_size']}" if cfg["kind"] == "images"
            else f"{cfg['rows']}x{cfg['cols']} {cfg['dtype']}")
    ax.set(xlabel="workers", ylabel="batches/s",
           title=f"{report['config']['kernel']['name']}, {what} "
                 f"({', '.join(report['machine']['devices'])}, {report['machine']['cpus']} cpus)")
    ax.set_xticks(sorted({r["workers"] for r in rows if r["workers"]}))
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
