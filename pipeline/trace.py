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
- Cheap: an event is ``FIELDS`` doubles packed (one ``struct.pack_into``) into one anonymous memory map
  of ``EVENTS`` events (13 MB of address space, its pages zero until touched: nothing to set up; one
  ``next`` of a counter, atomic under the GIL, reserves an event's place): no Python object per event for
  the garbage collector to scan. One event per batch (``WORKER``, written when its result arrives): its
  build (carried on its task until then: ``Task.built``; recorded alone if it gets no result), every
  stage in its worker and its return, made spans when the file is written. Its waits are not events of
  their own: the wait for a worker ends when the worker starts it, the wait for its turn where the
  hand-over writes it into the event (``until``). A run that records more keeps the first ``EVENTS``
  (about 75,000 batches) and counts the rest (``dropped``, in the file and the summary's notes): the file
  stays under about 80 MB (more with CUDA's copy spans). The JSON is written once, at the end of the run
  (also when it failed or was interrupted): the spans and waits as blocks of bytes made by numpy in a few
  threads (``events``), the few other events by the JSON encoder. Without ``--trace`` the hot path only
  tests ``trace is not None``.
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
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .devices import usable_cpus
from .errors import ConfigError

EVENTS = 80_000  # events per trace at most (about 75,000 batches, 80 MB of JSON); the rest: dropped, counted
THREADS = 4  # threads that make the file, at most (and at most the usable CPUs)
COUNTER_S = 0.02  # counters sampled at most this often
RSS_S = 0.2
SHORT_S = 20e-6  # a wait, a staging copy or a device-to-host step shorter than this is not recorded

# an event: (kind, name, pid, lane, start, end, index, attempt, then), times in wall-clock seconds, args
# aside; stored as FIELDS doubles in one preallocated buffer (names and lanes as codes): no Python object
# kept per event, so the garbage collector has nothing more to scan as the trace grows (a list of tuples
# cost a tiny-batch run a third of its speed, mostly in collections). ``then`` ends the wait that follows
# a span (WAITS): a build's when a worker started the batch (its WORKER event's start; for a build recorded
# alone, matched when the file is written: ``_started``); a return's, set by ``until``
SPAN, INSTANT, ASYNC, COUNTER, WORKER = 1, 2, 3, 4, 5
WAITS = {"build": "waiting for a worker", "return": "waiting for order"}  # span -> the wait that follows it
COUNTS = {"dispatch": "batches"}  # spans whose index column is a count (its args' key), not a batch
_POWERS = 10 ** np.arange(19, dtype=np.int64)
FIELDS = 20
# a WORKER event is one batch's time in a worker, made spans when the file is written (``_stages``): its
# stamps (start = received, decoded, copied, computed, end = its result on the host, columns 4, 9, 10, 11,
# 5), its return to the main (sent, received: 12, 13; 0 without one), its flags (14); ``then`` ends the
# wait for order after the return; and the batch's build, when the main built it (start, end, lane, pid,
# attempt: 15-19; 0 without one)
EVENT_BYTES = 8 * FIELDS
_pack = struct.Struct("8d").pack_into  # (then and the WORKER columns: 0)
_pack_worker = struct.Struct(f"{FIELDS}d").pack_into
_NO_BUILD = (0.0, 0.0, "build", 0, 0)
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
        """The wait for its turn after the return of WORKER event ``event`` (WAITS) ends at ``end`` (the
        main's perf_counter); a wait shorter than ``SHORT_S`` is left out of the file."""
        if 0 <= event < self.capacity:
            _then(self._mem, event * EVENT_BYTES + 64, end + self.offset)  # (column 8: then)

    def put(self, ev: tuple) -> None:
        self.store(*ev)

    def span(self, name: str, lane: str, start: float, end: float, index: int = -1, attempt: int = 0,
             pid: int | None = None, args: dict | None = None) -> int:
        """A span in the main's perf_counter clock: its event number."""
        off = self.offset
        return self.store(SPAN, name, pid or self.pid, lane, start + off, end + off, index, attempt, args)

    def here(self, name: str, start: float, index: int = -1, attempt: int = 0, args: dict | None = None) -> None:
        """A span on the calling thread's lane, from ``start`` to now."""
        self.span(name, threading.current_thread().name, start, time.perf_counter(), index, attempt, args=args)

    def worker(self, pid: int, spans: tuple, index: int, attempt: int, sent: float = 0.0,
               built: tuple | None = None) -> int:
        """A batch's stages in a worker or actor (``Computer``'s ``spans``: its clock offset, five stamps and
        flags: decoded there, CUDA, its copy started ahead); with ``sent`` (that process's wall clock when it
        sent the result), its return to the main until now; with ``built`` (``Task.built``: start, end, lane,
        build process or 0, attempt; the main's perf_counter), its build: one event (``WORKER``), made spans
        when the file is written; its number (for ``until``: the wait for order that follows the return)."""
        off, t0, t_decoded, t1, t2, t3, flags = spans
        i = next(self._next)
        if i >= self.capacity:
            return -1
        b0, b1, lane, bpid, battempt = built or _NO_BUILD
        ln = self.codes.get(lane)
        if ln is None:
            ln = self._code(lane)
        main = self.offset if built else 0.0
        _pack_worker(self._mem, i * EVENT_BYTES, WORKER, 0, pid, 0, t0 + off, t3 + off, index, attempt, 0.0,
                     t_decoded + off, t1 + off, t2 + off, sent, time.time() if sent else 0.0, flags,
                     b0 + main, b1 + main, ln, bpid or self.pid, battempt)
        return i

    def built(self, task) -> None:
        """``task``'s build (``Task.built``) as a span of its own, once: its batch ends without a result."""
        if task.built is not None:
            start, end, lane, pid, attempt = task.built
            task.built = None
            self.span("build", lane, start, end, task.index, attempt, pid or None)

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
    def _stages(self, w: np.ndarray) -> list[list[np.ndarray]]:
        """WORKER events (``worker``) as the spans of their stages, each stage's as columns (kind, name, pid,
        lane, start, end, index, attempt, then, and -1 for an event number: ``events``' columns):
        its build in the main (its wait for a worker ends when this worker started it), decode (decoded
        there), the copy to the device ("h2d", or "h2d wait" for a copy started ahead) on the copy lane,
        else a staging copy ("stage"), compute, the copy back ("d2h"), the return; a staging copy or a copy
        back shorter than ``SHORT_S`` left out."""
        flags = w[:, 14].astype(np.int64)
        t0, t3, then, td, t1, t2, sent, got = (w[:, c] for c in (4, 5, 8, 9, 10, 11, 12, 13))
        compute, copy, back = self._code("compute"), self._code("copy"), self._code("return")
        pid, attempt, none = w[:, 2], w[:, 7], None
        stages = [(w[:, 16] > 0, "build", w[:, 17], w[:, 15], w[:, 16], t0, w[:, 18], w[:, 19]),
                  (flags & 1 > 0, "decode", compute, t0, td, none, pid, attempt),
                  (flags & 6 == 2, "h2d", copy, td, t1, none, pid, attempt),
                  (flags & 6 == 6, "h2d wait", copy, td, t1, none, pid, attempt),
                  ((flags & 2 == 0) & (t1 - td > SHORT_S), "stage", compute, td, t1, none, pid, attempt),
                  (None, "compute", compute, t1, t2, none, pid, attempt),
                  (t3 - t2 > SHORT_S, "d2h", compute, t2, t3, none, pid, attempt),
                  (got > 0, "return", back, sent, got, then, pid, attempt)]
        parts = []
        for m, name, lane, a, b, c, p, at in stages:
            if m is None or m.all():
                m = slice(None)
            elif not m.any():
                continue
            k = len(a[m])
            parts.append([_full(k, SPAN), _full(k, self._code(name)), p[m],
                          lane[m] if isinstance(lane, np.ndarray) else _full(k, lane), a[m], b[m], w[m, 6], at[m],
                          _full(k, 0.0) if c is None else c[m], _full(k, -1)])
        return parts

    def _started(self, base: np.ndarray, w: np.ndarray) -> None:
        """A build's wait for a worker (WAITS) ends when a worker starts the batch: its event's ``then`` (set
        in ``base``), the start of the WORKER event of the same batch and attempt (the earliest, if more)."""
        code = self.codes.get("build")
        if code is None or not len(w):
            return
        builds = np.flatnonzero((base[:, 0] == SPAN) & (base[:, 1] == code))
        keys = w[:, 6] * 65536 + w[:, 7]
        order = np.argsort(keys, kind="stable")  # (they come as they arrived: the earliest first)
        keys = keys[order]
        want = base[builds, 6] * 65536 + base[builds, 7]
        at = np.searchsorted(keys, want).clip(max=len(keys) - 1)
        hit = keys[at] == want
        base[builds[hit], 8] = w[order[at[hit]], 4]

    def _waits(self, part: list[np.ndarray]) -> list[list[np.ndarray]]:
        """The waits that follow the spans of ``part`` (WAITS): async spans from their span's
        end to ``then``, on the main's lane of that name (those shorter than ``SHORT_S`` left out)."""
        kind, name, end, index, attempt, then = (part[c] for c in (0, 1, 5, 6, 7, 8))
        waits = []
        for span, wait in WAITS.items():
            code = self.codes.get(span)
            if code is not None:
                m = np.flatnonzero((name == code) & (kind == SPAN) & (then - end >= SHORT_S))
                if len(m):
                    c, k = self._code(wait), len(m)
                    waits.append([_full(k, ASYNC), _full(k, c), _full(k, self.pid), _full(k, c), end[m], then[m],
                                  index[m], attempt[m], _full(k, 0.0), _full(k, -1)])
        return waits

    def events(self, n: int, pool: ThreadPoolExecutor | None = None) -> tuple[list[str], list[list]]:
        """The first ``n`` recorded events (``n`` at most the capacity) as trace-event JSON: the few with args
        of their own (instants, counters; and the processes' and lanes' names) as a list of JSON objects;
        the many spans and waits as blocks of lines to make (``_lines``' parts: each event preceded by
        ``,\\n``). Those blocks are made by numpy, not by a format per event (that cost a tiny-batch run 7%,
        a JSON encoder 20%, on a 2-core VM): events alike in all but their batch and times share a line's
        constant parts, and the numbers of a column are written to a common width (``_digits``: JSON allows
        the spaces). ``pool``: threads that make the columns of numbers side by side (numpy lets go of the
        GIL)."""
        enc = json.JSONEncoder(separators=(",", ":"), default=str).encode
        raw = np.frombuffer(self._mem, np.float64, n * FIELDS).reshape(n, FIELDS)
        workers = raw[:, 0] == WORKER
        number = np.flatnonzero(~workers & (raw[:, 0] > 0))  # (each row's event number, for ``extra``; made: -1)
        base = raw[number]
        self._started(base, raw[workers])
        parts = [[base[:, c] for c in range(9)] + [number], *self._stages(raw[workers])]
        parts += [w for p in parts for w in self._waits(p)]
        kind, name, pid, lane, start, end, index, attempt, number = (
            np.concatenate([p[c] for p in parts]) for c in (0, 1, 2, 3, 4, 5, 6, 7, 9))
        kind, name, pid, lane, index, attempt, number = (
            c.astype(np.int64) for c in (kind, name, pid, lane, index, attempt, number))
        ts = np.rint((start - self.t0) * 1e6).astype(np.int64)
        te = np.rint((end - self.t0) * 1e6).astype(np.int64)
        text = [""] * len(self.codes)
        for t, code in self.codes.items():
            text[code] = t
        keys, tid = np.unique(pid * 65536 + lane, return_inverse=True)
        tid = tid.reshape(-1) + 1
        safe = np.array([enc(t) == f'"{t}"' for t in text] or [True])
        extra = np.isin(number, np.fromiter(self.extra, np.int64, len(self.extra)))
        counted = np.isin(name, [self.codes[c] for c in COUNTS if c in self.codes])  # (their index: a count)
        bulk = (((kind == SPAN) | (kind == ASYNC)) & ((index >= 0) | counted) & (attempt >= 0) & (attempt < 65536)
                & (ts >= 0) & (te >= ts) & ~extra & safe[name])
        block: list[list] = []
        if bulk.any():
            sel = np.flatnonzero(bulk)
            key = (tid[sel] << 44) | (kind[sel] << 40) | (name[sel] << 16) | attempt[sel]  # (a lane is a pid's)
            order = np.argsort(key, kind="stable")
            key = key[order]
            bounds = [0, *(np.flatnonzero(key[1:] != key[:-1]) + 1).tolist(), len(key)]
            sel = sel[order]  # (grouped; each column's digits made once, for all of them)
            i, t0, t1 = index[sel], ts[sel], te[sel]
            ends = np.where(kind[sel] == SPAN, t1 - t0, t1)  # (a span's duration, a wait's end)
            jobs = [(_digits, i), (_named, i), (_digits, t0), (_digits, ends)]
            wide, named, at_ts, at_end = (pool.map if pool else map)(lambda job: job[0](job[1]), jobs)
            digits = _count(i)
            for g, first in enumerate(sel[bounds[:-1]].tolist()):
                k, nm, p, t, at = (int(c[first]) for c in (kind, name, pid, tid, attempt))
                rows = slice(bounds[g], bounds[g + 1])
                nm, num = text[nm], wide[rows]
                if nm in COUNTS:  # a count in its args, not a batch in its name
                    head = [f',\n{{"name":"{nm}","cat":"{nm}","pid":{p},"tid":{t},"ts":', at_ts[rows]]
                    tail = [f',"args":{{"{COUNTS[nm]}":', num, "}}"]
                else:
                    head = [f',\n{{"name":"{nm} ', named[rows] if at == 1 else
                            _tailed(num, digits[rows], f' (attempt {at})"'),
                            f',"cat":"{nm}","pid":{p},"tid":{t},"ts":', at_ts[rows]]
                    tail = [',"args":{"batch":', num, f',"attempt":{at}}}}}']
                if k == SPAN:
                    block.append(head + [',"ph":"X","dur":', at_end[rows]] + tail)
                    continue
                # an async span: begin and end, matched by id ("<its name's place in WAITS>:<batch>[-attempt]")
                ident = [f',"id":"{list(WAITS.values()).index(nm) if nm in WAITS.values() else nm}:',
                         named[rows] if at == 1 else _tailed(num, digits[rows], f'-{at}"')]
                block.append(head + [',"ph":"b"'] + ident + tail)
                block.append(head[:-1] + [at_end[rows], ',"ph":"e"'] + ident + ["}"])
        out: list[str] = []
        for e in np.flatnonzero(~bulk & (kind > 0)).tolist():
            k, nm, p, t, i, at = int(kind[e]), text[name[e]], int(pid[e]), int(ts[e]), int(index[e]), int(attempt[e])
            args = self.extra.get(int(number[e]))
            if k == COUNTER:
                out.append(enc({"name": "pipeline", "ph": "C", "pid": p, "ts": t, "args": args}))
                continue
            if nm in COUNTS:
                args, i = dict(args or {}, **{COUNTS[nm]: i}), -1
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
        path = os.path.abspath(self.path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        # (at the run's end its workers are idle: threads make the blocks side by side, and the file is
        # written while the next ones are made)
        threads = min(THREADS, usable_cpus())
        with ThreadPoolExecutor(threads, thread_name_prefix="pipeline-trace") as pool, open(tmp, "wb") as f:
            events, block = self.events(min(n, self.capacity), pool)
            f.write(('{"displayTimeUnit":"ms","otherData":' + json.dumps(other, default=str) + ',"traceEvents":[\n'
                     + ",\n".join(events)).encode())  # (never empty: the main's name comes first)
            for b in pool.map(_lines, block):
                f.write(b)
            f.write(b"]}\n")
        if os.path.exists(path):  # (renamed over an old file, ext4 writes the new one back first: 10 ms)
            os.unlink(path)
        os.replace(tmp, path)
        return path


def _full(n: int, value: float) -> np.ndarray:
    return np.full(n, value, np.float64)


def _count(x: np.ndarray) -> np.ndarray:
    """The decimal digits of each non-negative integer of ``x``."""
    return np.searchsorted(_POWERS, x, side="right").clip(1)


def _digits(x: np.ndarray) -> np.ndarray:
    """Non-negative integers as rows of bytes of one width (``_lines`` puts such blocks side by side): each
    number's decimal digits right-aligned after spaces (a JSON number may follow spaces)."""
    top = int(x.max(initial=0))
    d = int(_count(top))
    right, q = np.empty((d, len(x)), np.uint8), x.astype(np.uint32) if top < 2**32 else x  # (3x faster)
    for k in range(d - 1, -1, -1):  # (a digit of every number at a time: 1-D operations, 5x faster than 2-D)
        n = q // 10  # (by a constant: numpy's libdivide, faster than divmod)
        right[k] = (q - n * 10).astype(np.uint8) + 48
        if k < d - 1:
            right[k][q == 0] = 32  # (nothing left: a leading zero, written as a space; but a number 0's one digit)
        q = n
    return right.T


def _named(x: np.ndarray) -> np.ndarray:
    """``x``'s digits left-aligned, then ``"``: the end of a first attempt's name."""
    return _tailed(_digits(x), _count(x), '"')


def _tailed(right: np.ndarray, digits: np.ndarray, tail: str) -> np.ndarray:
    """``_digits``' rows (``digits``: each number's count) left-aligned, then ``tail``, then spaces: inside a
    JSON string, the tail closes it."""
    d = right.shape[1]
    rest = np.broadcast_to(np.frombuffer((tail + " " * d).encode(), np.uint8), (len(right), len(tail) + d))
    both = np.concatenate([right, rest], axis=1)
    return np.take_along_axis(both, (d - digits)[:, None] + np.arange(d + len(tail)), axis=1)


def _lines(parts: list) -> np.ndarray:
    """Rows of bytes, each the concatenation of ``parts``: text (the same in every row) or ``_digits``."""
    n = next(len(p) for p in parts if not isinstance(p, str))
    width = [len(p.encode()) if isinstance(p, str) else p.shape[1] for p in parts]
    out = np.empty((n, sum(width)), np.uint8)
    out[:] = np.frombuffer(b"".join(p.encode() if isinstance(p, str) else b" " * w for p, w in zip(parts, width)),
                           np.uint8)  # (the text: one copy of a row; then the numbers)
    at = 0
    for p, w in zip(parts, width):
        if not isinstance(p, str):
            out[:, at:at + w] = p
        at += w
    return out


def read(path: str) -> dict:
    """A trace file written by ``Recorder.write`` (or any Chrome trace JSON: a list or an object)."""
    with open(path) as f:
        doc = json.load(f)
    return doc if isinstance(doc, dict) else {"traceEvents": doc}
