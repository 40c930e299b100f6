"""The same contract on Ray: one actor per worker, batches through Ray's object store.

 main (this module)                                   Ray actors (one per worker), any node
 ------------------                                   -------------------------------------
 source -> ray.put(batch) -> actor.compute.remote --> kernel set up once per actor on its device
 ray.wait over at most in_flight refs  <------------- ("result", i, array, timings) | ("error", i, ...)

Host-only rule: batches and params are checked (``handoff.to_host``) before anything is put in the object
store. Faults: actors are created with ``max_restarts=-1`` so Ray restarts a lost actor (its setup runs
again), and the lost batch is resubmitted by us with ``attempt + 1`` (``max_task_retries=0``): that keeps
``faults.max_attempts``, quarantine and the ``restarts`` accounting identical to the local backend.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import deque

import numpy as np

from . import devices
from .config import Config
from .errors import ConfigError, WorkerError
from .executor import remote_error
from .kernels import KernelSpec
from .sources import Batch
from .worker import Computer, pack_error

try:
    import ray
except ImportError:  # the [ray] extra is optional
    ray = None


class _Actor:
    """A worker on Ray: the kernel is built once per actor (and again if Ray restarts the actor)."""

    def __init__(self, rank: int, spec: KernelSpec, device_spec: str, threads: int, pinned: bool):
        import torch
        torch.set_num_threads(threads)
        self.rank = rank
        self.device = devices.choose("cuda" if device_spec.startswith("cuda") or
                                     (device_spec == "auto" and devices.gpu_count()) else "cpu", 0)
        self.computer = Computer(spec, self.device, pinned)

    def info(self):
        return os.getpid(), str(self.device)

    def compute(self, index: int, attempt: int, arr: np.ndarray):
        try:
            out, timings = self.computer(arr, index, attempt)
        except BaseException as e:  # noqa: BLE001 - as in the local worker: errors travel as data
            return ("error", index, pack_error(e), (self.rank, os.getpid(), str(self.device)))
        return ("result", index, out, timings, (self.rank, os.getpid(), str(self.device)))


class RayExecutor:
    """Same interface as ``LocalExecutor``: start, map, close, restarts, breakdown, worker_info."""

    def __init__(self, cfg: Config, spec: KernelSpec):
        if ray is None:
            raise ConfigError("run.backend = 'ray' needs Ray: pip install -e '.[ray]'")
        self.cfg, self.spec = cfg, spec
        self.threads = cfg.threads_per_worker()
        self.restarts: list[dict] = []
        self.breakdown = {k: 0.0 for k in ("build_s", "slot_wait_s", "handoff_s", "h2d_s", "compute_s",
                                           "d2h_s", "return_s")}
        self.startup_s = 0.0
        self.actors: list = []
        self.counts: dict[tuple, int] = {}
        self.owns_ray = False

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self) -> None:
        t0 = time.perf_counter()
        # Ray's driver prints worker-death notices to stdout; keep stdout for results (--json)
        self._quiet = contextlib.redirect_stdout(sys.stderr)
        self._quiet.__enter__()
        if not ray.is_initialized():
            address = self.cfg.run.ray_address or None
            kw = {} if address else {"num_cpus": max(os.cpu_count() or 1, self.cfg.workers.count)}
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, **kw)
            self.owns_ray = True
        opts = {"max_restarts": -1, "max_task_retries": 0, "num_cpus": 1}
        if self.cfg.workers.device.startswith("cuda") or (self.cfg.workers.device == "auto"
                                                          and _cluster_gpus() > 0):
            opts["num_gpus"] = min(1.0, max(_cluster_gpus(), 1) / self.cfg.workers.count)
        remote = ray.remote(**opts)(_Actor)
        self.actors = [remote.remote(r, self.spec, self.cfg.workers.device, self.threads,
                                     self.cfg.handoff.pinned) for r in range(self.cfg.workers.count)]
        try:
            self.infos = ray.get([a.info.remote() for a in self.actors])
        except Exception as e:  # setup failed: surface the kernel's own error
            raise _unwrap(e, f"a Ray actor failed to set up kernel '{self.spec.name}'") from None
        self.startup_s = time.perf_counter() - t0

    def close(self, graceful: bool = True) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False
        if getattr(self, "_quiet", None) is not None:
            self._quiet.__exit__(None, None, None)
            self._quiet = None

    def worker_info(self) -> list[dict]:
        return [{"rank": rank, "pid": pid, "device": dev, "batches": n}
                for (rank, pid, dev), n in sorted(self.counts.items())]

    def map(self, batches, on_result, on_failed) -> dict:
        in_flight, limit = self.cfg.in_flight(), self.cfg.faults.batch_timeout_s
        # per actor, in order: (ref, index, attempt, batch ref, solo); see NOTE [ Ray attribution ]
        queues = [deque() for _ in self.actors]
        since = [0.0] * len(self.actors)  # when the head of each queue started computing
        recovering: dict[int, object] = {}  # rank -> ref of a ping to an actor Ray is restarting
        todo: deque = deque()
        it, exhausted = iter(batches), False
        timed_out: set[int] = set()
        while True:
            usable = [r for r in range(len(queues)) if r not in recovering]
            while usable and sum(map(len, queues)) < in_flight and (todo or not exhausted):
                solo = bool(todo) and todo[0][3]
                free = [r for r in usable if not queues[r] or (not solo and not queues[r][0][4])]
                if not free:
                    break
                if todo:
                    index, attempt, obj, solo = todo.popleft()
                else:
                    t0 = time.perf_counter()
                    batch: Batch | None = next(it, None)
                    if batch is None:
                        exhausted = True
                        continue
                    obj, index, attempt = ray.put(batch.array()), batch.index, 1
                    self.breakdown["build_s"] += time.perf_counter() - t0
                rank = min(free, key=lambda r: len(queues[r]))
                if not queues[rank]:
                    since[rank] = time.monotonic()
                ref = self.actors[rank].compute.remote(index, attempt, obj)
                queues[rank].append((ref, index, attempt, obj, solo))
            heads = [q[0][0] for q in queues if q] + list(recovering.values())
            if not heads:
                break
            done, _ = ray.wait(heads, num_returns=1, timeout=min(1.0, limit / 4) if limit else 1.0)
            for rank, ping in list(recovering.items()):
                if ping in done:
                    try:
                        ray.get(ping)
                        del recovering[rank]  # restarted: its kernel is set up again
                    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                        time.sleep(0.2)
                        recovering[rank] = self.actors[rank].info.remote()
            for rank, q in enumerate(queues):
                if not q or q[0][0] not in done:
                    continue
                ref, index, attempt, obj, solo = q.popleft()
                since[rank] = time.monotonic()
                try:
                    msg = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                    was_timeout = rank in timed_out
                    timed_out.discard(rank)
                    cause = (f"timeout: batch ran over {limit:g} s (faults.batch_timeout_s)"
                             if was_timeout else _cause(e))
                    lost = [(index, attempt, obj)] + [(i, a, o) for _, i, a, o, _ in q]
                    q.clear()
                    self._lost(rank, lost, solo or len(lost) == 1 or was_timeout, cause, todo, on_failed)
                    recovering[rank] = self.actors[rank].info.remote()  # no work until Ray restarted it
                    continue
                self._on_message(msg, on_result, on_failed, attempt)
            if limit:
                for rank, q in enumerate(queues):
                    if q and time.monotonic() - since[rank] > limit:
                        ray.kill(self.actors[rank], no_restart=False)  # Ray restarts it; its head fails
                        since[rank] = float("inf")
                        timed_out.add(rank)
        return {"slots": 0, "slot_bytes": 0, "pickled_fallbacks": 0, "h2d_gbps": None,
                "transport": "ray object store"}

    def _on_message(self, msg, on_result, on_failed, attempt) -> None:
        if msg[0] == "result":
            _, index, out, timings, who = msg
            self.counts[who] = self.counts.get(who, 0) + 1
            pid, device = who[1:]
            for k in ("h2d_s", "d2h_s", "compute_s"):
                self.breakdown[k] += timings[k]
            on_result(index, out, {"pid": pid, "device": device, **timings})
            return
        _, index, packed, (_, pid, device) = msg
        if self.cfg.faults.on_error == "skip":
            on_failed({"batch": index, "cause": packed[1], "attempts": attempt})
        else:
            raise remote_error(packed, f"batch {index} (ray actor pid {pid}, device {device})")

    def _lost(self, rank, lost: list, known: bool, cause: str, todo: deque, on_failed) -> None:
        """An actor died holding ``lost`` (oldest first).

        NOTE [ Ray attribution ]
        Ray can't say which of an actor's queued tasks was running when it died: the reply of one that
        had finished can be lost with the process. So a death is charged to a batch only when it is
        ``known`` to be the culprit: it was alone on the actor, or is a timed-out head. Otherwise nobody
        is charged and every lost batch is retried ``solo`` (alone on an actor), where a further death
        is attributed exactly. Quarantine and ``failed`` then match the local backend.
        """
        self.restarts.append({"rank": rank, "pid": None, "cause": cause, "batch": lost[0][0] if known else None})
        (index, attempt, obj), rest = lost[0], lost[1:]
        if not known:
            todo.extend((i, a, o, True) for i, a, o in lost)
        else:  # the head was running; the rest never started
            if attempt + 1 > self.cfg.faults.max_attempts:
                on_failed({"batch": index, "cause": cause, "attempts": attempt})
            else:
                todo.append((index, attempt + 1, obj, True))
            todo.extend((i, a, o, False) for i, a, o in rest)


def _cluster_gpus() -> float:
    return ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0


def _cause(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"ray actor lost ({type(e).__name__}): {text[:120]}"


def _unwrap(e: Exception, where: str) -> Exception:
    cause = getattr(e, "cause", None)
    if isinstance(cause, Exception):
        cause.args = (f"{where}: {cause}",)
        return cause
    return WorkerError(f"{where}: {e}")
