"""The same contract on Ray: one actor per worker; the actors build their own batches when they can.

 driver (this module)                                 Ray actors (one per worker), spread over nodes
 --------------------                                 ----------------------------------------------
 the source, cloudpickled once per run ------------>  opened once per run (again after a restart)
 batch indices: actor.compute.remote(i, attempt) -->  build threads fill batch i into a local slot
                                                      (builders.Builders, as in the local backend);
                                                      the next tasks build while this one computes
 ray.wait over the head task of each actor <--------  kernel on its device -> ("result", i, array, ...)
   -> Outcome(index, result, info, failure)           with --output: the actor writes batch-i itself
 --output: the manifest line appended, checksum       (sinks.BatchFiles: atomic) and returns its
   from the batch digests                             manifest line and digest, not the array

A caller's iterator, or a source that can't be pickled, is built by the driver instead and each batch
``ray.put`` (NOTE [ Actor builds ]).

Bounds (``stream``): at most ``cfg.in_flight()`` batches at the actors (``QUEUE`` per actor), and at most
``window`` batches started and not yet yielded (results held for reordering count), so a slow consumer
slows the actors.

Host-only rule: batches and params are checked (``handoff.to_host``) before anything is put in the object
store. Faults: actors are created with ``max_restarts=-1`` so Ray restarts a lost actor (its setup runs
again, on any node that can host it), and the lost batch is resubmitted by us with ``attempt + 1``
(``max_task_retries=0``): that keeps ``faults.max_attempts``, quarantine and the ``restarts`` accounting
identical to the local backend. A node that goes away costs its actors; their batches are resubmitted
uncharged (NOTE [ Node loss ]). An actor that dies while starting is restarted by Ray and the run goes on;
``faults.max_attempts`` deaths in a row before it is up fail the run (NOTE [ Ray restarts while starting ]).

NOTE [ Actor builds ]
When the source builds batch k on its own (``Work.source``: synthetic, files, a map-style dataset) and
cloudpickles, the driver puts it in the object store once per run and sends each actor only (index,
attempt, run key): nothing of a batch passes through the driver, so it steers many nodes. The actor
builds with the local backend's ``Builders`` (build threads, ``workers.build_threads`` or 2) into
``QUEUE`` local slots; Ray runs up to ``QUEUE`` of its tasks at once (a threaded actor), so the next
batches build while one computes (the kernel runs one batch at a time, under a lock). A batch lost with an
actor is simply built again by whichever actor takes it. Placement: before the first batch every actor
checks that ``source.path`` exists on its node (else ConfigError, exit 2: one line naming the node) and
whether it sees the output directory (a probe file the driver writes there); if it does, each actor writes
its results there itself (the same atomic files as the local backend) and returns the manifest line and
the result's digest (``outputs.batch_digest``: the checksum is a digest of per-batch digests for every
backend); the driver appends the line. Otherwise the results come back and the driver writes them, with a
note. ``run.ray_build = "driver"`` makes the driver build; ``"actors"`` refuses a source they can't build.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import secrets
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from . import devices, outputs
from .builders import Builders
from .config import Config
from .errors import ConfigError, OutputError, WorkerError
from .executor import Outcome, remote_error
from .fields import nbytes as batch_nbytes
from .handoff import Descriptor, aligned
from .kernels import KernelSpec
from .sinks import TMP, BatchFiles
from .sources import Batch, Indexed
from .worker import Computer, cuda_fault, pack_error

try:
    import ray
except ImportError:  # the [ray] extra is optional
    ray = None

START_WAIT_S = 120.0  # actors not up by then: the cluster is busy or short of resources
RECOVER_WAIT_S = 60.0  # every actor lost and none back by then: give up
NODE_GRACE_S = 5.0  # no alive node can host an actor for this long: give up (Ray would wait forever)
QUEUE = 3  # tasks on one actor at once: one computing, the next ones building meanwhile


class _Actor:
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
            self.who = ("fatal", pack_error(e))  # (Ray would keep only its text, and restart nothing)
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
        """Actor-built: ``job`` = (index, attempt, run key, [source ref] or None); one argument, because
        each argument of a Ray task costs the driver its own serialisation (NOTE [ Actor builds ])."""
        return self.compute(job[0], job[1], None, job[2], job[3])

    def compute(self, index: int, attempt: int, arr, key: str | None = None, ref: list | None = None):
        run, slot, timings = None, None, {}
        try:
            if arr is None:  # actor-built (NOTE [ Actor builds ])
                run = self._open(key, ref)
                if run is None:
                    return ("reopen", index, self.who)
                t0 = time.perf_counter()
                arr, slot = run.build(index)
                build_s = time.perf_counter() - t0
            with self.lock:
                out, timings = self.computer(arr, index, attempt)
            if run is not None:
                arr = None
                if slot is not None:
                    run.release(slot)
                    slot = None
                timings["build_s"] = build_s
                learned = getattr(run.source, "learned", None)  # bad image files: for the driver's summary
                if learned is not None:
                    timings["learned"] = learned(index)
                if run.files is not None:
                    extra = getattr(run.source, "manifest", None)
                    timings["record"] = run.files.write(index, out, {"pid": self.who[1], "device": self.who[2],
                                                                     **timings}, extra(index) if extra else None)
                    timings["digest"] = outputs.batch_digest(index, out)
                    if not run.keep:
                        out = None
        except BaseException as e:  # noqa: BLE001 - as in the local worker: errors travel as data
            if slot is not None:
                run.release(slot)
            packed = pack_error(cuda_fault(e, self.device))
            if devices.sticky(e):  # NOTE [ CUDA faults ] in worker.py: the main kills and Ray restarts us
                return ("retire", index, packed[1], self.who)
            return ("error", index, packed, self.who)
        return ("result", index, out, timings, self.who)


class _ActorRun:
    """One actor-built run on an actor: the source, ``Builders`` over ``QUEUE`` local slots (the ring
    interface: ``slot_bytes``, ``view``), and the output directory's writer when the actors write it."""

    def __init__(self, key: str, payload: bytes):
        import cloudpickle
        self.key = key
        self.source, output, self.keep, threads, cwd = cloudpickle.loads(payload)
        if os.path.isdir(cwd):  # relative paths (--input data.npy) mean what they mean on the driver
            os.chdir(cwd)
        self.slot_bytes = aligned(getattr(self.source, "max_nbytes", None) or 0)
        self.slots = [np.empty(self.slot_bytes, np.uint8) for _ in range(QUEUE)]
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(QUEUE):
            self.free.put(i)
        self.boxes: dict[int, list] = {}  # slot -> [Event, the build's event once reported]
        self.builders = Builders(None, self.source.batch, self, threads, self._report, record_order=False)
        self.files = None
        if output is not None:
            path, fmt, keep_columns = output
            self.files = BatchFiles(path, fmt, self.source if keep_columns else None)

    def view(self, slot: int, layout):
        return layout.views(self.slots[slot]), Descriptor(slot, layout)

    def _report(self, event: tuple) -> None:
        box = self.boxes.pop(event[1].slot if event[0] == "built" else event[1])
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
        if event[0] == "error":
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
                box.append(("error", slot, WorkerError("the run ended (a new one started on this actor)"), None))
                box[0].set()


