"""Local backend: spawn workers, feed them from build threads, supervise, stream results out in order.

 caller's thread               main process, supervisor thread              worker processes (worker.py)
 ---------------               -------------------------------              ----------------------------
                               builders (threads) --fill slot k-->  ring
                   <--Outcome- _Run: jobs to builders, built batches --Task(k, slot)--> view slot -> device
 for (i, r) in ...             to the idlest worker; results, deaths,  <--("copied", k)-- (CUDA: slot free)
  (in order, or as done)       deadlines; retries and quarantine     <--("result", k, array, timings)--
                                                                           | ("error", k, error)

NOTE [ Supervisor ]
One thread per run (``_Run``) does all the bookkeeping and never waits on anything but
``multiprocessing.connection.wait`` over every worker's pipe, every process sentinel and a wake-up pipe
that build threads and the consumer write to. Builds run on their own threads (NOTE [ Builders ]), the
consumer in the caller's thread, so a death or a deadline is noticed at once whatever they are doing.
Bounds: ``in_flight`` slots; at most ``window`` batches (default 2 x in_flight) started and not yet taken
by the consumer, results held for reordering included: a slow consumer stops new builds (backpressure),
it never grows a buffer. A worker's status word (shared memory) names the batch it is computing: a
worker that dies loses it (retried on a fresh worker, quarantined after ``faults.max_attempts``) and the
others it held, queued or answered in results it had not sent yet (built again, uncharged). Without the
word (it died between batches) the oldest task it held is charged.

NOTE [ Slot release ]
A slot is free again when nothing will read it: on the CPU when the batch's result is back (the kernel
reads the slot itself); on CUDA as soon as the worker says its copy to the device has completed (a CUDA
event), before the kernel ends. A batch whose slot went back early and whose worker then dies is built
again from the source (``rebuild``); sources that can't (a caller's iterator) keep their slots until the
result is back.

NOTE [ Hand-over ]
Waking a thread that sleeps costs tens of microseconds of CPU on both sides (a futex, two context
switches, the GIL changing hands), as much as the rest of a small batch's bookkeeping. So the supervisor
hands finished outcomes to the consumer together: once it holds ``POST_COUNT`` of them (a quarter of the
window if that is fewer), once the oldest is ``POST_S`` old, when the window is full (the supervisor then
waits for the consumer), and when the run ends. A consumer that is busy finds them on its next take
anyway; one that sleeps is not the limit, and loses at most ``POST_S`` of latency. Build threads keep two
jobs each for the same reason (``_issue_builds``).
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import select
import signal
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Iterator

import numpy as np

from . import devices, fields, worker
from .builders import Builders, Built
from .config import Config
from .errors import RemoteTraceback, WorkerError
from .handoff import SlotRing, open_ring, remove_stale
from .kernels import KernelSpec
from .outputs import Relay
from .worker import Task

MB = 1 << 20
SMALL_SLOT = 256 << 10  # batches this small get SMALL_DEPTH slots per worker (NOTE [ Small batches ] in worker.py)
SMALL_DEPTH = 32
QUEUED_S = 0.004  # small batches: a worker is given about this much work at a time
INLINE_CPU_S, INLINE_WALL_S = 100e-6, 400e-6  # builds quicker than this are done by the supervisor itself
INLINE_SAMPLE = 8  # of those, one in this many has its CPU time measured
POST_COUNT, POST_S = 16, 0.002  # NOTE [ Hand-over ]: outcomes handed to the consumer together
STUCK_SEND_S = 10.0  # a run's stop waits this long for the supervisor, then ends the workers it may be sending to
BREAKDOWN = ("build_s", "dispatch_s", "receive_s", "stage_s", "h2d_s", "compute_s", "d2h_s",
             "slot_wait_s", "worker_wait_s", "idle_s", "return_s", "order_wait_s")


@dataclass
class Outcome:
    """One batch's end: its result, or (``result`` None) the record of why it failed."""
    index: int
    result: Any
    info: dict
    failure: dict | None = None


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
    retired: str | None = None  # why it is exiting on its own (a sticky CUDA error)
    gpu_reserved_mb: float | None = None


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
    """Workers for one config and kernel; ``stream`` can run several times on the same workers."""

    def __init__(self, cfg: Config, spec: KernelSpec):
        self.cfg, self.spec = cfg, spec
        self.ctx = mp.get_context(cfg.workers.start_method)
        if cfg.workers.start_method == "forkserver":  # the server imports torch once; workers fork from it
            self.ctx.set_forkserver_preload(["pipeline.worker"])
        self.threads = cfg.threads_per_worker()
        self.workers: list[Handle] = []
        self.history: list[Handle] = []
        self.generation = 0  # counts workers started: the set of pipes to wait on changed
        self.start_failures: dict[int, list[str]] = {}  # rank -> how its starts ended, in a row
        self.respawn_at: dict[int, float] = {}  # rank -> when to start it again (a death while starting)
        self.restarts: list[dict] = []
        self.notes: list[str] = []
        self.startup_s = 0.0  # until the first worker could compute (the first builds overlap it)
        self.ready_s = 0.0  # until every worker was ready (0: not all were, the run was over before)
        self.breakdown: dict = {}
        self.figures: dict = {}
        self.run_notes: list[str] = []  # the last run's own notes
        self.build_pool = None  # build processes kept from the last run (buildproc.BuildProcesses)
        self.ring: SlotRing | None = None
        self.status: SlotRing | None = None  # the workers' status words (``computing``)
        self.computing = None
        self._t_start: float | None = None
        self.relay = Relay()  # workers' stdout and stderr -> our stderr; the runner sets relay.bar

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self):
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc):
        self.close(graceful=exc[0] is None)

    def start(self) -> None:
        """Spawn the workers and return at once: they import torch and set up the kernel while the first
        batches are built (``startup_s``: until the first one is ready; ``ready_s``: the last one)."""
        if self.workers:
            return
        self._t_start = time.perf_counter()
        remove_stale(self.cfg.handoff.dir)
        try:  # a word per worker: the batch it is computing (NOTE [ Small batches ] in worker.py)
            self.status = SlotRing(1, 8 * max(1, self.cfg.workers.count), self.cfg.handoff.dir)
            self.computing = np.frombuffer(self.status._mm, np.int64)
        except OSError:  # no room even for that: workers send every result at once, as before
            self.status = self.computing = None
        for rank in range(self.cfg.workers.count):
            self.workers.append(self._spawn(rank))

    def wait_ready(self) -> None:
        """Block until every worker has set its kernel up (raises if one can't)."""
        while self.respawn_at or not all(w.ready for w in self.workers):
            self._pump_idle(1.0)

    @property
    def started(self) -> bool:
        return bool(self.workers)

    def _spawn(self, rank: int) -> Handle:
        if self.computing is not None:
            self.computing[rank] = 0
        parent, child = self.ctx.Pipe(duplex=True)
        out = self.relay.pipe()  # the worker's stdout and stderr
        p = self.ctx.Process(
            target=worker.main, name=f"pipeline-worker-{rank}", daemon=True,
            args=(rank, child, self.spec, self.cfg.workers.device, self.threads,
                  self.cfg.handoff.pinned, os.getpid(), self.cfg.handoff.dir, out,
                  self.status.path if self.status is not None else None),
        )
        try:
            with devices.thread_env(self.threads), _no_phantom_main_file():
                start_deaf(self.ctx, p)
        finally:
            out.close()  # the child holds its own copy: the relay sees EOF when the child exits
        child.close()
        h = Handle(rank, p, parent)
        self.history.append(h)
        self.generation += 1  # a run's poll object is made again (_Run._pump)
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
        self.respawn_at.clear()
        if self.build_pool is not None:
            self.build_pool.close()
            self.build_pool = None
        self.relay.close()  # after the last join: prints what the workers wrote, to the end of each pipe
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self.status is not None:
            self.computing = None
            self.status.close()
            self.status = None

    def worker_info(self) -> list[dict]:
        """Every worker this executor started (device None: it never got ready, e.g. the run was over)."""
        return [{"rank": w.rank, "pid": w.pid or w.process.pid, "device": w.device, "batches": w.batches,
                 **({"gpu_reserved_mb": round(w.gpu_reserved_mb, 1)} if w.gpu_reserved_mb is not None else {})}
                for w in self.history]

    # -- runs ----------------------------------------------------------------------------------------
    def stream(self, batches, ordered: bool = True, window: int | None = None,
               settle: bool = True, cfg: Config | None = None) -> Iterator[Outcome]:
        """Compute every batch of ``batches`` (an iterator of ``Batch``; see ``sources.Work``); yield an
        ``Outcome`` per batch, in batch order when ``ordered``, else as they complete.

        ``settle``: when the stream ends early (closed, or an error), let the workers finish what they
        hold (or replace the ones that don't within a few seconds), so that the next run starts clean;
        without it, the caller is expected to ``close()`` the executor.

        ``cfg``: this run's configuration (a warm ``Pipeline``'s per-call overrides: slots, build threads,
        faults); what the workers were started with (kernel, count, device) is the executor's.
        """
        self.start()
        run = _Run(self, batches, ordered, window, cfg or self.cfg)
        try:
            yield from run.outcomes()
        finally:
            run.stop(settle)
            self.breakdown, self.figures = run.breakdown, run.figures()
            self.run_notes = run.notes + [n for n in [run.gil_note()] if n]

    def _build_processes(self, source, ring: SlotRing, processes: int, threads: int, ring_dir: str):
        """The run's build processes (NOTE [ Build processes ]): those of the previous run when it built
        the same source into the same ring and ended with every job answered, else new ones."""
        import cloudpickle

        from .buildproc import BuildProcesses
        payload = cloudpickle.dumps(source)  # compared whole: a dataset changed since is sent again
        key = (payload, ring.path, processes, threads)
        pool = self.build_pool
        if pool is not None and (pool.key != key or not pool.idle()):
            pool.close()
            pool = None
        if pool is None:
            pool = BuildProcesses(self.ctx, payload, ring, processes, threads, self.relay, ring_dir)
            pool.key = key
        self.build_pool = pool
        return pool

    def _ring_for(self, count: int, slot_bytes: int, where: str) -> SlotRing:
        """The run's ring: the previous one when it fits (its pages stay mapped, workers keep it, and so do
        build processes): asked for as many slots or more (the run uses ``count`` of them), as large or
        larger. A small /dev/shm may give fewer slots, or a ring on disk, with a note
        (NOTE [ Small /dev/shm ])."""
        if (self.ring is None or self.ring.requested < count or self.ring.slot_bytes < slot_bytes
                or self.ring.asked_dir != where):
            if self.ring is not None:
                self.ring.close()
                self.ring = None
            if self.build_pool is not None:  # they map the old ring
                self.build_pool.close()
                self.build_pool = None
            self.ring, notes = open_ring(count, slot_bytes, where)
            for note in notes:
                if note not in self.notes:
                    self.notes.append(note)
                    print(f"pipeline: note: {note}", file=sys.stderr)
        return self.ring

    def _pump_idle(self, timeout: float) -> None:
        """Between runs (or before the first): take 'ready' messages, notice deaths while starting."""
        due = self.respawn_due()
        by_conn = {w.conn: w for w in self.workers}
        for obj in wait(list(by_conn) + [w.process.sentinel for w in self.workers],
                        timeout if due is None else min(timeout, due)):
            w = by_conn.get(obj)
            if w is not None:
                try:
                    while w.conn.poll():
                        self._on_setup_message(w, w.conn.recv())
                except (EOFError, OSError):
                    pass
        for w in list(self.workers):
            if not w.process.is_alive():
                if w.ready:
                    self._replace(w, self._cause(w))
                else:
                    self._died_unready(w, self.cfg.faults.max_attempts)

    def _on_setup_message(self, w: Handle, msg: tuple) -> None:
        if msg[0] == "ready":
            w.ready, w.pid, w.device = True, msg[1], msg[2]
            self.start_failures.pop(w.rank, None)
            if self._t_start is not None:
                if not self.startup_s:
                    self.startup_s = time.perf_counter() - self._t_start
                if all(h.ready for h in self.workers) and not self.respawn_at:
                    self.ready_s = time.perf_counter() - self._t_start
                    self._t_start = None
        elif msg[0] == "fatal":
            raise remote_error(msg[1], f"worker {w.rank} (pid {w.process.pid}) failed to set up kernel "
                                       f"'{self.spec.name}'")
        elif msg[0] == "note":
            if msg[1] not in self.notes:
                self.notes.append(msg[1])
        else:
            raise AssertionError(f"unexpected message from worker {w.rank} between runs: {msg[0]}")

    @staticmethod
    def _cause(w: Handle) -> str:
        return signal_name(w.process.exitcode) + _likely(w.process.exitcode)

    def _died_unready(self, w: Handle, limit: int) -> None:
        """NOTE [ Restarts while starting ]
        A worker that died (a signal, an exit) before it was ready, while importing torch or setting its
        kernel up, is started again after a short backoff (0.1 s, doubling, at most 2 s), and the run goes
        on with the workers that are up: the OOM killer, a preempted node or a container restart do that
        to a worker that did nothing wrong. A kernel setup that raises is another matter: deterministic (a
        config or code error), it fails the run at once ("fatal"). The ``limit``-th death in a row of the
        same rank before it was ready fails the run, with one line saying how each start ended."""
        w.process.join()
        w.conn.close()
        self.workers.remove(w)
        self.generation += 1  # its pipes are gone from the run's poll object
        causes = self.start_failures.setdefault(w.rank, [])
        causes.append(self._cause(w))
        if len(causes) >= limit:
            hint = ""
            main = sys.modules.get("__main__")
            if w.process.exitcode == 1 and getattr(main, "__file__", None) and not getattr(main, "__spec__", None):
                hint = (f"; its error is printed above. If it says 'bootstrapping phase', "
                        f"{os.path.basename(main.__file__)} calls pipeline at import time: spawn re-imports "
                        f"the main script in every worker, so put the call under "
                        f"`if __name__ == \"__main__\":`")
            raise WorkerError(f"worker {w.rank} (pid {w.process.pid}) died while starting, {len(causes)} times "
                              f"in a row (faults.max_attempts): {'; '.join(causes)}{hint}")
        self.restarts.append({"rank": w.rank, "pid": w.process.pid, "cause": f"{causes[-1]} while starting",
                              "batch": None})
        self.respawn_at[w.rank] = time.monotonic() + min(2.0, 0.1 * 2 ** (len(causes) - 1))

    def respawn_due(self) -> float | None:
        """Start the workers whose backoff is over (NOTE [ Restarts while starting ]); the seconds until
        the next is due, or None when none waits."""
        now = time.monotonic()
        for rank, at in list(self.respawn_at.items()):
            if at <= now:
                del self.respawn_at[rank]
                self.workers.append(self._spawn(rank))
                self.workers.sort(key=lambda h: h.rank)
        return max(0.0, min(self.respawn_at.values()) - now) if self.respawn_at else None

    def _replace(self, w: Handle, cause: str, batch: int | None = None) -> None:
        """A worker died (or was killed): record it and start a fresh one in its place."""
        w.process.join()
        w.conn.close()
        self.workers.remove(w)
        self.restarts.append({"rank": w.rank, "pid": w.pid, "cause": cause, "batch": batch})
        self.workers.append(self._spawn(w.rank))
        self.workers.sort(key=lambda h: h.rank)


