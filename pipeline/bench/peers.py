"""The local modes: this package's executor and the peers a user would pick instead (``mp.Pool``,
``ProcessPoolExecutor``, DataLoader).

Every mode is ``mode(cfg, spec, src, repeat) -> (results, seconds, startup, extra)``: the results in batch
order, the median seconds of ``repeat`` timed passes, the start-up (workers up and warmed, kept out of
the timing) and a dict of extra fields for its row. Adding a mode: one such function and its entry in
``RUNNERS``. The peers' worker entry points (``_peer_init``, ``_peer_compute``, ``_Batches``) stay at
module level: spawn pickles them by name.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import statistics
import time
import warnings

import numpy as np
import torch

from .. import devices
from ..errors import ConfigError
from ..runner import make_executor
from ..sources import Indexed, Work
from ..worker import Computer


def _timed(fn, repeat: int):
    """Median over ``repeat`` timed calls of fn() -> results."""
    times, results = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        results = fn()
        times.append(time.perf_counter() - t0)
    return results, statistics.median(times)


def _pipeline(cfg, spec, src, repeat):
    def work(batches):
        return Work(batches, src if isinstance(src, Indexed) else None, getattr(src, "max_nbytes", None))

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


RUNNERS = {"pipeline": _pipeline, "mp.Pool": _pool, "ProcessPoolExecutor": _executor, "DataLoader": _dataloader}
