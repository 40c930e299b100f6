"""Build threads: the main process fills free slots with batches, several at a time.

NOTE [ Builders ]
The supervisor hands out jobs (a free slot, and for a rebuild the batch index); ``threads`` build
threads take them. A job without an index draws the next batch record from the source under one lock
(a caller's iterator is not thread-safe, and the draw order is the batch order) and records its index in
``drawn``; the fill itself (an RNG fill, a copy out of a memory map or a caller's array) runs outside the
lock, in parallel: numpy releases the GIL there. A rebuild builds batch ``i`` again from a source that can
(``rebuild(i)``). A batch of rows (a dataset's samples, NOTE [ Samples ] in sources/datasets.py) is cut into
contiguous chunks, two per thread, and the thread that took it puts a hand-in token on the job queue for
each other thread: an idle one joins in and claims chunks under the batch's own lock (so a tiny sample
costs a loop iteration, not a queue round-trip); a busy one finds the token later and drops it. The thread
that finishes the last chunk reports the batch. Every outcome goes to ``report``: (BUILT, Built),
(EXHAUSTED, slot) or (ERROR, slot, exception, batch index or None) (wire.py); the supervisor never waits
for a build, it is told. The same class runs in build processes (buildproc.py), over the same ring, and in
Ray actors (ray_backend/actor.py), over slots of their own: any ``Ring`` (contracts.py).
"""
from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..contracts import Ring
from ..fields import Layout, copy_into
from ..sources.base import Batch
from ..wire import BUILT, ERROR, EXHAUSTED, Descriptor


@dataclass
class Built:
    index: int
    slot: int  # the job's slot: holds the batch when ``desc`` is set, else free again
    desc: Descriptor | None  # the batch in its slot
    array: Any  # a batch larger than a slot (an array, or a tuple or dict of them): pickled to the worker
    nbytes: int
    seconds: float = 0.0  # the build's wall time, summed over the threads that built it
    cpu: float | None = 0.0  # their CPU time (less than ``seconds``: waiting for the GIL, or for I/O;
    # None: not measured, see ``Builders.build_here``)
    batch: Batch | None = None  # the record of a caller's batch (a retry builds it again from it)
    start: float = 0.0  # when its build began (perf_counter: one clock for every process of this machine)
    lane: str = ""  # the thread that built it (its last chunk), for the trace
    pid: int = 0  # the build process that built it (0: the main)


class _Shared:
    """A batch that build threads fill together, one chunk of rows at a time (NOTE [ Builders ])."""

    def __init__(self, batch: Batch, slot: int, views, desc: Descriptor, chunks: list[tuple[int, int]]):
        self.batch, self.slot, self.views, self.desc, self.chunks = batch, slot, views, desc, chunks
        self.lock = threading.Lock()
        self.next = 0
        self.left = len(chunks)
        self.error: BaseException | None = None
        self.seconds = self.cpu = 0.0
        self.start = 0.0  # when the first thread began on it

    def claim(self) -> tuple[int, int] | None:
        with self.lock:
            if self.next >= len(self.chunks) or self.error is not None:
                return None
            self.next += 1
            return self.chunks[self.next - 1]

    def finish(self, seconds: float, cpu: float, error: BaseException | None) -> bool:
        """Count one chunk done; True for the thread that finished the batch's last chunk."""
        with self.lock:
            self.seconds += seconds
            self.cpu += cpu
            if error is not None and self.error is None:
                self.error = error
                self.left -= len(self.chunks) - self.next  # the chunks nobody will claim now
                self.next = len(self.chunks)
            self.left -= 1
            return self.left == 0


def _returned(event: tuple) -> tuple:
    return event


_LIVE: weakref.WeakSet = weakref.WeakSet()  # Builders not closed yet


@atexit.register
def _close_at_exit() -> None:
    """Build threads are daemons; one still inside C++ code (torch's resize of a JPEG: NOTE [ JPEG path ])
    when the interpreter finalizes is ended by a forced unwind that aborts the process ("terminate called
    without an active exception"). A run left without closing them (a Ctrl-C at the wrong moment) has
    them stopped here, after their current job (2 s at most each)."""
    for b in list(_LIVE):
        b.close(timeout=2.0)


