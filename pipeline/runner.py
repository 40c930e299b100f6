"""``run``: config + source + kernel -> ordered results and a summary, on the chosen backend."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
from tqdm import tqdm

from . import devices, kernels
from .config import Config, load_config
from .errors import ConfigError
from .handoff import to_host
from .outputs import checksum  # noqa: F401 - pipeline.runner.checksum, as before
from .sinks import open_output
from .sources import length, make_source
from .worker import Computer

# CLI names accepted as ``run(**overrides)`` and on the command line, and the config keys they set.
OVERRIDES = {
    "workers": "workers.count", "batches": "source.batches", "rows": "source.rows",
    "cols": "source.cols", "dtype": "source.dtype", "seed": "source.seed", "kernel": "kernel.name",
    "device": "workers.device", "start_method": "workers.start_method",
    "threads_per_worker": "workers.threads", "progress": "run.progress", "in_flight": "handoff.in_flight",
    "slot_mb": "handoff.slot_mb", "pinned": "handoff.pinned", "max_attempts": "faults.max_attempts",
    "batch_timeout_s": "faults.batch_timeout_s", "on_error": "faults.on_error",
    "input": "source.path", "input_key": "source.key", "output": "run.output",
    "overwrite": "run.overwrite", "backend": "run.backend", "ray_address": "run.ray_address",
}


@dataclass
class RunResult:
    summary: dict
    # in batch order: numpy arrays, or tuples or dicts of them for kernels with several outputs (None for a
    # failed batch)
    results: list = field(default_factory=list)


class Collector:
    """Results in batch order, the checksum, per-worker counts, failures; the output directory if any.

    With a sink (``--output``), batches it already holds are loaded back (``sink.load``) and skipped:
    ``counted`` drops them before they reach a worker, and every new result is written to it as it arrives.
    """

    def __init__(self, total: int | None, progress: bool, sink=None):
        self.results: dict[int, Any] = {i: sink.load(i) for i in sink.restored} if sink else {}
        self.skipped = len(self.results)
        self.sink = sink
        self.failed: list[dict] = []
        self.bytes_in = 0
        self.bar = tqdm(total=total, unit="batch", file=sys.stderr, dynamic_ncols=True,
                        disable=not progress or not sys.stderr.isatty(), initial=self.skipped)

    def counted(self, batches):
        done = set(self.results)
        for b in batches:
            if b.index in done:
                continue  # already in the output directory (resumed)
            self.bytes_in += b.nbytes
            yield b

    def result(self, index: int, arr: np.ndarray, info: dict) -> None:
        if self.sink is not None:
            self.sink.write(index, arr, info)
        self.results[index] = arr
        self.bar.update(1)

    def fail(self, record: dict) -> None:
        self.failed.append(record)
        self.bar.update(1)

    def ordered(self) -> list:
        n = max(list(self.results) + [f["batch"] for f in self.failed], default=-1) + 1
        return [self.results.get(i) for i in range(n)]


def resolve(config: Config | str | os.PathLike | None, overrides: dict[str, Any]) -> Config:
    """A Config from a path, a Config or defaults, plus ``run()``-style overrides (CLI names)."""
    dotted, origins = {}, {}
    for name, value in overrides.items():
        key = OVERRIDES.get(name, name if "." in name else None)
        if key is None:
            from .errors import ConfigError
            raise ConfigError(f"unknown setting '{name}' (known: {', '.join(OVERRIDES)}, "
                              f"or a dotted key such as source.rows)")
        dotted[key], origins[key] = value, f"--{name.replace('_', '-')}" if name in OVERRIDES else f"--set {key}"
    if isinstance(config, Config):
        cfg = config.replace(**dotted) if dotted else config
    else:
        cfg = load_config(config, dotted, origins)
    if cfg.source.path and cfg.source.kind == "synthetic":  # --input PATH implies a file source
        cfg = cfg.replace(**{"source.kind": "npy"})
    return cfg


def run(config: Config | str | os.PathLike | None = None, *, source: Iterable | None = None,
        kernel: str | Callable | None = None, **overrides) -> RunResult:
    """Run the pipeline. ``source``: your own arrays (numpy or CPU tensors) in batch order; ``kernel``:
    a built-in name, ``package.module:name`` or a callable; ``overrides``: CLI names (``workers=2``)."""
    if isinstance(kernel, str):
        overrides["kernel"] = kernel
    cfg = resolve(config, overrides)
    note = devices.check(cfg.workers.device)
    params = to_host(dict(cfg.kernel.params), "kernel param")
    spec = kernels.spec_for(kernel if callable(kernel) else cfg.kernel.name, params)
    if source is not None and cfg.source.path:
        raise ConfigError(f"give either source= (your arrays) or input= (a file), not both "
                          f"(input = {cfg.source.path!r})")
    src = make_source(cfg.source, source)
    total = length(src)
    sink = open_output(cfg.run, src, spec) if cfg.run.output else None  # checked before workers start
    col = Collector(total, cfg.run.progress, sink)
    max_nbytes = getattr(src, "max_nbytes", None)
    src = col.counted(src)
    t0 = time.perf_counter()
    info = {"startup_s": 0.0, "restarts": [], "handoff": None, "breakdown": None, "workers": []}
    try:
        if sink is not None and col.skipped == total:
            pass  # resumed with every batch already in the output directory: no worker to start
        elif cfg.workers.count == 0:
            run_serial(cfg, spec, src, col, info)
        else:
            ex, ok = make_executor(cfg, spec, max_nbytes), False
            if getattr(ex, "relay", None) is not None:
                ex.relay.bar = col.bar  # workers' prints go above the progress bar
            try:
                ex.start()
                info["startup_s"] = ex.startup_s
                info["handoff"] = ex.map(src, col.result, col.fail)
                ok = True
            finally:
                ex.close(graceful=ok)
                info.update(restarts=ex.restarts, breakdown=ex.breakdown or None, workers=ex.worker_info())
        results = col.ordered()
        summary = summarize(cfg, spec, results, col, time.perf_counter() - t0, info, note)
        if sink is not None:
            sink.finish(summary)  # DIR/summary.json: the run finished
    except Exception as e:  # the summary so far travels with the error (``--json`` prints it)
        e.summary = summarize(cfg, spec, col.ordered(), col, time.perf_counter() - t0, info, note,
                              error=f"{type(e).__name__}: {e}")
        raise
    finally:
        col.bar.close()
        if sink is not None:
            sink.close()  # releases the output directory (a no-op after finish)
    return RunResult(summary, results)


def make_executor(cfg: Config, spec, max_nbytes: int | None = None):
    """The backend's executor. Slots are sized for the largest batch when the source knows it."""
    if max_nbytes and not cfg.handoff.slot_mb:
        cfg = cfg.replace(**{"handoff.slot_mb": max_nbytes / 2**20})
    if cfg.run.backend == "ray":
        from .ray_backend import RayExecutor
        return RayExecutor(cfg, spec)
    from .executor import LocalExecutor
    return LocalExecutor(cfg, spec)


