"""The local modes: this package's executor (build threads, or build processes) and the peers a user would
pick instead (``mp.Pool``, ``ProcessPoolExecutor``, DataLoader, SPDL's thread pipeline).

Every mode is ``mode(cfg, spec, src, repeat) -> (results, seconds, startup, extra)``: the results in batch
order, the median seconds of ``repeat`` timed passes, the start-up (workers up and warmed, kept out of
the timing) and a dict of extra fields for its row. Adding a mode: one such function and its entry in
``RUNNERS``. The peers' worker entry points (``_peer_init``, ``_peer_compute``, ``_Batches``) stay at
module level: spawn pickles them by name.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch

from .. import devices
from ..compute import Computer
from ..errors import ConfigError
from ..fields import fields
from ..runner import make_executor
from ..sources.base import Indexed, Work
from ..sources.datasets import MapSource
from ..trace import Recorder
from . import paired


def _timed(fn, repeat: int):
    """Median over ``repeat`` timed calls of fn() -> results."""
    times, results = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        results = fn()
        times.append(time.perf_counter() - t0)
    return results, statistics.median(times)


def _pipeline(cfg, spec, src, repeat, traced: bool = False):
    """The pipeline; ``traced`` (pipeline.trace): ``repeat`` runs with ``--trace`` (a new recorder each, its
    file written in the timed run, as a user's is) alternating with as many without it, on the same warm
    workers (``paired``): its row's seconds are the traced runs', and ``trace_overhead`` their cost."""
    recorder = None
    path = cfg.run.trace or os.path.join(tempfile.gettempdir(), f"pipeline-bench-{os.getpid()}.trace.json")

    with make_executor(cfg, spec) as ex:
        warm = list(src)[: 2 * cfg.workers.count]  # every worker sets its kernel up before timing
        for _ in ex.stream(Work.of(src, warm), ordered=False):
            pass

        figures: dict = {}
        results: list = []
        writes: list[float] = []

        def once(trace: bool = False):
            nonlocal recorder, results
            rec = Recorder(path) if trace else None
            got = {o.index: o.result for o in ex.stream(Work.of(src, trace=rec), ordered=False)}
            if rec is not None:
                t0 = time.perf_counter()
                rec.write()
                writes.append(time.perf_counter() - t0)
                recorder = rec
            figures.update(ex.figures)
            results = [got[i] for i in range(len(got))]
            return results
        if traced:
            without, with_ = paired.alternate(once, repeat)
            seconds, cost = statistics.median(with_), paired.overhead(without, with_)
        else:
            results, seconds = _timed(once, repeat)
        n = len(results)
        extra = {"breakdown_ms_per_batch": {k.replace("_s", "_ms"): round(v / n * 1000, 3)  # last run
                                            for k, v in ex.breakdown.items()},
                 "threads_per_worker": ex.threads, "h2d_gbps": figures.get("h2d_gbps"),
                 "pickled_fallbacks": figures.get("pickled_fallbacks")}
        extra.update(build_threads=figures.get("build_threads"), build_threads_asked=cfg.workers.build_threads,
                     build_processes=figures.get("build_processes"),
                     slots=figures.get("slots"), h2d_from_slot=figures.get("h2d_from_slot"),
                     tasks_per_send=figures.get("tasks_per_send"),
                     answers_per_message=figures.get("answers_per_message"))
        if traced:
            extra.update(trace=recorder.path, trace_events=recorder.recorded,
                         trace_overhead=round(cost["overhead"], 4),
                         trace_overhead_interval=[round(x, 4) for x in cost["interval"]],
                         trace_ratios=[round(x, 4) for x in cost["ratios"]],
                         trace_pairs=cost["pairs"], trace_plain_s=round(statistics.median(without), 4),
                         trace_write_ms=round(statistics.median(writes) * 1e3, 2))
        return results, seconds, ex.startup_s, extra


def _pipeline_traced(cfg, spec, src, repeat):
    """The pipeline with ``--trace`` (NOTE [ Trace ]), paired with plain runs on its own workers."""
    return _pipeline(cfg, spec, src, repeat, traced=True)


# -- peers: the kernel is built once per worker process, as in the pipeline ----------------------------
_peer: dict = {}


def _peer_init(spec, device_spec, threads, pinned):
    torch.set_num_threads(threads)
    device = devices.choose(device_spec, (mp.current_process()._identity or (1,))[0] - 1)
    _peer["computer"] = Computer(spec, device, pinned)


def _peer_compute(item: tuple[int, np.ndarray]) -> np.ndarray:
    index, arr = item
    return _peer["computer"](arr, index)[0]


def kernel_computer(spec, device_spec: str, threads: int, pinned: bool) -> Computer:
    """The kernel's Computer in a peer's own worker (a Ray Data actor, a Daft class instance): ``threads``
    torch threads, the first GPU when ``device_spec`` asks for CUDA or is "auto" with one, else the CPU."""
    torch.set_num_threads(threads)
    use_cuda = device_spec.startswith("cuda") or (device_spec == "auto" and devices.gpu_count())
    return Computer(spec, devices.choose("cuda" if use_cuda else "cpu", 0), pinned)


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
        if not isinstance(src, Indexed):
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
    dataset, options, convert = _loader_args(src)
    with devices.thread_env(1):
        loader = torch.utils.data.DataLoader(
            dataset, num_workers=cfg.workers.count, persistent_workers=True,
            multiprocessing_context="spawn", pin_memory=device.type == "cuda", **options)
    threads = cfg.workers.threads or devices.usable_cpus()
    with devices.torch_threads(threads):
        computer = Computer(spec, device, False)  # DataLoader already pinned the batch
        it = iter(loader)
        computer(convert(next(it), 0))
        for _ in it:
            pass
        startup = time.perf_counter() - t0

        def once():
            return [computer(convert(x, i), i)[0] for i, x in enumerate(loader)]
        results, seconds = _timed(once, repeat)
    return results, seconds, startup, {"threads_main": threads}


def _loader_args(src):
    """DataLoader's dataset, its batching options, and ``convert(batch, i)`` -> numpy fields for the
    Computer. A dataset is batched by DataLoader itself: the source's batch size, drop_last and collate
    (torch's ``default_collate`` without one: a tensor per field; a tuple sample comes back a list); any
    other source as whole batches (``_Batches``)."""
    if not isinstance(src, MapSource):
        return _Batches(src), {"batch_size": None}, lambda x, i: x.numpy()
    if src.batch_size is None or src.collate is not None:
        return src.dataset, {"batch_size": src.batch_size, "collate_fn": src.collate}, _converter(src.collate)
    return (src.dataset, {"batch_size": src.batch_size, "drop_last": src.drop_last,
                          "collate_fn": torch.utils.data.default_collate}, _converter(None))


def _converter(collate):
    """Batch -> numpy fields as the source makes them (``fields``); torch's collate turns a tuple into a list."""
    def convert(x, i):
        if collate is None and isinstance(x, list):
            x = tuple(x)
        return fields(x, f"batch {i}")
    return convert


# -- SPDL: a thread pipeline in the main process ------------------------------------------------------
def has_spdl() -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec("spdl.pipeline") is not None
    except ImportError:  # "spdl" itself missing
        return False


def _spdl(cfg, spec, src, repeat):
    """SPDL's recommended thread pipeline over the same ``__getitem__`` (its guide for PyTorch datasets):
    the sample indices as the source, ``pipe(dataset.__getitem__, concurrency=N, output_order="input")``,
    ``aggregate(B)``, then a stage that stacks each field (or the source's collate), on a thread pool of N
    (``build(num_threads=N)``); the main iterates it and computes, as in the DataLoader mode. A source
    that is not a dataset grouped by a batch size pipes ``src.get`` (a whole batch per item) the same way.
    Each pass builds its pipeline again (threads: milliseconds); a pass over the first batches warms up."""
    device = devices.choose(cfg.workers.device, 0)
    threads = cfg.workers.threads or devices.usable_cpus()
    n = len(src)
    t0 = time.perf_counter()
    with devices.torch_threads(threads):
        computer = Computer(spec, device, cfg.handoff.pinned)

        def once(batches=n):
            got = [computer(x, i)[0] for i, x in enumerate(_spdl_batches(src, cfg.workers.count, batches))]
            if len(got) != batches:
                raise RuntimeError(f"spdl: {len(got)} batches for {batches}")
            return got
        once(min(n, 2 * cfg.workers.count))
        startup = time.perf_counter() - t0
        results, seconds = _timed(once, repeat)
    return results, seconds, startup, {"threads_main": threads, "spdl_threads": cfg.workers.count}


def _spdl_batches(src, threads: int, batches: int):
    """The first ``batches`` batches of ``src`` from an SPDL pipeline, as numpy fields, in order."""
    from spdl.pipeline import PipelineBuilder
    b = PipelineBuilder()
    if isinstance(src, MapSource) and src.batch_size:
        size = src.batch_size
        stop = min(src.samples, batches * size)
        b = (b.add_source(range(stop))
             .pipe(src.dataset.__getitem__, concurrency=threads, output_order="input")
             .aggregate(size, drop_last=src.drop_last)
             .pipe(_stack if src.collate is None else (lambda s: fields(src.collate(s), "batch (from collate)"))))
    else:
        b = b.add_source(range(batches)).pipe(src.get, concurrency=threads, output_order="input")
    pipe = b.add_sink(3).build(num_threads=threads, max_failures=0)  # a failed sample fails the run
    with pipe.auto_stop():
        yield from pipe.get_iterator()


def _stack(samples: list):
    """SPDL's aggregated samples as one batch: each field stacked (numpy fields, as the source makes them)."""
    fs = [fields(s, "sample") for s in samples]
    first = fs[0]
    if isinstance(first, dict):
        return {k: np.stack([f[k] for f in fs]) for k in first}
    if isinstance(first, tuple):
        return tuple(np.stack(col) for col in zip(*fs))
    return np.stack(fs)


RUNNERS = {"pipeline": _pipeline, "pipeline.trace": _pipeline_traced, "pipeline.procs": _pipeline, "mp.Pool": _pool, "ProcessPoolExecutor": _executor,
           "DataLoader": _dataloader, "spdl": _spdl}
