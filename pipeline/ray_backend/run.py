"""One stream on the Ray actors: per-actor task queues, resubmissions, reordering, the window."""
from __future__ import annotations

import contextlib
import time
from collections import deque
from typing import Iterator

from ..contracts import Outcome
from ..errors import OutputError, WorkerError
from ..fields import nbytes as batch_nbytes
from ..sources.base import Batch, Source
from ..trace import SPAN
from ..wire import RESULT, RETIRE
from .actor import REOPEN
from .cluster import QUEUE, ray
from .recovery import Pending, Recovery


class Run:
    """The state of one ``stream``: per-actor task queues, retries, reordering; short named steps. Lost
    actors are ``recovery``'s (recovery.py)."""

    def __init__(self, ex, it: Iterator[Batch], ordered: bool, in_flight: int, window: int, faults,
                 args: tuple = (), source: Source | None = None):
        self.ex, self.it, self.ordered, self.faults = ex, it, ordered, faults
        self.args = args  # compute's extra arguments: (run key, [source ref]) when the actors build
        self.learn = source.learn if source is not None else None  # the driver's source learns what the actors found
        self.sent: set[int] = set()  # ranks whose actor was sent the source's ref in this run
        self.in_flight, self.window = in_flight, window
        self.limit = faults.batch_timeout_s
        self.queues: list[deque[Pending]] = [deque() for _ in ex.actors]
        self.since = [0.0] * len(ex.actors)  # when the head of each queue started computing
        self.todo: deque = deque()  # (index, attempt, obj, solo): resubmissions, before new batches
        self.opened: dict[int, None] = {}  # started and not yet yielded, in the order they started
        self.ready: dict[int, Outcome] = {}
        self.exhausted = False
        self.finished = False
        self.recovery = Recovery(self)
        self.trace = None  # the run's trace.Recorder (NOTE [ Trace ] in trace.py): actors send their spans

    # -- handing out work ------------------------------------------------------------------------------
    def submit(self) -> None:
        """Tasks to the actors with room: resubmissions first, then new batches, within the bounds."""
        usable = [r for r in range(len(self.queues)) if r not in self.recovery.recovering]
        while usable and sum(map(len, self.queues)) < self.in_flight:
            if not self.todo and (self.exhausted or len(self.opened) >= self.window):
                return
            solo = bool(self.todo) and self.todo[0][3]
            free = [r for r in usable if not self.queues[r] or (len(self.queues[r]) < QUEUE and not solo
                                                                and not self.queues[r][0].solo)]
            if not free:
                return
            if self.todo:
                index, attempt, obj, solo = self.todo.popleft()
            else:
                t0 = time.perf_counter()
                batch: Batch | None = next(self.it, None)
                if batch is None:
                    self.exhausted = True
                    return
                index, attempt, obj = batch.index, 1, None
                self.opened[index] = None
                if not self.args:  # the driver builds (NOTE [ Actor builds ])
                    try:
                        arr = batch.array()
                        obj = ray.put(arr)
                    except Exception as e:  # a dataset's sample, a file: that batch fails (faults.on_error)
                        if self.faults.on_error != "skip":
                            self.failed(index, e)
                            continue
                        self.fail({"batch": index, "cause": f"{type(e).__name__}: {e}", "attempts": 1})
                        continue
                    self.ex.figures["put_bytes"] += batch_nbytes(arr)
                    self.ex.breakdown["build_s"] += time.perf_counter() - t0
                    if self.trace is not None:
                        self.trace.here("build", t0, index, attempt)
            rank = min(free, key=lambda r: len(self.queues[r]))
            if not self.queues[rank]:
                self.since[rank] = time.monotonic()
            if self.args:  # actor-built: the source's ref goes with a rank's first task only (it costs)
                key, source = self.args
                ref = self.ex.actors[rank].build.remote((index, attempt, key,
                                                         None if rank in self.sent else source,
                                                         self.trace is not None))
                self.sent.add(rank)
            elif self.trace is not None:  # (each argument of a Ray task costs: this one only when tracing)
                ref = self.ex.actors[rank].compute.remote(index, attempt, obj, None, None, True)
            else:
                ref = self.ex.actors[rank].compute.remote(index, attempt, obj)
            self.queues[rank].append(Pending(ref, index, attempt, obj, solo))

    def next_ready(self) -> Outcome | None:
        if not self.ready:
            return None
        index = next(iter(self.opened)) if self.ordered else next(iter(self.ready))
        if index not in self.ready:
            return None
        del self.opened[index]
        return self.ready.pop(index)

    def idle(self) -> bool:
        done = self.exhausted and not self.todo and not any(self.queues) and not self.ready
        self.finished = done
        return done

    # -- waiting for the actors --------------------------------------------------------------------------
    def step(self) -> None:
        heads = [q[0].ref for q in self.queues if q] + [p[0] for p in self.recovery.recovering.values()]
        if not heads:
            raise WorkerError("internal: batches outstanding but nothing to wait for")  # never expected
        done, _ = ray.wait(heads, num_returns=1, timeout=min(1.0, self.limit / 4) if self.limit else 1.0)
        done = set(done)
        self.recovery.check(done)
        for rank, q in enumerate(self.queues):
            if q and q[0].ref in done:
                self.collect(rank, q.popleft())
        if self.limit:
            self.recovery.check_deadlines()

    def collect(self, rank: int, task: Pending) -> None:
        self.since[rank] = time.monotonic()
        try:
            msg = ray.get(task.ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            self.recovery.on_actor_lost(rank, task, e)
            return
        if msg[0] == RETIRE:
            self.recovery.on_retire(rank, task, msg)
            return
        if msg[0] == REOPEN:  # restarted unseen: it lost the run's source; sent again with the batch
            self.sent.discard(rank)
            self.todo.appendleft((task.index, task.attempt, None, task.solo))
            who = msg[2]
            pids = [w[1] for w in self.ex.seen if w[0] == rank]
            if who not in self.ex.seen:  # a new incarnation, not a task that merely came early
                self.ex.restarts.append({"rank": rank, "pid": pids[-1] if pids else None, "batch": None,
                                         "node": self.ex.node_of[rank],
                                         "cause": "ray actor restarted while idle (seen at its next task)"})
                self.ex.seen[who] = 0
                self.ex.node_of[rank] = who[3]
            return
        self.on_message(msg, task.attempt)

    def on_message(self, msg: tuple, attempt: int) -> None:
        ex = self.ex
        if msg[0] == RESULT:
            _, index, out, timings, who = msg
            ex.seen[who] = ex.seen.get(who, 0) + 1
            ex.node_of[who[0]] = who[3]
            for k in ("h2d_s", "d2h_s", "compute_s", "build_s"):
                ex.breakdown[k] += timings.get(k, 0.0)
            found = timings.pop("learned", None)
            if found and self.learn is not None:
                self.learn(found)
            if self.trace is not None and "spans" in timings:
                self.trace.name_process(who[1], f"ray actor {who[0]} (pid {who[1]}, node {who[3][:12]})")
                spans = timings.pop("spans")
                self.trace.worker(who[1], spans, index)
                if "build_span" in timings:  # (the actor built it: in its clock, as the spans)
                    a, b = timings.pop("build_span")
                    self.trace.put((SPAN, "build", who[1], "build", a + spans[0], b + spans[0], index, attempt, None))
            self.ready[index] = Outcome(index, out, {"pid": who[1], "device": who[2], "node": who[3],
                                                     **timings}, None)
            return
        _, index, packed, who = msg
        where = f"batch {index} (ray actor pid {who[1]}, device {who[2]}, node {who[3][:12]})"
        if isinstance(packed[0], OutputError):  # a full disk: fatal, whatever on_error says
            raise packed.exception(where)
        if self.faults.on_error == "skip":
            self.fail({"batch": index, "cause": packed.text, "attempts": attempt})
        else:
            self.failed(index, packed.exception(where))

    def fail(self, record: dict) -> None:
        self.ready[record["batch"]] = Outcome(record["batch"], None, {}, record)

    def failed(self, index: int, error: BaseException) -> None:
        """Batch ``index`` raised and ``faults.on_error`` is "fail": as the local backend (its
        ``BuildSide.batch_failed``), in order the batches before it are yielded first; as done, at once."""
        if not self.ordered:
            raise error
        self.exhausted = True  # (nothing new is drawn; what was started ends)
        self.ready[index] = Outcome(index, None, {}, {"batch": index, "raise": error})

    def abandon(self) -> None:
        """The consumer stopped early or an error ends the stream: cancel what is queued on the actors and
        wait (bounded) for what is running, so that the next stream starts on idle actors."""
        if self.finished:
            return
        refs = [t.ref for q in self.queues for t in q]
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        if refs:
            with contextlib.suppress(Exception):
                ray.wait(refs, num_returns=len(refs), timeout=self.limit or 10.0)
        for q in self.queues:
            q.clear()
        self.todo.clear()
        self.ready.clear()
        self.opened.clear()
