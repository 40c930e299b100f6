"""The worker process: its entry point and its loop (module level: spawn imports it by name; forkserver
preloads this module, and torch with it).

A worker views each task's slot without copying, hands it to its ``Computer`` (compute.py: the device, the
kernel, the host result) and answers with the result or the error; the message kinds are wire.py's.

NOTE [ Small batches ]
A message costs the same few microseconds of pickling, a syscall and a wake-up whatever it carries, and
for a batch of a few KB that fixed cost is the whole cost. So the main sends every task a worker has room
for in one message (``wire.pack``: the ring named once, a small tuple per batch; plain ``pickle``, not
multiprocessing's ForkingPickler, which copies its table of reducers for every message), and a worker
that still holds received tasks keeps the results of quick ones (computed in under ``HOLD_S``; small
ones as raw bytes, ``fields.to_wire``) and sends them together: as soon as it has nothing left in hand, before it
waits, once the first held result is ``HOLD_S`` old, or once they add up to ``HOLD_BYTES``. A slow batch
goes back at once. Faults keep their meaning per batch: a held result is lost with its worker like
the task it answers, and the main, which still counts that task as the worker's, computes it again.
"""
from __future__ import annotations

import os
import time
from collections import deque

import numpy as np
import torch

from .. import devices, fields, outputs, wire
from ..compute import Computer, cuda_fault
from ..errors import PackedError
from .procs import child_setup, pipe_broke
from .ring import SlotReader

HOLD_S = 0.001  # NOTE [ Small batches ]: a quick result waits at most this long for others to share a send
HOLD_BYTES = 64 << 10  # held results are sent once they add up to more than this
HOLD_COUNT = 64


def main(rank: int, conn, out, main_pid: int, ring_dir: str, spec, device_spec: str, threads: int,
         pinned: bool, status: str | None = None) -> None:
    """Entry point of a worker process (procs.Children starts it). ``out``: the write end of the main's
    relay (NOTE [ Worker output ] in outputs.py); ``status``: the file of the workers' status words
    (NOTE [ Small batches ])."""
    child_setup(out, main_pid, ring_dir)
    outputs.warn_once()
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
            conn.send((wire.FATAL, PackedError.pack(e)))
            return
        words = np.frombuffer(SlotReader(status, 0)._mm, np.int64) if status else None
        conn.send((wire.READY, os.getpid(), str(device)))
        _loop(rank, conn, computer, words)
    except (EOFError, OSError):  # the pipe broke: if the main is gone, leave nothing behind
        pipe_broke(main_pid, ring_dir)


def _loop(rank: int, conn, computer: Computer, words=None) -> None:
    """``words[rank]``: 1 + the batch being computed, 0 between batches: what the main blames if this
    process dies. Without it, the main blames the oldest unanswered batch, so no result may be held."""
    cuda = computer.device.type == "cuda"
    readers: dict[str, SlotReader] = {}
    pending: deque = deque()  # tasks received and not started (a message may carry several)
    unsent: list = []  # results held back, not sent yet (NOTE [ Small batches ])
    unsent_since, unsent_bytes = 0.0, 0

    def receive() -> None:
        msg = conn.recv()
        if isinstance(msg, tuple):
            pending.extend(wire.unpack(msg))
        elif isinstance(msg, list):
            pending.extend(msg)
        else:
            pending.append(msg)  # a Task (a pickled batch), or None: stop

    def flush() -> None:
        nonlocal unsent_since, unsent_bytes
        if unsent:
            wire.send(conn, unsent[0] if len(unsent) == 1 else (wire.SEVERAL, unsent))
            unsent.clear()
        unsent_since, unsent_bytes = 0.0, 0

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
                    conn.send((wire.NOTE, f"worker {rank}: the slot ring could not be registered with CUDA "
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
            flush()  # nothing left in hand: what is held back goes now, before waiting
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
        copied = (lambda i=task.index: conn.send((wire.COPIED, i))) if cuda and task.desc is not None else None
        computer.trace = task.trace
        try:
            out, timings = computer(arr, task.index, task.attempt, staged, prefetch if cuda else None, copied,
                                    registered)
        except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt too: never hang
            msg = (wire.ERROR, task.index, PackedError.pack(cuda_fault(e, computer.device)))
            if devices.sticky(e):  # NOTE [ CUDA faults ]
                flush()
                conn.send((wire.RETIRE, task.index, msg[2].text))
                os._exit(75)
            quick = False
        else:
            timings["idle_s"] = idle
            if task.digest:  # the run's checksum: hashed here, in parallel, not in the main
                timings["digest"] = outputs.batch_digest(task.index, out)
            timings["sent"] = time.time()
            packed = fields.to_wire(out)  # (small: raw bytes, cheaper to pickle than arrays)
            msg = ((wire.RESULT, task.index, out, timings) if packed is None
                   else (wire.PACKED, task.index, packed, timings))
            unsent_bytes += fields.nbytes(out)
            quick = words is not None and timings["compute_s"] < HOLD_S
        if words is not None:
            words[rank] = 0
        del arr, staged
        unsent.append(msg)
        now = time.perf_counter()
        unsent_since = unsent_since or now
        if (not quick or not (pending or ahead) or now - unsent_since >= HOLD_S or unsent_bytes > HOLD_BYTES
                or len(unsent) >= HOLD_COUNT):
            flush()