def run_serial(cfg: Config, spec, src, col: Collector, info: dict) -> None:
    """``--workers 0``: the same kernel code in this process, under the same thread cap."""
    device = devices.choose(cfg.workers.device, 0)
    me = {"rank": 0, "pid": os.getpid(), "device": str(device), "batches": 0}
    info["workers"] = [me]
    with devices.torch_threads(cfg.threads_per_worker()):
        computer = Computer(spec, device, cfg.handoff.pinned)
        for batch in src:
            out, timings = computer(batch.array(), batch.index)
            col.result(batch.index, out, {"pid": me["pid"], "device": me["device"], **timings})
            me["batches"] += 1


def summarize(cfg: Config, spec, results: list, col: Collector, wall: float, info: dict,
              note: str | None, error: str | None = None) -> dict:
    done = [r for r in results if r is not None]
    n = len(results)
    ran = n - col.skipped  # batches this run handled (the rest were loaded back from --output)
    bytes_in = col.bytes_in
    device_set = sorted({w["device"] for w in info["workers"]})
    breakdown = info["breakdown"]
    if breakdown and len(done) > col.skipped:
        per = len(done) - col.skipped
        breakdown = {k.replace("_s", "_ms"): round(v / per * 1000, 3) for k, v in breakdown.items()}
    return {
        "batches": n,
        "completed": len(done),
        "bytes_in": bytes_in,
        "wall_s": round(wall, 4),
        "startup_s": round(info["startup_s"], 4),
        "skipped": col.skipped,
        "batches_per_s": round(ran / wall, 3) if wall else None,
        "steady_batches_per_s": round(ran / (wall - info["startup_s"]), 3) if wall > info["startup_s"] else None,
        "mb_per_s": round(bytes_in / wall / 1e6, 3) if wall and bytes_in else None,
        "checksum": checksum(results),
        "main_pid": os.getpid(),
        "device": ",".join(device_set),
        "kernel": spec.name,
        "threads_per_worker": cfg.threads_per_worker(),
        "workers": info["workers"],
        "restarts": info["restarts"],
        "failed": col.failed,
        "handoff": info["handoff"],
        "breakdown_ms_per_batch": breakdown,
        "notes": [note] if note else [],
        "error": error,
        "output": col.sink.path if col.sink else None,
        "config": cfg.to_dict(),
    }
