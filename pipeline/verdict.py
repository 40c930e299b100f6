"""The summary's ``bottleneck``: each stage's busy share of the run, the stage that limits, and what to change.

NOTE [ Verdict ]
From the run's per-batch breakdown (measured on every run, traced or not), each stage's busy fraction of
the steady wall (after the workers' start-up), against what that stage has to work with:
  build    the build threads' (or processes') time / (wall x threads); a build that holds the GIL
           (``BuildSide.gil_note``) is one interpreter's worth: its CPU time / wall
  workers  decode + staging + host-to-device + compute + device-to-host / (wall x workers), named after
           its largest part (``compute``, ``h2d``, ``decode``)
  main     the supervisor's own work (dispatching, receiving results, builds it does itself) / wall
  output   writing ``--output`` (the consumer's thread) / wall
The stage with the largest share limits; without it the run could go ``gain`` times faster before the
next one limits (the ratio of the two shares: a bound, not a promise). When no stage is busy half the
time, batches waited between stages (too few in flight), or start-up took the run. A build whose threads
ran but in turns is GIL-bound only when start-up was under 30% of the wall (builds beside the workers'
imports of torch wait for the CPU, not the GIL). The advice names the
one flag to change for that stage. On CUDA the GPU's own utilisation, sampled through NVML while the run
ran (``nvidia-ml-py``, optional), sits beside the package's figure (compute time / wall per worker).
"""
from __future__ import annotations

import threading

from . import devices

BUSY = 0.5  # below this share, no stage limits: batches wait between stages


def bottleneck(s: dict, gil: str | None = None, gpu: dict | None = None) -> dict | None:
    """The verdict for summary ``s`` (``summary.Tally.summary``'s), or None when there is nothing to judge
    (no batch computed, or the serial mode: one thread does every stage)."""
    b = s.get("breakdown_ms_per_batch")
    done = s["completed"] - s.get("skipped", 0)
    if not b or done <= 0 or not s.get("workers"):
        return None
    tot = {k[:-3]: v * done / 1000 for k, v in b.items()}  # seconds over the run
    steady = max(s["wall_s"] - (s.get("startup_s") or 0.0), 1e-6)
    workers = max(1, len(s["workers"]))
    h = s.get("handoff") or {}
    threads = max(1, h.get("build_threads") or 1)
    inline = min(1.0, (h.get("built_inline") or 0) / done)  # builds the supervisor did itself
    build = tot.get("build", 0.0)
    busy = {"build": build * (1 - inline) / (steady * threads)}
    parts = {"compute": tot.get("compute", 0.0) + tot.get("d2h", 0.0),
             "h2d": tot.get("h2d", 0.0) + tot.get("stage", 0.0), "decode": tot.get("decode", 0.0)}
    part = max(parts, key=parts.get)
    busy[part] = sum(parts.values()) / (steady * workers)
    busy["main"] = (tot.get("dispatch", 0.0) + tot.get("receive", 0.0) + build * inline) / steady
    busy["output"] = tot.get("write", 0.0) / steady
    if gil:
        busy["build"] = max(busy["build"], min(1.0, tot.get("build_cpu", 0.0) / steady))
    busy = {k: round(min(v, 1.0), 3) for k, v in busy.items()}
    ranked = sorted(busy, key=busy.get, reverse=True)
    gil = gil if gil and ranked[0] not in ("output", "compute") else None  # (the workers it saw wait may
    if gil:  # have waited for the output) the GIL note saw workers wait for builds that did not scale: the build
        ranked.remove("build")
        ranked.insert(0, "build")
    stage, then = ranked[0], ranked[1]
    cuda = "cuda" in (s.get("device") or "")
    limits = busy[stage] >= BUSY or bool(gil)
    out = {"stage": stage if limits else "none", "busy": busy}
    if limits:
        out.update(gain=round(min(10.0, busy[stage] / max(busy[then], 0.1)), 2), then=then)
    out["advice"] = _advice(out["stage"], s, tot, steady, threads, workers, gil, cuda)
    if cuda:
        out["gpu_util"] = gpu or {"source": "package", "util": busy.get("compute", busy[part])}
    return out


