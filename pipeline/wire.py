"""What crosses a pipe between the main and its children: message kinds, the task, its descriptor.

Every message is a tiny tuple whose first item is one of the kinds below (a constant, never a bare string
at the places that send or read it). Plain ``pickle`` on both sides (``send``), not multiprocessing's
ForkingPickler, which copies its table of reducers for every message (NOTE [ Small batches ] in
local/worker.py). The same kinds name the events the build threads report to the supervisor in the main.

  main -> worker        (TASKS, ring, slot_bytes, digest, trace, [(index, attempt, slot, layout), ...])  (``pack``)
                        Task(index, attempt, array=batch)  (a batch larger than a slot, pickled) | None (stop)
  worker -> main        (READY, pid, device) | (FATAL, PackedError) | (NOTE, text)
                        (COPIED, index) | (RETIRE, index, cause)
                        (RESULT, index, arrays, timings) | (PACKED, index, fields.to_wire(arrays), timings)
                        (ERROR, index, PackedError) | (SEVERAL, [RESULT/PACKED/ERROR messages])
  main -> build process [(slot, index), ...] | None (stop)
  build process -> main (READY, pid) | (FATAL, PackedError)
                        | (BUILT, index, slot, layout, nbytes, seconds, cpu, start, lane)
                        (BUILT, Built) (a batch larger than a slot) | (ERROR, slot, PackedError, index)
  build threads -> supervisor (in the main)
                        (BUILT, Built) | (EXHAUSTED, slot) | (ERROR, slot, exception, index or None)
                        | (BUILDER_DIED, rank)
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

READY = "ready"  # a child is set up: (READY, pid[, device])
FATAL = "fatal"  # a child's set-up raised (the kernel's, the source's): the run fails with its PackedError
NOTE = "note"  # a line for the run's summary notes (a ring that could not be registered with CUDA)
TASKS = "tasks"  # slot tasks for one worker, in one message (``pack``)
COPIED = "copied"  # CUDA: batch ``index`` is on the device, its slot may be reused (NOTE [ Slot release ])
RETIRE = "retire"  # a sticky CUDA error: the worker exits and is replaced (NOTE [ CUDA faults ])
RESULT = "result"  # batch ``index``'s result arrays, and its timings
PACKED = "packed"  # the same, a small result as raw bytes (``fields.to_wire``)
ERROR = "error"  # batch ``index`` raised: its PackedError (from a build process: its slot, too)
SEVERAL = "several"  # several RESULT/PACKED/ERROR messages sent together (NOTE [ Small batches ])
BUILT = "built"  # a batch is in its slot (or, larger than a slot, built apart)
EXHAUSTED = "exhausted"  # the source has no next batch: the job's slot is free again
BUILDER_DIED = "builder_died"  # a build process is gone (its reader thread saw its pipe end)
ANSWERS = (RESULT, PACKED, ERROR)  # the messages that answer a task (one each)


@dataclass(frozen=True)
class Descriptor:
    """What travels to the worker for a slot batch: a few dozen bytes, whatever the batch size."""
    slot: int
    layout: Any  # fields.Layout: the structure, and each field's shape, dtype and offset in the slot


@dataclass
class Task:
    index: int
    attempt: int
    ring: str | None = None  # path of the slot ring file, when the batch is in a slot
    slot_bytes: int = 0
    desc: Descriptor | None = None
    array: Any = None  # the pickled fallback, for a batch larger than a slot (an array, tuple or dict)
    batch: Any = None  # (main side) a caller's batch record, to build it again for a retry
    digest: bool = False  # the worker sends the result's digest with it (outputs.batch_digest)
    trace: bool = False  # the worker sends its spans with the result (NOTE [ Trace ] in trace.py)
    built: tuple | None = None  # (main side, tracing) its build, recorded with its result (trace.Recorder.worker)

    def __reduce__(self):  # what travels: no main-side bookkeeping (and a tuple pickles faster than a dict)
        return (Task, (self.index, self.attempt, self.ring, self.slot_bytes, self.desc, self.array, None,
                       self.digest, self.trace))


def pack(tasks: list[Task]) -> tuple:
    """Slot tasks as one message: the ring once, then (index, attempt, slot, layout) each (pickle keeps one
    copy of a layout that several share): a fifth of the bytes and of the time of pickled ``Task`` objects.
    ``unpack`` makes them ``Task`` objects again."""
    t = tasks[0]
    return (TASKS, t.ring, t.slot_bytes, t.digest, t.trace,
            [(t.index, t.attempt, t.desc.slot, t.desc.layout) for t in tasks])


def unpack(msg: tuple) -> list[Task]:
    _, ring, slot_bytes, digest, trace, items = msg
    return [Task(index, attempt, ring, slot_bytes, Descriptor(slot, layout), digest=digest, trace=trace)
            for index, attempt, slot, layout in items]


def send(conn, obj) -> None:
    """``conn.send(obj)`` for tasks, results and build jobs (plain data, numpy arrays): pickled with plain
    ``pickle``, not multiprocessing's ForkingPickler, which copies its table of reducers for every message
    (a few microseconds, a tiny batch's budget); ``conn.recv()`` reads either."""
    conn.send_bytes(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))


def answers(msg: tuple) -> tuple:
    """The messages in ``msg``: itself, or those a SEVERAL message carries."""
    return msg[1] if msg[0] == SEVERAL else (msg,)
