"""``pipeline bench``: the same batches through serial, the pipeline and the peers a user would pick.

Modes (each at every worker count, with the same kernel code and thread cap):
  serial               one process builds and computes (all cores, or --threads-per-worker)
  pipeline             this package: shared-memory slots, spawn workers
  mp.Pool              stdlib spawn ``multiprocessing.Pool.imap``, batches pickled through its pipes
  ProcessPoolExecutor  ``concurrent.futures`` (spawn) ``map``, batches pickled
  pipeline.trace       the pipeline with ``--trace`` (NOTE [ Trace ]), its file written in the timed run,
                       ``--repeat`` times, alternating with as many plain runs on its own workers: what tracing
                       costs, as the median of those pairs (``paired``; not in ``all``); ``--trace FILE``
                       keeps its file, ``--plot`` draws it
  pipeline.procs       the same, a dataset's batches built in build processes (``workers.build_processes``,
                       or the usable CPUs): for a ``__getitem__`` that holds the GIL
  DataLoader           ``torch.utils.data.DataLoader(num_workers=N)``: its workers build the batches,
                       the main process computes (``pin_memory`` on CUDA); on a dataset: its own batching
                       (``batch_size``, ``collate_fn`` = the source's or torch's default, ``drop_last``)
  spdl                 SPDL's thread pipeline (``spdl.pipeline.PipelineBuilder``), if installed: N threads
                       fetch the samples in order (``output_order="input"``), ``aggregate(B)`` and a stack
                       per field (or the source's collate) make the batch, the main process computes
  ray                  this package's Ray backend (one actor per worker, the object store), if installed
  ray.data             Ray Data: the driver's batches in with ``from_numpy_refs``, the kernel in
                       ``map_batches`` on an actor pool of ``workers`` actors, one of our batches per call,
                       results in order (``preserve_order``); if ``ray[data]`` is installed

Every mode runs on the same source: synthetic or file batches, or a dataset (``--source``, with
``--batch-size``): its samples grouped into batches the same way by every mode, so all agree with serial.
``all`` takes pipeline.procs only for a dataset (build processes are for Python in ``__getitem__``), and
leaves ray.data out for one (Ray Data's mode takes one array per batch), saying so.

Both Ray modes run on one local Ray instance, started once per bench (its start-up is part of theirs).

Worker start-up is timed apart and excluded: every mode is warmed up before its timed run. A calibration
measures the stages one at a time (the main's build on the build threads it would use, the kernel on one
worker's threads, host-to-device) and gives the roofline: the best throughput the slowest stage allows.
A mode measured above it means the calibration is off, and the table says so.

The package: this module runs the modes and records their rows (``bench``, ``run_bench``, the serial
reference); ``peers`` holds the local modes, ``ray_modes`` the Ray ones (a mode is one function and one
entry in its module's ``RUNNERS``); ``calibration`` the stages alone and the roofline; ``report`` the table,
the breakdown and the plot.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys

import numpy as np

from .. import devices, fields, kernels
from ..compute import Computer
from ..config import Config
from ..errors import ConfigError, ExitCode
from ..images.folder import ImageSource
from ..outputs import checksum, max_rel_diff
from ..runner import resolve
from ..sources.datasets import MapSource
from ..sources.factory import open_source
from . import images, peers, ray_modes, sequences, text
from .calibration import bound, calibrate, roofline
from .daft_modes import has_daft
from .peers import _timed, has_spdl
from .ray_modes import has_ray, has_ray_data, start_ray
from .report import PLOT_EXTRA, machine, plot, table

RUNNERS = {**peers.RUNNERS, **images.RUNNERS, **ray_modes.RUNNERS}  # mode -> (cfg, spec, src, repeat) -> (results, s, startup, extra)
MODES = ("serial", *RUNNERS)
RAY_MODES = tuple(ray_modes.RUNNERS)
QUICK = {"source.batches": 6, "source.rows": 64, "source.cols": 32}


EXTRAS = {"ray": ("Ray", "ray"), "ray.data": ("Ray Data", "ray"), "spdl": ("SPDL", "spdl"), "daft": ("Daft", "daft"),
          "spdl.io": ("SPDL's decoder (spdl.io, with FFmpeg's libraries)", "spdl")}  # mode -> (what, extra)


def bench(args, overrides: dict) -> int:
    if args.repeat < 1:
        raise ConfigError(f"--repeat {args.repeat}: must be >= 1")
    if args.quick:
        overrides = {**{k: v for k, v in QUICK.items() if k.split(".")[1] not in overrides}, **overrides}
    overrides.setdefault("progress", False)
    counts = _counts(args, overrides)
    if getattr(args, "plot", None) and importlib.util.find_spec("matplotlib") is None:  # (before, not after the run)
        raise ConfigError(PLOT_EXTRA)
    cfg = resolve(args.config, overrides)
    if cfg.source.object == sequences.DATASET:  # the sequence bench (configs/bench-seq.toml)
        return _sequences(args, cfg, counts, sequences)
    if cfg.source.object == text.MARKER:  # the text bench (configs/bench-text.toml)
        return _sequences(args, cfg, counts, text)
    modes = _modes(args.modes, bool(cfg.source.object), cfg.source.kind == "images")  # (a missing extra: now)
    if cfg.source.kind == "images" and not cfg.source.path:  # the image bench: its own set of JPEGs
        cfg, took = images.image_set(cfg)
        print(f"pipeline bench: {cfg.source.path} ({took:.1f} s to make or find)", file=sys.stderr)
    devices.check(cfg.workers.device)
    build_lists = _build_lists(args)
    report = run_bench(cfg, modes, counts, args.repeat, build_lists)
    print(table(report))
    if getattr(args, "plot", None):
        plot(report, args.plot)
        traced = [r for r in report["results"] if r.get("trace")]
        if traced:  # the traced run's timeline beside it (the last one: the most workers)
            from ..timeline import draw
            out = args.plot[:-4] + "-timeline.png" if args.plot.endswith(".png") else args.plot + "-timeline.png"
            draw(traced[-1]["trace"], out)
            print(f"pipeline bench: the timeline of pipeline.trace x{traced[-1]['workers']}: {out}", file=sys.stderr)
    if not cfg.run.trace:  # (pipeline.trace's files of its own, in the temp folder: gone once drawn)
        for r in report["results"]:
            if r.get("trace"):
                with contextlib.suppress(OSError):
                    os.unlink(r.pop("trace"))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=1, default=str)
    bad = [r for r in report["results"] if not r["agrees"]]
    for r in bad:
        print(f"pipeline bench: {r['mode']} x{r['workers']} disagrees with serial: max_rel_diff "
              f"{r['max_rel_diff_vs_serial']:.3g} > {r.get('tolerance', report['tolerance']):g}", file=sys.stderr)
    return ExitCode.FAILED if bad else ExitCode.OK


def _sequences(args, cfg: Config, counts: list[int], bench_module) -> int:
    """``configs/bench-seq.toml`` and ``configs/bench-text.toml``: samples of their own length, every way of
    feeding them (bench/sequences.py, bench/text.py)."""
    if args.quick:
        cfg = cfg.replace(**{"source.params": {**cfg.source.params, "n": 400}})
    known = bench_module.MODES
    if args.modes == "all":
        modes = [m for m in known if (m != "ray.data" or has_ray_data()) and (m != "daft" or has_daft())]
    else:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = [m for m in modes if m not in known]
        if unknown:
            raise ConfigError(f"--modes: unknown mode(s) {', '.join(unknown)} for this bench; known: "
                              f"{', '.join(known)}")
        if "ray.data" in modes and not has_ray_data():
            raise ConfigError("--modes ray.data needs Ray Data: pip install -e '.[ray]'")
        if "daft" in modes and not has_daft():
            raise ConfigError("--modes daft needs Daft: pip install -e '.[daft]'")
    run = sequences.run_seq_bench if bench_module is sequences else text.run_text_bench
    report = run(cfg, modes, max(counts), args.repeat)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=1, default=str)
    print(bench_module.table(report))
    bad = [r for r in report["results"] if not r["agrees"]]
    for r in bad:
        print(f"pipeline bench: {r['mode']} disagrees with serial: max_rel_diff {r['max_rel_diff_vs_serial']:.3g}",
              file=sys.stderr)
    return ExitCode.FAILED if bad else ExitCode.OK


def _modes(text: str, dataset: bool, image_folder: bool = False) -> list[str]:
    """``--modes``: a comma list, or ``all``: every mode whose extra is installed but pipeline.trace (the
    package's own cost of tracing, asked for by name; pipeline.procs only for a dataset; ray.data not for one, with a note; pipeline.device and spdl.io only for an image folder). A
    mode whose extra is missing: ConfigError naming it."""
    present = {"ray": has_ray(), "ray.data": has_ray_data(), "spdl": has_spdl(), "daft": has_daft()}
    if image_folder or "spdl.io" in text:
        why = images.has_spdl_io()
        present["spdl.io"] = why is None
        if why and text == "all":
            print(f"pipeline bench: spdl.io left out of 'all': it can't decode here ({why})", file=sys.stderr)
    if text == "all":
        if dataset and present["ray.data"]:
            print("pipeline bench: ray.data left out of 'all' for a dataset (its mode takes one array per "
                  "batch); ask for it with --modes ray.data", file=sys.stderr)
        return [m for m in MODES if present.get(m, True) and (m != "pipeline.procs" or dataset) and m != "pipeline.trace"
                and not (m == "ray.data" and dataset) and (m not in images.IMAGE_MODES or image_folder)]
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ConfigError(f"--modes: unknown mode(s) {', '.join(unknown)}; known: {', '.join(MODES)}")
    for m in modes:
        if m in images.IMAGE_MODES and not image_folder:
            raise ConfigError(f"--modes {m} is for a folder of images (--input DIR, or configs/bench-images.toml)")
    missing = [m for m in modes if m in present and not present[m]]
    if missing:
        what, extra = EXTRAS[missing[0]]
        raise ConfigError(f"--modes {missing[0]} needs {what}, which is not installed or can't load: "
                          f"pip install -e '.[{extra}]'")
    return modes


def _counts(args, overrides: dict) -> list[int]:
    if args.workers_list:
        try:
            counts = [int(x) for x in args.workers_list.split(",")]
        except ValueError:
            raise ConfigError(f"--workers-list {args.workers_list!r}: expected numbers like 1,2,4") from None
    elif "workers" in overrides:
        counts = [overrides.pop("workers")]
    else:
        counts = [1, 2] if args.quick else [1, 2, 4, devices.usable_cpus()]
    overrides.pop("workers", None)
    if any(c < 1 for c in counts):
        raise ConfigError(f"worker counts must be >= 1, got {counts}")
    return sorted(set(counts))


def _build_lists(args) -> list[int] | None:
    text = getattr(args, "build_threads_list", None)
    if not text:
        return None
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--build-threads-list {text!r}: expected numbers like 1,2") from None
    if any(c < 1 for c in counts):
        raise ConfigError(f"--build-threads-list: counts must be >= 1, got {counts}")
    return counts


def run_bench(cfg: Config, modes: list[str], counts: list[int], repeat: int,
              build_lists: list[int] | None = None) -> dict:
    spec = kernels.spec_for(cfg.kernel.name, dict(cfg.kernel.params), cfg.kernel.precision)
    src = open_source(cfg.source)
    n = len(src)
    batch_bytes, samples = _sizes(src)
    procs = (cfg.workers.build_processes or devices.usable_cpus()) if "pipeline.procs" in modes else 0
    image_folder = isinstance(src, ImageSource)
    if "ray.data" in modes and not image_folder and not isinstance(src.get(0), np.ndarray):
        raise ConfigError("--modes ray.data takes one array per batch; this source's batches are tuples or "
                          "dicts of fields: leave ray.data out (the ray mode takes them)")
    # first, on a quiet machine; for images also on one build thread (the decode's scaling: a goal)
    cal = calibrate(cfg, spec, src, counts, (build_lists or []) + [1] * image_folder or None, procs=procs,
                    repeat=repeat)
    ref, serial_time = _serial(cfg, spec, src, repeat)
    rows = []
    tol = 5e-2 if cfg.source.dtype == "float16" else 1e-3

    def record(mode, workers, results, seconds, startup, extra=None):
        diff = max_rel_diff(results, ref)
        # (a decoder or resampler other than serial's Pillow: its own tolerance, images.DECODE_TOLERANCE)
        within = images.DECODE_TOLERANCE if image_folder and mode in images.IMAGE_MODES else tol
        rows.append({
            "mode": mode, "workers": workers, "batches": n, "seconds": round(seconds, 4),
            "batches_per_s": round(n / seconds, 3), "mb_per_s": round(batch_bytes / seconds / 1e6, 2),
            **({"samples_per_s": round(samples / seconds, 1)} if samples else {}),
            "speedup_vs_serial": round(serial_time / seconds, 3), "startup_s": round(startup, 3),
            "checksum": checksum(results), "max_rel_diff_vs_serial": diff, "agrees": diff <= within,
            "tolerance": within,
            **(extra or {}),
        })

    if "serial" in modes:
        record("serial", 0, ref, serial_time, 0.0)
    # mode by mode, Ray last: its processes take a while to go after ray.shutdown() and would slow the
    # next mode; both Ray modes share one local instance, started once
    ray_init_s = None
    try:
        for mode in sorted((m for m in modes if m != "serial"), key=lambda m: m in RAY_MODES):
            if mode in RAY_MODES and ray_init_s is None:
                ray_init_s = start_ray(cfg, counts)
            runner = RUNNERS[mode]
            for workers in counts:
                for bt in (build_lists or [0]) if mode == "pipeline" else [0]:
                    c = cfg.replace(**{"workers.count": workers, "workers.build_threads": bt,
                                       "workers.build_processes": procs if mode == "pipeline.procs" else 0})
                    results, seconds, startup, extra = runner(c, spec, src, repeat)
                    if mode in RAY_MODES:  # the shared instance's start-up counts for each Ray mode
                        startup, extra = startup + ray_init_s, {**extra, "ray_init_s": round(ray_init_s, 3)}
                    record(mode, workers, results, seconds, startup, extra)
    finally:
        if ray_init_s is not None:
            import ray
            ray.shutdown()
    roof = roofline(cal, cfg, counts)
    for r in rows:
        if r["workers"]:
            b, stage = bound(cal, cfg, r["workers"], r.get("build_threads_asked", 0),
                             procs if r["mode"] == "pipeline.procs" else 0)
            r["roofline_batches_per_s"], r["limiting_stage"] = b, stage
            r["roofline_efficiency"] = round(r["batches_per_s"] / b, 3)
            r["calibration_off"] = r["roofline_efficiency"] > 1.05
        else:
            r["roofline_efficiency"] = None
    report = {"machine": machine(), "config": cfg.to_dict(), "tolerance": tol, "calibration": cal,
              "roofline": roof, "results": rows}
    if image_folder:
        alone = images.decode_alone(src, devices.usable_cpus(), repeat)  # the limit, in this run
        images.shares(rows, alone)
        report["images"] = {"decode_tolerance": images.DECODE_TOLERANCE, "decode_alone": alone,
                            "goals": images.goals(rows, cal, src.batch_size, alone),
                            "kernel_alone_images_per_s": round(src.batch_size / min(cal["kernel_s_by_threads"].values()), 1),
                            "decode_agreement_cpu": images.decode_agreement(cfg)}
    return report


def _sizes(src) -> tuple[int, int | None]:
    """The bytes of all batches (built once to know them when a collate makes them), and the samples of a
    dataset grouped by a batch size (None otherwise)."""
    known = [b.nbytes for b in src]
    nbytes = sum(known) if all(known) else sum(fields.nbytes(src.get(i)) for i in range(len(src)))
    if isinstance(src, MapSource) and src.batch_size:
        return nbytes, sum(src.rows_of(i) for i in range(len(src)))
    return nbytes, None


def _serial(cfg: Config, spec, src, repeat):
    device = devices.choose(cfg.workers.device, 0)
    threads = cfg.workers.threads or devices.usable_cpus()
    with devices.torch_threads(threads):
        computer = Computer(spec, device, cfg.handoff.pinned)
        batches = list(src)
        computer(batches[0].array())  # warm-up: lazy weights, allocator

        def once():
            return [computer(b.array(), b.index)[0] for b in batches]
        return _timed(once, repeat)
