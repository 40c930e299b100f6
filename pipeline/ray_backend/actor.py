"""The Ray actor (module level: Ray pickles the class by name): the kernel built once per actor, and the
batches of an actor-built run built here (NOTE [ Actor builds ] in ray_backend/__init__.py)."""
from __future__ import annotations

import os
import queue
import threading
import time

import numpy as np

from .. import devices, outputs
from ..compute import Computer, cuda_fault
from ..errors import PackedError, WorkerError
from ..kernels import KernelSpec
from ..local.builders import Builders
from ..local.ring import aligned
from ..sinks import BatchFiles
from ..wire import BUILT, ERROR, FATAL, RESULT, RETIRE, Descriptor
from .cluster import QUEUE, ray

REOPEN = "reopen"  # an actor restarted unseen lost the run's source: the driver sends it again


class Actor:
    """A worker on Ray: the kernel is built once per actor (and again if Ray restarts the actor); an
    actor-built run's source is opened at its first task (NOTE [ Actor builds ])."""

    def __init__(self, rank: int, spec: KernelSpec, device_spec: str, threads: int, pinned: bool):
        import torch
        torch.set_num_threads(threads)
        self.rank = rank
        self.device = devices.choose("cuda" if device_spec.startswith("cuda") or
                                     (device_spec == "auto" and devices.gpu_count()) else "cpu", 0)
        self.who = (rank, os.getpid(), str(self.device), ray.get_runtime_context().get_node_id(),
                    ray.util.get_node_ip_address())
        try:
            self.computer = Computer(spec, self.device, pinned)
        except Exception as e:  # noqa: BLE001 - deterministic: ``info`` says so, the driver raises it
            self.who = (FATAL, PackedError.pack(e))  # (Ray would keep only its text, and restart nothing)
        self.lock = threading.Lock()  # one kernel call at a time (its tasks run on QUEUE threads)
        self.opened = threading.Condition()
        self.run: _ActorRun | None = None

    def info(self):
        return self.who

    def check(self, paths: list[str], probe: str | None, key: str, ref: list):
        """Before an actor-built run: which of ``paths`` this node lacks, whether it sees the output dir's
        ``probe``, and why the run's source can't be opened here (None: it was, for the first task)."""
        missing = [p for p in paths if not os.path.exists(p)]
        why = None
        if not missing:
            try:
                self._open(key, ref)
            except Exception as e:  # noqa: BLE001 - a module the driver has and this node lacks, mostly
                why = f"{type(e).__name__}: {e}"
        return self.who, missing, probe is not None and os.path.exists(probe), why

    def _open(self, key: str, ref: list | None) -> "_ActorRun | None":
        """The run ``key`` (NOTE [ Actor builds ]): opened from ``ref`` (the first task of a run on this
        actor carries it), or, without it, the one a concurrent task is opening; None if there is none
        (a restart the driver has not seen): the driver sends the source again."""
        with self.opened:
            if ref is None:
                self.opened.wait_for(lambda: self.run is not None and self.run.key == key, timeout=2.0)
                return self.run if self.run is not None and self.run.key == key else None
            if self.run is None or self.run.key != key:
                if self.run is not None:
                    self.run.close()
                self.run = None
                self.run = _ActorRun(key, ray.get(ref[0]))
                self.opened.notify_all()
            return self.run

    def build(self, job: tuple):
        """Actor-built: ``job`` = (index, attempt, run key, [source ref] or None, trace); one argument, because
        each argument of a Ray task costs the driver its own serialisation (NOTE [ Actor builds ])."""
        return self.compute(job[0], job[1], None, job[2], job[3], job[4])

    def compute(self, index: int, attempt: int, arr, key: str | None = None, ref: list | None = None,
                trace: bool = False):
        run, slot, timings = None, None, {}
        try:
            if arr is None:  # actor-built (NOTE [ Actor builds ])
                run = self._open(key, ref)
                if run is None:
                    return (REOPEN, index, self.who)
                t0 = time.perf_counter()
                arr, slot = run.build(index)
                build_s = time.perf_counter() - t0
            with self.lock:
                self.computer.trace = trace  # its spans go back with the result (NOTE [ Trace ] in trace.py)
                out, timings = self.computer(arr, index, attempt)
            if run is not None:
                arr = None
                if slot is not None:
                    run.release(slot)
                    slot = None
                timings["build_s"] = build_s
                if trace:
                    timings["build_span"] = (t0, t0 + build_s)
                found = run.source.learned(index)  # bad image files: for the driver's summary
                if found:
                    timings["learned"] = found
                if run.files is not None:
                    timings["record"] = run.files.write(index, out, {"pid": self.who[1], "device": self.who[2],
                                                                     **timings}, run.source.manifest(index) or None)
                    timings["digest"] = outputs.batch_digest(index, out)
                    if not run.keep:
                        out = None
        except BaseException as e:  # noqa: BLE001 - as in the local worker: errors travel as data
            if slot is not None:
                run.release(slot)
            packed = PackedError.pack(cuda_fault(e, self.device))
            if devices.sticky(e):  # NOTE [ CUDA faults ] in compute.py: the main kills and Ray restarts us
                return (RETIRE, index, packed.text, self.who)
            return (ERROR, index, packed, self.who)
        return (RESULT, index, out, timings, self.who)


class _ActorRun:
    """One actor-built run on an actor: the source, ``Builders`` over ``QUEUE`` local slots (it is their
    ``Ring``: ``slot_bytes``, ``view``), and the output directory's writer when the actors write it."""

    def __init__(self, key: str, payload: bytes):
        import cloudpickle
        self.key = key
        self.source, output, self.keep, threads, cwd = cloudpickle.loads(payload)
        if os.path.isdir(cwd):  # relative paths (--input data.npy) mean what they mean on the driver
            os.chdir(cwd)
        self.slot_bytes = aligned(self.source.max_nbytes or 0)
        self.slots = [np.empty(self.slot_bytes, np.uint8) for _ in range(QUEUE)]
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(QUEUE):
            self.free.put(i)
        self.boxes: dict[int, list] = {}  # slot -> [Event, the build's event once reported]
        self.builders = Builders(None, self.source.batch, self, threads, self._report, record_order=False)
        self.files = None
        if output is not None:
            path, fmt, keep_columns, samples = output
            self.files = BatchFiles(path, fmt, self.source if keep_columns else None,
                                    self.source if samples else None)

    def view(self, slot: int, layout):
        return layout.views(self.slots[slot]), Descriptor(slot, layout)

    def _report(self, event: tuple) -> None:
        box = self.boxes.pop(event[1].slot if event[0] == BUILT else event[1])
        box.append(event)
        box[0].set()

    def build(self, index: int):
        """Batch ``index`` built by the build threads: (its arrays, the slot they lie in, or None)."""
        slot = self.free.get()
        box = [threading.Event()]
        self.boxes[slot] = box
        self.builders.submit(slot, index)
        box[0].wait()
        event = box[1]
        if event[0] == ERROR:
            self.free.put(slot)
            raise event[2]
        built = event[1]
        if built.desc is None:  # larger than a slot (a dataset item that is a whole batch): built apart
            self.free.put(slot)
            return built.array, None
        return built.desc.layout.views(self.slots[slot]), slot

    def release(self, slot: int) -> None:
        self.free.put(slot)

    def close(self) -> None:
        """A new run replaces this one: stop the build threads; a task still waiting for a build ends."""
        self.builders.close()
        for slot in list(self.boxes):
            box = self.boxes.pop(slot, None)
            if box is not None:
                box.append((ERROR, slot, WorkerError("the run ended (a new one started on this actor)"), None))
                box[0].set()
