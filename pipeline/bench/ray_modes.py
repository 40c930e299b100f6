"""The Ray modes: this package's Ray backend (``ray``) and Ray Data's ``map_batches`` (``ray.data``), each
``mode(cfg, spec, src, repeat) -> (results, seconds, startup, extra)`` as in ``peers``. Both run on one
local Ray instance that ``run_bench`` starts once (``start_ray``). ``_RayDataCompute`` stays at module
level: Ray pickles it by name.
"""
from __future__ import annotations

import os
import statistics
import time
import warnings

import numpy as np
import torch

from .. import devices
from ..config import Config
from ..compute import Computer
from ..images.folder import ImageSource
from .images import ray_data_images
from .peers import _pipeline


def has_ray() -> bool:
    import importlib.util
    return importlib.util.find_spec("ray") is not None


def has_ray_data() -> bool:
    import importlib.util
    return has_ray() and all(importlib.util.find_spec(m) is not None for m in ("pyarrow", "pandas"))


def start_ray(cfg: Config, counts: list[int]) -> float:
    """The local Ray instance both Ray modes use (private: loopback only, no dashboard); its start-up s."""
    from ..ray_backend import start_local_ray
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
    if isinstance(src, ImageSource):  # an image folder: Ray Data's own image recipe (bench/images.py)
        return ray_data_images(cfg, spec, src, repeat)
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


def rows_after_warmup(dataset, warm: int) -> tuple[list, float, float]:
    """A Ray Data dataset's rows (in order) less the first ``warm``, the seconds from the last warm-up row
    to the last row, and the start-up (until the last warm-up row): its actor pool starts and warms up
    before the timing, as every mode's workers do."""
    import logging
    log = logging.getLogger("ray.data")
    level = log.level
    log.setLevel(logging.ERROR)  # its per-execution INFO lines
    try:
        t0 = time.perf_counter()
        rows, stamps = [], []
        for row in dataset.iter_rows():
            rows.append(row)
            stamps.append(time.perf_counter())
    finally:
        log.setLevel(level)
    return rows[warm:], stamps[-1] - stamps[warm - 1], stamps[warm - 1] - t0


RUNNERS = {"ray": _ray, "ray.data": _ray_data}
