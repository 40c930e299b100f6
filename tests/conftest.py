"""Shared fixtures: the gpu marker, and a check that no test leaves a worker or a shm segment behind."""
import os
from contextlib import contextmanager

import psutil
import pytest
import torch

from pipeline.local.ring import RING_PREFIX as PREFIX, SHM_DIR

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


STDLIB_HELPERS = ("resource_tracker", "multiprocessing.forkserver")  # long-lived singletons, not workers


def workers_alive() -> list:
    """Children of this process, less zombies and the stdlib's own helper processes."""
    return workers_of(os.getpid())


def descendants(pid: int) -> list:
    """Every live process under process ``pid``, the stdlib's helpers included."""
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def workers_of(pid: int) -> list:
    """Worker and build processes under process ``pid``, whatever the start method: its live descendants,
    less the stdlib's helpers (the forkserver and the resource tracker: direct children whose command line
    names them; a worker forked by the forkserver has the server's command line, and is the server's child)."""
    def helper(p) -> bool:
        try:
            return p.ppid() == pid and any(h in " ".join(p.cmdline()) for h in STDLIB_HELPERS)
        except psutil.NoSuchProcess:
            return True  # (gone meanwhile)
    return [p for p in descendants(pid) if not helper(p)]


def ours() -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith(f"{PREFIX}{os.getpid()}-")}


@contextmanager
def local_ray(num_cpus: int):
    """A local Ray instance for a test module (its daemons are not workers of ours)."""
    import ray
    # address="local": a new instance, never another process's cluster on this machine (ray.init would join it)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


# The start method of in-process runs that don't name one: forkserver (the server imports torch once for
# the whole session, so a test's workers start in tens of milliseconds: the suite takes about 9 minutes on
# 2 cores, against 16.5 under spawn). The default, spawn, still runs in every CLI and script test (their own
# processes), in tests marked ``spawn`` and ``gpu``, on a machine with CUDA (its runs are on the GPU, and
# spawn is what they were checked under), and everywhere with PIPELINE_TEST_START_METHOD=spawn.
START_METHOD = os.environ.get("PIPELINE_TEST_START_METHOD", "spawn" if HAS_CUDA else "forkserver")


@pytest.fixture(autouse=True)
def default_start_method(request, monkeypatch):
    from dataclasses import fields

    from pipeline.config import WorkersConfig
    if START_METHOD == "spawn" or any(request.node.get_closest_marker(m) for m in ("spawn", "gpu")):
        return
    names = [f.name for f in fields(WorkersConfig)]
    defaults = list(WorkersConfig.__init__.__defaults__)  # (the last len(defaults) fields have defaults)
    defaults[names.index("start_method") - (len(names) - len(defaults))] = START_METHOD
    monkeypatch.setattr(WorkersConfig.__init__, "__defaults__", tuple(defaults))


@pytest.fixture(autouse=True)
def nothing_left_behind(request):
    """Every test: no child process of this process and no shm segment of ours remain afterwards (tests
    marked ``ray_daemons`` are exempt: Ray's own processes live for their module, or go slowly)."""
    if request.node.get_closest_marker("ray_daemons"):
        yield
        return
    before = ours()
    yield
    for _ in range(40):  # a killed child may take a moment to be reaped
        kids = workers_alive()
        if not kids:
            break
        psutil.wait_procs(kids, timeout=0.05)
    assert not kids, f"processes left behind: {[(k.pid, k.cmdline()[-3:]) for k in kids]}"
    assert ours() - before == set(), "shared-memory segments left behind"


TINY = dict(batches=4, rows=16, cols=8, progress=False, threads_per_worker=1)
