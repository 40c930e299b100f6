"""The worker side of a run: built batches to the workers, their answers back, deaths and deadlines.

NOTE [ Supervisor ]
One thread per run (executor.Run) does all the bookkeeping and never waits on anything but one ``poll``
over every worker's pipe, every process sentinel and a wake-up pipe that build threads and the consumer
write to. Builds run on their own threads (NOTE [ Builders ]), the consumer in the caller's thread, so a
death or a deadline is noticed at once whatever they are doing. Bounds: ``in_flight`` slots, and the
hand-over's window (NOTE [ Hand-over ]). A worker's status word (shared memory) names the batch it is
computing: a worker that dies loses it (retried on a fresh worker, quarantined after
``faults.max_attempts``) and the others it held, queued or answered in results it had not sent yet (built
again, uncharged). Without the word (it died between batches) the oldest task it held is charged.

NOTE [ Retries see the batch as built ]
On the CPU a kernel reads its slot itself and may write to it (``x.relu_()``); the batch at the head was
being computed, and the worker may have read the ones behind it. So every batch a dead worker held in a
slot is built again into a slot (from the source, or from its record: a reference, no copy, kept for
this), never sent as it is: a retry computes on the batch as the source built it. Nothing is copied for a
batch that is not retried. (A batch that travelled pickled is the main's own copy.)
"""
from __future__ import annotations

import math
import os
import select
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from .. import fields, wire
from ..contracts import Outcome
from ..wire import COPIED, FATAL, NOTE, PACKED, READY, RESULT, RETIRE, Task
from .procs import Child
from .worker import HOLD_S

QUEUED_S = 0.004  # small batches: a worker is given about this much work at a time


@dataclass
class Worker(Child):
    device: str | None = None
    batches: int = 0
    tasks: deque = field(default_factory=deque)  # sent and not answered, in the order it answers
    head_since: float = 0.0  # when the task at the head of ``tasks`` started computing
    retired: str | None = None  # why it is exiting on its own (a sticky CUDA error)
    gpu_reserved_mb: float | None = None