@dataclass
class _Task:
    ref: object  # the actor task's ObjectRef
    index: int
    attempt: int
    obj: object  # the batch's ObjectRef (kept for resubmission)
    solo: bool  # must run alone on its actor (NOTE [ Ray attribution ])


@contextlib.contextmanager
def _loopback_only():
    """While Ray starts its own instance: take 127.0.0.1 as this node's address, so that GCS, raylet and
    workers listen on the loopback interface only. Ray does so on its own only on macOS and Windows
    (``ray_constants.ENABLE_RAY_CLUSTER``); a cluster is joined with ``ray_address`` instead."""
    consts = getattr(getattr(ray, "_private", None), "ray_constants", None)
    saved = getattr(consts, "ENABLE_RAY_CLUSTER", None)
    if saved is not None:
        consts.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved is not None:
            consts.ENABLE_RAY_CLUSTER = saved


def start_local_ray(num_cpus: int) -> str | None:
    """Start a private Ray instance on this machine: loopback only, no dashboard. Returns a note if Ray
    did not bind to 127.0.0.1 (a Ray version without the switch ``_loopback_only`` uses)."""
    if ray is None:
        raise ConfigError("run.backend = 'ray' needs Ray: pip install -e '.[ray]'")
    with _loopback_only():  # "local": a new instance, even if this machine runs a cluster (ray start)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    ip = ray.util.get_node_ip_address()
    return None if ip == "127.0.0.1" else f"the local Ray instance listens on {ip}, not 127.0.0.1 only"