def _advice(stage: str, s: dict, tot: dict, steady: float, threads: int, workers: int, gil: str | None,
            cuda: bool) -> str:
    build = tot.get("build", 0.0)
    cores = devices.usable_cpus()
    cfg = s.get("config") or {}
    images = (cfg.get("source") or {}).get("kind") == "images"
    if stage == "build":
        if gil:
            return gil
        cpus = tot.get("build_cpu", 0.0) / steady
        ran = tot.get("build_cpu", 0.0) / max(build, 1e-9)  # of the threads' time, the share they ran
        if threads >= 2 and 0.15 <= ran < 0.8 and cpus <= 1.25 and s.get("startup_s", 0) < 0.3 * s["wall_s"]:  # they ran, but in turns: the GIL (I/O: ~0)
            return (f"the build threads took turns: {threads} threads ran {ran:.0%} of their time, {cpus:.1f} "
                    f"CPUs between them: the source holds the GIL (Python in __getitem__); build in processes "
                    f"instead: --build-processes {min(threads, cores)}")
        if cpus < 0.75 * threads:  # the threads mostly wait (I/O, sleep): more of them overlap it
            return (f"the build threads waited more than they computed ({cpus:.1f} CPUs busy for {threads} "
                    f"threads: I/O or sleeps): more of them: --build-threads {2 * threads}")
        if threads < cores:
            return f"the build uses {cpus:.1f} CPUs of {cores}: --build-threads {cores}"
        return (f"the build uses every core ({cpus:.1f} CPUs): "
                + ("decode on the GPU: --decode device" if images and cuda else
                   "more cores, or more machines: --backend ray"))
    if stage == "compute":
        more = f"more workers: --workers {workers * 2} (or more devices: --device cuda, --backend ray)"
        if cuda and s.get("precision") in ("fp32", None):
            return f"the kernel limits: --precision bf16, or {more}"
        return f"the kernel limits: {more}"
    if stage == "h2d":
        return ("host-to-device copies limit: send fewer bytes (uint8 fields, normalised on the device"
                + ("; --decode device sends the JPEG bytes" if images else "") + ")")
    if stage == "decode":
        return f"decoding on the workers limits: more workers (--workers {workers * 2}) or --decode main"
    if stage == "main":
        return ("the main's own work per batch (dispatching, receiving results) limits: larger batches "
                "(--batch-size, --rows) share it over more rows")
    if stage == "output":
        return "writing the output limits: a faster disk for --output (a local SSD, then copy)"
    wall, startup = s["wall_s"], s.get("startup_s") or 0.0
    if wall and startup > 0.5 * wall:
        return (f"no stage was busy half the run; start-up took {startup / wall:.0%} of it: more batches per "
                f"run, or keep the workers (pipeline.Pipeline)")
    slots = (s.get("handoff") or {}).get("slots") or 0
    return (f"no stage was busy half the run: batches waited between stages; more in flight: "
            f"--in-flight {max(4, 2 * slots)}")


def line(v: dict) -> str:
    """The verdict in one line, for the human summary."""
    shares = ", ".join(f"{k} {x:.0%}" for k, x in sorted(v["busy"].items(), key=lambda kv: -kv[1]))
    head = (f"{v['stage']} (busy: {shares}); without it up to {v['gain']}x before {v['then']} limits"
            if v["stage"] != "none" else f"none (busy: {shares})")
    gpu = v.get("gpu_util")
    if gpu:
        head += f"; GPU utilisation {gpu['util']:.0%} ({gpu['source']})"
    return f"{head}\n             advice: {v['advice']}"


class GpuSampler:
    """The GPUs' own utilisation through NVML (``nvidia-ml-py``), sampled every ``period`` s on a thread
    while a CUDA run runs; ``stop`` returns ``{"source": "nvml", "util": mean, "per_gpu": [...]}``, or None
    without NVML (not installed, no driver): the verdict then shows the package's own figure."""

    def __init__(self, period: float = 0.1):
        self.period = period
        self.samples: list[list[int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.nvml = None
        try:
            import pynvml
            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.nvml = pynvml
        except Exception:  # noqa: BLE001 - not installed, no driver, no device: the package's figure
            return
        self._thread = threading.Thread(target=self._sample, name="pipeline-nvml", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.samples.append([self.nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles])
            except Exception:  # noqa: BLE001 - a driver hiccup: that sample is skipped
                pass

    def stop(self) -> dict | None:
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        try:
            self.nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
        if not self.samples:
            return None
        per = [sum(col) / len(col) / 100 for col in zip(*self.samples)]
        return {"source": "nvml", "util": round(sum(per) / len(per), 3), "per_gpu": [round(p, 3) for p in per]}
