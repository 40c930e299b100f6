"""Build processes: spawned processes that build batches straight into the slots, past the main's GIL.

NOTE [ Build processes ]
A dataset whose ``__getitem__`` is Python that holds the GIL (parsing, tokenising, pure-Python
transforms) builds no faster on more threads. With ``workers.build_processes = N`` the builds run in N
spawn processes instead of the main's build threads. Each maps the run's slot ring (the same file the
workers map) and runs the same ``Builders`` threads as the main would (builders.py), over its own copy of
the source: sent once, by value with cloudpickle (a dataset named by ``source.object`` is made again
there from its name and params). Only sources that build batch k on their own qualify (a map-style
dataset, synthetic batches, files); a caller's iterator is drawn in the main.

The supervisor treats them like workers: it draws the batch indices itself, gives each ``(slot, index)``
job to the process with the fewest, and sends a process the jobs of one supervisor turn in one message
(``flush``); a reader thread per process turns what comes back (``(BUILT, index, slot, layout, nbytes,
seconds, cpu)``, ``(ERROR, slot, packed, index)``: wire.py) into the same build events the threads
report. Both ways travel as plain ``pickle`` (NOTE [ Small batches ] in local/worker.py: a batch's fixed
cost is these messages). Their lifecycle is the workers' (procs.py): a process that dies (SIGKILL, a
segfault in a decoder) ends its reader with EOF; the supervisor records a restart,
builds the batches it held again elsewhere (quarantined after ``faults.max_attempts``), and starts a new
process in its place. One that dies before it was ready ``faults.max_attempts`` times in a row fails the
run. The processes live for one run (their start-up overlaps the workers').
"""
from __future__ import annotations

import os
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .. import wire
from ..errors import PackedError
from ..wire import BUILDER_DIED, BUILT, ERROR, EXHAUSTED, FATAL, READY, Descriptor
from .builders import Built, Builders
from .procs import Child, Children, child_setup, pipe_broke
from .ring import SlotReader


def main(rank: int, conn, out, main_pid: int, ring_dir: str, payload: bytes, ring_path: str, slot_bytes: int,
         threads: int) -> None:
    """Entry point of a build process (procs.Children starts it)."""
    child_setup(out, main_pid, ring_dir)  # prints go to the main's stderr, as a worker's do
    lock = threading.Lock()

    def send(msg) -> None:
        with lock:
            wire.send(conn, msg)

    def report(event: tuple) -> None:
        if event[0] == ERROR:
            _, slot, error, index = event
            event = (ERROR, slot, PackedError.pack(error), index)
        elif event[0] == BUILT and event[1].desc is not None:
            b = event[1]
            event = (BUILT, b.index, b.slot, b.desc.layout, b.nbytes, b.seconds, b.cpu, b.start, b.lane)
        send(event)

    try:
        try:
            import cloudpickle
            source = cloudpickle.loads(payload)
            reader = SlotReader(ring_path, slot_bytes)
            builders = Builders(None, source.batch, _Ring(reader), threads, report, record_order=False)
        except BaseException as e:  # noqa: BLE001 - reported to the main, which raises it
            send((FATAL, PackedError.pack(e)))
            return
        send((READY, os.getpid()))
        while True:
            jobs = conn.recv()
            if jobs is None:
                break
            for slot, index in jobs:
                builders.submit(slot, index)
        builders.close()
    except (EOFError, OSError):  # the main is gone
        pipe_broke(main_pid, ring_dir)


class _Ring:
    """The builders' view of the ring in a build process (a ``Ring``): slot ``k`` in a layout, and its
    descriptor."""

    def __init__(self, reader: SlotReader):
        self.reader, self.slot_bytes = reader, reader.slot_bytes

    def view(self, slot: int, layout):
        desc = Descriptor(slot, layout)
        return self.reader.view(desc), desc


@dataclass
class _Proc(Child):
    jobs: dict = field(default_factory=dict)  # slot -> batch index, given to it and not answered
    outbox: list = field(default_factory=list)  # (slot, index) jobs not sent yet (``flush``)
    alive: bool = True  # False once its reader saw its pipe end


