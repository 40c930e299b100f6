"""The in-order hand-over: outcomes from the supervisor thread to the caller's thread, within a window.

NOTE [ Hand-over ]
Waking a thread that sleeps costs tens of microseconds of CPU on both sides (a futex, two context
switches, the GIL changing hands), as much as the rest of a small batch's bookkeeping. So the supervisor
hands finished outcomes to the consumer together: once it holds ``POST_COUNT`` of them (a quarter of the
window if that is fewer), once the oldest is ``POST_S`` old, when the window is full (the supervisor then
waits for the consumer), and when the run ends. A consumer that is busy finds them on its next take
anyway; one that sleeps is not the limit, and loses at most ``POST_S`` of latency. Build threads keep two
jobs each for the same reason (building.py).

The window: at most ``window`` batches (default 2 x in_flight) started and not yet taken by the consumer,
results held for reordering included, so a slow consumer stops new builds (backpressure) and never grows
a buffer. In order, a batch is handed over once every batch drawn before it is; a failed batch
(``on_error = "fail"``) raises where it would have come, after every batch before it.
"""
from __future__ import annotations

import threading
import time
from typing import Iterator

from ..contracts import Outcome

POST_COUNT, POST_S = 16, 0.002  # outcomes handed to the consumer together


class Handover:
    """One run's outcomes on their way to the consumer; ``run`` is its coordinator (executor.Run)."""

    def __init__(self, run, window: int, ordered: bool):
        self.run, self.window, self.ordered = run, window, ordered
        self.cond = threading.Condition()
        self.done: dict[int, Outcome] = {}  # handed over, not yet taken by the consumer
        self.outbox: list[Outcome] = []  # done, not yet handed over (the supervisor's own)
        self.outbox_since = 0.0  # when the oldest of them was done
        self.drawn = None  # batch indices in the order they were drawn (the builders'): the order to keep
        self.started = 0  # next-batch jobs issued and not answered 'exhausted'
        self.taken = 0
        self.error: BaseException | None = None
        self.finished = False
        self.handed: list = []  # (tracing) (outcome, done at, handed over at), recorded once the lock is let go

    # -- the consumer's side (the caller's thread) --------------------------------------------------
    def outcomes(self) -> Iterator[Outcome]:
        while True:
            with self.cond:  # every outcome that may be handed over now, under one lock
                while True:
                    outs = []  # (what was done before a failure is handed over first: in order, up to
                    out = self._next_done()  # the batch that failed)
                    while out is not None:
                        outs.append(out)
                        out = self._next_done()
                    if outs:
                        break
                    if self.error is not None:
                        raise self.error
                    if self.finished:
                        return
                    self.cond.wait(1.0)
            if self.handed:  # (out of the lock: the supervisor may want it meanwhile)
                for out, done_at, now in self.handed:
                    self.traced(out, done_at, now)
                self.handed.clear()
            for out in outs:
                if out.failure is not None and "raise" in out.failure:  # (see BuildSide.batch_failed)
                    raise out.failure["raise"]
                # taken one at a time (the window bounds what is not yet yielded); the supervisor may
                # wait for this take: woken when the window was full (it reads ``taken`` under the lock,
                # after it raised ``started``: an int's update is atomic, no lock needed here)
                full = self.started - self.taken >= self.window
                self.taken += 1
                if full:
                    self.run.wake()
                yield out

    def _next_done(self) -> Outcome | None:
        if not self.done:
            return None
        if not self.ordered:
            out = self.done.pop(next(iter(self.done)))
        else:
            drawn = self.drawn
            if not (drawn and drawn[0] in self.done):
                return None
            out = self.done.pop(drawn.popleft())
        now = time.perf_counter()
        done_at = out.info.pop("_done_at")
        self.run.breakdown["order_wait_s"] += now - done_at
        if self.run.trace is not None:
            self.handed.append((out, done_at, now))
        return out

    def traced(self, out: Outcome, done_at: float, now: float) -> None:
        """NOTE [ Trace ] in trace.py: a result's event (its build, its stages in the worker, its return,
        received at ``done_at``, and its wait for order until ``now``; 0: never handed over)."""
        info = out.info
        if "spans" in info:
            self.run.trace.worker(info["pid"], info.pop("spans"), out.index, info["sent"], info.pop("_built", None),
                                  done_at, now)

    def untaken(self) -> list[Outcome]:
        """Outcomes done and not taken by the consumer (a run that ended early)."""
        with self.cond:
            return [*self.done.values(), *self.outbox]

    # -- the supervisor's side ----------------------------------------------------------------------
    def room(self) -> int:
        """Batches that may still be started within the window."""
        with self.cond:
            return self.window - (self.started - self.taken)

    def deliver(self, out: Outcome) -> None:
        if not self.outbox:
            self.outbox_since = time.perf_counter()
        self.outbox.append(out)  # handed over by ``post``: one lock and one wake-up for all of them

    def post(self, now: bool = True) -> None:
        """Hand the outbox to the consumer; ``now`` False: only once it holds ``POST_COUNT`` outcomes
        (fewer for a small window), its oldest is ``POST_S`` old, or the window is full."""
        if not self.outbox:
            return
        if not now and len(self.outbox) < max(1, min(POST_COUNT, self.window // 4)):
            if (time.perf_counter() - self.outbox_since < POST_S
                    and self.window - (self.started - self.taken) > 0):
                return
        with self.cond:
            for out in self.outbox:
                self.done[out.index] = out
            self.cond.notify_all()
        self.outbox.clear()

    def post_due(self) -> float | None:
        """Seconds until ``post(now=False)`` hands over what the outbox holds; None when empty."""
        return max(0.0, self.outbox_since + POST_S - time.perf_counter()) if self.outbox else None

    def fail(self, error: BaseException) -> None:
        """The supervisor failed: the consumer raises ``error`` once it has taken what came before."""
        with self.cond:
            self.error = error

    def finish(self) -> None:
        """The supervisor is done: everything goes over, and the consumer learns that nothing follows."""
        self.post()
        with self.cond:
            self.finished = True
            self.cond.notify_all()
