"""Local backend: start and supervise spawn workers, bounded in-flight batches, retries, shutdown.

 main (this module)                                  worker processes (worker.py)
 ------------------                                  ----------------------------
 source -> batch into a free slot -> Task ---pipe--> view slot -> device -> kernel -> host
 _on_message  <------------------------------pipe--- ("result", index, array, timings) | ("error", ...)
 _on_death    <- process sentinel (crash, kill, OOM)
 _check_deadlines: a batch past faults.batch_timeout_s -> kill its worker -> _on_death

One loop does the bookkeeping, waiting with ``multiprocessing.connection.wait`` on every worker's pipe
and process sentinel, so a dead worker is noticed at once, and the main knows which worker holds which
batch: a lost batch goes to a fresh worker, and one that keeps killing workers is quarantined. Workers
compute their tasks in order, so the oldest task a worker holds is the one it was computing.
"""
from __future__ import annotations

import itertools
import os
import multiprocessing as mp
import signal
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Callable, Iterable

import numpy as np

from . import devices, worker
from .config import Config
from .errors import RemoteTraceback, WorkerError
from .handoff import SlotRing, remove_stale
from .kernels import KernelSpec
from .outputs import Relay
from .sources import Batch
from .worker import Task

MB = 1 << 20


@dataclass
class Handle:
    rank: int
    process: mp.process.BaseProcess
    conn: object
    pid: int | None = None
    device: str | None = None
    ready: bool = False
    batches: int = 0
    tasks: deque = field(default_factory=deque)
    head_since: float = 0.0  # when the task at the head of ``tasks`` started computing


def signal_name(exitcode: int | None) -> str:
    if exitcode is None:
        return "unknown"
    if exitcode < 0:
        try:
            return f"{signal.Signals(-exitcode).name}({exitcode})"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def _likely(exitcode: int | None) -> str:
    return {-9: " (killed: out of memory, or kill -9)", -11: " (segmentation fault in native code)",
            -6: " (aborted)"}.get(exitcode or 0, "")


