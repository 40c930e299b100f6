"""Ray actors lost in a run: a crash, a node gone, a deadline, a sticky CUDA error. Who is charged, what is
resubmitted, and when to give up waiting for a restart."""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import WorkerError
from .cluster import NODE_GRACE_S, RECOVER_WAIT_S, can_host, describe_cluster, ray


@dataclass
class Pending:
    ref: object  # the actor task's ObjectRef
    index: int
    attempt: int
    obj: object  # the batch's ObjectRef (kept for resubmission)
    solo: bool  # must run alone on its actor (NOTE [ Ray attribution ])


class Recovery:
    """The lost actors of ``run`` (run.Run): restarting, their batches resubmitted or quarantined."""

    def __init__(self, run):
        self.run = run
        # rank -> [ping ref, lost at, unhostable since, pid of the incarnation we killed (or None)]
        self.recovering: dict[int, list] = {}
        self.timed_out: set[int] = set()
        self.next_check = 0.0  # when ``check`` may next ask GCS which nodes can host an actor

    def on_actor_lost(self, rank: int, task: Pending, e: Exception) -> None:
        q = self.run.queues[rank]
        was_timeout = rank in self.timed_out
        self.timed_out.discard(rank)
        if was_timeout:
            cause, node_lost = f"timeout: batch ran over {self.run.limit:g} s (faults.batch_timeout_s)", False
        else:
            cause, node_lost = self.run.ex.lost_cause(rank, e)
        lost = [task] + list(q)
        q.clear()
        self.lost(rank, lost, task.solo or len(lost) == 1 or was_timeout, node_lost, cause)
        if not (node_lost or was_timeout):  # Ray may declare the node dead later: amend the cause then
            self.run.ex.unsure.append((self.run.ex.restarts[-1], type(e).__name__))
        self.recovering[rank] = [self.run.ex.actors[rank].info.remote(), time.monotonic(), None, None]

    def on_retire(self, rank: int, task: Pending, msg: tuple) -> None:
        """A sticky CUDA error left the actor's CUDA context unusable: kill it (Ray restarts it, its kernel
        set up again) and treat its batch as a crash's, charged to that batch (it was the one running)."""
        ray.kill(self.run.ex.actors[rank], no_restart=False)
        q = self.run.queues[rank]
        lost = [task] + list(q)
        q.clear()
        self.lost(rank, lost, True, False, f"{msg[2]} (sticky CUDA error: worker retired and replaced)")
        # ray.kill is asynchronous: until it lands, the old incarnation may answer the ping (its pid says so)
        self.recovering[rank] = [self.run.ex.actors[rank].info.remote(), time.monotonic(), None, msg[3][1]]

    def lost(self, rank: int, lost: list[Pending], known: bool, node_lost: bool, cause: str) -> None:
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
        self.run.ex.up_restarts[rank] += 1  # Ray restarts it: that restart is not a death while starting
        self.run.sent.discard(rank)  # the new incarnation needs the run's source
        pids = [who[1] for who in self.run.ex.seen if who[0] == rank]  # in the order incarnations came up
        pid = pids[-1] if pids else None
        self.run.ex.restarts.append({"rank": rank, "pid": pid, "cause": cause, "node": self.run.ex.node_of[rank],
                                 "batch": lost[0].index if known and not node_lost else None})
        if self.run.trace is not None:
            self.run.trace.instant("actor lost", "compute", pid=pid, args={"cause": cause, "held": [t.index for t in lost]})
        if node_lost:
            self.run.todo.extend((t.index, t.attempt, t.obj, False) for t in lost)
            return
        if not known:
            self.run.todo.extend((t.index, t.attempt, t.obj, True) for t in lost)
            return
        head, rest = lost[0], lost[1:]  # the head was running; the rest never started
        if head.attempt + 1 > self.run.faults.max_attempts:
            self.run.fail({"batch": head.index, "cause": cause, "attempts": head.attempt})
        else:
            self.run.todo.append((head.index, head.attempt + 1, head.obj, True))
        self.run.todo.extend((t.index, t.attempt, t.obj, False) for t in rest)

    def check(self, done: set) -> None:
        now = time.monotonic()
        hostable = None  # asked of GCS (ray.nodes()) at most twice a second, not on every result
        if now >= self.next_check and any(now - e[1] >= 1.0 for e in self.recovering.values()):
            self.next_check, hostable = now + 0.5, can_host(self.run.ex.opts)
        for rank, entry in list(self.recovering.items()):
            ping, lost_at, unhostable, killed = entry
            if ping in done:
                try:
                    who = ray.get(ping)
                    self.run.ex.fatal(who)
                    if who[1] == killed:  # answered before the kill landed: ask the next incarnation
                        time.sleep(0.05)
                        entry[0] = self.run.ex.actors[rank].info.remote()
                        continue
                    del self.recovering[rank]  # restarted: its kernel is set up again
                    self.run.ex.came_up(rank)
                    self.run.ex.amend_node_losses()
                    self.run.ex.seen.setdefault(who, 0)
                    self.run.ex.node_of[rank] = who[3]
                    continue
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                    time.sleep(0.2)
                    entry[0] = self.run.ex.actors[rank].info.remote()
            if hostable is None or now - lost_at < 1.0:
                continue
            self.run.ex.check_starting(rank)  # died again while starting? (NOTE [ Ray restarts while starting ])
            if hostable:
                entry[2] = None
            elif unhostable is None:
                entry[2] = now
            elif now - unhostable > NODE_GRACE_S:
                raise WorkerError(f"the Ray actor of worker {rank} cannot be restarted: no alive node "
                                  f"has what it needs ({self.run.ex.need()}; cluster: {describe_cluster()}); "
                                  f"add a node or restart the cluster")
        outstanding = self.run.todo or any(self.run.queues)
        if outstanding and len(self.recovering) == len(self.run.queues):
            oldest = min(e[1] for e in self.recovering.values())
            if now - oldest > RECOVER_WAIT_S:
                raise WorkerError(f"no Ray actor came back within {RECOVER_WAIT_S:g} s of being lost "
                                  f"(cluster: {describe_cluster()}); check the cluster (ray status)")

    def check_deadlines(self) -> None:
        for rank, q in enumerate(self.run.queues):
            if q and time.monotonic() - self.run.since[rank] > self.run.limit:
                ray.kill(self.run.ex.actors[rank], no_restart=False)  # Ray restarts it; its head fails
                self.run.since[rank] = float("inf")
                self.timed_out.add(rank)
