"""The local backend: spawn workers, feed them from build threads, supervise, stream results out in order.

 caller's thread               main process, supervisor thread (Run)        worker processes (worker.py)
 ---------------               -------------------------------------        ----------------------------
                               build side (building.py): free slots ->
                               builders (threads or processes) fill slot k --> ring
                   <--Outcome- worker side (dispatch.py): built batches --Task(k, slot)--> view slot -> device
 for (i, r) in ...             to the idlest worker; answers, deaths,  <--(COPIED, k)-- (CUDA: slot free)
  (in order, or as done)       deadlines; retries and quarantine     <--(RESULT, k, arrays, timings)--
   hand-over (handover.py) <-- outcomes, in order, within the window      | (ERROR, k, PackedError)

``LocalExecutor`` owns what lives across runs: the workers (their lifecycle: procs.py), the slot ring
(ring.py), build processes kept warm. ``Run`` is one stream: it sizes the slots, makes the three parts,
and runs the supervisor loop over them (NOTE [ Supervisor ] in local/dispatch.py); a slot's life is slots.py's.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import wait
from typing import Iterator

import numpy as np

from .. import devices
from ..config import Config
from ..contracts import Outcome
from ..kernels import KernelSpec
from ..outputs import Relay
from ..sources.base import Work
from ..wire import FATAL, NOTE, READY
from . import worker
from .building import BuildSide
from .buildproc import BuildProcesses
from .dispatch import Worker, WorkerSide, settle
from .handover import Handover
from .procs import Children, likely, signal_name
from .ring import SlotRing, open_ring, remove_stale
from .slots import SlotPool

SMALL_SLOT = 256 << 10  # batches this small get SMALL_DEPTH slots per worker (NOTE [ Small batches ])
SMALL_DEPTH = 32
STUCK_SEND_S = 10.0  # a run's stop waits this long for the supervisor, then ends the workers it may be sending to
BREAKDOWN = ("build_s", "dispatch_s", "receive_s", "stage_s", "h2d_s", "compute_s", "d2h_s",
             "slot_wait_s", "worker_wait_s", "idle_s", "return_s", "order_wait_s")


class LocalExecutor:
    """Workers for one config and kernel (an ``Executor``: contracts.py); ``stream`` can run several times
    on the same workers."""

    def __init__(self, cfg: Config, spec: KernelSpec):
        self.cfg, self.spec = cfg, spec
        self.ctx = mp.get_context(cfg.workers.start_method)
        if cfg.workers.start_method == "forkserver":  # the server imports torch once; workers fork from it
            self.ctx.set_forkserver_preload([worker.__name__])
        self.threads = cfg.threads_per_worker()
        self.relay = Relay()  # workers' stdout and stderr -> our stderr; the runner sets relay.bar
        self.children = Children(self.ctx, "worker", "worker", worker.main, self.relay, self.threads,
                                 cfg.handoff.dir, make=Worker)
        self.workers: list[Worker] = []
        self.history: list[Worker] = []
        self.generation = 0  # counts workers started: the set of pipes to wait on changed
        self.respawn_at: dict[int, float] = {}  # rank -> when to start it again (a death while starting)
        self.restarts: list[dict] = []
        self.notes: list[str] = []
        self.startup_s = 0.0  # until the first worker could compute (the first builds overlap it)
        self.ready_s = 0.0  # until every worker was ready (0: not all were, the run was over before)
        self.breakdown: dict = {}
        self.figures: dict = {}
        self.run_notes: list[str] = []  # the last run's own notes
        self.gil: str | None = None  # the last run's build held the GIL: what to do (BuildSide.gil_note)
        self.build_pool: BuildProcesses | None = None  # build processes kept from the last run
        self.ring: SlotRing | None = None
        self.status: SlotRing | None = None  # the workers' status words (``computing``)
        self.computing = None
        self._t_start: float | None = None

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
        try:  # a word per worker: the batch it is computing (NOTE [ Small batches ] in local/worker.py)
            self.status = SlotRing(1, 8 * max(1, self.cfg.workers.count), self.cfg.handoff.dir)
            self.computing = np.frombuffer(self.status._mm, np.int64)
        except OSError:  # no room even for that: workers send every result at once
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

    @property
    def up(self) -> bool:
        """Every worker has been ready once: waits from now on are the run's, not its start-up's."""
        return self._t_start is None

    def _spawn(self, rank: int) -> Worker:
        if self.computing is not None:
            self.computing[rank] = 0
        w = self.children.start(rank, self.spec, self.cfg.workers.device, self.threads, self.cfg.handoff.pinned,
                                self.status.path if self.status is not None else None)
        self.history.append(w)
        self.generation += 1  # a run's poll object is made again (WorkerSide.pump)
        return w

    def close(self, graceful: bool = True) -> None:
        """Stop every worker (politely, then by force); nothing is left running."""
        self.children.stop(self.workers, graceful)
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
    def stream(self, work: Work, ordered: bool = True, window: int | None = None,
               settle: bool = True, cfg: Config | None = None) -> Iterator[Outcome]:
        """Compute every batch of ``work`` (sources.base.Work); yield an ``Outcome`` per batch, in batch
        order when ``ordered``, else as they complete.

        ``settle``: when the stream ends early (closed, or an error), let the workers finish what they
        hold (or replace the ones that don't within a few seconds), so that the next run starts clean;
        without it, the caller is expected to ``close()`` the executor.

        ``cfg``: this run's configuration (a warm ``Pipeline``'s per-call overrides: slots, build threads,
        faults); what the workers were started with (kernel, count, device) is the executor's.
        """
        self.start()
        run = Run(self, work, ordered, window, cfg or self.cfg)
        try:
            yield from run.outcomes()
        finally:
            run.stop(settle)
            self.breakdown = dict(run.breakdown, build_cpu_s=run.counts["build_cpu_s"])
            self.figures = run.figures()
            self.run_notes = list(run.notes)
            self.gil = run.gil_note()  # the verdict's advice when the build holds the GIL (NOTE [ Verdict ])

    def build_processes(self, source, ring: SlotRing, processes: int, threads: int, ring_dir: str):
        """The run's build processes (NOTE [ Build processes ]): those of the previous run when it built
        the same source into the same ring and ended with every job answered, else new ones."""
        import cloudpickle
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

    def ring_for(self, count: int, slot_bytes: int, where: str) -> SlotRing:
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

    # -- the workers' lives ------------------------------------------------------------------------------
    def _pump_idle(self, timeout: float) -> None:
        """Between runs (or before the first): take READY messages, notice deaths while starting."""
        due = self.respawn_due()
        by_conn = {w.conn: w for w in self.workers}
        for obj in wait(list(by_conn) + [w.process.sentinel for w in self.workers],
                        timeout if due is None else min(timeout, due)):
            w = by_conn.get(obj)
            if w is not None:
                try:
                    while w.conn.poll():
                        self.on_setup_message(w, w.conn.recv())
                except (EOFError, OSError):
                    pass
        for w in list(self.workers):
            if not w.process.is_alive():
                if w.ready:
                    self.replace(w, self.cause(w))
                else:
                    self.died_unready(w, self.cfg.faults.max_attempts)

    def on_setup_message(self, w: Worker, msg: tuple) -> None:
        if msg[0] == READY:
            w.pid, w.device = msg[1], msg[2]
            self.children.came_up(w)
            if self._t_start is not None:
                if not self.startup_s:
                    self.startup_s = time.perf_counter() - self._t_start
                if all(h.ready for h in self.workers) and not self.respawn_at:
                    self.ready_s = time.perf_counter() - self._t_start
                    self._t_start = None
        elif msg[0] == FATAL:
            raise msg[1].exception(f"worker {w.rank} (pid {w.process.pid}) failed to set up kernel "
                                   f"'{self.spec.name}'")
        elif msg[0] == NOTE:
            if msg[1] not in self.notes:
                self.notes.append(msg[1])
        else:
            raise AssertionError(f"unexpected message from worker {w.rank} between runs: {msg[0]}")

    @staticmethod
    def cause(w: Worker) -> str:
        return signal_name(w.process.exitcode) + likely(w.process.exitcode)

    def died_unready(self, w: Worker, limit: int) -> None:
        """NOTE [ Restarts while starting ]
        A worker that died (a signal, an exit) before it was ready, while importing torch or setting its
        kernel up, is started again after a short backoff (0.1 s, doubling, at most 2 s), and the run goes
        on with the workers that are up: the OOM killer, a preempted node or a container restart do that
        to a worker that did nothing wrong. A kernel setup that raises is another matter: deterministic (a
        config or code error), it fails the run at once (FATAL). The ``limit``-th death in a row of the
        same rank before it was ready fails the run, with one line saying how each start ended
        (``procs.Children.died``). Build processes are started again at once, by the same count."""
        self.workers.remove(w)
        self.generation += 1  # its pipes are gone from the run's poll object
        cause = self.children.died(w, limit)
        tries = len(self.children.failed_starts[w.rank])
        self.restarts.append({"rank": w.rank, "pid": w.process.pid, "cause": f"{cause} while starting",
                              "batch": None})
        self.respawn_at[w.rank] = time.monotonic() + min(2.0, 0.1 * 2 ** (tries - 1))

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

    def replace(self, w: Worker, cause: str, batch: int | None = None) -> None:
        """A worker died (or was killed): record it and start a fresh one in its place."""
        self.workers.remove(w)
        self.children.died(w, self.cfg.faults.max_attempts)
        self.restarts.append({"rank": w.rank, "pid": w.pid, "cause": cause, "batch": batch})
        self.workers.append(self._spawn(w.rank))
        self.workers.sort(key=lambda h: h.rank)


class Run:
    """One stream: sizes the slots, makes its build side, worker side and hand-over, and runs the
    supervisor thread's loop over them (NOTE [ Supervisor ] in local/dispatch.py)."""

    def __init__(self, ex: LocalExecutor, work: Work, ordered: bool, window: int | None, cfg: Config):
        self.ex, self.cfg, self.work, self.ordered = ex, cfg, work, ordered
        self.trace = work.trace  # trace.Recorder or None (NOTE [ Trace ] in trace.py)
        self.cuda = devices.on_cuda(cfg.workers.device)
        self.in_flight = cfg.in_flight(self.cuda)
        self.asked_window = window
        self.small = False  # small batches (NOTE [ Small batches ] in local/worker.py): set in _setup
        self.breakdown = {k: 0.0 for k in BREAKDOWN}
        self.counts = {"batches": 0, "pickled": 0, "direct": 0, "h2d_bytes": 0, "build_cpu_s": 0.0, "built": 0,
                       "sends": 0, "sent": 0, "messages": 0, "answers": 0, "inline": 0}
        self.notes: list[str] = []  # this run's own notes (the executor's are for every run)
        self.asleep = False  # the supervisor is (about to be) waiting in poll: build threads must wake it
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.ring: SlotRing | None = None
        self.handover = Handover(self, max(window or 2 * self.in_flight, self.in_flight), ordered)
        self.build: BuildSide | None = None
        self.workers: WorkerSide | None = None

    def outcomes(self) -> Iterator[Outcome]:
        if not self._setup():
            return
        self.thread = threading.Thread(target=self._supervise, name="pipeline-supervisor", daemon=True)
        self.thread.start()
        yield from self.handover.outcomes()

    def _setup(self) -> bool:
        batches = iter(self.work)
        asked = self.in_flight
        slot_bytes = int(self.cfg.handoff.slot_mb * (1 << 20)) or self.work.max_nbytes
        if not slot_bytes:  # a caller's iterable: the first batch sizes the slots
            first = next(batches, None)
            if first is None:
                return False
            slot_bytes = first.nbytes
            rest = batches
            batches = (b for it in ([first], rest) for b in it)
        if not self.cfg.handoff.in_flight and slot_bytes <= SMALL_SLOT:  # NOTE [ Small batches ] in local/worker.py
            workers = max(1, len(self.ex.workers))
            self.in_flight = max(self.in_flight, self.cfg.build_threads(self.cuda) + SMALL_DEPTH * workers)
            self.handover.window = max(self.asked_window or 2 * self.in_flight, self.in_flight)
            self.small = True  # (the slots are there; how many a worker gets at once follows its speed)
        self.ring = self.ex.ring_for(self.in_flight, max(1, slot_bytes), self.cfg.handoff.dir)
        self.pool = SlotPool(min(self.ring.count, self.in_flight))  # (a ring kept from a run that asked for more)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.workers = WorkerSide(self, asked)
        self.build = BuildSide(self, batches, self.work.source, self.work.digests)
        self.handover.drawn = self.build.builders.drawn
        if self.trace is not None:
            for w in self.ex.workers:  # (one still starting: its start-up span comes with its READY)
                pid = w.pid or w.process.pid
                self.trace.name_process(pid, f"worker {w.rank} (pid {pid})")
        return True

    def stop(self, settle_workers: bool) -> None:
        """End the run (normally, early, or on an error): stop the supervisor, the builders, and settle."""
        if self.thread is not None:
            self.stopping = True
            self.wake()
            self.thread.join(STUCK_SEND_S)
            if self.thread.is_alive():  # stuck sending to a worker that does not read (stopped, wedged):
                for w in self.ex.workers:  # end the workers, and the send fails with a broken pipe
                    if w.process.is_alive():
                        w.process.kill()
                self.thread.join()
        if self.build is not None and self.build.stop():  # (one stuck in the caller's iterator may still
            os.close(self.wake_r)  # write: then the pipe stays open, or a reused fd number would get its byte)
            os.close(self.wake_w)
        if self.trace is not None:  # (results never taken: their stages, without a wait for order)
            for out in self.handover.untaken():
                self.handover.traced(out, out.info.get("_done_at", 0.0), 0.0)
        if settle_workers and self.thread is not None:
            settle(self.ex)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake (pipe full) or closed

    def gil_note(self) -> str | None:
        return self.build.gil_note() if self.build is not None else None

    def figures(self) -> dict:
        ring, c, h2d = self.ring, self.counts, self.breakdown["h2d_s"]
        builders = self.build.builders if self.build is not None else None
        return {
            "slots": self.pool.count if ring else 0,
            "slot_bytes": ring.slot_bytes if ring else 0,
            "build_threads": builders.count if builders else 0,
            "build_processes": builders.processes if builders else 0,
            "pickled_fallbacks": c["pickled"],
            "h2d_gbps": round(c["h2d_bytes"] / h2d / 1e9, 2) if h2d and c["h2d_bytes"] else None,
            "h2d_from_slot": (c["direct"] == c["batches"]) if c["h2d_bytes"] else None,
            "built_inline": c["inline"],
            "tasks_per_send": round(c["sent"] / c["sends"], 2) if c["sends"] else None,
            "answers_per_message": round(c["answers"] / c["messages"], 2) if c["messages"] else None,
        }

    # -- the supervisor thread -----------------------------------------------------------------------
    def _supervise(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # Ctrl-C is the main thread's
        build, workers, handover = self.build, self.workers, self.handover
        counts = lambda: {"slots in use": self.pool.count - len(self.pool),  # noqa: E731 - (for the trace)
                          "batches in flight": handover.started - handover.taken}
        try:
            while not self.stopping:
                build.take()
                build.issue()
                workers.dispatch()
                if build.exhausted and build.idle() and not (workers.ready or workers.busy()):
                    break
                due = self.ex.respawn_due()
                tick = self._tick() if due is None else min(self._tick(), due)
                if workers.hold_until:  # a held dispatch (see dispatch): look again when the hold ends
                    tick = min(tick, max(0.0, workers.hold_until - time.perf_counter()))
                handover.post(now=False)
                if self.trace is not None:
                    self.trace.counters(counts)
                post = handover.post_due()
                workers.pump(tick if post is None else min(tick, post))
                handover.post(now=False)
        except BaseException as e:  # noqa: BLE001 - the consumer raises it
            handover.fail(e)
        finally:
            if self.trace is not None:  # (builds of batches that got no result: recorded alone)
                for task in workers.unanswered():
                    self.trace.built(task)
            handover.finish()

    def _tick(self) -> float:
        t = self.cfg.faults.batch_timeout_s
        return min(1.0, t / 4) if t else 1.0
