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
  the garbage collector to scan. One event per batch (``WORKER``), recorded when the consumer is handed its
  result (or when the run ends, for a result never taken): the worker's stamps as they came, its return,
  its wait for order (until it was handed over), and its build (carried on its task, then with its result:
  ``Task.built``; recorded alone if it gets no result); made spans when the file is written. The wait for a
  worker ends when the worker started the batch. A run that records more keeps the first ``EVENTS`` (about
  75,000 batches) and counts the rest (``dropped``, in the file and the summary's notes): the file stays
  under about 80 MB (more with CUDA's copy spans). Without ``--trace`` the hot path only tests ``trace is
  not None``.
- The file (``_File``): made by numpy, not by a format per event (that cost a tiny-batch run 7%, a JSON
  encoder 20%, on a 2-core VM): lines alike but for their numbers are blocks of bytes, a template row
  and columns of digits (``_lines``), each stamp's digits made once for every line it is in
  (``_File.batches``); the few events with args of their own (instants, counters) by the JSON encoder.
  Written at the end of the run (also when it failed or was interrupted); a run past ``CHUNK`` events
  (about 16,000 batches) has a background thread append its batches' lines to the temp file as they come,
  so the end writes at most the last ``CHUNK`` (about 30 ms on a 2-core VM).
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
import weakref

import numpy as np

from .errors import ConfigError

EVENTS = 80_000  # events per trace at most (about 75,000 batches, 80 MB of JSON); the rest: dropped, counted
CHUNK = 16384  # past this many events, a background thread writes batches' events, this many at a time
POLL_S = 0.05  # how often it looks
COUNTER_S = 0.02  # counters sampled at most this often
RSS_S = 0.2
SHORT_S = 20e-6  # a wait, a staging copy or a device-to-host step shorter than this is not recorded

# an event: (kind, name, pid, lane, start, end, index, attempt, then), times in wall-clock seconds, args
# aside; stored as FIELDS doubles in one preallocated buffer (names and lanes as codes): no Python object
# kept per event, so the garbage collector has nothing more to scan as the trace grows (a list of tuples
# cost a tiny-batch run a third of its speed, mostly in collections). ``then`` ends the wait that follows
# a span (WAITS): a build's when a worker started the batch (its WORKER event's start; for a build recorded
# alone, matched when the file is written: ``_started``); a return's, when its batch was handed over
SPAN, INSTANT, ASYNC, COUNTER, WORKER = 1, 2, 3, 4, 5
WAITS = {"build": "waiting for a worker", "return": "waiting for order"}  # span -> the wait that follows it
COUNTS = {"dispatch": "batches"}  # spans whose index column is a count (its args' key), not a batch
_POWERS = 10 ** np.arange(19, dtype=np.int64)


def _quads() -> tuple[np.ndarray, np.ndarray]:
    """0 to 9999 as four ASCII digits each, with zeros ("0042") and after spaces ("  42"), as uint32s: made
    by arithmetic at import (a format per number cost every process that imports this module 9 ms)."""
    k = np.arange(10000)
    zeros = (np.stack([k // 1000, k // 100 % 10, k // 10 % 10, k % 10], axis=1) + ord("0")).astype(np.uint8)
    spaced = np.where(k[:, None] < np.array([1000, 100, 10, 0]), np.uint8(ord(" ")), zeros)
    return spaced.view(np.uint32)[:, 0], zeros.view(np.uint32)[:, 0]


# 0 to 9999 as four bytes: after spaces ("  42"), with zeros ("0042"), and 0 as spaces (a quad with nothing in it)
_QUADS, _QUADS_ZEROS = _quads()
_QUADS_BLANK = _QUADS.copy()
_QUADS_BLANK[0] = np.frombuffer(b"    ", np.uint32)[0]
FIELDS = 20
# a WORKER event is one batch's time in a worker, stored as it comes (one ``pack_into``, the worker's
# ``spans`` as they are: no arithmetic on the hot path): that process's clock offset, its stamps in its own
# clock (received, decoded, copied, computed, its result on the host), flags, attempt (columns 1-8); its
# pid and batch (9, 10); its return to the main (sent, in its wall clock; received; 11, 12), the end of its
# wait for order (13: handed over), the main's clock offset (14); the batch's build when the main built it
# (start, end, lane, pid, attempt: 15-19); the main's stamps in its perf_counter, 0 for none. Made the
# columns of other events (``_walls``), then spans, when the file is written.
EVENT_BYTES = 8 * FIELDS
_pack = struct.Struct("8d").pack_into  # (then: 0)
_pack_worker = struct.Struct(f"{FIELDS}d").pack_into
# a WORKER event's columns as ``_walls`` gives them: kind, -, pid, -, start, end, batch, attempt, then (those of
# every event); decoded, copied, computed, sent, received, flags; its build's start, end, lane, pid, attempt
_WALLS = np.array([0, 0, 9, 0, 2, 6, 10, 8, 13, 3, 4, 5, 11, 12, 7, 15, 16, 17, 18, 19])



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
        self.file = _File(path)
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

    def worker(self, pid: int, spans: tuple, index: int, sent: float = 0.0, built: tuple | None = None,
               received: float = 0.0, then: float = 0.0) -> None:
        """A batch's stages in a worker or actor (``Computer``'s ``spans``: its clock offset, five stamps, flags
        (decoded there, CUDA, its copy started ahead) and attempt); with ``sent`` (that process's wall clock
        when it sent the result), its return to the main until ``received``, then its wait for order until
        ``then`` (handed over); with ``built`` (``Task.built``: start, end, lane, build process or 0,
        attempt), its build; the main's stamps in its perf_counter: one event (``WORKER``), made spans when
        the file is written."""
        i = next(self._next)
        if i >= self.capacity:
            return
        if i == CHUNK:  # a long run: its file is made as it goes
            self.file.start(self)
        if built is None:
            _pack_worker(self._mem, i * EVENT_BYTES, WORKER, *spans, pid, index, sent, received, then, self.offset,
                         0.0, 0.0, 0.0, 0.0, 0.0)
            return
        ln = self.codes.get(built[2])
        if ln is None:
            ln = self._code(built[2])
        _pack_worker(self._mem, i * EVENT_BYTES, WORKER, *spans, pid, index, sent, received, then, self.offset,
                     built[0], built[1], ln, built[3] or self.pid, built[4])

    def built(self, task) -> None:
        """``task``'s build (``Task.built``) as a span of its own, once: its batch ends without a result."""
        if task.built is not None:
            start, end, lane, pid, attempt = task.built
            task.built = None
            self.span("build", lane, start, end, task.index, attempt, pid or None)

    def instant(self, name: str, lane: str = "pipeline-supervisor", index: int = -1, attempt: int = 0,
                pid: int | None = None, args: dict | None = None) -> None:
        self.store(INSTANT, name, pid or self.pid, lane, time.time(), 0.0, index, attempt, args)

    def counters(self, values) -> None:
        """``values()`` (a dict: made only when due), sampled at most every ``COUNTER_S``; the main's RSS every
        ``RSS_S``."""
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
                   dict(values(), **{"main RSS MiB": round(self._rss, 1)}))

    def name_process(self, pid: int, name: str) -> None:
        self.processes[pid] = name

    def text(self) -> list[str]:
        """Names and lanes by their codes."""
        with self._lock:
            text = [""] * len(self.codes)
            for t, code in self.codes.items():
                text[code] = t
        return text

    def write(self, summary: dict | None = None) -> str:
        """The trace as JSON at ``path`` (atomically: a temp file renamed); the summary's verdict and the
        dropped count go in ``otherData``."""
        return self.file.finish(self, summary)


class _File:
    """A recorder's JSON file (NOTE [ Trace ]): once a run has recorded ``CHUNK`` events, a background
    thread formats its batches' events (WORKER, the many; each final once recorded) a chunk at a time and
    appends them to a temp file; ``finish`` adds the rest (the last batches, the spans recorded in the main,
    the few events with args of their own, the names), then renames it into place, in one thread (a thread
    making the bytes of the blocks the other laid out took 1.3x as long on a 2-core VM). Lanes get their
    thread ids as they first appear (``tids``)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.tmp = f"{self.path}.tmp-{os.getpid()}-{id(self)}"
        self.tids: dict[int, int] = {}  # pid << 16 | lane code -> its tid
        self.done = 0  # events before this one: their WORKER events are in the file
        self.out = None  # the temp file, once opened
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.failed: BaseException | None = None

    def start(self, rec: Recorder) -> None:
        """The background writer, for a long run (it ends when ``finish`` says so or ``rec`` is gone)."""
        weakref.finalize(rec, self.abandon)
        self.thread = threading.Thread(target=_background, args=(weakref.ref(rec), self.stop),
                                       name="pipeline-trace-writer", daemon=True)
        self.thread.start()

    def abandon(self) -> None:
        """(``rec`` dropped unwritten: its run abandoned) its temp file goes with it."""
        self.stop.set()
        if self.out is not None:
            self.out.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def drain(self, rec: Recorder) -> None:
        """(The background writer) the next ``CHUNK`` or more WORKER events into the file (each recorded whole:
        final)."""
        lo = self.done
        top = min(rec.capacity, lo + 8 * CHUNK)
        kinds = np.frombuffer(rec._mem, np.float64, (top - lo) * FIELDS, lo * EVENT_BYTES)[::FIELDS]
        empty = np.flatnonzero(kinds == 0)  # (a glimpse while events are recorded: whether to look closer)
        front = int(empty[0]) if len(empty) else top - lo
        if np.count_nonzero(kinds[:front] == WORKER) < CHUNK:
            return
        # a copy made under the GIL, as each event is stored: every event in it whole, or not yet begun
        rows = np.frombuffer(rec._mem[lo * EVENT_BYTES:(lo + front) * EVENT_BYTES], np.float64).reshape(-1, FIELDS)
        empty = np.flatnonzero(rows[:, 0] == 0)  # (its place taken, not yet stored)
        end = int(empty[0]) if len(empty) else len(rows)
        w = np.flatnonzero(rows[:end, 0] == WORKER)
        if len(w) < CHUNK:
            return
        block, rest = self.batches(rec, _walls(rows[w]))
        out, more = self.format(rec, _stages(rec, rest))
        f = self.open(rec)
        if out:
            f.write((",\n" + ",\n".join(out)).encode())
        for b in block + more:
            f.write(_lines(b))
        self.done = lo + end

    def open(self, rec: Recorder):
        """The temp file, begun: its first event, the main's name (every one after begins with ``,\\n``)."""
        if self.out is None:
            self.out = open(self.tmp, "wb")
            self.out.write(b'{"traceEvents":[\n' + json.dumps(
                {"name": "process_name", "ph": "M", "pid": rec.pid, "args": {"name": rec.processes[rec.pid]}}).encode())
        return self.out

    def finish(self, rec: Recorder, summary: dict | None) -> str:
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
        try:
            if self.failed is not None:
                raise self.failed
            return self._finish(rec, summary)
        finally:
            if self.out is not None:
                self.out.close()
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)

    def _finish(self, rec: Recorder, summary: dict | None) -> str:
        n = next(rec._next)  # events recorded (this call's step is not one)
        rec.dropped = max(0, n - rec.capacity)
        rec.recorded = n = min(n, rec.capacity)
        other = {"dropped_events": rec.dropped, "start_unix_s": rec.t0}
        if summary is not None:
            other.update(bottleneck=summary.get("bottleneck"), wall_s=summary.get("wall_s"),
                         kernel=summary.get("kernel"), checksum=summary.get("checksum"))
        raw = np.frombuffer(rec._mem, np.float64, n * FIELDS).reshape(n, FIELDS)
        workers = raw[:, 0] == WORKER
        number = np.flatnonzero(~workers & (raw[:, 0] > 0))  # (each row's event number, for ``extra``; made: -1)
        base = raw[number]
        w = _walls(raw[workers])
        _started(rec, base, w)
        block, rest = self.batches(rec, w[np.flatnonzero(workers) >= self.done])  # (those not in the file yet)
        parts = [[base[:, c] for c in range(9)] + [number], *_stages(rec, rest)]
        out, more = self.format(rec, parts)
        text = rec.text()
        meta = [{"name": "process_name", "ph": "M", "pid": p, "args": {"name": nm}}
                for p, nm in rec.processes.items() if p != rec.pid]
        meta += [{"name": "process_sort_index", "ph": "M", "pid": p, "args": {"sort_index": i}}
                 for i, p in enumerate(rec.processes)]
        for k, t in self.tids.items():  # (a process's lanes in the order they were first named)
            meta += [{"name": "thread_name", "ph": "M", "pid": k >> 16, "tid": t,
                      "args": {"name": text[k & 65535] or "counters"}},
                     {"name": "thread_sort_index", "ph": "M", "pid": k >> 16, "tid": t,
                      "args": {"sort_index": k & 65535}}]
        enc = json.JSONEncoder(separators=(",", ":"), default=str).encode
        f = self.open(rec)
        f.write("".join(",\n" + e for e in [enc(m) for m in meta] + out).encode())
        for b in block + more:
            f.write(_lines(b))
        f.write(('\n],"displayTimeUnit":"ms","otherData":' + json.dumps(other, default=str) + "}\n").encode())
        self.out.close()
        if os.path.exists(self.path):  # (renamed over an old file, ext4 writes the new one back first: 10 ms)
            os.unlink(self.path)
        os.replace(self.tmp, self.path)
        return self.path

    def batches(self, rec: Recorder, w: np.ndarray) -> tuple[list, np.ndarray]:
        """WORKER events (``worker``) straight into blocks of lines (``_lines``' parts): the lines ``_stages``
        and ``format`` would make, with each stamp's digits made once for all the lines it is in. A block: one
        line of each of the batches alike (the same worker, attempt, build process, build lane and build
        attempt) that have it. The events it can't write so (a stamp before the trace's start, a stage that
        ends before it begins: clocks that disagree) are returned, for ``_stages``."""
        us = {c: np.rint((w[:, c] - rec.t0) * 1e6).astype(np.int64) for c in (4, 5, 8, 9, 10, 11, 12, 13, 15, 16)}
        flags = w[:, 14].astype(np.int64)
        t0, t3, then, td, t1, t2, got, b1 = (w[:, c] for c in (4, 5, 8, 9, 10, 11, 13, 16))
        built, back = b1 > 0, got > 0
        # (a line: its name, (its start, its end) columns, the stage's lane or the wait's place in WAITS, when)
        lines = [("build", 15, 16, "build", built), (WAITS["build"], 16, 4, 0, built & (t0 - b1 >= SHORT_S)),
                 ("decode", 4, 9, "compute", flags & 1 > 0), ("h2d", 9, 10, "copy", flags & 6 == 2),
                 ("h2d wait", 9, 10, "copy", flags & 6 == 6),
                 ("stage", 9, 10, "compute", (flags & 2 == 0) & (t1 - td > SHORT_S)),
                 ("compute", 10, 11, "compute", None), ("d2h", 11, 5, "compute", t3 - t2 > SHORT_S),
                 ("return", 12, 13, "return", back), (WAITS["return"], 13, 8, 1, back & (then - got >= SHORT_S))]
        ok = (w[:, 6] >= 0) & (w[:, 7] >= 0) & (w[:, 7] < 65536) & (w[:, 19] >= 0) & (w[:, 19] < 65536)
        for _, a, b, _, on in lines:
            ok &= (us[a] >= 0) & (us[b] >= us[a]) if on is None else ~on | ((us[a] >= 0) & (us[b] >= us[a]))
        rows, rest = np.flatnonzero(ok), w[~ok]
        if not len(rows):
            return [], rest
        # grouped (each column's digits made once, for all of them)
        order = rows[np.lexsort((w[rows, 19], w[rows, 18] * 65536 + w[rows, 17], w[rows, 2] * 65536 + w[rows, 7]))]
        keys = w[order][:, (2, 7, 18, 17, 19)].T
        bounds = [0, *(np.flatnonzero((keys[:, 1:] != keys[:, :-1]).any(axis=0)) + 1).tolist(), len(order)]
        us = {c: np.maximum(x[order], 0) for c, x in us.items()}
        index = w[order, 6].astype(np.int64)
        made: dict = {}

        def digits(key, x):  # (a column's digits, made once)
            if key not in made:
                made[key] = _digits(x)
            return made[key]
        wide, count = _digits(index), _count(index)
        named = _tailed(wide, count, '"')
        codes = {lane: rec._code(lane) for lane in ("compute", "copy", "return")}
        blocks = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            p, at, bp, bl, bat = (int(k) for k in keys[:, lo])
            for name, a, b, lane, on in lines:
                sel = slice(lo, hi)
                if on is not None:
                    m = on[order[lo:hi]]
                    if not m.any():
                        continue
                    if not m.all():
                        sel = lo + np.flatnonzero(m)
                mine = name == "build" or name == WAITS["build"]  # (the build's attempt; the main or a build process)
                n, num = bat if mine else at, wide[sel]
                nm = named[sel] if n == 1 else _tailed(num, count[sel], f' (attempt {n})"')
                head = f',\n{{"name":"{name} '
                args = [',"args":{"batch":', num, f',"attempt":{n}}}}}']
                if isinstance(lane, str):  # a span
                    who, tid = (bp, self.tid(bp, bl)) if mine else (p, self.tid(p, codes[lane]))
                    blocks.append([head, nm, f',"cat":"{name}","pid":{who},"tid":{tid},"ts":', digits(a, us[a])[sel],
                                   ',"ph":"X","dur":', digits((a, b), us[b] - us[a])[sel], *args])
                    continue
                tid = self.tid(rec.pid, rec._code(name))  # a wait: async, begin and end matched by id
                ident = [f',"id":"{lane}:', named[sel] if n == 1 else _tailed(num, count[sel], f'-{n}"')]
                where = f',"cat":"{name}","pid":{rec.pid},"tid":{tid},"ts":'
                blocks.append([head, nm, where, digits(a, us[a])[sel], ',"ph":"b"', *ident, *args])
                blocks.append([head, nm, where, digits(b, us[b])[sel], ',"ph":"e"', *ident, "}"])
        return blocks, rest

    def tid(self, pid: int, lane: int) -> int:
        """A lane's thread id, given as it first appears."""
        return self.tids.setdefault(pid << 16 | lane, len(self.tids) + 1)

    def format(self, rec: Recorder, parts: list) -> tuple[list[str], list]:
        """Events given as ``parts`` (columns: kind, name, pid, lane, start, end, index, attempt, then, event
        number or -1), with the waits that follow them, as trace-event JSON: the few with args of their own
        (instants, counters) as a list of JSON objects; the many spans and waits as blocks of lines to make
        (``_lines``' parts: each event preceded by ``,\\n``). Those blocks are made by numpy, not by a format
        per event (that cost a tiny-batch run 7%, a JSON encoder 20%, on a 2-core VM): events alike in all
        but their batch and times share a line's constant parts, and the numbers of a column are written to a
        common width (``_digits``: JSON allows the spaces)."""
        parts = parts + [w for p in parts for w in _waits(rec, p)]
        if not parts:
            return [], []
        enc = json.JSONEncoder(separators=(",", ":"), default=str).encode
        kind, name, pid, lane, start, end, index, attempt, number = (
            np.concatenate([p[c] for p in parts]) for c in (0, 1, 2, 3, 4, 5, 6, 7, 9))
        kind, name, pid, lane, index, attempt, number = (
            c.astype(np.int64) for c in (kind, name, pid, lane, index, attempt, number))
        ts = np.rint((start - rec.t0) * 1e6).astype(np.int64)
        te = np.rint((end - rec.t0) * 1e6).astype(np.int64)
        text = rec.text()
        keys = pid * 65536 + lane
        lanes = np.sort(keys)  # (distinct: not np.unique, whose first call imports numpy.ma, 7 to 14 ms, paid by
        lanes = lanes[np.diff(lanes, prepend=-1) != 0]  # every traced CLI run; keys are >= 0)
        tid = np.array([self.tid(k >> 16, k & 65535) for k in lanes.tolist()])[np.searchsorted(lanes, keys)]
        safe = np.array([enc(t) == f'"{t}"' for t in text] or [True])
        extra = np.isin(number, np.array(list(rec.extra), np.int64))
        counted = np.isin(name, [rec.codes[c] for c in COUNTS if c in rec.codes])  # (their index: a count)
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
            wide, digits, at_ts, at_end = _digits(i), _count(i), _digits(t0), _digits(ends)
            named = _tailed(wide, digits, '"')
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
            args = rec.extra.get(int(number[e]))
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
        return out, block


def _stages(rec: Recorder, w: np.ndarray) -> list[list[np.ndarray]]:
    """WORKER events (as ``_walls`` gives them) as the spans of their stages, each stage's as columns (kind,
    name, pid, lane, start, end, index, attempt, then, and -1 for an event number: ``format``'s columns): its
    build in the main (its wait for a worker ends when this worker started it), decode (decoded there), the
    copy to the device ("h2d", or "h2d wait" for a copy started ahead) on the copy lane, else a staging copy
    ("stage"), compute, the copy back ("d2h"), the return; a staging copy or a copy back shorter than
    ``SHORT_S`` left out."""
    flags = w[:, 14].astype(np.int64)
    t0, t3, then, td, t1, t2, sent, got = (w[:, c] for c in (4, 5, 8, 9, 10, 11, 12, 13))
    compute, copy, back = rec._code("compute"), rec._code("copy"), rec._code("return")
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
        parts.append([_full(k, SPAN), _full(k, rec._code(name)), p[m],
                      lane[m] if isinstance(lane, np.ndarray) else _full(k, lane), a[m], b[m], w[m, 6], at[m],
                      _full(k, 0.0) if c is None else c[m], _full(k, -1)])
    return parts


def _started(rec: Recorder, base: np.ndarray, w: np.ndarray) -> None:
    """A build's wait for a worker (WAITS) ends when a worker starts the batch: its event's ``then`` (set
    in ``base``), the start of the WORKER event of the same batch and attempt (the earliest, if more)."""
    code = rec.codes.get("build")
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


def _waits(rec: Recorder, part: list[np.ndarray]) -> list[list[np.ndarray]]:
    """The waits that follow the spans of ``part`` (WAITS): async spans from their span's
    end to ``then``, on the main's lane of that name (those shorter than ``SHORT_S`` left out)."""
    kind, name, end, index, attempt, then = (part[c] for c in (0, 1, 5, 6, 7, 8))
    waits = []
    for span, wait in WAITS.items():
        code = rec.codes.get(span)
        if code is not None:
            m = np.flatnonzero((name == code) & (kind == SPAN) & (then - end >= SHORT_S))
            if len(m):
                c, k = rec._code(wait), len(m)
                waits.append([_full(k, ASYNC), _full(k, c), _full(k, rec.pid), _full(k, c), end[m], then[m],
                              index[m], attempt[m], _full(k, 0.0), _full(k, -1)])
    return waits


def _background(ref: weakref.ref, stop: threading.Event) -> None:
    """The background writer's loop (``_File.start``): a look every ``POLL_S``, while its recorder lives."""
    while not stop.wait(POLL_S):
        rec = ref()
        if rec is None:
            return
        try:
            rec.file.drain(rec)
        except BaseException as e:  # noqa: BLE001 - raised by ``write``
            rec.file.failed = e
            return
        del rec


def _walls(w: np.ndarray) -> np.ndarray:
    """WORKER events as stored (``worker``) in the columns of every event (``_WALLS``), in wall-clock seconds."""
    out = w[:, _WALLS]
    out[:, (1, 3)] = 0
    out[:, (4, 5, 9, 10, 11)] += w[:, 1:2]  # (the worker's clock)
    main = out[:, (8, 13, 15, 16)]
    out[:, (8, 13, 15, 16)] = np.where(main > 0, main + w[:, 14:15], 0.0)  # (the main's; 0: none)
    return out


def _full(n: int, value: float) -> np.ndarray:
    return np.full(n, value, np.float64)


def _count(x: np.ndarray) -> np.ndarray:
    """The decimal digits of each non-negative integer of ``x``."""
    return np.searchsorted(_POWERS, x, side="right").clip(1)


def _digits(x: np.ndarray) -> np.ndarray:
    """Non-negative integers as rows of bytes of one width (``_lines`` puts such blocks side by side): each
    number's decimal digits right-aligned after spaces (a JSON number may follow spaces). Four digits at a
    time, looked up (``_QUADS``): a few operations on whole columns, however many digits."""
    top = int(x.max(initial=0))
    d = int(_count(top))
    q = x.astype(np.uint32) if top < 2**32 else x.astype(np.int64)  # (3x faster)
    quads = -(-d // 4)
    out = np.empty((len(x), quads), np.uint32)
    for k in range(quads):  # (the lowest four digits first; a quad with digits above it keeps its zeros)
        n = q // 10000  # (by a constant: numpy's libdivide, faster than divmod)
        r = (q - n * 10000).astype(np.intp)
        alone = (_QUADS if k == 0 else _QUADS_BLANK)[r]  # (nothing above it: spaces; a number 0's one digit)
        out[:, quads - 1 - k] = alone if k == quads - 1 else np.where(n > 0, _QUADS_ZEROS[r], alone)
        q = n
    return out.view(np.uint8)[:, 4 * quads - d:]


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