def describe_cluster() -> str:
    """'2 alive nodes; CPU 3, GPU 0, memory 12.1 GB' for messages."""
    res = ray.cluster_resources()
    alive = sum(1 for n in ray.nodes() if n.get("Alive"))
    parts = [f"{k} {res.get(k, 0):g}" for k in ("CPU", "GPU")]
    parts += [f"{k} {v:g}" for k, v in sorted(res.items())
              if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith("node:")]
    return f"{alive} alive node(s); " + ", ".join(parts)


class RayExecutor:
    """Same interface as ``LocalExecutor``: start, stream, close, restarts, breakdown, worker_info."""

    def __init__(self, cfg: Config, spec: KernelSpec):
        if ray is None:
            raise ConfigError("run.backend = 'ray' needs Ray: pip install -e '.[ray]'")
        self.cfg, self.spec = cfg, spec
        self.threads = cfg.threads_per_worker()
        self.restarts: list[dict] = []
        self.breakdown = {k: 0.0 for k in ("build_s", "slot_wait_s", "handoff_s", "h2d_s", "compute_s",
                                           "d2h_s", "return_s")}
        self.figures = {"slots": 0, "slot_bytes": 0, "pickled_fallbacks": 0, "h2d_gbps": None,
                        "transport": "ray object store"}
        self.notes: list[str] = []
        self.run_notes: list[str] = []  # this run's: who builds the batches and why, who writes the output
        self.startup_s = 0.0
        self.up_restarts: list[int] = []  # per rank: Ray's restart count when its actor was last up (or lost)
        self.start_fails: list[int] = []  # per rank: deaths before it came up, in a row, recorded
        self.actors: list = []
        self.node_of: list[str] = []  # the node each rank's actor was last seen on
        self.seen: dict[tuple, int] = {}  # (rank, pid, device, node, ip) -> batches computed
        self.unsure: list[tuple[dict, str]] = []  # restarts whose node may yet be declared dead
        self.owns_ray = False
        self._quiet = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    # -- lifecycle ---------------------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return bool(self.actors)

    def start(self) -> None:
        if self.actors:
            return
        t0 = time.perf_counter()
        # Ray's driver prints worker-death notices to stdout; keep stdout for results (--json)
        self._quiet = contextlib.redirect_stdout(sys.stderr)
        self._quiet.__enter__()
        if not ray.is_initialized():
            if self.cfg.run.ray_address:
                ray.init(address=self.cfg.run.ray_address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            else:
                note = start_local_ray(max(os.cpu_count() or 1, self.cfg.workers.count))
                if note:
                    self.notes.append(note)
            self.owns_ray = True
        self.opts = self._actor_options()
        remote = ray.remote(**self.opts)(_Actor)
        self.actors = [remote.remote(r, self.spec, self.cfg.workers.device, self.threads,
                                     self.cfg.handoff.pinned) for r in range(self.cfg.workers.count)]
        pings = [a.info.remote() for a in self.actors]
        self.up_restarts = [0] * len(self.actors)
        self.start_fails = [0] * len(self.actors)
        deadline = time.monotonic() + START_WAIT_S
        ready: list = []
        while len(ready) < len(pings) and time.monotonic() < deadline:
            ready, _ = ray.wait(pings, num_returns=len(pings), timeout=0.5)
            for rank, ping in enumerate(pings):
                if ping not in ready:
                    self.check_starting(rank)
        if len(ready) < len(pings):
            raise WorkerError(f"{len(pings) - len(ready)} of {len(pings)} Ray actors not started after "
                              f"{START_WAIT_S:g} s (cluster: {describe_cluster()}); the cluster is busy "
                              f"or short of what each asks for ({self._need()}): free it, or lower --workers")
        try:
            infos = ray.get(pings)
        except Exception as e:  # the actor could not be created at all
            raise _unwrap(e, f"a Ray actor failed to set up kernel '{self.spec.name}'") from None
        for who in infos:
            self.fatal(who)
        self.node_of = [who[3] for who in infos]
        for rank, who in enumerate(infos):
            self.seen.setdefault(who, 0)
            self.came_up(rank)
        self.startup_s = time.perf_counter() - t0

    def check_starting(self, rank: int) -> None:
        """NOTE [ Ray restarts while starting ]
        An actor whose process dies while it starts or sets its kernel up (a signal, an exit: the OOM
        killer, a preempted node) is restarted by Ray at once (``max_restarts=-1``), and the run goes on
        with the actors that are up. A kernel setup that raises is deterministic: Ray does not restart
        it, and ``start`` raises the kernel's own error at once. The restarts are read from GCS (its
        actor table's restart count) while a rank is not up: ``faults.max_attempts`` deaths in a row
        before it came up fail the run with one line, as on the local backend."""
        now = _restarts(self.actors[rank])
        if now is None:
            return
        fails = now - self.up_restarts[rank]
        node = self.node_of[rank] if rank < len(self.node_of) else None
        while self.start_fails[rank] < fails:
            self.start_fails[rank] += 1
            self.restarts.append({"rank": rank, "pid": None, "node": node, "batch": None,
                                  "cause": "ray actor died while starting (Ray restarted it)"})
        limit = self.cfg.faults.max_attempts
        if fails >= limit:
            raise WorkerError(f"the Ray actor of worker {rank} died while starting, {fails} times in a row "
                              f"(faults.max_attempts = {limit}): its process ended before kernel "
                              f"'{self.spec.name}' was set up (killed, out of memory, or an exit in setup); "
                              f"its log on its node (ray logs) says how")

    def fatal(self, who: tuple) -> None:
        """An actor's kernel setup raised (deterministic: a config or code error): the run fails at once,
        with the kernel's own error (its type, one line, the actor's traceback as ``__cause__``)."""
        if who[0] == "fatal":
            raise remote_error(who[1], f"a Ray actor failed to set up kernel '{self.spec.name}'")

    def came_up(self, rank: int) -> None:
        """Rank's actor answered: its deaths while starting are forgiven."""
        now = _restarts(self.actors[rank])
        if now is not None:
            self.up_restarts[rank] = now
        self.start_fails[rank] = 0

    def _actor_options(self) -> dict:
        """One CPU per actor, GPUs on CUDA; spread over nodes; ``QUEUE`` tasks at once (a threaded actor:
        building overlaps computing) plus one for pings. Refuses what the cluster can never host."""
        res, device, n = ray.cluster_resources(), self.cfg.workers.device, self.cfg.workers.count
        opts = {"max_restarts": -1, "max_task_retries": 0, "num_cpus": 1, "scheduling_strategy": "SPREAD",
                "max_concurrency": QUEUE + 1}
        gpus = res.get("GPU", 0)
        if device.startswith("cuda") and not gpus:
            raise ConfigError(f"workers.device = '{device}': the Ray cluster has no GPU ({describe_cluster()});"
                              f" use --device cpu or auto, or add GPU nodes")
        if device.startswith("cuda") or (device == "auto" and gpus > 0):
            opts["num_gpus"] = min(1.0, gpus / n)
        if res.get("CPU", 0) < n:
            raise ConfigError(f"workers.count = {n}: each Ray actor needs 1 CPU and the cluster has "
                              f"{describe_cluster()}; use --workers {int(res.get('CPU', 0))} or fewer, or add nodes")
        return opts

    def _need(self) -> str:
        return ", ".join(f"{k} {self.opts.get(f'num_{k.lower()}s', 0):g}" for k in ("CPU", "GPU"))

    def close(self, graceful: bool = True) -> None:
        if self.unsure and ray.is_initialized():
            self.amend_node_losses()
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False
        if self._quiet is not None:
            self._quiet.__exit__(None, None, None)
            self._quiet = None

    def worker_info(self) -> list[dict]:
        """Every actor incarnation: rank, pid, device, the node it ran on (id and IP), batches computed."""
        return [{"rank": rank, "pid": pid, "device": dev, "node": node, "ip": ip, "batches": n}
                for (rank, pid, dev, node, ip), n in sorted(self.seen.items())]

    # -- runs ----------------------------------------------------------------------------------------------
    def stream(self, batches: Iterable[Batch], ordered: bool = True, window: int | None = None,
               settle: bool = True, cfg: Config | None = None) -> Iterator[Outcome]:
        """Outcomes in batch order (``ordered``) or as they complete, at most ``in_flight`` batches at the
        actors and ``window`` (default 2 x in_flight) started and not yet yielded. (An early end always
        settles: queued tasks are cancelled, running ones awaited; ``settle`` is the local backend's.)
        ``cfg``: this run's configuration (faults, in_flight), as for the local backend."""
        cfg = cfg or self.cfg
        in_flight = cfg.in_flight()
        window = 2 * in_flight if window is None else window
        if window < 1:
            raise ConfigError(f"window = {window}: must be >= 1")
        self.run_notes = []
        args = self._plan(batches, cfg)
        run = _Run(self, iter(batches), ordered, min(in_flight, window), window, cfg.faults, args,
                   getattr(batches, "source", None))
        try:
            while True:
                run.fill()
                out = run.next_ready()
                if out is not None:
                    if out.failure is not None and "raise" in out.failure:  # (see _Run.failed)
                        raise out.failure["raise"]
                    yield out
                    continue
                if run.idle():
                    break
                run.step()
        finally:
            run.abandon()  # after an early close or an error: nothing left running on the actors
            self.amend_node_losses()

    def _plan(self, work, cfg: Config) -> tuple:
        """Who builds this run's batches (NOTE [ Actor builds ]): ``compute``'s extra arguments (the run
        key and the source's ObjectRef) when the actors do, () when the driver does (a note says why)."""
        self.figures.update(transport="ray object store", put_bytes=0, source_bytes=0, written_by="driver")
        src = work if isinstance(work, Indexed) else getattr(work, "source", None)
        mode = cfg.run.ray_build
        if mode == "driver":
            self.run_notes.append("run.ray_build = 'driver': the driver builds every batch and puts it in the "
                                  "object store")
            return ()
        why = None
        if src is None:
            why = ("the source is drawn in order (an iterable of batches), so the driver builds every batch and "
                   "puts it in the object store; a map-style dataset, synthetic batches or files are built by "
                   "the actors")
        else:
            import cloudpickle
            sink, keep = getattr(work, "sink", None), getattr(work, "keep", True)
            output = (sink.spec() if sink is not None else None)
            threads = cfg.workers.build_threads or 2
            try:
                payload = cloudpickle.dumps((src, output, keep, threads, os.getcwd()))
            except Exception as e:  # noqa: BLE001 - a lock, an open file, a generator in the dataset
                name = type(getattr(src, "dataset", src)).__name__
                why = (f"the source ({name}) can't be pickled ({type(e).__name__}: {str(e)[:80]}), so the driver "
                       f"builds every batch and puts it in the object store")
        if why is not None:
            if mode == "actors":
                raise ConfigError(f"run.ray_build = 'actors': {why}; use run.ray_build = 'auto'")
            self.run_notes.append(why)
            return ()
        args = (hashlib.sha1(payload).hexdigest(), [ray.put(payload)])
        answers = self._placement(cfg, sink, args)
        why = next((w for _, _, _, w in answers if w), None)
        if why is not None:
            why = (f"the actors can't load the source ({why[:120]}), so the driver builds every batch and puts "
                   f"it in the object store; make what defines it importable on every node")
            if mode == "actors":
                raise ConfigError(f"run.ray_build = 'actors': {why}")
            self.run_notes.append(why)
            return ()
        blind = sorted({who[4] for who, _, sees, _ in answers if not sees}) if sink is not None else []
        if blind:
            self.run_notes.append(f"--output {sink.path} is not visible to the actors on {', '.join(blind)}: "
                                  f"their results come back and the driver writes them")
            payload = cloudpickle.dumps((src, None, keep, threads, os.getcwd()))
            args = (hashlib.sha1(payload).hexdigest(), [ray.put(payload)])
        elif output is not None:
            self.figures["written_by"] = "actors"
        self.figures.update(transport="built by the actors", source_bytes=len(payload))
        return args

    def _placement(self, cfg: Config, sink, args: tuple) -> list[tuple]:
        """Every actor's answer to ``check``: ConfigError naming the node when one lacks the input; the
        others say whether they see the output directory (a probe file in it) and opened the source."""
        paths = [os.path.abspath(cfg.source.path)] if cfg.source.path else []
        probe = os.path.join(sink.path, f"{TMP}probe-{secrets.token_hex(4)}") if sink is not None else None
        if probe:
            with open(probe, "w"):
                pass
        try:
            answers = []
            for ref in [a.check.remote(paths, probe, *args) for a in self.actors]:
                try:
                    answers.append(ray.get(ref, timeout=START_WAIT_S))
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                        ray.exceptions.GetTimeoutError):
                    continue  # lost meanwhile: the run notices and restarts it
        finally:
            if probe:
                with contextlib.suppress(OSError):
                    os.unlink(probe)
        for who, missing, _, _ in answers:
            if missing:
                raise ConfigError(f"--input {missing[0]}: not found on node {who[4]} (Ray actor of worker "
                                  f"{who[0]}); every node must see the input at the same path (shared storage, "
                                  f"or a copy on each node), or let the driver build: --set run.ray_build=driver")
        return answers

    def amend_node_losses(self) -> None:
        """Restarts recorded as a lost actor whose node Ray has since declared dead: say so.

        A killed node is declared dead by GCS health checks (``health_check_period_ms`` x
        ``health_check_failure_threshold``, 15 s by default), often after its actors' tasks have failed."""
        still = []
        for record, error in self.unsure:
            if _node_alive(record["node"]):
                still.append((record, error))
            else:
                record["cause"] = f"{_node_gone(record['node'], error)}; was: {record['cause']}"
        self.unsure = still

    def _lost_cause(self, rank: int, e: Exception) -> tuple[str, bool]:
        """Why rank's actor went away, and whether its node did (NOTE [ Node loss ])."""
        node = self.node_of[rank] if rank < len(self.node_of) else None
        if node and not _node_alive(node):
            return _node_gone(node, type(e).__name__), True
        return _cause(e), False


