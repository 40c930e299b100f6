"""The build side of a run: free slots -> build jobs -> built batches, waiting for a worker.

The supervisor thread gives the builders (build threads, or build processes: NOTE [ Builders ], NOTE
[ Build processes ]) a job per free slot, two per build thread at most, while the window has room; their
reports come back through ``done_q`` and become tasks for the worker side. A batch that failed to build
fails under ``faults.on_error``; batches a dead worker or build process held are built again
(``rebuilds``, before new ones). Batches that build quicker than a hand-off to a thread costs are built
on the supervisor's own thread (NOTE [ Small batches ] in local/worker.py).
"""
from __future__ import annotations

import queue
import time
from collections import deque
from typing import Any

from .. import devices
from ..contracts import Outcome
from ..wire import BUILDER_DIED, BUILT, EXHAUSTED, Task
from .builders import Built, Builders
from .worker import HOLD_S

MB = 1 << 20
INLINE_CPU_S, INLINE_WALL_S = 100e-6, 400e-6  # builds quicker than this are done by the supervisor itself
INLINE_SAMPLE = 8  # of those, one in this many has its CPU time measured


class BuildSide:
    """``run``: the run's coordinator (executor.Run): its config, pool of slots, counts and siblings."""

    def __init__(self, run, batches, source, digests: bool):
        self.run, self.batches, self.source, self.digests = run, batches, source, digests
        self.rebuild = source.batch if source is not None else None
        self.done_q: queue.SimpleQueue = queue.SimpleQueue()  # what the builders report
        self.jobs = 0  # jobs the builders have not answered yet
        self.exhausted = False
        # (index, attempt, the batch record or None) to build again: from the record when the source can't
        # build batch i on its own (a caller's iterator), else from the source
        self.rebuilds: deque[tuple[int, int, Any]] = deque()
        self.attempts: dict[int, int] = {}
        self.slot_wait_since = 0.0  # when a wait for a free slot began (0: not waiting)
        # the builds reported once every worker was up: the first's and the last's time, their CPU and wall
        # time, how many (see gil_note)
        self.build_span = (0.0, 0.0, 0.0, 0.0, 0)
        self.build_cpu: float | None = None  # moving averages of a build's CPU and wall time (measured)
        self.build_wall = 0.0
        self.builders = self._builders()
        self.threads = self.builders.count

    def _builders(self):
        run, cfg = self.run, self.run.cfg
        threads = cfg.build_threads(run.cuda)
        procs = cfg.workers.build_processes
        if procs and self.source is None:
            run.note(f"workers.build_processes = {procs}: a caller's iterator is drawn in order in the main, "
                     f"so its batches were built on the main's threads; give a map-style dataset (__len__ "
                     f"and __getitem__) to build them in processes")
        if procs and self.source is not None:
            builders = run.ex.build_processes(self.source, run.ring, procs, max(1, threads // procs),
                                              cfg.handoff.dir)
            builders.bind(self.batches, self.report, run.ordered)
            return builders
        return Builders(self.batches, self.rebuild, run.ring, threads, self.report, record_order=run.ordered)

    def report(self, event: tuple) -> None:
        """Called by build threads: the supervisor is woken only when it waits (or is about to: its pump
        looks at the queue after it says so); when busy it takes every finished build on its next turn."""
        self.done_q.put(event)
        if self.run.asleep:
            self.run.wake()

    def idle(self) -> bool:
        """No build job out, none to do again."""
        return not (self.jobs or self.rebuilds)

    # -- reports ---------------------------------------------------------------------------------------
    def take(self) -> None:
        while True:
            try:
                event = self.done_q.get_nowait()
            except queue.Empty:
                return
            self.on_event(event)

    def on_event(self, event: tuple) -> None:
        """A builder's report (NOTE [ Builders ]): a batch built, the source exhausted, a build that raised,
        a build process gone."""
        kind = event[0]
        if kind == BUILT:
            self.jobs -= 1
            self._on_built(event[1])
        elif kind == BUILDER_DIED:
            self._builder_died(event[1])
        else:
            self.jobs -= 1
            if kind == EXHAUSTED:
                self.exhausted = True
                self.run.handover.started -= 1
                self.run.pool.give_back(event[1])
            else:
                self._build_failed(*event[1:])

    def _build_failed(self, slot: int | None, error: BaseException, index: int | None) -> None:
        """A build raised. Drawing from a caller's iterator (no index): the run fails with it. Building
        batch ``index`` (a dataset's sample, a file): that batch fails, under ``faults.on_error``."""
        if slot is not None:
            self.run.pool.give_back(slot)
        if self.run.trace is not None:
            self.run.trace.instant("build failed", index=-1 if index is None else index,
                                   args={"error": f"{type(error).__name__}: {error}"[:200]})
        if index is None:
            raise error
        if self.run.cfg.faults.on_error != "skip":
            return self.batch_failed(index, error)
        self.fail(index, f"{type(error).__name__}: {error}", self.attempts.pop(index, 1))

    def batch_failed(self, index: int, error: BaseException) -> None:
        """Batch ``index`` raised (its kernel, or its build) and ``faults.on_error`` is "fail": the run
        fails with that error. As done: at once. In order: once the batches before it are handed over (none
        of them is lost with it): nothing new starts, what was started ends, and the consumer raises the
        error where the batch would have come (the earliest, if several fail meanwhile)."""
        if not self.run.ordered:
            raise error
        self.exhausted = True  # (no batch is drawn any more; retries of those in flight go on)
        self.run.handover.deliver(Outcome(index, None, {"_done_at": time.perf_counter()},
                                          {"batch": index, "raise": error}))

    def fail(self, index: int, cause: str, attempts: int) -> None:
        """Batch ``index`` is quarantined (or skipped): its record goes to the consumer in its place."""
        if self.run.trace is not None:
            self.run.trace.instant("quarantined", index=index, attempt=attempts, args={"cause": cause[:200]})
        self.run.handover.deliver(Outcome(index, None, {"_done_at": time.perf_counter()},
                                          {"batch": index, "cause": cause, "attempts": attempts}))

    def _builder_died(self, rank: int) -> None:
        """A build process is gone (NOTE [ Build processes ]): its batches are built again elsewhere, or
        quarantined after ``faults.max_attempts``; a new process takes its place."""
        if self.run.stopping or self.builders is None:
            return
        limit = self.run.cfg.faults.max_attempts
        old, jobs, cause = self.builders.replace(rank, limit)
        if self.run.trace is not None:
            self.run.trace.instant("build process died", pid=old.pid or None, args={"cause": cause})
        self.run.ex.restarts.append({"builder": rank, "pid": old.pid or old.process.pid, "cause": cause,
                                     "batch": jobs[0][1] if jobs else None})
        for slot, index in jobs:
            self.jobs -= 1
            self.run.pool.give_back(slot)
            attempt = self.attempts.pop(index, 1) + 1
            if attempt > limit:
                self.fail(index, f"build process {rank} died building it: {cause}", attempt - 1)
            else:
                self.rebuilds.append((index, attempt, None))

    def _on_built(self, b: Built) -> None:
        run, counts = self.run, self.run.counts
        now = time.perf_counter()
        if run.ex.up:  # (the workers are up: builds are not held back by their start)
            first, _, cpu, wall, n = self.build_span
            self.build_span = (first or now, now, cpu + (b.cpu or 0.0), wall + b.seconds, n + 1)
        run.breakdown["build_s"] += b.seconds
        counts["built"] += 1
        if b.cpu is None:  # not measured (an inline build: see issue): the last measured ratio
            counts["build_cpu_s"] += b.seconds * min(1.0, self.build_cpu / max(self.build_wall, 1e-9))
        else:
            counts["build_cpu_s"] += b.cpu
            self.measured(b.cpu, b.seconds)
        attempt = self.attempts.pop(b.index, 1)
        if b.desc is None:  # larger than a slot: the array travels pickled
            run.pool.give_back(b.slot)
            counts["pickled"] += 1
            if counts["pickled"] == 1:
                run.note(f"handoff: batch {b.index} ({b.nbytes / MB:.2f} MiB) was larger than a slot "
                         f"({run.ring.slot_bytes / MB:.2f} MiB) and travelled pickled through a worker's "
                         f"pipe, slower (pickled_fallbacks counts such batches); --set handoff.slot_mb="
                         f"{-(-b.nbytes // MB)} or more keeps them in shared memory")
            task = Task(b.index, attempt, array=b.array, digest=self.digests)
        else:
            run.pool.built(b.slot, b.index)
            task = Task(b.index, attempt, run.ring.path, run.ring.slot_bytes, b.desc, digest=self.digests)
            task.batch = b.batch  # a caller's batch: kept (a reference, no copy) to build it again
        if run.trace is not None:
            task.trace = True
            if b.pid and b.pid not in run.trace.processes:
                run.trace.name_process(b.pid, f"build process (pid {b.pid})")
            # (recorded with its result, one event: trace.Recorder.worker; or alone if it has none: ``built``)
            task.built = (b.start or now - b.seconds, now, b.lane or "build", b.pid, attempt)
        run.workers.queue(task)

    # -- deciding where to build --------------------------------------------------------------------
    def measured(self, cpu: float, wall: float) -> None:
        """A build's CPU and wall time into the moving averages ``inline`` decides from: from the first
        build measured, of samples capped at twice the limits (one build that was preempted, or waited for
        the GIL, does not send the next ones to the build threads; a run of slow ones does)."""
        cpu, wall = min(cpu, 2 * INLINE_CPU_S), min(wall, 2 * INLINE_WALL_S)
        if self.build_cpu is None:
            self.build_cpu, self.build_wall = cpu, wall
        else:
            self.build_cpu += 0.2 * (cpu - self.build_cpu)
            self.build_wall += 0.2 * (wall - self.build_wall)

    def inline(self) -> bool:
        """Build on this thread: the source builds batch i on its own, in the main's threads, and its
        batches take less time to build than handing them to a build thread and back costs
        (NOTE [ Small batches ] in local/worker.py). Decided from the builds so far, and again after each."""
        return (self.source is not None and not self.builders.processes
                and self.run.counts["built"] >= 2 * self.threads and self.build_cpu is not None
                and self.build_cpu < INLINE_CPU_S and self.build_wall < INLINE_WALL_S)

    def issue(self) -> None:
        """Jobs for the build threads, two a thread at most: a slot is taken when a thread is about to
        fill it (the second job lets a thread go on from one build to the next without waiting for this
        thread's turn), so 'no free slot while a build thread is idle' (``slot_wait``) means the workers
        hold them all. Batches that build quicker than a hand-off are built here instead, a few at a time
        (``inline``)."""
        run, pool, counts = self.run, self.run.pool, self.run.counts
        t0 = time.perf_counter()
        inline = self.inline()
        if inline:
            def submit(slot, index=None, batch=None):
                counts["inline"] += 1  # (one build in INLINE_SAMPLE has its CPU time measured)
                self.on_event(self.builders.build_here(slot, index, batch, counts["inline"] % INLINE_SAMPLE == 1))
        else:
            submit = self.builders.submit
        idle = 2 * run.workers.depth * max(1, len(run.ex.workers)) if inline else 2 * self.threads - self.jobs
        while pool and self.rebuilds and idle > 0:
            index, attempt, batch = self.rebuilds.popleft()
            self.attempts[index] = attempt
            self.jobs, idle = self.jobs + 1, idle - 1
            submit(pool.take(), index, batch)
        room = run.handover.room()
        while not self.exhausted and room > 0 and pool and idle > 0:
            self.jobs, idle, room = self.jobs + 1, idle - 1, room - 1
            run.handover.started += 1
            submit(pool.take())  # (inline: 'exhausted' ends the loop)
            if inline and time.perf_counter() - t0 > HOLD_S:  # the workers' answers are read meanwhile
                break
        self.builders.flush()
        starved = not self.exhausted and room > 0 and self.jobs < self.threads and not pool
        if starved and run.ex.up:  # (waits while workers still start are start-up)
            self.slot_wait_since = self.slot_wait_since or t0
        elif self.slot_wait_since:
            run.breakdown["slot_wait_s"] += t0 - self.slot_wait_since
            self.slot_wait_since = 0.0

    def gil_note(self) -> str | None:
        """The build was the limit (workers waited longer for batches than they computed) and its threads,
        while the batches were being built, used about one CPU between them, and were not mostly waiting
        (for I/O): the source holds the GIL (Python in ``__getitem__``), so more threads don't help and
        build processes would. (Measured over the span of the builds, not per build: threads that share a
        batch's chunks take turns on the GIL between chunks, so each chunk alone looks like a full CPU.)"""
        b, c = self.run.breakdown, self.run.counts
        if self.builders.processes or not b["build_s"]:
            return None
        t = self.threads
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

    def stop(self) -> bool:
        """The run ends: stop the builders (build processes that finished every job stay for the next run);
        True when no build thread is stuck in the caller's iterator (the wake-up pipe may then close)."""
        ex, builders = self.run.ex, self.builders
        if builders is not ex.build_pool or not builders.idle():
            builders.close()
            if builders is ex.build_pool:
                ex.build_pool = None
        else:
            builders.unbind()  # nothing of theirs may reach this run's wake-up pipe once closed
        return not builders.stuck()
