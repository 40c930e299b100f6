"""Device choice per worker rank, CPU fallback, thread caps, and what a container lets this process use.

NOTE [ Containers ]
``os.cpu_count()`` is the host's core count; a container (or ``taskset``) may let this process use far
fewer. ``usable_cpus`` takes the smaller of the affinity mask and the cgroup CPU quota (v2 ``cpu.max``,
v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``), rounded down (a quota of 1.5 CPUs gives 1: one more thread
than the quota pays for gets throttled every period), at least 1. ``memory_limit`` reads the cgroup memory
limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``). Both find the process's cgroup the way the kernel
reports it: the hierarchy in /proc/self/cgroup, where it is mounted in /proc/self/mountinfo, and every
ancestor up to the mount's root (a parent's limit binds the children too). No torch import here: config
asks for the CPU count for its thread caps.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
PROC_CGROUP = "/proc/self/cgroup"
PROC_MOUNTINFO = "/proc/self/mountinfo"
PROC_MEMINFO = "/proc/meminfo"
NO_LIMIT = 1 << 62  # cgroup v1 reports "no limit" as LONG_MAX rounded down to a page


def host_cpus() -> int:
    """The host's logical cores (``os.cpu_count()``), whatever this process may use of them."""
    return os.cpu_count() or 1


def usable_cpus() -> int:
    """CPUs this process may use: the affinity mask and the cgroup CPU quota, the smaller, at least 1."""
    n = host_cpus()
    try:
        n = min(n, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        pass
    quota = cpu_quota()
    if quota is not None:
        n = min(n, int(quota))
    return max(1, n)


def cpu_quota() -> float | None:
    """CPUs' worth of time per period that the cgroup allows (the tightest on the path); None: no quota."""
    best = None
    for version, d in cgroup_dirs("cpu"):
        if version == 2:
            parts = (_read(os.path.join(d, "cpu.max")) or "max").split()
            quota, period = parts[0], parts[1] if len(parts) > 1 else "100000"
        else:
            quota = _read(os.path.join(d, "cpu.cfs_quota_us")) or "-1"
            period = _read(os.path.join(d, "cpu.cfs_period_us")) or "100000"
        try:
            q, p = int(quota), int(period)
        except ValueError:  # "max"
            continue
        if q > 0 and p > 0:
            best = q / p if best is None else min(best, q / p)
    return best


def memory_limit() -> int | None:
    """The cgroup memory limit in bytes (the tightest on the path); None when none is set."""
    best = None
    for version, d in cgroup_dirs("memory"):
        text = _read(os.path.join(d, "memory.max" if version == 2 else "memory.limit_in_bytes"))
        try:
            limit = int(text or "max")
        except ValueError:  # "max"
            continue
        if 0 < limit < NO_LIMIT:
            best = limit if best is None else min(best, limit)
    return best


def memory_available() -> tuple[int, str] | None:
    """(bytes, where it comes from): the memory this process may use, the cgroup limit or MemAvailable
    (the smaller when both are known); None when neither can be read."""
    found = []
    limit = memory_limit()
    if limit is not None:
        found.append((limit, "cgroup memory limit"))
    for line in (_read(PROC_MEMINFO) or "").splitlines():
        if line.startswith("MemAvailable:"):
            found.append((int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"))
    return min(found) if found else None


def cgroup_dirs(controller: str) -> list[tuple[int, str]]:
    """(cgroup version, directory) of this process's cgroup for ``controller`` and of its ancestors up to
    the mount's root, leaf first; [] where cgroups can't be read."""
    paths = {}
    for line in (_read(PROC_CGROUP) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for name in parts[1].split(",") if parts[1] else [""]:
                paths[name] = parts[2]
    v1, v2 = None, None
    for line in (_read(PROC_MOUNTINFO) or "").splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if tail[0] == "cgroup" and controller in tail[2].split(",") and controller in paths:
            v1 = (1, root, point, paths[controller])
        elif tail[0] == "cgroup2" and "" in paths and v2 is None:
            v2 = (2, root, point, paths[""])
    found = v1 or v2  # a v1 hierarchy holding the controller wins (hybrid hosts mount both)
    if found is None:
        return []
    version, root, point, path = found
    if root != "/" and (path == root or path.startswith(root + "/")):
        path = path[len(root):]
    leaf = os.path.normpath(os.path.join(point, path.lstrip("/")))
    if not os.path.isdir(leaf):  # the path names the host's hierarchy, the container sees its own root
        leaf = point
    out, d = [], leaf
    while True:
        out.append((version, d))
        if os.path.normpath(d) == os.path.normpath(point) or d == os.path.dirname(d):
            return out
        d = os.path.dirname(d)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def gpu_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def on_cuda(spec: str) -> bool:
    """Workers with device ``spec`` compute on a GPU (``auto``: when this machine has one)."""
    return spec.startswith("cuda") or (spec == "auto" and gpu_count() > 0)


def check(spec: str) -> str | None:
    """Raise ConfigError for a device this machine lacks; return a note for ``auto`` without a GPU."""
    import torch
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
    import torch
    if spec == "cpu" or (spec == "auto" and gpu_count() == 0):
        return torch.device("cpu")
    if spec in ("auto", "cuda"):
        return torch.device("cuda", rank % gpu_count())
    return torch.device(spec)


def thread_vars(threads: int) -> dict:
    """The BLAS/OpenMP thread variables for a cap of ``threads``."""
    return {k: str(threads) for k in THREAD_VARS}


@contextmanager
def thread_env(threads: int):
    """Set the BLAS/OpenMP thread variables while workers are spawned, so they inherit the cap."""
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update(thread_vars(threads))
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
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def describe() -> dict:
    import multiprocessing as mp
    import platform
    import torch
    devices = [{"index": i, "name": torch.cuda.get_device_name(i),
                "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
               for i in range(gpu_count())]
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "devices": devices,
        "cpus": host_cpus(),
        "usable_cpus": usable_cpus(),
        "default_start_method": mp.get_start_method(allow_none=True) or mp.get_context().get_start_method(),
        "pipeline_start_method": "spawn",
    }


PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


@contextmanager
def precision(name: str, device):
    """Run kernel calls under ``kernel.precision``: autocast to bf16/fp16 (on CUDA; bf16 and fp16 autocast on
    the CPU too), TF32 matmuls and convolutions for ``tf32`` on CUDA (plain fp32 on the CPU)."""
    import torch
    if name in ("bf16", "fp16"):
        with torch.autocast(device.type, dtype=torch.bfloat16 if name == "bf16" else torch.float16):
            yield
    elif name == "tf32" and device.type == "cuda":
        before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    else:
        yield


def memory_note(device) -> str:
    """'cuda:0: 1.2 GiB free of 79.1 GiB' (after the caching allocator gave back what it could)."""
    import torch
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return f"{device}: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB"


def sticky(e: BaseException) -> bool:
    """A CUDA error after which the process's CUDA context is unusable (device-side assert, illegal
    address, launch failure): the worker must be replaced. Out-of-memory is not one."""
    import torch
    if isinstance(e, torch.OutOfMemoryError):
        return False
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(e, accel):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "CUDA error", "device-side assert", "illegal memory access", "unspecified launch failure"))
