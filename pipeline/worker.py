"""The worker process: its loop, the per-batch compute shared with the serial baseline, the watchdog.

Module level, so that spawn can import the entry point by name. Messages are tiny tuples:

  main -> worker   ("tasks", ring, slot_bytes, digest, [(index, attempt, slot, layout), ...])   (``pack``)
                   Task(index, attempt, array=batch)   (a batch larger than a slot, pickled) | None (stop)
  worker -> main   ("ready", pid, device) | ("fatal", error) | ("note", text)
                   ("copied", index)   (CUDA: the batch is on the device, its slot may be reused)
                   ("retire", index, cause)   (a sticky CUDA error: the worker exits, NOTE [ CUDA faults ])
                   ("result", index, array, timings) | ("error", index, error)
                   ("packed", index, fields.to_wire(array), timings)   (a small result, as bytes)
                   ("several", [("result", ...) | ("error", ...), ...])

NOTE [ Small batches ]
A message costs the same few microseconds of pickling, a syscall and a wake-up whatever it carries, and
for a batch of a few KB that fixed cost is the whole cost. So the main sends every task a worker has room
for in one message (``pack``: the ring named once, a small tuple per batch; plain ``pickle``, not
multiprocessing's ForkingPickler, which copies its table of reducers for every message), and a worker
that still holds received tasks keeps the results of quick ones (computed in under ``HOLD_S``; small
ones as raw bytes, ``fields.to_wire``) and sends them together: as soon as it has nothing left in hand, before it
waits, once the first held result is ``HOLD_S`` old, or once they add up to ``HOLD_BYTES``. A slow batch
goes back at once, as before. Faults keep their meaning per batch: a held result is lost with its worker like
the task it answers, and the main, which still counts that task as the worker's, computes it again.

NOTE [ Shutdown ]
Workers ignore SIGINT: Ctrl-C reaches the whole process group, and the main decides what happens (stop
handing out work, stop the workers, clean up). A watchdog thread checks twice a second that the main is
alive, as PyTorch's DataLoader workers do; if it died (even by SIGKILL, which no ``daemon`` flag covers)
the worker unlinks the main's shared-memory rings and exits, also when a kernel is stuck. A worker whose
pipe to the main breaks does the same once the main is gone (a zombie counts: a SIGKILLed main is one
until its parent reaps it), whatever its own parent: under forkserver that is the server, not the main.
"""
from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from . import decoding, devices, fields, kernels, outputs
from .errors import pack_error  # noqa: F401 - pipeline.worker.pack_error, as before
from .handoff import Descriptor, SlotReader, pipe_broke, watchdog

HOLD_S = 0.001  # NOTE [ Small batches ]: a quick result waits at most this long for others to share a send
HOLD_BYTES = 64 << 10  # held results are sent once they add up to more than this
HOLD_COUNT = 64


def pack(tasks: list[Task]) -> tuple:
    """Slot tasks as one message: the ring once, then (index, attempt, slot, layout) each (pickle keeps one
    copy of a layout that several share): a fifth of the bytes and of the time of pickled ``Task`` objects.
    ``unpack`` makes them ``Task`` objects again."""
    t = tasks[0]
    return ("tasks", t.ring, t.slot_bytes, t.digest,
            [(t.index, t.attempt, t.desc.slot, t.desc.layout) for t in tasks])


def unpack(msg: tuple) -> list[Task]:
    _, ring, slot_bytes, digest, items = msg
    return [Task(index, attempt, ring, slot_bytes, Descriptor(slot, layout), digest=digest)
            for index, attempt, slot, layout in items]


def send(conn, obj) -> None:
    """``conn.send(obj)`` for tasks and results (plain data, numpy arrays): pickled with plain ``pickle``,
    not multiprocessing's ForkingPickler, which copies its table of reducers for every message (a few
    microseconds, a tiny batch's budget); ``conn.recv()`` reads either."""
    conn.send_bytes(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))


@dataclass
class Task:
    index: int
    attempt: int
    ring: str | None = None  # path of the slot ring file, when the batch is in a slot
    slot_bytes: int = 0
    desc: Descriptor | None = None
    array: Any = None  # the pickled fallback, for a batch larger than a slot (an array, tuple or dict)
    released: bool = False  # (main side) its slot went back to the ring (NOTE [ Slot release ])
    batch: Any = None  # (main side) a caller's batch record, to build it again for a retry
    digest: bool = False  # the worker sends the result's digest with it (outputs.batch_digest)

    def __reduce__(self):  # what travels: no main-side bookkeeping (and a tuple pickles faster than a dict)
        return (Task, (self.index, self.attempt, self.ring, self.slot_bytes, self.desc, self.array, False, None,
                       self.digest))


