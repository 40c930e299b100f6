"""``--trace FILE``: every batch through every stage, as a Chrome trace-event JSON (Perfetto, chrome://tracing).

NOTE [ Trace ]
One ``Recorder`` per run, in the main. What the main does (build threads, build processes' reports,
dispatch, waits, hand-over, writes) is recorded where it happens; what a worker or a Ray actor does
(decode, host-to-device, compute, device-to-host) travels back with the batch's result, in its timings
(``spans``, with that process's clock offset), and is recorded when the result arrives: no buffer and no
file in any child, nothing written by a process that may be killed. A worker killed mid-batch leaves no
spans for that attempt; its death, the retry and its replacement are instant events the main records.

- One time base: every process stamps with ``time.perf_counter`` and sends ``time.time() - perf_counter()``
  with it; the main turns each stamp into wall-clock seconds (on one machine the two clocks agree; across
  a Ray cluster, as well as the nodes' clocks do).
- Cheap: events are tuples put into a list of ``EVENTS`` preallocated entries (one ``next`` of a counter,
  atomic under the GIL, and a store); a run that records more keeps the first ``EVENTS`` and counts the
  rest (``dropped``, in the file and the summary's notes): the file stays under about 70 MB. The JSON is
  written once, at the end of the run (also when it failed or was interrupted). Without ``--trace`` the
  hot path only tests ``trace is not None``.
- Tracks: a process per OS process (main, each worker, each build process, each Ray actor), a thread per
  lane (the main's supervisor, each build thread, the consumer; a worker's compute, copy and return lanes);
  waits ("waiting for a worker", "waiting for order") are async spans keyed by the batch (their own rows
  in Perfetto, since they overlap); counters for slots in use, batches in flight and the main's RSS.
"""
from __future__ import annotations

import itertools
import json
import os
import threading
import time

EVENTS = 500_000  # at most this many events per trace; the rest are dropped and counted
COUNTER_S = 0.02  # counters sampled at most this often
RSS_S = 0.2

# (kind, name, pid, lane, start, end, index, attempt, args): times in wall-clock seconds
SPAN, INSTANT, ASYNC, COUNTER = "X", "i", "b", "C"


def clock() -> float:
    """This process's perf_counter -> wall-clock offset, sent with its stamps."""
    return time.time() - time.perf_counter()