class Builders:
    """``threads`` build threads over ``ring`` (a ``Ring``); the main's, a build process's or a Ray actor's."""

    processes = 0  # (build processes: buildproc.BuildProcesses, the same interface)

    def __init__(self, batches: Iterator[Batch] | None, rebuild: Callable[[int], Batch] | None, ring: Ring,
                 threads: int, report: Callable[[tuple], None], record_order: bool = True):
        self._batches, self._rebuild, self._ring, self._report = batches, rebuild, ring, report
        self._draw = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = False
        self._record = record_order
        self.drawn: deque[int] = deque()  # batch indices in the order they were drawn
        self.count = max(1, threads)
        self.threads = [threading.Thread(target=self._work, name=f"pipeline-build-{i}", daemon=True)
                        for i in range(self.count)]
        for t in self.threads:
            t.start()
        _LIVE.add(self)

    def submit(self, slot: int, index: int | None = None, batch: Batch | None = None) -> None:
        """Build the next batch (or batch ``index`` again: from its record ``batch`` when given, else from
        the source) into ``slot``."""
        self._jobs.put((slot, index, batch))

    def flush(self) -> None:
        """(Build processes send a turn's jobs together; threads have taken them already.)"""

    def close(self, timeout: float = 5.0) -> None:
        """Skip the jobs not started; wait for the running ones (a stuck caller's iterator: not forever)."""
        self._stopped = True
        _LIVE.discard(self)
        for _ in self.threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def stuck(self) -> bool:
        """After ``close``: a thread still inside the caller's iterator."""
        return any(t.is_alive() for t in self.threads)

    def _work(self) -> None:
        lane = threading.current_thread().name  # (once: a trace's lane for this thread's builds)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if isinstance(job, _Shared):  # a hand with another thread's batch
                self._chunks(job)
                continue
            if not self._stopped:
                self._job(*job, lane=lane)

    def build_here(self, slot: int, index: int | None = None, batch: Batch | None = None,
                   cpu: bool = True) -> tuple:
        """``submit``'s job, done in the caller's thread (the supervisor's, for batches that build in less
        time than a hand-off to a thread costs: NOTE [ Small batches ] in local/worker.py); its outcome returned,
        not reported. ``cpu`` False: its CPU time is not measured (``Built.cpu`` is None; a thread's CPU
        clock is a system call, a tiny batch's budget), so the caller measures one build in several."""
        return self._job(slot, index, batch, share=False, cpu=cpu)

    def _job(self, slot: int, index: int | None, batch: Batch | None, share: bool = True,
             cpu: bool = True, lane: str = "pipeline-supervisor") -> tuple | None:
        report = self._report if share else _returned
        t0, c0 = time.perf_counter(), (time.thread_time() if cpu else 0.0)
        try:
            if index is None:
                with self._draw:
                    batch = next(self._batches, None)
                    if batch is not None and self._record:
                        self.drawn.append(batch.index)
                if batch is None:
                    return report((EXHAUSTED, slot))
            elif batch is None:
                batch = self._rebuild(index)
            shared = self._share(batch, slot, t0) if share else None
            if shared is not None:
                self._chunks(shared, time.perf_counter() - t0, time.thread_time() - c0)
                return None
            built = self._fill(batch, slot)
        except BaseException as e:  # noqa: BLE001 - the supervisor decides: one clear error
            return report((ERROR, slot, e, batch.index if batch is not None else index))
        built.seconds, built.cpu = time.perf_counter() - t0, (time.thread_time() - c0 if cpu else None)
        built.start, built.lane = t0, lane
        if self._rebuild is None:  # a caller's batch: its record goes with it, for a retry
            built.batch = batch
        return report((BUILT, built))

    def _share(self, batch: Batch, slot: int, t0: float) -> _Shared | None:
        """A batch of rows that fits its slot, split into contiguous chunks that idle threads may help
        with: two per thread, so that a slow chunk doesn't hold the batch; None to build it in one go."""
        if self.count < 2 or batch.rows < 2 or batch.layout is None or batch.nbytes > self._ring.slot_bytes:
            return None
        n = min(batch.rows, 2 * self.count)
        cuts = [batch.rows * k // n for k in range(n + 1)]
        views, desc = self._ring.view(slot, batch.layout)
        shared = _Shared(batch, slot, views, desc, list(zip(cuts, cuts[1:])))
        shared.start = t0
        for _ in range(min(self.count, n) - 1):
            self._jobs.put(shared)
        return shared

    def _chunks(self, shared: _Shared, seconds: float = 0.0, cpu: float = 0.0) -> None:
        """Fill chunks of ``shared`` until none is left; the thread that ends its last one reports it."""
        claimed = shared.claim()  # None: came too late, nothing left to help with
        last = False
        while claimed is not None:
            t0, c0 = time.perf_counter(), time.thread_time()
            error = None
            try:
                shared.batch.fill_rows(shared.views, *claimed)
            except BaseException as e:  # noqa: BLE001 - reported once, by the last thread
                error = e
            seconds, cpu = seconds + time.perf_counter() - t0, cpu + time.thread_time() - c0
            last = shared.finish(seconds, cpu, error)
            seconds = cpu = 0.0
            claimed = shared.claim()
        if last:
            b = shared.batch
            if shared.error is not None:
                self._report((ERROR, shared.slot, shared.error, b.index))
            else:
                self._report((BUILT, Built(b.index, shared.slot, shared.desc, None, b.nbytes, shared.seconds,
                                           shared.cpu, start=shared.start, lane=threading.current_thread().name)))

    def _fill(self, batch: Batch, slot: int) -> Built:
        if batch.layout is None:  # known once built: a collated batch, a dataset item that is a batch
            arrays = batch.produce()
            layout = Layout.of(arrays)
            if layout.nbytes > self._ring.slot_bytes:
                return Built(batch.index, slot, None, arrays, layout.nbytes)
            views, desc = self._ring.view(slot, layout)
            copy_into(views, arrays)
            return Built(batch.index, slot, desc, None, layout.nbytes)
        if batch.nbytes <= self._ring.slot_bytes:
            views, desc = self._ring.view(slot, batch.layout)
            batch.fill(views)
            return Built(batch.index, slot, desc, None, batch.nbytes)
        return Built(batch.index, slot, None, batch.array(), batch.nbytes)