@dataclass
class Staged:
    """A batch on its way to the device: its tensor(s), and on CUDA the copy's start/end events."""
    x: Any  # a tensor, or a tuple or dict of tensors (the batch's fields)
    start: Any = None
    end: Any = None
    direct: bool = False  # copied straight from a slot registered with CUDA (no staging memcpy)


class Stager:
    """Host -> device copies: ``non_blocking``, on a copy stream; straight from the slot when the ring is
    registered with CUDA (pinned in place), else through alternating pinned staging buffers.

    NOTE [ Overlap ]
    On CUDA a worker starts the copy of its next batch (when one is already waiting in its pipe) while the
    GPU computes the current one: ``start`` issues the copy on a side stream and records an event;
    ``ready`` makes the compute stream wait for that event (the GPU waits, not the CPU). Two staging
    buffers alternate, so the copy of batch k+1 never overwrites the buffer batch k was copied from; the
    buffer of batch k-1 is free because its result was synchronised before batch k+1 was received. A slot
    copied straight to the device goes back to the main once the copy's end event has completed.
    """

    def __init__(self, device: torch.device, pinned: bool):
        self.device, self.pinned = device, pinned and device.type == "cuda"
        self.bufs: list = [None, None]
        self.turn = 0
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, batch, registered: bool = False) -> Staged:
        """Start the copy of ``batch`` (an array, or a tuple or dict of arrays: each field) to the device."""
        arrays = fields.flatten(batch)  # (a field already on the device, decoded there: passed through)
        xs = [a if isinstance(a, torch.Tensor) else torch.from_numpy(a if a.flags.writeable else a.copy())
              for a in arrays]
        if self.stream is None:
            return Staged(fields.like(batch, xs))
        direct = self.pinned and registered
        if self.pinned and not registered:
            host = [x.device.type == "cpu" for x in xs]
            sizes = [x.numel() * x.element_size() if h else 0 for x, h in zip(xs, host)]
            starts = [0]
            for n in sizes:
                starts.append(starts[-1] + -(-n // fields.FIELD_ALIGN) * fields.FIELD_ALIGN)
            self.turn ^= 1
            if self.bufs[self.turn] is None or self.bufs[self.turn].numel() < starts[-1]:
                self.bufs[self.turn] = torch.empty(starts[-1], dtype=torch.uint8, pin_memory=True)
            staged = []
            for x, o, n, h in zip(xs, starts, sizes, host):
                if h:
                    v = self.bufs[self.turn][o:o + n].view(x.dtype).view(x.shape)
                    v.copy_(x)
                    x = v
                staged.append(x)
            xs = staged
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            start.record(self.stream)
            ys = [x.to(self.device, non_blocking=True) for x in xs]
            end.record(self.stream)
        return Staged(fields.like(batch, ys), start, end, direct)

    def ready(self, h: Staged):
        """The batch's tensors on the device, once the compute stream may read them."""
        if h.end is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(h.end)
            for x in fields.flatten(h.x):
                x.record_stream(current)  # the allocator must not reuse it while the compute stream reads
        return h.x

    @staticmethod
    def seconds(h: Staged) -> float:
        return h.start.elapsed_time(h.end) / 1000 if h.end is not None else 0.0


class Computer:
    """A kernel built once on its device, with its stager: computes one batch, the same way everywhere
    (workers, the serial baseline, Ray actors, the bench's peers)."""

    def __init__(self, spec: kernels.KernelSpec, device: torch.device, pinned: bool):
        self.device, self.name, self.precision = device, spec.name, spec.precision
        self.cuda = device.type == "cuda"
        # (fp32 on the CPU, the usual case, enters no context: a tiny batch's budget)
        self.autocast = spec.precision in ("bf16", "fp16") or (spec.precision == "tf32" and self.cuda)
        self.kernel = kernels.make(spec, device)
        self.stager = Stager(device, pinned)

    def start(self, arr, registered: bool = False) -> Staged | None:
        """Start the copy of a batch received ahead (NOTE [ Overlap ]); None for an encoded image batch,
        which ``__call__`` decodes first (decoding.py)."""
        return None if decoding.is_encoded(arr) else self.stager.start(arr, registered)

    def __call__(self, arr, index: int = -1, attempt: int = 1, staged: Staged | None = None,
                 meanwhile: Callable[[], None] | None = None,
                 copied: Callable[[], None] | None = None, registered: bool = False) -> tuple[Any, dict]:
        """One batch: host array(s) -> device -> kernel -> host numpy (an array, or a tuple or dict of arrays:
        ``outputs.host_result``, which raises KernelError for anything else), and the time of each step.

        ``staged``: the batch's copy, if it was started earlier (see NOTE [ Overlap ]); ``meanwhile`` runs
        after the kernel is launched and before its result is awaited (starting the next batch's copy);
        ``copied`` is called once the copy to the device has completed, while the kernel may still run;
        ``registered``: ``arr`` lies in memory registered with CUDA (a slot), copied without staging.
        """
        kernels.current.update(index=index, attempt=attempt)
        t0 = time.perf_counter()
        decoded, bad = (decoding.decode(arr, self.device, index) if staged is None and decoding.is_encoded(arr)
                        else (arr, None))
        t_decoded = time.perf_counter()
        h = staged or self.stager.start(decoded, registered)
        x = self.stager.ready(h)
        t1 = time.perf_counter()
        if self.autocast:
            with devices.precision(self.precision, self.device):
                y = self.kernel(x)
        else:
            y = self.kernel(x)
        if copied is not None and h.end is not None:
            h.end.synchronize()  # the copy, not the kernel: nothing reads the host memory any more
            copied()
        if meanwhile is not None:
            meanwhile()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        # validated, on the host, never a view of the slot (it is reused): KernelError for a bad return
        out = outputs.host_result(y, where=f"kernel {self.name!r}, batch {index}", avoid=fields.flatten(arr))
        t3 = time.perf_counter()
        timings = {"h2d_s": self.stager.seconds(h), "h2d_bytes": fields.nbytes(arr), "direct": h.direct,
                   "stage_s": (t1 - t_decoded) if staged is None else 0.0, "compute_s": t2 - t1, "d2h_s": t3 - t2}
        if bad is not None:  # an encoded image batch (decoding.py): decoded here
            timings.update(decode_s=t_decoded - t0, **({"bad_samples": bad} if bad else {}))
        if self.cuda:
            timings["gpu_reserved_mb"] = torch.cuda.memory_reserved(self.device) / 2**20
        return out, timings


def cuda_fault(e: BaseException, device: torch.device) -> BaseException:
    """NOTE [ CUDA faults ]
    Out of device memory: the worker frees its cache, the error names the device and its free/total
    memory, and ``on_error`` applies as for any kernel error; the worker carries on. A sticky CUDA error
    (a device-side assert, an illegal address) leaves the process's CUDA context unusable: the worker says
    so ("retire") and exits; the main replaces it and retries or quarantines the batch as for a crash. A Ray
actor replies "retire" instead of a result, and the main kills it so that Ray restarts it."""
    if isinstance(e, torch.OutOfMemoryError) and device.type == "cuda":
        first = e.args[0] if e.args else ""
        e.args = (f"out of memory on {devices.memory_note(device)} after freeing the cache; the worker "
                  f"carries on (smaller batches, --rows, or fewer workers per GPU): {first}",) + e.args[1:]
    return e


def main(rank: int, conn, spec: kernels.KernelSpec, device_spec: str, threads: int, pinned: bool,
         main_pid: int, ring_dir: str, out=None, status: str | None = None) -> None:
    """Entry point of a worker process. ``out``: the write end of the main's relay (NOTE [ Worker output ]);
    ``status``: the file of the workers' status words (NOTE [ Small batches ])."""
    outputs.worker_stdio(out)  # fd 1 and 2 -> the relay pipe: stdout belongs to the main's summary
    outputs.warn_once()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # born with SIGINT blocked: see executor._sigint_blocked
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    threading.Thread(target=watchdog, args=(main_pid, ring_dir), daemon=True).start()
    os.environ.update(devices.thread_vars(threads))  # (forked from a preloaded forkserver,
    # the environment is the server's: what this worker imports later reads this run's cap)
    try:
        try:
            torch.set_num_threads(threads)
            device = devices.choose(device_spec, rank)
            if device.type == "cuda":
                torch.cuda.set_device(device)
            computer = Computer(spec, device, pinned)
        except BaseException as e:  # noqa: BLE001 - reported to the main, which raises it
            conn.send(("fatal", pack_error(e)))
            return
        words = np.frombuffer(SlotReader(status, 0)._mm, np.int64) if status else None
        conn.send(("ready", os.getpid(), str(device)))
        _loop(rank, conn, computer, words)
    except (EOFError, OSError):  # the pipe broke: if the main is gone, leave nothing behind
        pipe_broke(main_pid, ring_dir)


def _loop(rank: int, conn, computer: Computer, words=None) -> None:
    """``words[rank]``: 1 + the batch being computed, 0 between batches: what the main blames if this
    process dies. Without it, the main blames the oldest unanswered batch, so no result may be held."""
    cuda = computer.device.type == "cuda"
    readers: dict[str, SlotReader] = {}
    pending: deque = deque()  # tasks received and not started (a message may carry several)
    held: list = []  # results not sent yet (NOTE [ Small batches ])
    held_since, held_bytes = 0.0, 0

    def receive() -> None:
        msg = conn.recv()
        if isinstance(msg, tuple):
            pending.extend(unpack(msg))
        elif isinstance(msg, list):
            pending.extend(msg)
        else:
            pending.append(msg)  # a Task (a pickled batch), or None: stop

    def flush() -> None:
        nonlocal held_since, held_bytes
        if held:
            send(conn, held[0] if len(held) == 1 else ("several", held))
            held.clear()
        held_since, held_bytes = 0.0, 0

    def view(task):
        """The task's batch (a view of its slot, or the pickled array) and whether CUDA can DMA from it."""
        if task.desc is None:
            return task.array, False
        reader = readers.get(task.ring)
        if reader is None:
            for old in list(readers):  # a new ring (a new run with bigger batches): drop the old one
                readers.pop(old).close()
            reader = readers[task.ring] = SlotReader(task.ring, task.slot_bytes)
            if computer.stager.pinned:
                why = reader.register()
                if why:
                    conn.send(("note", f"worker {rank}: the slot ring could not be registered with CUDA "
                                       f"({why}); host-to-device copies go through pinned staging buffers"))
        return reader.view(task.desc), reader.registered

    ahead: list = []  # on CUDA: the next (task, array, staged copy), received while this batch computed

    def prefetch():
        try:
            if not pending and conn.poll():
                receive()
            if pending:
                task = pending.popleft()
                if task is None:
                    ahead.append((None, None, None))
                else:
                    arr, registered = view(task)
                    ahead.append((task, arr, computer.start(arr, registered)))
        except (EOFError, OSError) as e:  # the main is gone: raised below, not blamed on the kernel
            ahead.append((e, None, None))

    while True:
        idle = 0.0
        if not ahead and not pending:
            flush()  # nothing left in hand: what is held goes now, before waiting
            t0 = time.perf_counter()
            receive()
            idle = time.perf_counter() - t0
        task, arr, staged = ahead.pop() if ahead else (pending.popleft(), None, None)
        if isinstance(task, BaseException):
            raise task
        if task is None:
            flush()
            return
        if words is not None:
            words[rank] = task.index + 1
        registered = False
        if arr is None:
            arr, registered = view(task)
        copied = (lambda i=task.index: conn.send(("copied", i))) if cuda and task.desc is not None else None
        try:
            out, timings = computer(arr, task.index, task.attempt, staged, prefetch if cuda else None, copied,
                                    registered)
        except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt too: never hang
            msg = ("error", task.index, pack_error(cuda_fault(e, computer.device)))
            if devices.sticky(e):  # NOTE [ CUDA faults ]
                flush()
                conn.send(("retire", task.index, msg[2][1]))
                os._exit(75)
            quick = False
        else:
            timings["idle_s"] = idle
            if task.digest:  # the run's checksum: hashed here, in parallel, not in the main
                timings["digest"] = outputs.batch_digest(task.index, out)
            timings["sent"] = time.time()
            wire = fields.to_wire(out)  # (small: raw bytes, cheaper to pickle than arrays)
            msg = ("result", task.index, out, timings) if wire is None else ("packed", task.index, wire, timings)
            held_bytes += fields.nbytes(out)
            quick = words is not None and timings["compute_s"] < HOLD_S
        if words is not None:
            words[rank] = 0
        del arr, staged
        held.append(msg)
        now = time.perf_counter()
        held_since = held_since or now
        if (not quick or not (pending or ahead) or now - held_since >= HOLD_S or held_bytes > HOLD_BYTES
                or len(held) >= HOLD_COUNT):
            flush()