class Recorder:
    def __init__(self, path: str, capacity: int = EVENTS):
        self.path = path
        self.capacity = capacity
        self.buf: list = [None] * capacity
        self._next = itertools.count()
        self.offset = clock()  # the main's
        self.pid = os.getpid()
        self.t0 = time.time()
        self.processes: dict[int, str] = {self.pid: "main"}
        self._counter_at = self._rss_at = 0.0
        self._rss = 0.0
        self.dropped = self.recorded = 0  # (set by ``write``)
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    # -- recording (any thread of the main) --------------------------------------------------------------
    def put(self, ev: tuple) -> None:
        i = next(self._next)
        if i < self.capacity:
            self.buf[i] = ev

    def span(self, name: str, lane: str, start: float, end: float, index: int = -1, attempt: int = 0,
             pid: int | None = None, args: dict | None = None) -> None:
        """A span in the main's perf_counter clock."""
        off = self.offset
        self.put((SPAN, name, pid or self.pid, lane, start + off, end + off, index, attempt, args))

    def here(self, name: str, start: float, index: int = -1, attempt: int = 0, args: dict | None = None) -> None:
        """A span on the calling thread's lane, from ``start`` to now."""
        self.span(name, threading.current_thread().name, start, time.perf_counter(), index, attempt, args=args)

    def remote(self, pid: int, spans: tuple, index: int, attempt: int) -> None:
        """A child's spans (``spans(...)``'s value): its clock offset, then (name, lane, start, end)."""
        off, items = spans
        for name, lane, a, b in items:
            self.put((SPAN, name, pid, lane, a + off, b + off, index, attempt, None))

    def instant(self, name: str, lane: str = "pipeline-supervisor", index: int = -1, attempt: int = 0,
                pid: int | None = None, args: dict | None = None) -> None:
        self.put((INSTANT, name, pid or self.pid, lane, time.time(), 0.0, index, attempt, args))

    def wait(self, name: str, start: float, end: float, index: int, attempt: int = 0) -> None:
        """An async span (overlapping others of its name) in the main's clock: a batch waiting."""
        off = self.offset
        self.put((ASYNC, name, self.pid, name, start + off, end + off, index, attempt, None))

    def counters(self, values: dict) -> None:
        """Sampled: at most every ``COUNTER_S``; the main's RSS every ``RSS_S``."""
        now = time.perf_counter()
        if now - self._counter_at < COUNTER_S:
            return
        self._counter_at = now
        if now - self._rss_at >= RSS_S:
            self._rss_at = now
            try:
                with open("/proc/self/statm", "rb") as f:
                    self._rss = int(f.read().split()[1]) * self._page / 2**20
            except (OSError, ValueError, IndexError):
                pass
        self.put((COUNTER, "pipeline", self.pid, "", now + self.offset, 0.0, -1, 0,
                  dict(values, **{"main RSS MiB": round(self._rss, 1)})))

    def name_process(self, pid: int, name: str) -> None:
        self.processes[pid] = name

    # -- the file ------------------------------------------------------------------------------------
    def events(self, n: int) -> list[dict]:
        """The first ``n`` recorded events (``n`` at most the capacity) as trace-event dicts."""
        t0, lanes, out = self.t0, {}, []
        for ev in self.buf[:n]:
            if ev is None:  # (a slot taken by a thread that had not stored yet at the end)
                continue
            kind, name, pid, lane, a, b, index, attempt, args = ev
            tid = lanes.setdefault((pid, lane), len(lanes) + 1)
            label = name if index < 0 else f"{name} {index}" + (f" (attempt {attempt})" if attempt > 1 else "")
            e = {"name": label, "cat": name, "ph": kind, "pid": pid, "tid": tid, "ts": round((a - t0) * 1e6, 1)}
            a_ = {"batch": index, "attempt": attempt} if index >= 0 else {}
            if args:
                a_.update(args)
            if kind == SPAN:
                e["dur"] = round(max(0.0, b - a) * 1e6, 1)
            elif kind == INSTANT:
                e["s"] = "t"
            elif kind == ASYNC:
                e["id"] = f"{name}-{index}-{attempt}"
                end = dict(e, ph="e", ts=round((b - t0) * 1e6, 1))
                if a_:
                    e["args"] = a_
                out.append(e)
                out.append(end)
                continue
            elif kind == COUNTER:
                e.pop("tid")
                e["name"] = "pipeline"
                out.append(dict(e, args=args))
                continue
            if a_:
                e["args"] = a_
            out.append(e)
        meta = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}
                for pid, name in self.processes.items()]
        meta += [{"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": i}}
                 for i, pid in enumerate(self.processes)]
        meta += [{"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": lane or "counters"}}
                 for (pid, lane), tid in lanes.items()]
        return meta + out

    def write(self, summary: dict | None = None) -> str:
        """The trace as JSON at ``path`` (atomically: a temp file renamed); the summary's verdict and the
        dropped count go in ``otherData``."""
        n = next(self._next)  # events recorded (this call's step is not one)
        self.dropped = max(0, n - self.capacity)
        self.recorded = min(n, self.capacity)
        other = {"dropped_events": self.dropped, "start_unix_s": self.t0}
        if summary is not None:
            other.update(bottleneck=summary.get("bottleneck"), wall_s=summary.get("wall_s"),
                         kernel=summary.get("kernel"), checksum=summary.get("checksum"))
        doc = {"traceEvents": self.events(min(n, self.capacity)), "displayTimeUnit": "ms", "otherData": other}
        path = os.path.abspath(self.path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(doc, f, separators=(",", ":"), default=str)
        os.replace(tmp, path)
        return path


def spans(items: list) -> tuple:
    """A child's spans for its result's timings: (its clock offset, [(name, lane, start, end), ...])."""
    return (clock(), items)


def read(path: str) -> dict:
    """A trace file written by ``Recorder.write`` (or any Chrome trace JSON: a list or an object)."""
    with open(path) as f:
        doc = json.load(f)
    return doc if isinstance(doc, dict) else {"traceEvents": doc}