class WorkerSide:
    """``run``: the run's coordinator (executor.Run): its config, pool of slots, counts and siblings."""

    def __init__(self, run, in_flight: int):
        """``in_flight``: the config's slots, before small batches got more: tasks a worker holds at first."""
        self.run, self.ex = run, run.ex
        self.ready: deque[Task] = deque()  # built (or to be sent again), waiting for a worker
        self.pickled_ready = 0  # of which travel pickled (larger than a slot)
        self.depth = max(2, math.ceil(in_flight / max(1, len(self.ex.workers))))  # tasks queued per worker
        self.base_depth = self.depth
        self.batch_s = 1.0  # moving average of a batch's time in a worker (small batches: see _account)
        self.ready_since = 0.0  # when the oldest batch waiting for a worker became ready (small batches)
        self.hold_until = 0.0  # when a dispatch held back for that ends (0: none held; batches that wait
        # for a worker with room wait for its answer, which wakes the supervisor: no timed look)
        self.wait_since = 0.0  # when a wait for a worker with room began (0: not waiting)
        self._polled = -1  # the worker generation the poll object was made for (see pump)
        self._poll = self._fds = None

    def queue(self, task: Task) -> None:
        """A built batch (or one to send again) waits for a worker with room."""
        self.ready.append(task)
        self.pickled_ready += task.array is not None

    def busy(self) -> bool:
        """Some worker holds a task."""
        return any(w.tasks for w in self.ex.workers)

    # -- out ----------------------------------------------------------------------------------------------
    def dispatch(self) -> None:
        """Ready batches to the workers with room, the idlest first; each worker's share in one message
        (NOTE [ Small batches ] in local/worker.py)."""
        run = self.run
        t0 = time.perf_counter()
        sends: dict[int, tuple[Worker, list[Task]]] = {}
        # Small batches: a worker with nothing to do (waiting in its pipe) is woken with a full share, not
        # one batch at a time, while another still computes (it frees slots soon) and for HOLD_S at most.
        if run.small and self.ready and not self.ready_since:
            self.ready_since = t0
        hold = run.small and not run.build.exhausted and t0 - self.ready_since < HOLD_S and self.busy()
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
                counts = shares([len(w.tasks) for w in room], depth, n)
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
            if self.ex.up:  # waits for workers still starting are start-up, not waits
                self.wait_since = self.wait_since or t0
        else:
            self.ready_since = 0.0
            if self.wait_since:
                run.breakdown["worker_wait_s"] += t0 - self.wait_since
                self.wait_since = 0.0
        self.hold_until = self.ready_since + HOLD_S if hold and self.ready else 0.0
        for w, tasks in sends.values():
            send_tasks(w, tasks, run.pool, run.counts)
        if sends:
            t1 = time.perf_counter()
            run.breakdown["dispatch_s"] += t1 - t0
            if run.trace is not None:  # NOTE [ Trace ] in trace.py (its index: the count of batches, COUNTS)
                run.trace.span("dispatch", "pipeline-supervisor", t0, t1, sum(len(t) for _, t in sends.values()))

    # -- back -----------------------------------------------------------------------------------------------
    def pump(self, timeout: float) -> None:
        """Wait for the next thing to happen (a message, a death, a build, the consumer) and handle it.
        One ``poll`` object for the run, made again only when a worker was replaced: a wait costs one
        syscall, whatever the number of workers; a message is read when its pipe is ready (one per pipe
        and wait: level-triggered, the next wait sees the rest)."""
        run = self.run
        if self._polled != self.ex.generation:
            self._poll, self._fds = select.poll(), {run.wake_r: None}
            self._poll.register(run.wake_r, select.POLLIN)
            for w in self.ex.workers:
                for fd, sentinel in ((w.conn.fileno(), False), (w.process.sentinel, True)):
                    self._fds[fd] = (w, sentinel)
                    self._poll.register(fd, select.POLLIN)
            self._polled = self.ex.generation
        run.asleep = True  # (then the queue is looked at: a build reported before this is not missed)
        wait_ms = 0 if not run.build.done_q.empty() else timeout * 1000
        events = self._poll.poll(wait_ms)
        run.asleep = False
        look = not events and wait_ms > 0  # a quiet tick: look at every worker anyway (not after a look
        # at a build that came in: a death shows in its sentinel's event too)
        for fd, _ in events:
            entry = self._fds.get(fd)
            if entry is None:
                os.read(run.wake_r, 4096)
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
            several = wire.answers(msg)
            for m in several:
                self._on_message(w, m)
            run.counts["messages"] += 1
            run.counts["answers"] += len(several)
            run.breakdown["receive_s"] += time.perf_counter() - t0
        if look:
            for w in list(self.ex.workers):
                if not w.process.is_alive():
                    self.on_death(w, w.retired or self.ex.cause(w))
        self.check_deadlines()

    def _on_message(self, w: Worker, msg: tuple) -> None:
        kind, run = msg[0], self.run
        if kind == PACKED or kind == RESULT:  # (first: the one that comes once per batch)
            task = self._answered(w, msg[1])
            w.batches += 1
            info = msg[3]  # the worker's timings, and the batch's facts for the consumer
            if "gpu_reserved_mb" in info:
                w.gpu_reserved_mb = info["gpu_reserved_mb"]
            self._account(info)
            info["pid"], info["device"], info["_done_at"] = w.pid, w.device, time.perf_counter()
            if run.trace is not None and "spans" in info:
                info["_built"] = task.built  # (recorded with its stages when it is handed over: Handover.traced)
                if info.get("splits"):
                    run.trace.instant("split", "compute", task.index, task.attempt, w.pid,
                                      {"halvings": info["splits"]})
            run.handover.deliver(Outcome(task.index, fields.from_wire(msg[2]) if kind == PACKED else msg[2], info))
            return
        if kind in (READY, FATAL, NOTE):
            self.ex.on_setup_message(w, msg)
            if kind == READY and run.trace is not None:
                run.trace.name_process(w.pid, f"worker {w.rank} (pid {w.pid})")
                run.trace.span("start-up", "compute", w.started, time.perf_counter(), pid=w.pid)
            return
        if kind == RETIRE:  # NOTE [ CUDA faults ] in compute.py: its sentinel follows
            w.retired = f"{msg[2]} (sticky CUDA error: worker retired and replaced)"
            return
        if kind == COPIED:  # NOTE [ Slot release ]: the device has its copy
            task = next((t for t in w.tasks if t.index == msg[1]), None)
            if task is not None and run.build.rebuild is not None:
                self._release(task)
            return
        task = self._answered(w, msg[1])  # ERROR
        if run.trace is not None:
            run.trace.built(task)
            run.trace.instant("batch raised", "compute", task.index, task.attempt, w.pid, {"error": msg[2].text[:200]})
        if run.cfg.faults.on_error == "skip":
            run.handover.deliver(Outcome(task.index, None, {"_done_at": time.perf_counter()},
                                         {"batch": task.index, "cause": msg[2].text, "attempts": task.attempt}))
        else:
            run.build.batch_failed(task.index, msg[2].exception(f"batch {task.index} (worker pid {w.pid}, "
                                                                f"device {w.device})"))

    def _answered(self, w: Worker, index: int) -> Task:
        """The task at the head of ``w.tasks`` is answered: its slot goes back, the next one's clock starts."""
        task = w.tasks.popleft()
        w.head_since = time.monotonic()
        assert task.index == index, (task.index, index)
        self._release(task)
        return task

    def unanswered(self) -> list[Task]:
        """Tasks built and not answered: waiting for a worker, or sent."""
        return [*self.ready, *(t for w in self.ex.workers for t in w.tasks)]

    def _account(self, t: dict) -> None:
        """A result's timings (``Computer``'s, with the worker's ``idle_s`` and ``sent``) into the run's."""
        run = self.run
        b, c = run.breakdown, run.counts
        b["stage_s"] += t["stage_s"]
        b["h2d_s"] += t["h2d_s"]
        b["compute_s"] += t["compute_s"]
        b["d2h_s"] += t["d2h_s"]
        b["idle_s"] += t["idle_s"]
        if "decode_s" in t:  # an encoded image batch, decoded by the worker (images/encoded.py)
            b["decode_s"] = b.get("decode_s", 0.0) + t["decode_s"]
        b["return_s"] += max(0.0, time.time() - t["sent"])
        c["batches"] += 1
        if run.small:  # queue about QUEUED_S of work per worker: deep for quick batches, never a long tail
            self.batch_s += 0.2 * (t["stage_s"] + t["compute_s"] + t["d2h_s"] - self.batch_s)
            self.depth = max(self.base_depth, min(run.in_flight // max(1, len(self.ex.workers)),
                                                  int(QUEUED_S / max(self.batch_s, 1e-6))))
        if t["h2d_s"]:
            c["h2d_bytes"] += t["h2d_bytes"]
            c["direct"] += bool(t["direct"])

    def _release(self, task: Task) -> None:
        if task.desc is not None:
            self.run.pool.release(task.desc.slot, task.index)

    # -- deaths and deadlines ---------------------------------------------------------------------------
    def on_death(self, w: Worker, cause: str) -> None:
        run = self.run
        if not w.ready:  # it held no batch yet (NOTE [ Restarts while starting ] in local/executor.py)
            self.ex.died_unready(w, run.cfg.faults.max_attempts)
            return
        lost = list(w.tasks)
        batch = lost[0].index if lost else None
        if run.trace is not None:
            run.trace.instant("worker died", "compute", pid=w.pid,
                              args={"cause": cause, "held": [t.index for t in lost]})
            for task in lost:  # (their builds: a batch in a slot is built again, a new task)
                run.trace.built(task)
        if lost:
            # the batch it was computing, as the worker said in its status word; else the oldest it held
            # (a worker that died between batches: the one it was about to start)
            k = int(self.ex.computing[w.rank]) - 1 if self.ex.computing is not None else -1
            at = next((j for j, t in enumerate(lost) if t.index == k), 0)
            lost.insert(0, lost.pop(at))
            head = lost[0]
            batch = head.index
            head.attempt += 1
            if run.trace is not None and head.attempt <= run.cfg.faults.max_attempts:
                run.trace.instant("retry", index=head.index, attempt=head.attempt, args={"cause": cause})
            if head.attempt > run.cfg.faults.max_attempts:
                self._release(head)
                lost = lost[1:]
                run.build.fail(head.index, cause, head.attempt - 1)
        for task in reversed(lost):  # the head first, then the rest in their order
            if task.desc is not None:  # NOTE [ Retries see the batch as built ]
                self._release(task)
                run.build.rebuilds.appendleft((task.index, task.attempt, task.batch))
            else:
                self.ready.appendleft(task)
                self.pickled_ready += 1
        self.ex.replace(w, cause, batch)
        if run.trace is not None:  # its replacement (its "start-up" span ends when it says READY)
            new = next(h for h in self.ex.workers if h.rank == w.rank)
            run.trace.name_process(new.process.pid, f"worker {w.rank} (pid {new.process.pid})")
            run.trace.instant("worker started", "compute", pid=new.process.pid, args={"replacing": w.pid})

    def check_deadlines(self) -> None:
        limit = self.run.cfg.faults.batch_timeout_s
        if not limit:
            return
        now = time.monotonic()
        for w in list(self.ex.workers):
            if w.tasks and now - w.head_since > limit:
                w.process.kill()
                w.process.join()
                self.on_death(w, f"timeout: batch ran over {limit:g} s (faults.batch_timeout_s)")


