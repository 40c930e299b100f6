"""Build threads: the main process fills free slots with batches, several at a time.

NOTE [ Builders ]
The supervisor hands out jobs (a free slot, and for a rebuild the batch index); ``threads`` build
threads take them. A job without an index draws the next batch record from the source under one lock
(a caller's iterator is not thread-safe, and the draw order is the batch order) and records its index in
``drawn``; the fill itself (an RNG fill, a copy out of a memory map or a caller's array) runs outside the
lock, in parallel: numpy releases the GIL there. A rebuild builds batch ``i`` again from a source that can
(``rebuild(i)``). Every outcome goes to ``report``: ("built", Built), ("exhausted", slot) or
("error", slot, exception); the supervisor never waits for a build, it is told.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .handoff import Descriptor, SlotRing
from .sources import Batch


@dataclass
class Built:
    index: int
    slot: int  # the job's slot: holds the batch when ``desc`` is set, else free again
    desc: Descriptor | None  # the batch in its slot
    array: np.ndarray | None  # a batch larger than a slot: built apart, pickled to the worker
    nbytes: int
    seconds: float  # the build, on one thread


class Builders:
    def __init__(self, batches: Iterator[Batch], rebuild: Callable[[int], Batch] | None, ring: SlotRing,
                 threads: int, report: Callable[[tuple], None], record_order: bool = True):
        self._batches, self._rebuild, self._ring, self._report = batches, rebuild, ring, report
        self._draw = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = False
        self._record = record_order
        self.drawn: deque[int] = deque()  # batch indices in the order they were drawn
        self.threads = [threading.Thread(target=self._work, name=f"pipeline-build-{i}", daemon=True)
                        for i in range(max(1, threads))]
        for t in self.threads:
            t.start()

    def submit(self, slot: int, index: int | None = None) -> None:
        """Build the next batch (or batch ``index`` again) into ``slot``."""
        self._jobs.put((slot, index))

    def close(self, timeout: float = 5.0) -> None:
        """Skip the jobs not started; wait for the running ones (a stuck caller's iterator: not forever)."""
        self._stopped = True
        for _ in self.threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._stopped:
                continue
            slot, index = job
            t0 = time.perf_counter()
            try:
                if index is None:
                    with self._draw:
                        batch = next(self._batches, None)
                        if batch is not None and self._record:
                            self.drawn.append(batch.index)
                    if batch is None:
                        self._report(("exhausted", slot))
                        continue
                else:
                    batch = self._rebuild(index)
                built = self._fill(batch, slot)
            except BaseException as e:  # noqa: BLE001 - the supervisor raises it: one clear error
                self._report(("error", slot, e))
                continue
            built.seconds = time.perf_counter() - t0
            self._report(("built", built))

    def _fill(self, batch: Batch, slot: int) -> Built:
        if batch.nbytes <= self._ring.slot_bytes:
            view = self._ring.view(slot, batch.shape, batch.dtype)
            batch.fill(view)
            return Built(batch.index, slot, self._ring.describe(slot, view), None, batch.nbytes, 0.0)
        return Built(batch.index, slot, None, batch.array(), batch.nbytes, 0.0)