class BuildProcesses:
    """N build processes with ``threads`` build threads each, behind the interface of ``Builders``:
    ``submit(slot, index)``, ``drawn``, ``close()``; outcomes go to ``report`` as build events, plus
    ``(BUILDER_DIED, rank)`` for a process that is gone (the supervisor calls ``replace``)."""

    def __init__(self, ctx, payload: bytes, ring, processes: int, threads: int, relay, ring_dir: str):
        self.per_process = max(1, threads)
        self._children = Children(ctx, "build process", "builder", main, relay, self.per_process, ring_dir,
                                  make=_Proc)
        self._args = (payload, ring.path, ring.slot_bytes, self.per_process)
        self._batches, self._report, self._record = iter(()), _nobody, True
        self.drawn: deque[int] = deque()  # batch indices in the order they were drawn
        self.key = None  # what they build, into which ring (the executor's: LocalExecutor._build_processes)
        self.processes = processes
        self.count = processes * self.per_process  # build threads in all
        self.procs: list[_Proc] = [self._spawn(r) for r in range(processes)]

    def _spawn(self, rank: int) -> _Proc:
        proc = self._children.start(rank, *self._args)
        threading.Thread(target=self._read, args=(proc,), name=f"pipeline-builder-{rank}-reader",
                         daemon=True).start()
        return proc

    def _read(self, proc: _Proc) -> None:
        """Relay one process's messages to ``report``; EOF (it died, or stopped) ends it."""
        try:
            while True:
                msg = proc.conn.recv()
                kind = msg[0]
                if kind == READY:
                    proc.pid = msg[1]
                    self._children.came_up(proc)
                elif kind == FATAL:
                    self._report((ERROR, None, msg[1].exception(f"build process {proc.rank} could not "
                                                                f"set up the source"), None))
                elif kind == BUILT:
                    if len(msg) > 2:
                        _, index, slot, layout, nbytes, seconds, cpu, start, lane = msg
                        msg = (BUILT, Built(index, slot, Descriptor(slot, layout), None, nbytes, seconds, cpu,
                                            start=start, lane=lane, pid=proc.pid))
                    proc.jobs.pop(msg[1].slot, None)
                    self._report(msg)
                else:
                    _, slot, packed, index = msg
                    proc.jobs.pop(slot, None)
                    self._report((ERROR, slot, packed.exception(f"build process {proc.rank} (pid {proc.pid})"),
                                  index))
        except (EOFError, OSError):
            pass
        except BaseException as e:  # noqa: BLE001 - a bug here: the run fails with it, never hangs
            self._report((ERROR, None, e, None))
        finally:
            proc.alive = False
            self._report((BUILDER_DIED, proc.rank))

    def bind(self, batches, report: Callable[[tuple], None], record_order: bool = True) -> None:
        """A run's batches and its report: processes kept from an earlier run serve the next one."""
        self._batches, self._report, self._record = batches, report, record_order
        self.drawn = deque()

    def unbind(self) -> None:
        """Between runs: events go nowhere (a death shows at the next run's ``idle`` check)."""
        self._batches, self._report = iter(()), _nobody

    def idle(self) -> bool:
        """Every process alive and no job unanswered: they may serve another run."""
        return all(p.process.is_alive() and not p.jobs for p in self.procs)

    def stuck(self) -> bool:
        return False

    def submit(self, slot: int, index: int | None = None, batch=None) -> None:
        """Build batch ``index`` (or the next one: drawn here, in order) into ``slot``; the source builds
        it on its own, so a batch record is not needed."""
        if index is None:
            batch = next(self._batches, None)
            if batch is None:
                self._report((EXHAUSTED, slot))
                return
            index = batch.index
            if self._record:
                self.drawn.append(index)
        proc = min((p for p in self.procs if p.alive), key=lambda p: len(p.jobs), default=self.procs[0])
        proc.jobs[slot] = index
        proc.outbox.append((slot, index))

    def flush(self) -> None:
        """Send the jobs submitted since the last flush: one message per process."""
        for p in self.procs:
            if p.outbox:
                jobs, p.outbox = p.outbox, []
                try:
                    wire.send(p.conn, jobs)
                except OSError:
                    pass  # it died: its reader reports it, and the jobs are among those it held

    def replace(self, rank: int, limit: int) -> tuple[_Proc, list[tuple[int, int]], str]:
        """The dead process ``rank``, its jobs not answered ((slot, index) pairs) and why it ended; a new one in
        its place. WorkerError if it died before it was ready ``limit`` times in a row."""
        proc = next(p for p in self.procs if p.rank == rank)
        cause = self._children.died(proc, limit)
        jobs = list(proc.jobs.items())
        self.procs[self.procs.index(proc)] = self._spawn(rank)
        return proc, jobs, cause

    def close(self, timeout: float = 5.0) -> None:
        """Stop them: each finishes the build it is in (up to ``timeout``); one still setting its source
        up (a large dataset being loaded) has nothing to finish and is ended at once (Ctrl-C then takes
        effect at once)."""
        for p in self.procs:
            if not p.ready and p.process.is_alive():
                p.process.kill()
        self.flush()
        self._children.stop(self.procs, grace=timeout)


def _nobody(event: tuple) -> None:
    """Where events go between runs: nowhere (a death then shows at the next run's ``idle`` check)."""