class _Run:
    """One stream: the supervisor thread's state and loop (NOTE [ Supervisor ])."""

    def __init__(self, ex: LocalExecutor, batches, ordered: bool, window: int | None, cfg: Config):
        self.ex, self.cfg = ex, cfg
        self.batches = iter(batches)
        self.source = getattr(batches, "source", None)  # builds batch k on its own (see sources.Work)
        self.rebuild = self.source.batch if self.source is not None else None
        self.max_nbytes = getattr(batches, "max_nbytes", None)
        self.digests = getattr(batches, "digests", False)  # workers digest each result (the caller's checksum)
        self.ordered = ordered
        self.cuda = _cuda(self.cfg)
        self.in_flight = self.cfg.in_flight(self.cuda)
        self.asked_window = window
        self.small = False  # small batches (NOTE [ Small batches ] in worker.py): set in _setup
        self.ready_since = 0.0  # when the oldest batch waiting for a worker became ready (small batches)
        self.hold_until = 0.0  # when a dispatch held back for that ends (0: none held; batches that wait
        # for a worker with room wait for its answer, which wakes the supervisor: no timed look)
        # the builds reported once every worker was up: the first's and the last's time, their CPU and wall
        # time, how many (see gil_note)
        self.build_span = (0.0, 0.0, 0.0, 0.0, 0)
        self.build_cpu: float | None = None  # moving averages of a build's CPU and wall time (_measured)
        self.build_wall = 0.0
        self.window = max(window or 2 * self.in_flight, self.in_flight)
        self.depth = max(2, math.ceil(self.in_flight / max(1, len(ex.workers))))  # tasks queued per worker
        self.base_depth = self.depth
        self.batch_s = 1.0  # moving average of a batch's time in a worker (small batches: see _account)
        self.breakdown = {k: 0.0 for k in BREAKDOWN}
        self.counts = {"batches": 0, "pickled": 0, "direct": 0, "h2d_bytes": 0, "build_cpu_s": 0.0, "built": 0,
                       "sends": 0, "sent": 0, "messages": 0, "answers": 0, "inline": 0}
        self.notes: list[str] = []  # this run's own notes (the executor's are for every run)
        self.cond = threading.Condition()
        self.held: dict[int, Outcome] = {}  # done, not yet taken by the consumer
        self.outbox: list[Outcome] = []  # done, not yet handed to the consumer (the supervisor's own)
        self.outbox_since = 0.0  # when the oldest of them was done (NOTE [ Hand-over ])
        self.asleep = False  # the supervisor is (about to be) waiting in poll: build threads must wake it
        self.taken = 0
        self.error: BaseException | None = None
        self.finished = False
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.builders: Builders | None = None
        self.ring: SlotRing | None = None

    # -- the consumer's side (the caller's thread) --------------------------------------------------
    def outcomes(self) -> Iterator[Outcome]:
        if not self._setup():
            return
        self.thread = threading.Thread(target=self._supervise, name="pipeline-supervisor", daemon=True)
        self.thread.start()
        while True:
            with self.cond:  # every outcome that may be handed over now, under one lock
                while True:
                    outs = []  # (what was done before a failure is handed over first: in order, up to
                    out = self._next_held()  # the batch that failed)
                    while out is not None:
                        outs.append(out)
                        out = self._next_held()
                    if outs:
                        break
                    if self.error is not None:
                        raise self.error
                    if self.finished:
                        return
                    self.cond.wait(1.0)
            for out in outs:
                if out.failure is not None and "raise" in out.failure:  # (see _batch_failed)
                    raise out.failure["raise"]
                # taken one at a time (the window bounds what is not yet yielded); the supervisor may
                # wait for this take: woken when the window was full (it reads ``taken`` under the lock,
                # after it raised ``started``: an int's update is atomic, no lock needed here)
                full = self.started - self.taken >= self.window
                self.taken += 1
                if full:
                    self._wake()
                yield out

    def _next_held(self) -> Outcome | None:
        if not self.held:
            return None
        if not self.ordered:
            out = self.held.pop(next(iter(self.held)))
        else:
            drawn = self.builders.drawn
            if not (drawn and drawn[0] in self.held):
                return None
            out = self.held.pop(drawn.popleft())
        self.breakdown["order_wait_s"] += time.perf_counter() - out.info.pop("_done_at")
        return out

    def _setup(self) -> bool:
        slot_bytes = int(self.cfg.handoff.slot_mb * MB) or self.max_nbytes
        if not slot_bytes:  # a caller's iterable: the first batch sizes the slots
            first = next(self.batches, None)
            if first is None:
                return False
            slot_bytes = first.nbytes
            rest = self.batches
            self.batches = (b for it in ([first], rest) for b in it)
        if not self.cfg.handoff.in_flight and slot_bytes <= SMALL_SLOT:  # NOTE [ Small batches ] in worker.py
            workers = max(1, len(self.ex.workers))
            self.in_flight = max(self.in_flight, self.cfg.build_threads(self.cuda) + SMALL_DEPTH * workers)
            self.window = max(self.asked_window or 2 * self.in_flight, self.in_flight)
            self.small = True  # (the slots are there; how many a worker gets at once follows its speed)
        self.ring = self.ex._ring_for(self.in_flight, max(1, slot_bytes), self.cfg.handoff.dir)
        self.slots = min(self.ring.count, self.in_flight)  # (a ring kept from a run that asked for more)
        self.free = list(range(self.slots - 1, -1, -1))
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self._polled = -1  # the worker generation the poll object was made for (see _pump)
        self.done_q: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = self.cfg.build_threads(self.cuda)
        procs = self.cfg.workers.build_processes
        if procs and self.source is None:
            self._note(f"workers.build_processes = {procs}: a caller's iterator is drawn in order in the "
                       f"main, so its batches were built on the main's threads; give a map-style dataset "
                       f"(__len__ and __getitem__) to build them in processes")
        if procs and self.source is not None:
            self.builders = self.ex._build_processes(self.source, self.ring, procs, max(1, self.threads // procs),
                                                     self.cfg.handoff.dir)
            self.builders.bind(self.batches, self._built, self.ordered)
        else:
            self.builders = Builders(self.batches, self.rebuild, self.ring, self.threads, self._built,
                                     record_order=self.ordered)
        self.threads = self.builders.count
        self.slot_wait_since = self.worker_wait_since = 0.0  # when each wait began (0: not waiting)
        self.started = 0  # next-batch jobs issued and not answered 'exhausted'
        self.jobs = 0  # jobs the builders have not answered yet
        self.exhausted = False
        self.ready: deque[Task] = deque()  # built (or to be sent again), waiting for a worker
        self.pickled_ready = 0  # of which travel pickled (larger than a slot)
        # (index, attempt, the batch record or None) to build again: from the record when the source can't
        # build batch i on its own (a caller's iterator), else from the source
        self.rebuilds: deque[tuple[int, int, Any]] = deque()
        self.attempts: dict[int, int] = {}
        return True

    def stop(self, settle: bool) -> None:
        """End the run (normally, early, or on an error): stop the supervisor, the builders, and settle."""
        if self.thread is not None:
            self.stopping = True
            self._wake()
            self.thread.join(STUCK_SEND_S)
            if self.thread.is_alive():  # stuck sending to a worker that does not read (stopped, wedged):
                for w in self.ex.workers:  # end the workers, and the send fails with a broken pipe
                    if w.process.is_alive():
                        w.process.kill()
                self.thread.join()
        if self.builders is not None:
            if self.builders is not self.ex.build_pool or not self.builders.idle():
                self.builders.close()  # (build processes that finished every job stay for the next run)
                if self.builders is self.ex.build_pool:
                    self.ex.build_pool = None
            else:
                self.builders.unbind()  # nothing of theirs may reach this run's wake-up pipe once closed
            if not self.builders.stuck():  # one stuck in the caller's iterator
                os.close(self.wake_r)  # may still write: then the pipe stays open (a reused fd number
                os.close(self.wake_w)  # would get its byte)
        if settle and self.thread is not None:
            self._settle()

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def gil_note(self) -> str | None:
        """The build was the limit (workers waited longer for batches than they computed) and its threads,
        while the batches were being built, used about one CPU between them, and were not mostly waiting
        (for I/O): the source holds the GIL (Python in ``__getitem__``), so more threads don't help and
        build processes would. (Measured over the span of the builds, not per build: threads that share a
        batch's chunks take turns on the GIL between chunks, so each chunk alone looks like a full CPU.)"""
        if self.builders is None or hasattr(self.builders, "procs") or not self.breakdown["build_s"]:
            return None
        t, c, b = self.threads, self.counts, self.breakdown
        if 2 * c["inline"] > c["built"]:  # quick builds, done by the supervisor: its fixed cost is the limit
            return None
        if t < 2 or c["built"] < 2 * t or devices.usable_cpus() < 2 or b["idle_s"] <= b["compute_s"]:
            return None
        first, last, cpu, wall, n = self.build_span
        if n < 2 * t:
            return None
        cpus = cpu / max(last - first + wall / n, 1e-9)  # (from the start of the first)
        if not 0.4 <= cpus <= 1.25 or cpu < 0.3 * wall:  # (one interpreter's worth, or less when the
            # supervisor's share of the GIL was large; not mostly waiting, for I/O)
            return None
        return (f"build: the build was the limit (workers waited {b['idle_s'] / c['built'] * 1000:.1f} ms per "
                f"batch for one) and did not scale with threads: {t} build threads used {cpus:.1f} CPUs between "
                f"them ({c['build_cpu_s'] / c['built'] * 1000:.1f} ms of CPU and {b['build_s'] / c['built'] * 1000:.1f} "
                f"ms of thread time per batch): the source holds the GIL; build in processes instead: "
                f"--build-processes {min(t, devices.usable_cpus())}")

    def figures(self) -> dict:
        ring, c = self.ring, self.counts
        h2d = self.breakdown["h2d_s"]
        return {
            "slots": self.slots if ring else 0,
            "slot_bytes": ring.slot_bytes if ring else 0,
            "build_threads": self.builders.count if self.builders else 0,
            "build_processes": len(getattr(self.builders, "procs", ())),
            "pickled_fallbacks": c["pickled"],
            "h2d_gbps": round(c["h2d_bytes"] / h2d / 1e9, 2) if h2d and c["h2d_bytes"] else None,
            "h2d_from_slot": (c["direct"] == c["batches"]) if c["h2d_bytes"] else None,
            "built_inline": c["inline"],
            "tasks_per_send": round(c["sent"] / c["sends"], 2) if c["sends"] else None,
            "answers_per_message": round(c["answers"] / c["messages"], 2) if c["messages"] else None,
        }

    # -- wake-ups ----------------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake (pipe full) or closed

    def _built(self, event: tuple) -> None:
        """Called by build threads: the supervisor is woken only when it waits (or is about to: ``_pump``
        looks at the queue after it says so); when busy it takes every finished build on its next turn."""
        self.done_q.put(event)
        if self.asleep:
            self._wake()

    # -- the supervisor thread -----------------------------------------------------------------------
    def _supervise(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # Ctrl-C is the main thread's
        try:
            while not self.stopping:
                self._take_builds()
                self._issue_builds()
                self._dispatch()
                at_workers = any(w.tasks for w in self.ex.workers)
                if self.exhausted and not (self.jobs or self.ready or self.rebuilds or at_workers):
                    break
                due = self.ex.respawn_due()
                tick = self._tick() if due is None else min(self._tick(), due)
                if self.hold_until:  # a held dispatch (see _dispatch): look again when the hold ends
                    tick = min(tick, max(0.0, self.hold_until - time.perf_counter()))
                self._post(now=False)
                post = self._post_due()
                self._pump(tick if post is None else min(tick, post))
                self._post(now=False)
        except BaseException as e:  # noqa: BLE001 - the consumer raises it
            with self.cond:
                self.error = e
        finally:
            self._post()
            with self.cond:
                self.finished = True
                self.cond.notify_all()

    def _tick(self) -> float:
        t = self.cfg.faults.batch_timeout_s
        return min(1.0, t / 4) if t else 1.0

    def _take_builds(self) -> None:
        while True:
            try:
                event = self.done_q.get_nowait()
            except queue.Empty:
                return
            self._on_event(event)

    def _on_event(self, event: tuple) -> None:
        """A builder's report (NOTE [ Builders ]): a batch built, the source exhausted, a build that raised,
        a build process gone."""
        kind = event[0]
        if kind == "built":
            self.jobs -= 1
            self._on_built(event[1])
        elif kind == "builder_died":
            self._builder_died(event[1])
        else:
            self.jobs -= 1
            if kind == "exhausted":
                self.exhausted = True
                self.started -= 1
                self.free.append(event[1])
            else:
                self._build_failed(*event[1:])

    def _build_failed(self, slot: int | None, error: BaseException, index: int | None) -> None:
        """A build raised. Drawing from a caller's iterator (no index): the run fails with it. Building
        batch ``index`` (a dataset's sample, a file): that batch fails, under ``faults.on_error``."""
        if slot is not None:
            self.free.append(slot)
        if index is None:
            raise error
        if self.cfg.faults.on_error != "skip":
            return self._batch_failed(index, error)
        self._fail(index, f"{type(error).__name__}: {error}", self.attempts.pop(index, 1))

    def _batch_failed(self, index: int, error: BaseException) -> None:
        """Batch ``index`` raised (its kernel, or its build) and ``faults.on_error`` is "fail": the run
        fails with that error. As done: at once. In order: once the batches before it are handed over (none
        of them is lost with it): nothing new starts, what was started ends, and the consumer raises the
        error where the batch would have come (the earliest, if several fail meanwhile)."""
        if not self.ordered:
            raise error
        self.exhausted = True  # (no batch is drawn any more; retries of those in flight go on)
        self._deliver(Outcome(index, None, {"_done_at": time.perf_counter()}, {"batch": index, "raise": error}))

    def _fail(self, index: int, cause: str, attempts: int) -> None:
        self._deliver(Outcome(index, None, {"_done_at": time.perf_counter()},
                              {"batch": index, "cause": cause, "attempts": attempts}))

    def _builder_died(self, rank: int) -> None:
        """A build process is gone (NOTE [ Build processes ]): its batches are built again elsewhere, or
        quarantined after ``faults.max_attempts``; a new process takes its place."""
        if self.stopping or self.builders is None:
            return
        limit = self.cfg.faults.max_attempts
        old, held, cause = self.builders.replace(rank, limit)
        self.ex.restarts.append({"builder": rank, "pid": old.pid or old.process.pid, "cause": cause,
                                 "batch": held[0][1] if held else None})
        for slot, index in held:
            self.jobs -= 1
            self.free.append(slot)
            attempt = self.attempts.pop(index, 1) + 1
            if attempt > limit:
                self._fail(index, f"build process {rank} died building it: {cause}", attempt - 1)
            else:
                self.rebuilds.append((index, attempt, None))

    def _on_built(self, b: Built) -> None:
        if self.ex._t_start is None:  # (the workers are up: builds are not held back by their start)
            first, _, cpu, wall, n = self.build_span
            now = time.perf_counter()
            self.build_span = (first or now, now, cpu + (b.cpu or 0.0), wall + b.seconds, n + 1)
        self.breakdown["build_s"] += b.seconds
        self.counts["built"] += 1
        if b.cpu is None:  # not measured (an inline build: see _issue_builds): the last measured ratio
            self.counts["build_cpu_s"] += b.seconds * min(1.0, self.build_cpu / max(self.build_wall, 1e-9))
        else:
            self.counts["build_cpu_s"] += b.cpu
            self._measured(b.cpu, b.seconds)
        attempt = self.attempts.pop(b.index, 1)
        if b.desc is None:  # larger than a slot: the array travels pickled
            self.free.append(b.slot)
            self.counts["pickled"] += 1
            if self.counts["pickled"] == 1:
                self._note(f"handoff: batch {b.index} ({b.nbytes / MB:.2f} MiB) was larger than a slot "
                           f"({self.ring.slot_bytes / MB:.2f} MiB) and travelled pickled through a worker's "
                           f"pipe, slower (pickled_fallbacks counts such batches); --set handoff.slot_mb="
                           f"{-(-b.nbytes // MB)} or more keeps them in shared memory")
            task = Task(b.index, attempt, array=b.array, digest=self.digests)
        else:
            task = Task(b.index, attempt, self.ring.path, self.ring.slot_bytes, b.desc, digest=self.digests)
            task.batch = b.batch  # a caller's batch: kept (a reference, no copy) to build it again
        self.ready.append(task)
        self.pickled_ready += task.array is not None

    def _measured(self, cpu: float, wall: float) -> None:
        """A build's CPU and wall time into the moving averages ``_inline`` decides from: from the first
        build measured, of samples capped at twice the limits (one build that was preempted, or waited for
        the GIL, does not send the next ones to the build threads; a run of slow ones does)."""
        cpu, wall = min(cpu, 2 * INLINE_CPU_S), min(wall, 2 * INLINE_WALL_S)
        if self.build_cpu is None:
            self.build_cpu, self.build_wall = cpu, wall
        else:
            self.build_cpu += 0.2 * (cpu - self.build_cpu)
            self.build_wall += 0.2 * (wall - self.build_wall)

    def _inline(self) -> bool:
        """Build on this thread: the source builds batch i on its own, in the main's threads, and its
        batches take less time to build than handing them to a build thread and back costs
        (NOTE [ Small batches ] in worker.py). Decided from the builds so far, and again after each."""
        return (self.source is not None and not hasattr(self.builders, "procs")
                and self.counts["built"] >= 2 * self.threads and self.build_cpu is not None
                and self.build_cpu < INLINE_CPU_S and self.build_wall < INLINE_WALL_S)

    def _issue_builds(self) -> None:
        """Jobs for the build threads, two a thread at most: a slot is taken when a thread is about to
        fill it (the second job lets a thread go on from one build to the next without waiting for this
        thread's turn), so 'no free slot while a build thread is idle' (``slot_wait``) means the workers
        hold them all. Batches that build quicker than a hand-off are built here instead, a few at a time
        (``_inline``)."""
        t0 = time.perf_counter()
        inline = self._inline()
        if inline:
            def submit(slot, index=None, batch=None):
                self.counts["inline"] += 1  # (one build in INLINE_SAMPLE has its CPU time measured)
                self._on_event(self.builders.build_here(slot, index, batch,
                                                         self.counts["inline"] % INLINE_SAMPLE == 1))
        else:
            submit = self.builders.submit
        idle = 2 * self.depth * max(1, len(self.ex.workers)) if inline else 2 * self.threads - self.jobs
        while self.free and self.rebuilds and idle > 0:
            index, attempt, batch = self.rebuilds.popleft()
            self.attempts[index] = attempt
            self.jobs, idle = self.jobs + 1, idle - 1
            submit(self.free.pop(), index, batch)
        with self.cond:
            room = self.window - (self.started - self.taken)
        while not self.exhausted and room > 0 and self.free and idle > 0:
            self.jobs, idle, room = self.jobs + 1, idle - 1, room - 1
            self.started += 1
            submit(self.free.pop())  # (inline: 'exhausted' ends the loop)
            if inline and time.perf_counter() - t0 > worker.HOLD_S:  # the workers' answers are read meanwhile
                break
        self.builders.flush()
        starved = not self.exhausted and room > 0 and self.jobs < self.threads and not self.free
        if starved and self.ex._t_start is None:  # (waits while workers still start are start-up)
            self.slot_wait_since = self.slot_wait_since or t0
        elif self.slot_wait_since:
            self.breakdown["slot_wait_s"] += t0 - self.slot_wait_since
            self.slot_wait_since = 0.0

    def _dispatch(self) -> None:
        """Ready batches to the workers with room, the idlest first; each worker's share in one message
        (NOTE [ Small batches ] in worker.py)."""
        t0 = time.perf_counter()
        sends: dict[int, tuple[Handle, list[Task]]] = {}
        # Small batches: a worker with nothing to do (waiting in its pipe) is woken with a full share, not
        # one batch at a time, while another still computes (it frees slots soon) and for HOLD_S at most.
        if self.small and self.ready and not self.ready_since:
            self.ready_since = t0
        hold = (self.small and not self.exhausted and t0 - self.ready_since < worker.HOLD_S
                and any(w.tasks for w in self.ex.workers))
        drained = True
        while self.ready:
            # A pickled batch goes only to an idle worker: one that is computing would not read it while
            # it sends its own result, and both sends would block for ever once they exceed a pipe's buffer.
            pickled = self.ready[0].array is not None
            depth = 1 if pickled else self.depth
            full = not hold or len(self.ready) >= self.depth // 2
            room = [w for w in self.ex.workers if w.ready and len(w.tasks) < depth and (w.tasks or full)]
            if not room:
                drained = False
                break
            if pickled:
                counts, n = [0] * len(room), 1
                counts[min(range(len(room)), key=lambda i: len(room[i].tasks))] = 1
                self.pickled_ready -= 1
            else:  # the slot batches up to the next pickled one, shared out at once, the idlest first
                n = len(self.ready)
                if self.pickled_ready:
                    n = next((i for i, t in enumerate(self.ready) if t.array is not None), n)
                counts = _shares([len(w.tasks) for w in room], depth, n)
            for w, k in zip(room, counts):
                if k:
                    if not w.tasks:
                        w.head_since = time.monotonic()
                    tasks = [self.ready.popleft() for _ in range(k)]
                    w.tasks.extend(tasks)
                    sends.setdefault(w.rank, (w, []))[1].extend(tasks)
            if sum(counts) < n:  # every worker with room is full now
                drained = not self.ready
                break
        if not drained:
            if self.ex._t_start is None:  # waits for workers still starting are start-up, not waits
                self.worker_wait_since = self.worker_wait_since or t0
        else:
            self.ready_since = 0.0
            if self.worker_wait_since:
                self.breakdown["worker_wait_s"] += t0 - self.worker_wait_since
                self.worker_wait_since = 0.0
        self.hold_until = self.ready_since + worker.HOLD_S if hold and self.ready else 0.0
        for w, tasks in sends.values():
            self.counts["sends"] += 1
            self.counts["sent"] += len(tasks)
            try:
                run: list[Task] = []  # slot tasks in one message; a pickled batch alone (ForkingPickler, as
                for task in tasks:    # ever), in the order of w.tasks: the order the worker answers in
                    if task.array is None:
                        run.append(task)
                        continue
                    if run:
                        worker.send(w.conn, worker.pack(run))
                        run = []
                    w.conn.send(task)
                if run:
                    worker.send(w.conn, worker.pack(run))
            except OSError:
                pass  # the worker died; its sentinel tells us, and the tasks are sent again from w.tasks
        if sends:
            self.breakdown["dispatch_s"] += time.perf_counter() - t0

    def _pump(self, timeout: float) -> None:
        """Wait for the next thing to happen (a message, a death, a build, the consumer) and handle it.
        One ``poll`` object for the run, made again only when a worker was replaced: a wait costs one
        syscall, whatever the number of workers; a message is read when its pipe is ready (one per pipe
        and wait: level-triggered, the next wait sees the rest)."""
        if self._polled != self.ex.generation:
            self._poll, self._fds = select.poll(), {self.wake_r: None}
            self._poll.register(self.wake_r, select.POLLIN)
            for w in self.ex.workers:
                for fd, sentinel in ((w.conn.fileno(), False), (w.process.sentinel, True)):
                    self._fds[fd] = (w, sentinel)
                    self._poll.register(fd, select.POLLIN)
            self._polled = self.ex.generation
        self.asleep = True  # (then the queue is looked at: a build reported before this is not missed)
        wait = 0 if not self.done_q.empty() else timeout * 1000
        events = self._poll.poll(wait)
        self.asleep = False
        look = not events and wait > 0  # a quiet tick: look at every worker anyway (not after a look
        # at a build that came in: a death shows in its sentinel's event too)
        for fd, _ in events:
            entry = self._fds.get(fd)
            if entry is None:
                os.read(self.wake_r, 4096)
                continue
            w, sentinel = entry
            if sentinel or w not in self.ex.workers:  # it ended (or was replaced during this wait)
                look = True
                continue
            try:
                t0 = time.perf_counter()
                msg = w.conn.recv()
            except (EOFError, OSError):
                look = True  # died mid-message; the sentinel follows
                continue
            several = msg[1] if msg[0] == "several" else (msg,)
            for m in several:
                self._on_message(w, m)
            self.counts["messages"] += 1
            self.counts["answers"] += len(several)
            self.breakdown["receive_s"] += time.perf_counter() - t0
        if look:
            for w in list(self.ex.workers):
                if not w.process.is_alive():
                    self._on_death(w, w.retired or self.ex._cause(w))
        self._check_deadlines()

    def _on_message(self, w: Handle, msg: tuple) -> None:
        kind = msg[0]
        if kind == "packed" or kind == "result":  # (first: the one that comes once per batch)
            task = w.tasks.popleft()
            w.head_since = time.monotonic()
            assert task.index == msg[1], (task.index, msg[1])
            self._release(task)
            w.batches += 1
            info = msg[3]  # the worker's timings, and the batch's facts for the consumer
            if "gpu_reserved_mb" in info:
                w.gpu_reserved_mb = info["gpu_reserved_mb"]
            self._account(info)
            info["pid"], info["device"], info["_done_at"] = w.pid, w.device, time.perf_counter()
            self._deliver(Outcome(task.index, fields.from_wire(msg[2]) if kind == "packed" else msg[2], info))
            return
        if kind in ("ready", "fatal", "note"):
            self.ex._on_setup_message(w, msg)
            return
        if kind == "retire":  # NOTE [ CUDA faults ] in worker.py: its sentinel follows
            w.retired = f"{msg[2]} (sticky CUDA error: worker retired and replaced)"
            return
        if kind == "copied":  # NOTE [ Slot release ]: the device has its copy
            task = next((t for t in w.tasks if t.index == msg[1]), None)
            if task is not None and self.rebuild is not None:
                self._release(task)
            return
        task = w.tasks.popleft()  # "error"
        w.head_since = time.monotonic()
        assert task.index == msg[1], (task.index, msg[1])
        self._release(task)
        if self.cfg.faults.on_error == "skip":
            self._deliver(Outcome(task.index, None, {"_done_at": time.perf_counter()},
                                  {"batch": task.index, "cause": msg[2][1], "attempts": task.attempt}))
        else:
            self._batch_failed(task.index, remote_error(msg[2], f"batch {task.index} (worker pid {w.pid}, "
                                                                 f"device {w.device})"))

    def _account(self, t: dict) -> None:
        """A result's timings (``Computer``'s, with the worker's ``idle_s`` and ``sent``) into the run's."""
        b, c = self.breakdown, self.counts
        b["stage_s"] += t["stage_s"]
        b["h2d_s"] += t["h2d_s"]
        b["compute_s"] += t["compute_s"]
        b["d2h_s"] += t["d2h_s"]
        b["idle_s"] += t["idle_s"]
        if "decode_s" in t:  # an encoded image batch, decoded by the worker (decoding.py)
            b["decode_s"] = b.get("decode_s", 0.0) + t["decode_s"]
        b["return_s"] += max(0.0, time.time() - t["sent"])
        c["batches"] += 1
        if self.small:  # queue about QUEUED_S of work per worker: deep for quick batches, never a long tail
            self.batch_s += 0.2 * (t["stage_s"] + t["compute_s"] + t["d2h_s"] - self.batch_s)
            self.depth = max(self.base_depth, min(self.in_flight // max(1, len(self.ex.workers)),
                                                  int(QUEUED_S / max(self.batch_s, 1e-6))))
        if t["h2d_s"]:
            c["h2d_bytes"] += t["h2d_bytes"]
            c["direct"] += bool(t["direct"])

    def _release(self, task: Task) -> None:
        if task.desc is not None and not task.released:
            task.released = True
            self.free.append(task.desc.slot)

    def _deliver(self, out: Outcome) -> None:
        if not self.outbox:
            self.outbox_since = time.perf_counter()
        self.outbox.append(out)  # handed over by ``_post``: one lock and one wake-up for all of them

    def _post(self, now: bool = True) -> None:
        """Hand the outbox to the consumer (NOTE [ Hand-over ]); ``now`` False: only once it holds
        ``POST_COUNT`` outcomes (fewer for a small window), its oldest is ``POST_S`` old, or the window
        is full."""
        if not self.outbox:
            return
        if not now and len(self.outbox) < max(1, min(POST_COUNT, self.window // 4)):
            if (time.perf_counter() - self.outbox_since < POST_S
                    and self.window - (self.started - self.taken) > 0):
                return
        with self.cond:
            for out in self.outbox:
                self.held[out.index] = out
            self.cond.notify_all()
        self.outbox.clear()

    def _post_due(self) -> float | None:
        """Seconds until ``_post(now=False)`` hands over what the outbox holds; None when empty."""
        return max(0.0, self.outbox_since + POST_S - time.perf_counter()) if self.outbox else None

    def _on_death(self, w: Handle, cause: str) -> None:
        if not w.ready:  # it held no batch yet (NOTE [ Restarts while starting ])
            self.ex._died_unready(w, self.cfg.faults.max_attempts)
            return
        lost = list(w.tasks)
        batch = lost[0].index if lost else None
        if lost:
            # the batch it was computing, as the worker said in its status word; else the oldest it held
            # (a worker that died between batches: the one it was about to start)
            k = int(self.ex.computing[w.rank]) - 1 if self.ex.computing is not None else -1
            at = next((j for j, t in enumerate(lost) if t.index == k), 0)
            lost.insert(0, lost.pop(at))
            head = lost[0]
            batch = head.index
            head.attempt += 1
            if head.attempt > self.cfg.faults.max_attempts:
                self._release(head)
                lost = lost[1:]
                self._deliver(Outcome(head.index, None, {"_done_at": time.perf_counter()},
                                      {"batch": head.index, "cause": cause, "attempts": head.attempt - 1}))
        for task in reversed(lost):  # the head first, then the rest in their order
            # NOTE [ Retries see the batch as built ]: on the CPU a kernel reads its slot itself and may
            # write to it (``x.relu_()``); the head was being computed, and the worker may have read the
            # ones behind it. So every batch a dead worker held in a slot is built again into a slot
            # (from the source, or from its record: a reference, no copy, kept for this), never sent
            # as it is: a retry computes on the batch as the source built it. Nothing is copied for a
            # batch that is not retried. (A batch that travelled pickled is the main's own copy.)
            if task.desc is not None:
                self._release(task)
                self.rebuilds.appendleft((task.index, task.attempt, task.batch))
            else:
                self.ready.appendleft(task)
                self.pickled_ready += 1
        self.ex._replace(w, cause, batch)

    def _check_deadlines(self) -> None:
        limit = self.cfg.faults.batch_timeout_s
        if not limit:
            return
        now = time.monotonic()
        for w in list(self.ex.workers):
            if w.tasks and now - w.head_since > limit:
                w.process.kill()
                w.process.join()
                self._on_death(w, f"timeout: batch ran over {limit:g} s (faults.batch_timeout_s)")

    # -- after an early end: the next run must start with idle workers -----------------------------
    def _settle(self, limit: float = 5.0) -> None:
        deadline = time.monotonic() + limit
        busy = [w for w in self.ex.workers if w.tasks]
        while busy and time.monotonic() < deadline:
            for obj in wait([w.conn for w in busy] + [w.process.sentinel for w in busy], 0.2):
                w = next((h for h in busy if obj in (h.conn, h.process.sentinel)), None)
                try:
                    while w is not None and w.conn.poll():
                        msg = w.conn.recv()
                        for m in msg[1] if msg[0] == "several" else (msg,):
                            if m[0] in ("result", "packed", "error"):
                                w.tasks.popleft()
                except (EOFError, OSError):
                    pass
            busy = [w for w in busy if w.tasks and w.process.is_alive()]
        for w in list(self.ex.workers):
            if w.tasks or not w.process.is_alive():
                if w.process.is_alive():
                    w.process.kill()
                head = w.tasks[0].index if w.tasks else None
                self.ex._replace(w, "stopped: still busy when its run ended early", head)


def _shares(loads: list[int], cap: int, n: int) -> list[int]:
    """How many of ``n`` tasks each worker gets, given the tasks it holds (``loads``): the least loaded
    first, never above ``cap``, as evenly as that allows (water-filling)."""
    def given(level: int) -> int:
        return sum(max(0, min(level, cap) - x) for x in loads)
    lo, hi = min(loads), cap
    while lo < hi:  # the highest level the n tasks fill everyone up to
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if given(mid) <= n else (lo, mid - 1)
    counts = [max(0, min(lo, cap) - x) for x in loads]
    left = n - sum(counts)
    for i in sorted(range(len(loads)), key=loads.__getitem__):  # the rest: one more each, idlest first
        if left and loads[i] + counts[i] < cap:
            counts[i] += 1
            left -= 1
    return counts


def _cuda(cfg: Config) -> bool:
    d = cfg.workers.device
    return d.startswith("cuda") or (d == "auto" and devices.gpu_count() > 0)


@contextmanager
def _sigint_blocked():
    """Start children deaf to SIGINT, so that a Ctrl-C while a worker is still importing torch doesn't print
    its traceback: the main alone handles Ctrl-C (NOTE [ Shutdown ] in worker.py). SIGINT is blocked (the
    mask survives fork and exec; works from any thread) and, from the main thread, also ignored (an ignored
    signal stays ignored across exec, and Python then installs no KeyboardInterrupt handler). The worker
    ignores SIGINT itself, then unblocks it."""
    import threading
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    handler = None
    if threading.current_thread() is threading.main_thread():
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        if handler is not None:
            signal.signal(signal.SIGINT, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start_deaf(ctx, p) -> None:
    """Start child ``p`` deaf to SIGINT (``_sigint_blocked``). Under forkserver only the server's own start
    is: a child's start waits until the server has imported what it preloads (torch: seconds, the first
    time), and a Ctrl-C meanwhile is the main's (ignored there, it was lost, and the run went on)."""
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver
        with _sigint_blocked():
            forkserver.ensure_running()
        p.start()
        return
    with _sigint_blocked():
        p.start()


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
