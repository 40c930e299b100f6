"""Ray itself: a private local instance, what the cluster can host, how to name a lost actor's cause."""
from __future__ import annotations

import contextlib

from ..errors import ConfigError, WorkerError

try:
    import ray
except ImportError:  # the [ray] extra is optional
    ray = None

EXTRA = "run.backend = 'ray' needs Ray: pip install -e '.[ray]'"
START_WAIT_S = 120.0  # actors not up by then: the cluster is busy or short of resources
RECOVER_WAIT_S = 60.0  # every actor lost and none back by then: give up
NODE_GRACE_S = 5.0  # no alive node can host an actor for this long: give up (Ray would wait forever)
QUEUE = 3  # tasks on one actor at once: one computing, the next ones building meanwhile


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
        raise ConfigError(EXTRA)
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


def restart_count(actor) -> int | None:
    """How many times Ray has restarted ``actor`` (GCS's actor table), or None if it can't say."""
    try:
        info = ray._private.state.actors(actor._actor_id.hex())
        return int(info.get("NumRestarts", 0))
    except Exception:  # noqa: BLE001 - a Ray version without it: restarts while starting are not counted
        return None


def can_host(opts: dict) -> bool:
    """Whether some alive node has, in total, what one actor asks for."""
    need_cpu, need_gpu = opts.get("num_cpus", 0), opts.get("num_gpus", 0)
    for n in ray.nodes():
        res = n.get("Resources", {})
        if n.get("Alive") and res.get("CPU", 0) >= need_cpu and res.get("GPU", 0) >= need_gpu:
            return True
    return False


def node_alive(node_id: str) -> bool:
    return any(n.get("NodeID") == node_id and n.get("Alive") for n in ray.nodes())


def node_gone(node: str, error: str) -> str:
    return f"node {node[:12]} went away: its Ray actor was lost ({error})"


def cause(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"ray actor lost ({type(e).__name__}): {text[:120]}"


def unwrap(e: Exception, where: str) -> Exception:
    cause = getattr(e, "cause", None)
    if isinstance(cause, Exception):
        cause.args = (f"{where}: {cause}",)
        return cause
    return WorkerError(f"{where}: {e}")
