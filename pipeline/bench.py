"""``pipeline bench``: the same batches through serial, the pipeline and the peers a user would pick.

Modes (each at every worker count, with the same kernel code and thread cap):
  serial               one process builds and computes (all cores, or --threads-per-worker)
  pipeline             this package: shared-memory slots, spawn workers
  mp.Pool              stdlib spawn ``multiprocessing.Pool.imap``, batches pickled through its pipes
  ProcessPoolExecutor  ``concurrent.futures`` (spawn) ``map``, batches pickled
  DataLoader           ``torch.utils.data.DataLoader(num_workers=N)``: its workers build the batches,
                       the main process computes (``pin_memory`` on CUDA)
  ray                  this package's Ray backend (one actor per worker, the object store), if installed
  ray.data             Ray Data: the driver's batches in with ``from_numpy_refs``, the kernel in
                       ``map_batches`` on an actor pool of ``workers`` actors, one of our batches per call,
                       results in order (``preserve_order``); if ``ray[data]`` is installed

Both Ray modes run on one local Ray instance, started once per bench (its start-up is part of theirs).

Worker start-up is timed apart and excluded: every mode is warmed up before its timed run. A calibration
measures the stages one at a time (the main's build on the build threads it would use, the kernel on one
worker's threads, host-to-device) and gives the roofline: the best throughput the slowest stage allows.
A mode measured above it means the calibration is off, and the table says so.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np
import torch

from . import devices, kernels
from .config import Config
from .errors import ConfigError, ExitCode
from .outputs import max_rel_diff  # noqa: F401 - pipeline.bench.max_rel_diff, as before; works on structures
from .runner import checksum, make_executor, make_source, resolve
from .sources import Work
from .worker import Computer

MODES = ("serial", "pipeline", "mp.Pool", "ProcessPoolExecutor", "DataLoader", "ray", "ray.data")
RAY_MODES = ("ray", "ray.data")
QUICK = {"source.batches": 6, "source.rows": 64, "source.cols": 32}


def bench(args, overrides: dict) -> int:
    present = {"ray": _has_ray(), "ray.data": _has_ray_data()}
    modes = ([m for m in MODES if present.get(m, True)] if args.modes == "all"
             else [m.strip() for m in args.modes.split(",") if m.strip()])
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ConfigError(f"--modes: unknown mode(s) {', '.join(unknown)}; known: {', '.join(MODES)}")
    missing = [m for m in modes if m in present and not present[m]]
    if missing:
        raise ConfigError(f"--modes {','.join(missing)} needs Ray Data: pip install -e '.[ray]'"
                          if "ray.data" in missing else "--modes ray needs Ray: pip install -e '.[ray]'")
    if args.repeat < 1:
        raise ConfigError(f"--repeat {args.repeat}: must be >= 1")
    if args.quick:
        overrides = {**{k: v for k, v in QUICK.items() if k.split(".")[1] not in overrides}, **overrides}
    overrides.setdefault("progress", False)
    counts = _counts(args, overrides)
    cfg = resolve(args.config, overrides)
    devices.check(cfg.workers.device)
    build_lists = _build_lists(args)
    report = run_bench(cfg, modes, counts, args.repeat, build_lists)
    print(table(report))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=1, default=str)
    if getattr(args, "plot", None):
        plot(report, args.plot)
    bad = [r for r in report["results"] if not r["agrees"]]
    for r in bad:
        print(f"pipeline bench: {r['mode']} x{r['workers']} disagrees with serial: max_rel_diff "
              f"{r['max_rel_diff_vs_serial']:.3g} > {report['tolerance']:g}", file=sys.stderr)
    return ExitCode.FAILED if bad else ExitCode.OK


def _has_ray() -> bool:
    import importlib.util
    return importlib.util.find_spec("ray") is not None


def _has_ray_data() -> bool:
    import importlib.util
    return _has_ray() and all(importlib.util.find_spec(m) is not None for m in ("pyarrow", "pandas"))


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
    src = make_source(cfg.source)
    n = len(src)
    batch_bytes = sum(b.nbytes for b in src)
    cal = calibrate(cfg, spec, src, counts, build_lists)  # first, on a quiet machine: peers' processes may linger
    ref, serial_time = _serial(cfg, spec, src, repeat)
    rows = []
    tol = 5e-2 if cfg.source.dtype == "float16" else 1e-3

    def record(mode, workers, results, seconds, startup, extra=None):
        diff = max_rel_diff(results, ref)
        rows.append({
            "mode": mode, "workers": workers, "batches": n, "seconds": round(seconds, 4),
            "batches_per_s": round(n / seconds, 3), "mb_per_s": round(batch_bytes / seconds / 1e6, 2),
            "speedup_vs_serial": round(serial_time / seconds, 3), "startup_s": round(startup, 3),
            "checksum": checksum(results), "max_rel_diff_vs_serial": diff, "agrees": diff <= tol,
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
                ray_init_s = _start_ray(cfg, counts)
            runner = {"pipeline": _pipeline, "mp.Pool": _pool, "ProcessPoolExecutor": _executor,
                      "DataLoader": _dataloader, "ray": _ray, "ray.data": _ray_data}[mode]
            for workers in counts:
                for bt in (build_lists or [0]) if mode == "pipeline" else [0]:
                    c = cfg.replace(**{"workers.count": workers, "workers.build_threads": bt})
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
            b, stage = bound(cal, cfg, r["workers"], r.get("build_threads_asked", 0))
            r["roofline_batches_per_s"], r["limiting_stage"] = b, stage
            r["roofline_efficiency"] = round(r["batches_per_s"] / b, 3)
            r["calibration_off"] = r["roofline_efficiency"] > 1.05
        else:
            r["roofline_efficiency"] = None
    return {"machine": machine(), "config": cfg.to_dict(), "tolerance": tol, "calibration": cal,
            "roofline": roof, "results": rows}


def _timed(fn, repeat: int):
    """Median over ``repeat`` timed calls of fn() -> results."""
    times, results = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        results = fn()
        times.append(time.perf_counter() - t0)
    return results, statistics.median(times)


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


def _start_ray(cfg: Config, counts: list[int]) -> float:
    """The local Ray instance both Ray modes use (private: loopback only, no dashboard); its start-up s."""
    from .ray_backend import start_local_ray
    t0 = time.perf_counter()
    start_local_ray(max(os.cpu_count() or 1, max(counts)))
    return time.perf_counter() - t0


class _RayDataCompute:
    """Ray Data's callable class: the same Computer, built once per actor, on the device our Ray backend
    would give it; one call per block, and each block is one of our batches."""

    def __init__(self, spec, device_spec: str, threads: int, pinned: bool):
        torch.set_num_threads(threads)
        use_cuda = device_spec.startswith("cuda") or (device_spec == "auto" and devices.gpu_count())
        self.computer = Computer(spec, devices.choose("cuda" if use_cuda else "cpu", 0), pinned)

    def __call__(self, batch: dict) -> dict:
        out = self.computer(batch["data"])[0]
        return {"out": np.expand_dims(out, 0)}  # one row per batch: our result, whatever its shape


def _ray_data(cfg, spec, src, repeat):
    """One Ray Data execution streams the warm-up batches, then ``repeat`` passes over the batches: its
    actor pool starts once (start-up = until the warm-up's last result), as the other modes' workers do.
    A pass's time = building and putting the batches in the driver (``from_numpy`` does that before it
    executes) + the span between its last result and the previous pass's."""
    import logging

    import ray
    import ray.data  # noqa: F401 - ray.data.from_numpy_refs below
    log = logging.getLogger("ray.data")
    level = log.level
    log.setLevel(logging.ERROR)  # its per-execution INFO lines and the "progress bars disabled" note
    try:
        with warnings.catch_warnings():  # Ray Data's DataContext warns about its own deprecated fields
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            return _ray_data_run(cfg, spec, src, repeat)
    finally:
        log.setLevel(level)


