"""The Ray backend's executor: the actors' lives (start, restarts while starting, close) and a run's
stream; who builds is placement.py's, a run's bookkeeping run.py's and recovery.py's."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterator

from ..config import Config
from ..contracts import Outcome
from ..errors import ConfigError, WorkerError
from ..kernels import KernelSpec
from ..sources.base import Work
from ..wire import FATAL
from .actor import Actor
from .cluster import (EXTRA, QUEUE, START_WAIT_S, cause, describe_cluster, node_alive, node_gone,
                      ray, restart_count, start_local_ray, unwrap)
from .placement import plan
from .run import Run


class RayExecutor:
    """One Ray actor per worker (an ``Executor``: contracts.py); ``stream`` runs on the same actors again."""

    def __init__(self, cfg: Config, spec: KernelSpec):
        if ray is None:
            raise ConfigError(EXTRA)
        self.cfg, self.spec = cfg, spec
        self.threads = cfg.threads_per_worker()
        self.restarts: list[dict] = []
        self.breakdown = {k: 0.0 for k in ("build_s", "slot_wait_s", "handoff_s", "h2d_s", "compute_s",
                                           "d2h_s", "return_s")}
        self.figures = {"slots": 0, "slot_bytes": 0, "pickled_fallbacks": 0, "h2d_gbps": None,
                        "transport": "ray object store"}
        self.notes: list[str] = []
        self.gil: str | None = None  # (the local backend's: build threads that hold the GIL)
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
        self.relay = None  # the actors' prints go to Ray's logs
        self.ready_s = 0.0

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
        remote = ray.remote(**self.opts)(Actor)
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
                              f"or short of what each asks for ({self.need()}): free it, or lower --workers")
        try:
            infos = ray.get(pings)
        except Exception as e:  # the actor could not be created at all
            raise unwrap(e, f"a Ray actor failed to set up kernel '{self.spec.name}'") from None
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
        now = restart_count(self.actors[rank])
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
        if who[0] == FATAL:
            raise who[1].exception(f"a Ray actor failed to set up kernel '{self.spec.name}'")

    def came_up(self, rank: int) -> None:
        """Rank's actor answered: its deaths while starting are forgiven."""
        now = restart_count(self.actors[rank])
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

    def need(self) -> str:
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
    def stream(self, work: Work, ordered: bool = True, window: int | None = None,
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
        args = plan(self, work, cfg)
        run = Run(self, iter(work), ordered, min(in_flight, window), window, cfg.faults, args, work.source)
        run.trace = work.trace
        try:
            while True:
                run.submit()
                out = run.next_ready()
                if out is not None:
                    if out.failure is not None and "raise" in out.failure:  # (see Run.failed)
                        raise out.failure["raise"]
                    yield out
                    continue
                if run.idle():
                    break
                run.step()
        finally:
            run.abandon()  # after an early close or an error: nothing left running on the actors
            self.amend_node_losses()

    def amend_node_losses(self) -> None:
        """Restarts recorded as a lost actor whose node Ray has since declared dead: say so.

        A killed node is declared dead by GCS health checks (``health_check_period_ms`` x
        ``health_check_failure_threshold``, 15 s by default), often after its actors' tasks have failed."""
        still = []
        for record, error in self.unsure:
            if node_alive(record["node"]):
                still.append((record, error))
            else:
                record["cause"] = f"{node_gone(record['node'], error)}; was: {record['cause']}"
        self.unsure = still

    def lost_cause(self, rank: int, e: Exception) -> tuple[str, bool]:
        """Why rank's actor went away, and whether its node did (NOTE [ Node loss ])."""
        node = self.node_of[rank] if rank < len(self.node_of) else None
        if node and not node_alive(node):
            return node_gone(node, type(e).__name__), True
        return cause(e), False
