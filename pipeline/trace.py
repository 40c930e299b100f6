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
- Cheap: an event is nine doubles packed (one ``struct.pack_into``) into one anonymous memory map of
  ``EVENTS`` events (18 MB of address space, its pages zero until touched: nothing to set up; one ``next``
  of a counter, atomic under the GIL, reserves an event's place): no Python object per event for the
  garbage collector to scan. A batch's wait for a worker and its wait for its turn are not events of
  their own: their end is written into its build's and its return's event (``until``), and the waits are
  made from them when the file is written. A run that records more keeps the first ``EVENTS`` and counts
  the rest (``dropped``, in the file and the summary's notes): the file stays under about 80 MB. The JSON
  is written once, at the end of the run (also when it failed or was interrupted): the spans and waits
  as blocks of bytes made by numpy (``events``), the few other events by the JSON encoder. Without
  ``--trace`` the hot path only tests ``trace is not None``.
- Spans of a staging copy, a device-to-host step and waits shorter than ``SHORT_S`` (20 µs) are left out:
  invisible in a timeline, and most of a tiny batch's events.
- Tracks: a process per OS process (main, each worker, each build process, each Ray actor), a thread per
  lane (the main's supervisor, each build thread, the consumer; a worker's compute, copy and return lanes);
  waits ("waiting for a worker", "waiting for order") are async spans keyed by the batch (their own rows
  in Perfetto, since they overlap); counters for slots in use, batches in flight and the main's RSS.
"""
from __future__ import annotations

import itertools
import json
import mmap
import os
import struct
import threading
import time

import numpy as np

from .errors import ConfigError

EVENTS = 250_000  # events per trace at most (about 75,000 batches, 80 MB of JSON); the rest: dropped, counted
COUNTER_S = 0.02  # counters sampled at most this often
RSS_S = 0.2
SHORT_S = 20e-6  # a wait, a staging copy or a device-to-host step shorter than this is not recorded

# an event: (kind, name, pid, lane, start, end, index, attempt, then), times in wall-clock seconds, args
# aside; stored as FIELDS doubles in one preallocated buffer (names and lanes as codes): no Python object
# kept per event, so the garbage collector has nothing more to scan as the trace grows (a list of tuples
# cost a tiny-batch run a third of its speed, mostly in collections). ``then``, set later by ``until``,
# ends the wait that follows a span (WAITS): one event for a batch's build and its wait for a worker, one
# for its return and its wait for its turn, instead of two each
SPAN, INSTANT, ASYNC, COUNTER = 1, 2, 3, 4
WAITS = {"build": "waiting for a worker", "return": "waiting for order"}  # span -> the wait ``until`` ends
_POWERS = 10 ** np.arange(19, dtype=np.int64)
FIELDS = 9
EVENT_BYTES = 8 * FIELDS
_pack = struct.Struct(f"{FIELDS - 1}d").pack_into  # (then: 0 until ``until``)
_then = struct.Struct("d").pack_into


def clock() -> float:
    """This process's perf_counter -> wall-clock offset, sent with its stamps."""
    return time.time() - time.perf_counter()


class Recorder:
    def __init__(self, path: str, capacity: int = EVENTS):
        self.path = path
        try:  # a file that can't be written fails now, in one line, not after the run
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(f"{os.path.abspath(path)}.tmp-{os.getpid()}", "w"):
                pass
            os.unlink(f"{os.path.abspath(path)}.tmp-{os.getpid()}")
        except OSError as e:
            raise ConfigError(f"run.trace = {path!r}: can't write there ({e.strerror}): give a writable path "
                              f"for --trace") from None
        self.capacity = capacity
        # anonymous memory: its pages are zero until an event first touches them, so a trace of a short run
        # costs nothing to set up (an ``array`` of 32 MB filled with zeros cost 50 ms on a 2-core VM)
        self._mem = mmap.mmap(-1, EVENT_BYTES * capacity)
        self.extra: dict[int, dict] = {}  # event number -> its args (instants, counters, dispatches)
        self.codes: dict[str, int] = {}  # names and lanes -> codes
        self._lock = threading.Lock()
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
    def _code(self, text: str) -> int:
        with self._lock:
            return self.codes.setdefault(text, len(self.codes))

    def store(self, kind: int, name: str, pid: int, lane: str, a: float, b: float, index: int = -1,
              attempt: int = 0, args: dict | None = None) -> int:
        """One event (times in wall-clock seconds): its number; past the capacity, counted and dropped (-1)."""
        i = next(self._next)
        if i >= self.capacity:
            return -1
        codes = self.codes
        n, ln = codes.get(name), codes.get(lane)
        if n is None:
            n = self._code(name)
        if ln is None:
            ln = self._code(lane)
        if args:
            self.extra[i] = args
        # one C call, under the GIL: a half-stored event is never seen
        _pack(self._mem, i * EVENT_BYTES, kind, n, pid, ln, a, b, index, attempt)
        return i

    def until(self, event: int, end: float) -> None:
        """The wait after span ``event`` (a "build" or a "return": WAITS) ends at ``end`` (the main's
        perf_counter); a wait shorter than ``SHORT_S`` is not written."""
        if 0 <= event < self.capacity:
            _then(self._mem, event * EVENT_BYTES + 8 * (FIELDS - 1), end + self.offset)

    def put(self, ev: tuple) -> None:
        self.store(*ev)

    def span(self, name: str, lane: str, start: float, end: float, index: int = -1, attempt: int = 0,
             pid: int | None = None, args: dict | None = None) -> int:
        """A span in the main's perf_counter clock: its event number (for ``until``)."""
        off = self.offset
        return self.store(SPAN, name, pid or self.pid, lane, start + off, end + off, index, attempt, args)

    def here(self, name: str, start: float, index: int = -1, attempt: int = 0, args: dict | None = None) -> None:
        """A span on the calling thread's lane, from ``start`` to now."""
        self.span(name, threading.current_thread().name, start, time.perf_counter(), index, attempt, args=args)

    def worker(self, pid: int, spans: tuple, index: int, attempt: int) -> None:
        """A batch's stages in a worker or actor (``Computer``'s ``spans``: its clock offset, five stamps
        and flags: decoded there, CUDA, its copy started ahead), as spans on that process's lanes."""
        off, t0, t_decoded, t1, t2, t3, flags = spans
        store = self.store
        if flags & 1:
            store(SPAN, "decode", pid, "compute", t0 + off, t_decoded + off, index, attempt)
        if flags & 2:
            store(SPAN, "h2d wait" if flags & 4 else "h2d", pid, "copy", t_decoded + off, t1 + off, index, attempt)
        elif t1 - t_decoded > SHORT_S:  # (on the CPU "stage" is nothing unless a copy was made)
            store(SPAN, "stage", pid, "compute", t_decoded + off, t1 + off, index, attempt)
        store(SPAN, "compute", pid, "compute", t1 + off, t2 + off, index, attempt)
        if t3 - t2 > SHORT_S:
            store(SPAN, "d2h", pid, "compute", t2 + off, t3 + off, index, attempt)

    def instant(self, name: str, lane: str = "pipeline-supervisor", index: int = -1, attempt: int = 0,
                pid: int | None = None, args: dict | None = None) -> None:
        self.store(INSTANT, name, pid or self.pid, lane, time.time(), 0.0, index, attempt, args)

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
        self.store(COUNTER, "pipeline", self.pid, "", now + self.offset, 0.0, -1, 0,
                   dict(values, **{"main RSS MiB": round(self._rss, 1)}))

    def name_process(self, pid: int, name: str) -> None:
        self.processes[pid] = name

    # -- the file ------------------------------------------------------------------------------------
    def _with_waits(self, a: np.ndarray) -> np.ndarray:
        """The events, then the waits that ``until`` closed (WAITS): async spans from their span's end to
        ``then``, on the main's lane of that name (those shorter than ``SHORT_S`` left out)."""
        rows = []
        for span, wait in WAITS.items():
            code = self.codes.get(span)
            if code is None:
                continue
            w = a[(a[:, 0] == SPAN) & (a[:, 1] == code) & (a[:, 8] - a[:, 5] >= SHORT_S)]
            if len(w):
                c = self._code(wait)
                rows.append(np.column_stack([np.full(len(w), ASYNC), np.full(len(w), c), np.full(len(w), self.pid),
                                             np.full(len(w), c), w[:, 5], w[:, 8], w[:, 6], w[:, 7],
                                             np.zeros(len(w))]))
        return np.concatenate([a, *rows]) if rows else a

    def events(self, n: int) -> tuple[list[str], list[bytes]]:
        """The first ``n`` recorded events (``n`` at most the capacity) as trace-event JSON: the few with args
        of their own (instants, counters, a dispatch; and the processes' and lanes' names) as a list of JSON
        objects; the many spans and waits as blocks of bytes, each event preceded by ``,\\n``. That block is
        built by numpy, not by a format per event (that cost a tiny-batch run 7%, a JSON encoder 20%, on a
        2-core VM): events alike in all but their batch and times share a line's constant parts, and the
        numbers of a column are written to a common width (``_digits``: JSON allows the spaces)."""
        enc = json.JSONEncoder(separators=(",", ":"), default=str).encode
        a = self._with_waits(np.frombuffer(self._mem, np.float64, n * FIELDS).reshape(n, FIELDS))
        n = len(a)
        text = [""] * len(self.codes)
        for t, code in self.codes.items():
            text[code] = t
        kind, name, pid, lane, index, attempt = a[:, [0, 1, 2, 3, 6, 7]].astype(np.int64).T
        ts = np.rint((a[:, 4] - self.t0) * 1e6).astype(np.int64)
        te = np.rint((a[:, 5] - self.t0) * 1e6).astype(np.int64)
        keys, tid = np.unique(pid * 65536 + lane, return_inverse=True)
        tid = tid.reshape(-1) + 1
        safe = np.array([enc(t) == f'"{t}"' for t in text] or [True])
        extra = np.zeros(n, bool)
        extra[[e for e in self.extra if e < n]] = True
        bulk = (((kind == SPAN) | (kind == ASYNC)) & (index >= 0) & (attempt >= 0) & (attempt < 65536) & (ts >= 0)
                & (te >= ts) & ~extra & safe[name])
        block = []
        if bulk.any():
            sel = np.flatnonzero(bulk)
            key = (tid[sel] << 44) | (kind[sel] << 40) | (name[sel] << 16) | attempt[sel]  # (a lane is a pid's)
            groups, which = np.unique(key, return_inverse=True)
            order = np.argsort(which.reshape(-1), kind="stable")
            bounds = np.searchsorted(which.reshape(-1)[order], np.arange(len(groups) + 1))
            for g, first in enumerate(sel[order[bounds[:-1]]].tolist()):
                k, nm, p, t, at = (int(c[first]) for c in (kind, name, pid, tid, attempt))
                rows = sel[order[bounds[g]:bounds[g + 1]]]
                nm, again = text[nm], f" (attempt {at})" if at > 1 else ""
                i, t0, t1 = index[rows], ts[rows], te[rows]
                named = _digits(i, f'{again}"')
                head = [f',\n{{"name":"{nm} ', named, f',"cat":"{nm}","pid":{p},"tid":{t},"ts":', _digits(t0)]
                tail = [',"args":{"batch":', _digits(i), f',"attempt":{at}}}}}']
                if k == SPAN:
                    block.append(_lines(head + [',"ph":"X","dur":', _digits(t1 - t0)] + tail))
                else:  # an async span: begin and end, matched by id
                    ident = _digits(i, f'-{at}"')
                    block.append(_lines(head + [f',"ph":"b","id":"{nm}-', ident] + tail))
                    head[-1] = _digits(t1)
                    block.append(_lines(head + [f',"ph":"e","id":"{nm}-', ident, "}"]))
        out: list[str] = []
        for e in np.flatnonzero(~bulk & (kind > 0)).tolist():
            k, nm, p, t, i, at = int(kind[e]), text[name[e]], int(pid[e]), int(ts[e]), int(index[e]), int(attempt[e])
            args = self.extra.get(e)
            if k == COUNTER:
                out.append(enc({"name": "pipeline", "ph": "C", "pid": p, "ts": t, "args": args}))
                continue
            ev = {"name": nm if i < 0 else f"{nm} {i}" + (f" (attempt {at})" if at > 1 else ""), "cat": nm,
                  "pid": p, "tid": int(tid[e]), "ts": t,
                  "args": dict({"batch": i, "attempt": at} if i >= 0 else {}, **(args or {}))}
            if k == SPAN:
                ev.update(ph="X", dur=max(0, int(te[e]) - t))
            elif k == INSTANT:
                ev.update(ph="i", s="t")
            else:
                ev.update(ph="b", id=f"{nm}-{i}-{at}")
                out.append(enc(ev))
                ev = {"name": ev["name"], "cat": nm, "pid": p, "tid": ev["tid"], "ts": int(te[e]), "ph": "e",
                      "id": ev["id"]}
            out.append(enc(ev))
        meta = [{"name": "process_name", "ph": "M", "pid": p, "args": {"name": nm}}
                for p, nm in self.processes.items()]
        meta += [{"name": "process_sort_index", "ph": "M", "pid": p, "args": {"sort_index": i}}
                 for i, p in enumerate(self.processes)]
        meta += [{"name": "thread_name", "ph": "M", "pid": int(k >> 16), "tid": t + 1,
                  "args": {"name": text[int(k & 65535)] or "counters"}} for t, k in enumerate(keys.tolist())]
        return [enc(m) for m in meta] + out, block

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
        events, block = self.events(min(n, self.capacity))
        path = os.path.abspath(self.path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(('{"displayTimeUnit":"ms","otherData":' + json.dumps(other, default=str) + ',"traceEvents":[\n'
                     + ",\n".join(events)).encode())  # (never empty: the main's name comes first)
            for b in block:
                f.write(b)
            f.write(b"]}\n")
        if os.path.exists(path):  # (renamed over an old file, ext4 writes the new one back first: 10 ms)
            os.unlink(path)
        os.replace(tmp, path)
        return path


def _digits(x: np.ndarray, tail: str | None = None) -> np.ndarray:
    """Non-negative integers as rows of bytes of one width (``_lines`` puts such blocks side by side): each
    number's decimal digits right-aligned after spaces (a JSON number may follow spaces); with ``tail``,
    the digits left-aligned, then ``tail``, then spaces (inside a JSON string: the tail closes it)."""
    nd = np.searchsorted(_POWERS, x, side="right").clip(1)  # each number's digits
    d = int(nd.max())
    right, q = np.empty((len(x), d), np.uint8), x
    for k in range(d - 1, -1, -1):  # (a column at a time: 1-D operations, five times faster than 2-D)
        done = q == 0  # (nothing left: a leading zero, written as a space; but a number 0's one digit)
        q, r = np.divmod(q, 10)
        right[:, k] = np.where(done, 32, r + 48) if k < d - 1 else r + 48
    if tail is None:
        return right
    # the row read from its first digit on, through the tail and spaces that follow it
    rest = np.broadcast_to(np.frombuffer((tail + " " * d).encode(), np.uint8), (len(x), len(tail) + d))
    both = np.concatenate([right, rest], axis=1)
    return np.take_along_axis(both, (d - nd)[:, None] + np.arange(d + len(tail)), axis=1)


def _lines(parts: list) -> bytes:
    """Rows of bytes, each the concatenation of ``parts``: text (the same in every row) or ``_digits``."""
    n = next(len(p) for p in parts if not isinstance(p, str))
    cols = [np.broadcast_to(np.frombuffer(p.encode(), np.uint8), (n, len(p.encode()))) if isinstance(p, str)
            else p for p in parts]
    return np.concatenate(cols, axis=1).tobytes()


def read(path: str) -> dict:
    """A trace file written by ``Recorder.write`` (or any Chrome trace JSON: a list or an object)."""
    with open(path) as f:
        doc = json.load(f)
    return doc if isinstance(doc, dict) else {"traceEvents": doc}