def _ray_data_run(cfg, spec, src, repeat):
    import ray
    import ray.data
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # results in batch order, for the checksum
    ctx.enable_progress_bars = False
    t0 = time.perf_counter()
    batches = list(src)
    refs = [ray.put(b.array()) for b in batches]  # the driver builds them, as for every mode
    put_s = time.perf_counter() - t0
    warm = refs[: 2 * cfg.workers.count]
    opts = {"num_cpus": 1}
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.workers.device.startswith("cuda") or (cfg.workers.device == "auto" and gpus):
        opts["num_gpus"] = min(1.0, gpus / cfg.workers.count)
    ds = ray.data.from_numpy_refs(warm + refs * repeat).map_batches(
        _RayDataCompute, fn_constructor_args=(spec, cfg.workers.device, cfg.threads_per_worker(),
                                              cfg.handoff.pinned),
        compute=ray.data.ActorPoolStrategy(size=cfg.workers.count), batch_size=None,
        batch_format="numpy", zero_copy_batch=True, **opts)
    t0 = time.perf_counter()
    outs, stamps = [], []
    for row in ds.iter_rows():
        outs.append(row["out"])
        stamps.append(time.perf_counter())
    n, w = len(batches), len(warm)
    startup = stamps[w - 1] - t0
    ends = [stamps[w - 1]] + [stamps[w + (k + 1) * n - 1] for k in range(repeat)]
    seconds = statistics.median(put_s + b - a for a, b in zip(ends, ends[1:]))
    return outs[-n:], seconds, startup, {"threads_per_worker": cfg.threads_per_worker(),
                                         "put_s": round(put_s, 4)}