class LocalExecutor:
    """Workers for one config and kernel; ``map`` can run several times on the same workers (bench)."""

    def __init__(self, cfg: Config, spec: KernelSpec):
        self.cfg, self.spec = cfg, spec
        self.ctx = mp.get_context(cfg.workers.start_method)
        self.threads = cfg.threads_per_worker()
        self.workers: list[Handle] = []
        self.history: list[Handle] = []
        self.restarts: list[dict] = []
        self.startup_s = 0.0
        self.breakdown: dict = {}
        self.ring: SlotRing | None = None
        self.relay = Relay()  # workers' stdout and stderr -> our stderr; the runner sets relay.bar

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close(graceful=exc[0] is None)

    def start(self) -> None:
        t0 = time.perf_counter()
        remove_stale()
        for rank in range(self.cfg.workers.count):
            self.workers.append(self._spawn(rank))
        while not all(w.ready for w in self.workers):
            self._pump(timeout=1.0, starting=True)
        self.startup_s = time.perf_counter() - t0

    def _spawn(self, rank: int) -> Handle:
        parent, child = self.ctx.Pipe(duplex=True)
        out = self.relay.pipe()  # the worker's stdout and stderr
        p = self.ctx.Process(
            target=worker.main, name=f"pipeline-worker-{rank}", daemon=True,
            args=(rank, child, self.spec, self.cfg.workers.device, self.threads,
                  self.cfg.handoff.pinned, os.getpid(), out),
        )
        try:
            with devices.thread_env(self.threads), _no_phantom_main_file(), _born_ignoring_sigint():
                p.start()
        finally:
            out.close()  # the child holds its own copy: the relay sees EOF when the child exits
        child.close()
        h = Handle(rank, p, parent)
        self.history.append(h)
        return h

    def close(self, graceful: bool = True) -> None:
        """Stop every worker (politely, then by force); nothing is left running."""
        for w in self.workers:
            if graceful and w.process.is_alive():
                try:
                    w.conn.send(None)
                except OSError:
                    pass
        deadline = time.monotonic() + (2.0 if graceful else 0.0)
        for w in self.workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
        for w in self.workers:
            if w.process.is_alive():
                w.process.terminate()
        for w in self.workers:
            w.process.join(1.0)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.conn.close()
        self.workers = []
        self.relay.close()  # after the last join: prints what the workers wrote, to the end of each pipe
        if self.ring is not None:
            self.ring.close()
            self.ring = None

    def worker_info(self) -> list[dict]:
        return [{"rank": w.rank, "pid": w.pid, "device": w.device, "batches": w.batches}
                for w in self.history if w.pid]

    # -- one run -------------------------------------------------------------------------------------
    def map(self, batches: Iterable[Batch], on_result: Callable[[int, np.ndarray, dict], None],
            on_failed: Callable[[dict], None]) -> dict:
        """Compute every batch; ``on_result`` gets them as they complete. Returns handoff figures."""
        self.on_result, self.on_failed = on_result, on_failed
        self.todo: deque[Task] = deque()
        self.outstanding: dict[int, Task] = {}
        self.pickled = 0
        self.h2d = [0.0, 0]
        self.breakdown = {k: 0.0 for k in ("build_s", "slot_wait_s", "handoff_s", "h2d_s", "compute_s",
                                           "d2h_s", "return_s")}
        in_flight = self.cfg.in_flight()
        it = iter(batches)
        first = next(it, None)
        if first is None:
            return self._figures(None)
        slot_bytes = int(self.cfg.handoff.slot_mb * MB) or first.nbytes
        if self.ring is None or self.ring.count != in_flight or self.ring.slot_bytes < slot_bytes:
            if self.ring is not None:
                self.ring.close()
            self.ring = SlotRing(in_flight, slot_bytes)  # kept for the next map: its pages stay mapped
        self.ring.reset()
        it = itertools.chain([first], it)
        exhausted = False
        while True:
            while len(self.outstanding) < in_flight:
                w = self._idlest()
                if w is None:
                    break
                if self.todo:
                    self._send(w, self.todo.popleft())
                elif not exhausted:
                    t0 = time.perf_counter()
                    batch = next(it, None)
                    if batch is None:
                        exhausted = True
                        continue
                    self._send(w, self._task(batch, t0))
                else:
                    break
            if exhausted and not self.todo and not self.outstanding:
                break
            t0 = time.perf_counter()
            self._pump(timeout=self._tick())
            if len(self.outstanding) >= in_flight:
                self.breakdown["slot_wait_s"] += time.perf_counter() - t0
        return self._figures(self.ring)

    def _task(self, batch: Batch, t0: float) -> Task:
        if batch.nbytes <= self.ring.slot_bytes and self.ring.free:
            slot, view = self.ring.take(batch.shape, batch.dtype)
            batch.fill(view)
            task = Task(batch.index, 1, self.ring.name, self.ring.slot_bytes, self.ring.describe(slot, view))
            del view
        else:
            task = Task(batch.index, 1, array=batch.array())
            self.pickled += 1
        self.breakdown["build_s"] += time.perf_counter() - t0
        self.outstanding[batch.index] = task
        return task

    def _idlest(self) -> Handle | None:
        ready = [w for w in self.workers if w.ready]
        return min(ready, key=lambda w: len(w.tasks)) if ready else None

    def _send(self, w: Handle, task: Task) -> None:
        t0 = time.perf_counter()
        if not w.tasks:
            w.head_since = time.monotonic()
        w.tasks.append(task)
        try:
            w.conn.send(task)
        except OSError:
            pass  # the worker died; its sentinel tells us, and the task is retried from w.tasks
        self.breakdown["handoff_s"] += time.perf_counter() - t0

    def _tick(self) -> float:
        t = self.cfg.faults.batch_timeout_s
        return min(1.0, t / 4) if t else 1.0

    # -- events --------------------------------------------------------------------------------------
    def _pump(self, timeout: float, starting: bool = False) -> None:
        by_conn = {w.conn: w for w in self.workers}
        by_sentinel = {w.process.sentinel: w for w in self.workers}
        for obj in wait(list(by_conn) + list(by_sentinel), timeout):
            if obj in by_conn:
                w = by_conn[obj]
                try:
                    while w.conn.poll():
                        self._on_message(w, w.conn.recv())
                except (EOFError, OSError):
                    pass  # died mid-message; the sentinel follows
        for w in list(self.workers):
            if not w.process.is_alive():
                self._on_death(w, signal_name(w.process.exitcode) + _likely(w.process.exitcode),
                               starting)
        self._check_deadlines()

    def _on_message(self, w: Handle, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ready":
            w.ready, w.pid, w.device = True, msg[1], msg[2]
            return
        if kind == "fatal":
            raise remote_error(msg[1], f"worker {w.rank} (pid {w.process.pid}) failed to set up kernel "
                                   f"'{self.spec.name}'")
        task = w.tasks.popleft()
        w.head_since = time.monotonic()
        assert task.index == msg[1], (task.index, msg[1])
        if kind == "result":
            w.batches += 1
            timings = msg[3]
            for k in ("h2d_s", "d2h_s", "compute_s"):
                self.breakdown[k] += timings[k]
            self.breakdown["handoff_s"] += timings["stage_s"] - timings["h2d_s"]
            self.breakdown["return_s"] += max(0.0, time.time() - timings["sent"])
            if timings["h2d_s"]:
                self.h2d[0] += timings["h2d_s"]
                self.h2d[1] += timings["h2d_bytes"]
            self._finish(task)
            self.on_result(task.index, msg[2], {"pid": w.pid, "device": w.device, **timings})
        else:
            where = f"batch {task.index} (worker pid {w.pid}, device {w.device})"
            if self.cfg.faults.on_error == "skip":
                self._finish(task)
                self.on_failed({"batch": task.index, "cause": msg[2][1], "attempts": task.attempt})
            else:
                raise remote_error(msg[2], where)

    def _finish(self, task: Task) -> None:
        self.outstanding.pop(task.index, None)
        if task.desc is not None:
            self.ring.release(task.desc.slot)

    def _on_death(self, w: Handle, cause: str, starting: bool) -> None:
        w.process.join()
        w.conn.close()
        self.workers.remove(w)
        if not w.ready:
            hint = ""
            main = sys.modules.get("__main__")
            if w.process.exitcode == 1 and getattr(main, "__file__", None) and not getattr(main, "__spec__", None):
                hint = (f"; its error is printed above. If it says 'bootstrapping phase', "
                        f"{os.path.basename(main.__file__)} calls pipeline at import time: spawn re-imports "
                        f"the main script in every worker, so put the call under "
                        f"`if __name__ == \"__main__\":`")
            raise WorkerError(f"worker {w.rank} (pid {w.process.pid}) died while starting: {cause}{hint}")
        lost = list(w.tasks)
        if lost:
            head = lost[0]
            self.todo.extendleft(reversed(lost[1:]))
            head.attempt += 1
            if head.attempt > self.cfg.faults.max_attempts:
                self._finish(head)
                self.on_failed({"batch": head.index, "cause": cause, "attempts": head.attempt - 1})
            else:
                self.todo.appendleft(head)
        self.restarts.append({"rank": w.rank, "pid": w.pid, "cause": cause,
                              "batch": lost[0].index if lost else None})
        if not starting:
            self.workers.append(self._spawn(w.rank))
            self.workers.sort(key=lambda h: h.rank)

    def _check_deadlines(self) -> None:
        limit = self.cfg.faults.batch_timeout_s
        if not limit:
            return
        now = time.monotonic()
        for w in list(self.workers):
            if w.tasks and now - w.head_since > limit:
                w.process.kill()
                w.process.join()
                self._on_death(w, f"timeout: batch ran over {limit:g} s (faults.batch_timeout_s)", False)

    def _figures(self, ring: SlotRing | None) -> dict:
        return {
            "slots": ring.count if ring else 0,
            "slot_bytes": ring.slot_bytes if ring else 0,
            "pickled_fallbacks": self.pickled,
            "h2d_gbps": round(self.h2d[1] / self.h2d[0] / 1e9, 2) if self.h2d[0] else None,
        }


@contextmanager
def _born_ignoring_sigint():
    """Start children with SIGINT ignored (kept across exec), so that a Ctrl-C while a worker is still
    importing torch doesn't print its traceback: the main alone handles Ctrl-C (NOTE [ Shutdown ])."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _no_phantom_main_file():
    """Hide a ``__main__.__file__`` that is no file (``python -`` sets '<stdin>') while starting a worker.

    Spawn re-runs the parent's main script in the child from ``__main__.__file__``; for '<stdin>' the child
    dies with FileNotFoundError before it gets to the worker. Without ``__file__`` the child skips that
    step, as it does for notebooks and ``python -c``; kernels defined there travel by value anyway.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    phantom = path is not None and getattr(main, "__spec__", None) is None and not os.path.isfile(path)
    if phantom:
        del main.__file__
    try:
        yield
    finally:
        if phantom:
            main.__file__ = path


def remote_error(packed: tuple, where: str) -> BaseException:
    """The worker's exception as its own type, ``where`` in its message, the remote traceback as cause."""
    exc, text, tb = packed
    if exc is None:
        exc = WorkerError(text)
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{where}: {exc.args[0]}",) + tuple(exc.args[1:])
    else:
        exc.args = (f"{where}: {text}",) + tuple(exc.args)
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    exc.batch_where = where
    return exc
