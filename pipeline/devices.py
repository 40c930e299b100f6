"""Device choice per worker rank, CPU fallback, thread caps."""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from .errors import ConfigError

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check(spec: str) -> str | None:
    """Raise ConfigError for a device this machine lacks; return a note for ``auto`` without a GPU."""
    n = gpu_count()
    if spec.startswith("cuda"):
        if n == 0:
            raise ConfigError(f"workers.device = '{spec}': CUDA is not available on this machine "
                              f"(torch {torch.__version__}); use --device cpu or auto")
        if ":" in spec and int(spec.split(":")[1]) >= n:
            raise ConfigError(f"workers.device = '{spec}': only {n} CUDA device(s) visible "
                              f"(cuda:0..cuda:{n - 1})")
    if spec == "auto" and n == 0:
        return "device auto: no CUDA GPU visible, computing on the CPU"
    return None


def choose(spec: str, rank: int) -> torch.device:
    """``auto``: GPU ``rank % visible GPUs``, CPU when there is none; ``cuda``: the same, required."""
    if spec == "cpu" or (spec == "auto" and gpu_count() == 0):
        return torch.device("cpu")
    if spec in ("auto", "cuda"):
        return torch.device("cuda", rank % gpu_count())
    return torch.device(spec)


@contextmanager
def thread_env(threads: int):
    """Set the BLAS/OpenMP thread variables while workers are spawned, so they inherit the cap."""
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update({k: str(threads) for k in THREAD_VARS})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def torch_threads(threads: int):
    """Cap torch's intra-op threads in this process for a while (the serial baseline)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def describe() -> dict:
    import multiprocessing as mp
    import platform
    devices = [{"index": i, "name": torch.cuda.get_device_name(i),
                "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
               for i in range(gpu_count())]
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "devices": devices,
        "cpus": os.cpu_count(),
        "default_start_method": mp.get_start_method(allow_none=True) or mp.get_context().get_start_method(),
        "pipeline_start_method": "spawn",
    }