def _ray(cfg, spec, src, repeat):
    return _pipeline(cfg.replace(**{"run.backend": "ray"}), spec, src, repeat)


def _pipeline(cfg, spec, src, repeat):
    def work(batches):
        return Work(batches, getattr(src, "batch", None), getattr(src, "max_nbytes", None))

    with make_executor(cfg, spec) as ex:
        warm = list(src)[: 2 * cfg.workers.count]  # every worker sets its kernel up before timing
        for _ in ex.stream(work(warm), ordered=False):
            pass

        figures: dict = {}

        def once():
            got = {o.index: o.result for o in ex.stream(work(src), ordered=False)}
            figures.update(ex.figures)
            return [got[i] for i in range(len(got))]
        results, seconds = _timed(once, repeat)
        n = len(results)
        extra = {"breakdown_ms_per_batch": {k.replace("_s", "_ms"): round(v / n * 1000, 3)  # last run
                                            for k, v in ex.breakdown.items()},
                 "threads_per_worker": ex.threads, "h2d_gbps": figures.get("h2d_gbps"),
                 "pickled_fallbacks": figures.get("pickled_fallbacks")}
        extra.update(build_threads=figures.get("build_threads"), build_threads_asked=cfg.workers.build_threads,
                     slots=figures.get("slots"), h2d_from_slot=figures.get("h2d_from_slot"))
        return results, seconds, ex.startup_s, extra


# -- peers: the kernel is built once per worker process, as in the pipeline ----------------------------
_peer: dict = {}


def _peer_init(spec, device_spec, threads, pinned):
    torch.set_num_threads(threads)
    device = devices.choose(device_spec, (mp.current_process()._identity or (1,))[0] - 1)
    _peer["computer"] = Computer(spec, device, pinned)


def _peer_compute(item: tuple[int, np.ndarray]) -> np.ndarray:
    index, arr = item
    return _peer["computer"](arr, index)[0]


def _peer_args(cfg):
    return (cfg.workers.device, cfg.threads_per_worker(), cfg.handoff.pinned)


def _pool(cfg, spec, src, repeat):
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    with devices.thread_env(cfg.threads_per_worker()):
        pool = ctx.Pool(cfg.workers.count, _peer_init, (spec, *_peer_args(cfg)))
    try:
        pool.map(_peer_compute, [(b.index, b.array()) for b in list(src)[: 2 * cfg.workers.count]], chunksize=1)
        startup = time.perf_counter() - t0
        results, seconds = _timed(lambda: list(pool.imap(_peer_compute, ((b.index, b.array()) for b in src))), repeat)
    finally:
        pool.terminate()
        pool.join()
    return results, seconds, startup, {"threads_per_worker": cfg.threads_per_worker()}


def _executor(cfg, spec, src, repeat):
    t0 = time.perf_counter()
    with devices.thread_env(cfg.threads_per_worker()):
        ex = cf.ProcessPoolExecutor(cfg.workers.count, mp_context=mp.get_context("spawn"),
                                    initializer=_peer_init, initargs=(spec, *_peer_args(cfg)))
    try:
        list(ex.map(_peer_compute, [(b.index, b.array()) for b in list(src)[: 2 * cfg.workers.count]]))
        startup = time.perf_counter() - t0
        results, seconds = _timed(lambda: list(ex.map(_peer_compute, ((b.index, b.array()) for b in src))), repeat)
    finally:
        ex.shutdown(cancel_futures=True)
    return results, seconds, startup, {"threads_per_worker": cfg.threads_per_worker()}


