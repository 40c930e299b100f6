"""Calibration and roofline: each stage timed alone, and the best throughput the slowest one allows."""
from __future__ import annotations

import time

import torch

from .. import devices, fields, kernels
from ..compute import Computer
from ..config import Config


def calibrate(cfg: Config, spec, src, counts: list[int], build_lists: list[int] | None = None, k: int = 4,
              procs: int = 0, repeat: int = 1) -> dict:
    """Per-batch seconds of each stage alone, measured here: the main's build on the build threads each
    worker count gets (in parallel, into buffers already faulted in, as slots are; on one thread too for
    ``procs`` build processes; the best of ``repeat`` tries, the thread counts taking turns: a shared
    machine's slow moments don't set the roofline, nor one count's), the kernel on one worker's threads
    (on CUDA: on a device-resident batch), and host-to-device from pinned memory."""
    cuda = _cuda(cfg)
    threads_needed = {_build_threads(cfg, w, cuda, b) for w in counts for b in {0, *(build_lists or [])}}
    tries: dict[int, list[float]] = {t: [] for t in sorted(threads_needed | ({1} if procs else set()))}
    for _ in range(max(1, repeat)):
        for t, seconds in tries.items():
            seconds.append(_build_rate(src, t))
    build = {t: min(seconds) for t, seconds in tries.items()}
    batches = list(src)[:k]
    out = batches[0].array()
    device = devices.choose(cfg.workers.device, 0)
    per_worker = {}
    for threads in sorted({cfg.replace(**{"workers.count": w}).threads_per_worker() for w in counts}):
        with devices.torch_threads(threads):
            computer = Computer(spec, device, cfg.handoff.pinned)
            x = fields.map_fields(lambda a: torch.from_numpy(a).to(device), out)
            computer.kernel(x)  # warm-up: lazy weights, allocator
            _sync(device)
            t0, calls = time.perf_counter(), 0
            while not calls or (time.perf_counter() - t0 < 0.01 and calls < 1000):  # (quick kernels: more
                for b in batches:  # calls, so that the clock's resolution and one slow call don't decide)
                    kernels.current.update(index=b.index, attempt=1)
                    computer.kernel(x)
                calls += len(batches)
            _sync(device)
            per_worker[threads] = (time.perf_counter() - t0) / calls
    h2d = None
    if device.type == "cuda":
        xs = [torch.from_numpy(a).pin_memory() for a in fields.flatten(out)]
        for x in xs:
            x.to(device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(k):
            for x in xs:
                x.to(device, non_blocking=True)
        torch.cuda.synchronize()
        h2d = (time.perf_counter() - t0) / k
    return {"batch_bytes": fields.nbytes(out), "build_s_by_threads": build, "build_s": build[min(build)],
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


def _build_rate(src, threads: int, per: int = 3, least_s: float = 0.01) -> float:
    """Seconds per batch of the main's build on ``threads`` threads at once (each into its own buffer,
    faulted in first, as a slot that is reused): the build stage's cost per batch at that parallelism. A
    batch known only once built (a collate) is built apart, as the build threads do before their copy.
    Each thread builds ``per`` batches, more for quick ones (``least_s`` of builds at least), timed from
    when they all start: a tiny batch's build is not measured as the cost of starting a thread."""
    import threading
    n = len(src)
    bufs = [src.batch(i % n).array() for i in range(threads)]

    def build(t: int, i: int) -> None:
        b = src.batch(i % n)
        if b.fill is None:
            b.produce()
        else:
            b.fill(bufs[t])
    t0 = time.perf_counter()
    build(0, 0)
    per = max(per, min(10_000, int(least_s / max(time.perf_counter() - t0, 1e-7))))
    go = threading.Barrier(threads + 1)

    def fill(t):
        go.wait()
        for j in range(per):
            build(t, t * per + j)
    workers = [threading.Thread(target=fill, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    go.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    return (time.perf_counter() - t0) / (threads * per)


def bound(cal: dict, cfg: Config, workers: int, build_threads: int = 0, procs: int = 0) -> tuple[float, str]:
    """The best throughput the slowest stage allows, and that stage's name: the main's build on its build
    threads (the fill into the slot is the only copy the main makes), or with ``procs`` build processes
    one thread's build times the processes the cores can run; the kernel on the usable workers
    (CPU: cores // threads; CUDA: the GPUs, whose copy engines overlap the kernel, so the slower of the
    kernel and the host-to-device copy)."""
    cuda = cal["device"].startswith("cuda")
    bt = _build_threads(cfg, workers, cuda, build_threads)
    threads = cfg.replace(**{"workers.count": workers}).threads_per_worker()
    by_threads = {int(t): s for t, s in cal["build_s_by_threads"].items()}  # (str keys once through JSON)
    if procs:
        stages = {f"build ({procs} process{'es' if procs > 1 else ''})": min(procs, cal["cores"]) / by_threads[1]}
    else:
        stages = {f"main build ({bt} thread{'s' if bt > 1 else ''})": 1 / by_threads[bt]}
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