class _Run:
    """The state of one ``stream``: per-actor task queues, retries, reordering; short named steps."""

    def __init__(self, ex: RayExecutor, it: Iterator[Batch], ordered: bool, in_flight: int, window: int,
                 faults, args: tuple = (), source=None):
        self.ex, self.it, self.ordered, self.faults = ex, it, ordered, faults
        self.args = args  # compute's extra arguments: (run key, [source ref]) when the actors build
        self.learn = getattr(source, "learn", None)  # the driver's source learns what the actors found
        self.sent: set[int] = set()  # ranks whose actor was sent the source's ref in this run
        self.in_flight, self.window = in_flight, window
        self.limit = faults.batch_timeout_s
        self.queues: list[deque[_Task]] = [deque() for _ in ex.actors]
        self.since = [0.0] * len(ex.actors)  # when the head of each queue started computing
        # rank -> [ping ref, lost at, unhostable since, pid of the incarnation we killed (or None)]
        self.recovering: dict[int, list] = {}
        self.todo: deque = deque()  # (index, attempt, obj, solo): resubmissions, before new batches
        self.timed_out: set[int] = set()
        self.opened: dict[int, None] = {}  # started and not yet yielded, in the order they started
        self.ready: dict[int, Outcome] = {}
        self.exhausted = False
        self.finished = False
        self.next_check = 0.0  # when check_recovering may next ask GCS which nodes can host an actor

    # -- handing out work ------------------------------------------------------------------------------
    def fill(self) -> None:
        usable = [r for r in range(len(self.queues)) if r not in self.recovering]
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
            rank = min(free, key=lambda r: len(self.queues[r]))
            if not self.queues[rank]:
                self.since[rank] = time.monotonic()
            if self.args:  # actor-built: the source's ref goes with a rank's first task only (it costs)
                key, source = self.args
                ref = self.ex.actors[rank].build.remote((index, attempt, key,
                                                         None if rank in self.sent else source))
                self.sent.add(rank)
            else:
                ref = self.ex.actors[rank].compute.remote(index, attempt, obj)
            self.queues[rank].append(_Task(ref, index, attempt, obj, solo))

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
        heads = [q[0].ref for q in self.queues if q] + [p[0] for p in self.recovering.values()]
        if not heads:
            raise WorkerError("internal: batches outstanding but nothing to wait for")  # never expected
        done, _ = ray.wait(heads, num_returns=1, timeout=min(1.0, self.limit / 4) if self.limit else 1.0)
        done = set(done)
        self.check_recovering(done)
        for rank, q in enumerate(self.queues):
            if q and q[0].ref in done:
                self.collect(rank, q.popleft())
        if self.limit:
            self.check_deadlines()

    def collect(self, rank: int, task: _Task) -> None:
        self.since[rank] = time.monotonic()
        try:
            msg = ray.get(task.ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            self.on_actor_lost(rank, task, e)
            return
        if msg[0] == "retire":
            self.on_retire(rank, task, msg)
            return
        if msg[0] == "reopen":  # restarted unseen: it lost the run's source; sent again with the batch
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
        if msg[0] == "result":
            _, index, out, timings, who = msg
            ex.seen[who] = ex.seen.get(who, 0) + 1
            ex.node_of[who[0]] = who[3]
            for k in ("h2d_s", "d2h_s", "compute_s", "build_s"):
                ex.breakdown[k] += timings.get(k, 0.0)
            found = timings.pop("learned", None)
            if found and self.learn is not None:
                self.learn(found)
            self.ready[index] = Outcome(index, out, {"pid": who[1], "device": who[2], "node": who[3],
                                                     **timings}, None)
            return
        _, index, packed, who = msg
        where = f"batch {index} (ray actor pid {who[1]}, device {who[2]}, node {who[3][:12]})"
        if isinstance(packed[0], OutputError):  # a full disk: fatal, whatever on_error says
            raise remote_error(packed, where)
        if self.faults.on_error == "skip":
            self.fail({"batch": index, "cause": packed[1], "attempts": attempt})
        else:
            self.failed(index, remote_error(packed, where))

    def fail(self, record: dict) -> None:
        self.ready[record["batch"]] = Outcome(record["batch"], None, {}, record)

    def failed(self, index: int, error: BaseException) -> None:
        """Batch ``index`` raised and ``faults.on_error`` is "fail": as the local backend (its
        ``_batch_failed``), in order the batches before it are yielded first; as done, at once."""
        if not self.ordered:
            raise error
        self.exhausted = True  # (nothing new is drawn; what was started ends)
        self.ready[index] = Outcome(index, None, {}, {"batch": index, "raise": error})

    def on_actor_lost(self, rank: int, task: _Task, e: Exception) -> None:
        q = self.queues[rank]
        was_timeout = rank in self.timed_out
        self.timed_out.discard(rank)
        if was_timeout:
            cause, node_lost = f"timeout: batch ran over {self.limit:g} s (faults.batch_timeout_s)", False
        else:
            cause, node_lost = self.ex._lost_cause(rank, e)
        lost = [task] + list(q)
        q.clear()
        self.lost(rank, lost, task.solo or len(lost) == 1 or was_timeout, node_lost, cause)
        if not (node_lost or was_timeout):  # Ray may declare the node dead later: amend the cause then
            self.ex.unsure.append((self.ex.restarts[-1], type(e).__name__))
        self.recovering[rank] = [self.ex.actors[rank].info.remote(), time.monotonic(), None, None]

    def on_retire(self, rank: int, task: _Task, msg: tuple) -> None:
        """A sticky CUDA error left the actor's CUDA context unusable: kill it (Ray restarts it, its kernel
        set up again) and treat its batch as a crash's, charged to that batch (it was the one running)."""
        ray.kill(self.ex.actors[rank], no_restart=False)
        q = self.queues[rank]
        lost = [task] + list(q)
        q.clear()
        self.lost(rank, lost, True, False, f"{msg[2]} (sticky CUDA error: worker retired and replaced)")
        # ray.kill is asynchronous: until it lands, the old incarnation may answer the ping (its pid says so)
        self.recovering[rank] = [self.ex.actors[rank].info.remote(), time.monotonic(), None, msg[3][1]]

    def lost(self, rank: int, lost: list[_Task], known: bool, node_lost: bool, cause: str) -> None:
        """An actor died holding ``lost`` (oldest first).

        NOTE [ Ray attribution ]
        Ray can't say which of an actor's queued tasks was running when it died: the reply of one that
        had finished can be lost with the process. So a death is charged to a batch only when it is
        ``known`` to be the culprit: it was alone on the actor, or is a timed-out head. Otherwise nobody
        is charged and every lost batch is retried ``solo`` (alone on an actor), where a further death
        is attributed exactly. Quarantine and ``failed`` then match the local backend.

        NOTE [ Node loss ]
        When the actor's node is no longer alive, the node is the culprit: nobody is charged, every lost
        batch is resubmitted as it was (same attempt, not solo), and Ray restarts the actor on a node
        that can host it. If none can, Ray would keep it pending forever: ``check_recovering`` gives up
        with a WorkerError after NODE_GRACE_S without a capable node, or RECOVER_WAIT_S without any actor.
        """
        self.ex.up_restarts[rank] += 1  # Ray restarts it: that restart is not a death while starting
        self.sent.discard(rank)  # the new incarnation needs the run's source
        pids = [who[1] for who in self.ex.seen if who[0] == rank]  # in the order incarnations came up
        pid = pids[-1] if pids else None
        self.ex.restarts.append({"rank": rank, "pid": pid, "cause": cause, "node": self.ex.node_of[rank],
                                 "batch": lost[0].index if known and not node_lost else None})
        if node_lost:
            self.todo.extend((t.index, t.attempt, t.obj, False) for t in lost)
            return
        if not known:
            self.todo.extend((t.index, t.attempt, t.obj, True) for t in lost)
            return
        head, rest = lost[0], lost[1:]  # the head was running; the rest never started
        if head.attempt + 1 > self.faults.max_attempts:
            self.fail({"batch": head.index, "cause": cause, "attempts": head.attempt})
        else:
            self.todo.append((head.index, head.attempt + 1, head.obj, True))
        self.todo.extend((t.index, t.attempt, t.obj, False) for t in rest)

    def check_recovering(self, done: set) -> None:
        now = time.monotonic()
        hostable = None  # asked of GCS (ray.nodes()) at most twice a second, not on every result
        if now >= self.next_check and any(now - e[1] >= 1.0 for e in self.recovering.values()):
            self.next_check, hostable = now + 0.5, _can_host(self.ex.opts)
        for rank, entry in list(self.recovering.items()):
            ping, lost_at, unhostable, killed = entry
            if ping in done:
                try:
                    who = ray.get(ping)
                    self.ex.fatal(who)
                    if who[1] == killed:  # answered before the kill landed: ask the next incarnation
                        time.sleep(0.05)
                        entry[0] = self.ex.actors[rank].info.remote()
                        continue
                    del self.recovering[rank]  # restarted: its kernel is set up again
                    self.ex.came_up(rank)
                    self.ex.amend_node_losses()
                    self.ex.seen.setdefault(who, 0)
                    self.ex.node_of[rank] = who[3]
                    continue
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                    time.sleep(0.2)
                    entry[0] = self.ex.actors[rank].info.remote()
            if hostable is None or now - lost_at < 1.0:
                continue
            self.ex.check_starting(rank)  # died again while starting? (NOTE [ Ray restarts while starting ])
            if hostable:
                entry[2] = None
            elif unhostable is None:
                entry[2] = now
            elif now - unhostable > NODE_GRACE_S:
                raise WorkerError(f"the Ray actor of worker {rank} cannot be restarted: no alive node "
                                  f"has what it needs ({self.ex._need()}; cluster: {describe_cluster()}); "
                                  f"add a node or restart the cluster")
        outstanding = self.todo or any(self.queues)
        if outstanding and len(self.recovering) == len(self.queues):
            oldest = min(e[1] for e in self.recovering.values())
            if now - oldest > RECOVER_WAIT_S:
                raise WorkerError(f"no Ray actor came back within {RECOVER_WAIT_S:g} s of being lost "
                                  f"(cluster: {describe_cluster()}); check the cluster (ray status)")

    def check_deadlines(self) -> None:
        for rank, q in enumerate(self.queues):
            if q and time.monotonic() - self.since[rank] > self.limit:
                ray.kill(self.ex.actors[rank], no_restart=False)  # Ray restarts it; its head fails
                self.since[rank] = float("inf")
                self.timed_out.add(rank)

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


def _restarts(actor) -> int | None:
    """How many times Ray has restarted ``actor`` (GCS's actor table), or None if it can't say."""
    try:
        info = ray._private.state.actors(actor._actor_id.hex())
        return int(info.get("NumRestarts", 0))
    except Exception:  # noqa: BLE001 - a Ray version without it: restarts while starting are not counted
        return None


def _can_host(opts: dict) -> bool:
    """Whether some alive node has, in total, what one actor asks for."""
    need_cpu, need_gpu = opts.get("num_cpus", 0), opts.get("num_gpus", 0)
    for n in ray.nodes():
        res = n.get("Resources", {})
        if n.get("Alive") and res.get("CPU", 0) >= need_cpu and res.get("GPU", 0) >= need_gpu:
            return True
    return False


def _node_alive(node_id: str) -> bool:
    return any(n.get("NodeID") == node_id and n.get("Alive") for n in ray.nodes())


def _node_gone(node: str, error: str) -> str:
    return f"node {node[:12]} went away: its Ray actor was lost ({error})"


def _cause(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"ray actor lost ({type(e).__name__}): {text[:120]}"


def _unwrap(e: Exception, where: str) -> Exception:
    cause = getattr(e, "cause", None)
    if isinstance(cause, Exception):
        cause.args = (f"{where}: {cause}",)
        return cause
    return WorkerError(f"{where}: {e}")