class _Batches(torch.utils.data.Dataset):
    """The bench's batches as a map-style dataset: DataLoader workers build them."""

    def __init__(self, src):
        if not hasattr(src, "get"):
            raise ConfigError("the DataLoader mode needs a source that can build batch i on its own "
                              "(synthetic or file input)")
        self.src = src

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        return torch.from_numpy(self.src.get(i))


def _dataloader(cfg, spec, src, repeat):
    with warnings.catch_warnings():  # its hint about workers > cores: the bench compares that on purpose
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        return _dataloader_run(cfg, spec, src, repeat)


def _dataloader_run(cfg, spec, src, repeat):
    device = devices.choose(cfg.workers.device, 0)
    t0 = time.perf_counter()
    with devices.thread_env(1):
        loader = torch.utils.data.DataLoader(
            _Batches(src), batch_size=None, num_workers=cfg.workers.count, persistent_workers=True,
            multiprocessing_context="spawn", pin_memory=device.type == "cuda")
    threads = cfg.workers.threads or devices.usable_cpus()
    with devices.torch_threads(threads):
        computer = Computer(spec, device, False)  # DataLoader already pinned the batch
        it = iter(loader)
        computer(next(it).numpy())
        for _ in it:
            pass
        startup = time.perf_counter() - t0

        def once():
            return [computer(x.numpy(), i)[0] for i, x in enumerate(loader)]
        results, seconds = _timed(once, repeat)
    return results, seconds, startup, {"threads_main": threads}