def shares(loads: list[int], cap: int, n: int) -> list[int]:
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


def send_tasks(w: Worker, tasks: list[Task], pool, counts: dict) -> None:
    """``tasks`` to worker ``w``: slot tasks in one message (their slots are ``sent`` in ``pool``), a
    pickled batch alone (ForkingPickler), in the order of ``w.tasks``: the order the worker answers in."""
    counts["sends"] += 1
    counts["sent"] += len(tasks)
    try:
        run: list[Task] = []
        for task in tasks:
            if task.array is None:
                pool.sent(task.desc.slot)
                run.append(task)
                continue
            if run:
                wire.send(w.conn, wire.pack(run))
                run = []
            w.conn.send(task)
        if run:
            wire.send(w.conn, wire.pack(run))
    except OSError:
        pass  # the worker died; its sentinel tells us, and the tasks are sent again from w.tasks


def settle(ex, limit: float = 5.0) -> None:
    """After a run's early end, the next run must start with idle workers: those of ``ex`` (the
    LocalExecutor) that answer what they hold within ``limit`` s stay; the others are replaced."""
    deadline = time.monotonic() + limit
    busy = [w for w in ex.workers if w.tasks]
    while busy and time.monotonic() < deadline:
        for obj in wait([w.conn for w in busy] + [w.process.sentinel for w in busy], 0.2):
            w = next((h for h in busy if obj in (h.conn, h.process.sentinel)), None)
            try:
                while w is not None and w.conn.poll():
                    for m in wire.answers(w.conn.recv()):
                        if m[0] in wire.ANSWERS:
                            w.tasks.popleft()
            except (EOFError, OSError):
                pass
        busy = [w for w in busy if w.tasks and w.process.is_alive()]
    for w in list(ex.workers):
        if w.tasks or not w.process.is_alive():
            if w.process.is_alive():
                w.process.kill()
            head = w.tasks[0].index if w.tasks else None
            ex.replace(w, "stopped: still busy when its run ended early", head)