# -- calibration and roofline ----------------------------------------------------------------------------
def calibrate(cfg: Config, spec, src, counts: list[int], build_lists: list[int] | None = None, k: int = 4) -> dict:
    """Per-batch seconds of each stage alone, measured here: the main's build on the build threads each
    worker count gets (in parallel, into buffers already faulted in, as slots are), the kernel on one
    worker's threads (on CUDA: on a device-resident batch), and host-to-device from pinned memory."""
    cuda = _cuda(cfg)
    threads_needed = {_build_threads(cfg, w, cuda, b) for w in counts for b in {0, *(build_lists or [])}}
    build = {t: _build_rate(src, t) for t in sorted(threads_needed)}
    batches = list(src)[:k]
    out = batches[0].array()
    device = devices.choose(cfg.workers.device, 0)
    per_worker = {}
    for threads in sorted({cfg.replace(**{"workers.count": w}).threads_per_worker() for w in counts}):
        with devices.torch_threads(threads):
            computer = Computer(spec, device, cfg.handoff.pinned)
            x = torch.from_numpy(out).to(device)
            computer.kernel(x)  # warm-up: lazy weights, allocator
            _sync(device)
            t0 = time.perf_counter()
            for b in batches:
                kernels.current.update(index=b.index, attempt=1)
                computer.kernel(x)
            _sync(device)
            per_worker[threads] = (time.perf_counter() - t0) / len(batches)
    h2d = None
    if device.type == "cuda":
        x = torch.from_numpy(out).pin_memory()
        x.to(device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(k):
            x.to(device, non_blocking=True)
        torch.cuda.synchronize()
        h2d = (time.perf_counter() - t0) / k
    return {"batch_bytes": batches[0].nbytes, "build_s_by_threads": build, "build_s": build[min(build)],
            "kernel_s_by_threads": per_worker, "h2d_s": h2d, "device": str(device),
            "cores": devices.usable_cpus(), "gpus": devices.gpu_count()}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda(cfg: Config) -> bool:
    return cfg.workers.device.startswith("cuda") or (cfg.workers.device == "auto" and devices.gpu_count() > 0)


def _build_threads(cfg: Config, workers: int, cuda: bool, build_threads: int = 0) -> int:
    """The build threads a run at ``workers`` gets (``build_threads``: asked for; 0: the config's)."""
    c = cfg.replace(**{"workers.count": workers, **({"workers.build_threads": build_threads} if build_threads else {})})
    return min(c.build_threads(cuda), c.in_flight(cuda))


def _build_rate(src, threads: int, per: int = 3) -> float:
    """Seconds per batch of the main's build on ``threads`` threads at once (each into its own buffer,
    faulted in first, as a slot that is reused): the build stage's cost per batch at that parallelism."""
    import threading
    n = len(src)
    bufs = [src.batch(i % n).array() for i in range(threads)]

    def fill(t):
        for j in range(per):
            src.batch((t * per + j) % n).fill(bufs[t])
    workers = [threading.Thread(target=fill, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return (time.perf_counter() - t0) / (threads * per)


def bound(cal: dict, cfg: Config, workers: int, build_threads: int = 0) -> tuple[float, str]:
    """The best throughput the slowest stage allows, and that stage's name: the main's build on its build
    threads (the fill into the slot is the only copy the main makes); the kernel on the usable workers
    (CPU: cores // threads; CUDA: the GPUs, whose copy engines overlap the kernel, so the slower of the
    kernel and the host-to-device copy)."""
    cuda = cal["device"].startswith("cuda")
    bt = _build_threads(cfg, workers, cuda, build_threads)
    threads = cfg.replace(**{"workers.count": workers}).threads_per_worker()
    stages = {f"main build ({bt} thread{'s' if bt > 1 else ''})": 1 / cal["build_s_by_threads"][bt]}
    if cuda:
        gpus = max(1, cal["gpus"])
        stages["kernel on the GPU"] = min(workers, gpus) / cal["kernel_s_by_threads"][threads]
        stages["host-to-device"] = gpus / cal["h2d_s"]
    else:
        usable = min(workers, max(1, cal["cores"] // threads))
        stages["kernel x usable workers"] = usable / cal["kernel_s_by_threads"][threads]
    stage = min(stages, key=stages.get)
    return round(stages[stage], 3), stage


def roofline(cal: dict, cfg: Config, counts: list[int], n: int = 0) -> dict:
    """``bound`` for each worker count, with the automatic build threads."""
    out = {str(w): bound(cal, cfg, w) for w in counts}
    return {"bound_batches_per_s": {w: b for w, (b, _) in out.items()},
            "limiting_stage": {w: s for w, (_, s) in out.items()}}


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
    lines = [f"machine: {m['cpus']} cpus, {', '.join(m['devices'])}, torch {m['torch']}, "
             f"python {m['python']}",
             f"batch {cal['batch_bytes'] / 1e6:.2f} MB; the main builds {builds}",
             f"{'mode':<20}{'workers':>8}{'build':>6}{'batch/s':>10}{'MB/s':>10}{'speedup':>9}{'startup s':>10}"
             f"{'roofline':>10}{'rel diff':>10}"]
    for r in report["results"]:
        eff = f"{r['roofline_efficiency']:.0%}" if r.get("roofline_efficiency") else "-"
        lines.append(f"{r['mode']:<20}{r['workers']:>8}{r.get('build_threads') or '-':>6}"
                     f"{r['batches_per_s']:>10.2f}{r['mb_per_s']:>10.1f}"
                     f"{r['speedup_vs_serial']:>8.2f}x{r['startup_s']:>10.2f}{eff:>10}"
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
    off = [r for r in report["results"] if r.get("calibration_off")]
    for r in off:
        lines.append(f"warning: {r['mode']} x{r['workers']} ran at {r['roofline_efficiency']:.0%} of the roofline: "
                     f"the calibration is off (a stage measured alone ran slower than in the pipeline)")
    return "\n".join(lines)


def breakdown_text(b: dict) -> str:
    """The per-batch breakdown in three groups: the main's own work, the worker's, and waits."""
    main = ("build", "dispatch", "receive")
    work = ("stage", "h2d", "compute", "d2h")
    waits = ("slot_wait", "worker_wait", "idle", "return", "order_wait")

    def part(keys):
        return ", ".join(f"{k} {b[k + '_ms']}" for k in keys if k + "_ms" in b)
    return f"main [{part(main)}] worker [{part(work)}] waits [{part(waits)}]"


def plot(report: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install -e '.[plot]'") from None
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
    ax.set(xlabel="workers", ylabel="batches/s",
           title=f"{report['config']['kernel']['name']}, {cfg['rows']}x{cfg['cols']} {cfg['dtype']} "
                 f"({', '.join(report['machine']['devices'])}, {report['machine']['cpus']} cpus)")
    ax.set_xticks(sorted({r["workers"] for r in rows if r["workers"]}))
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
