"""Ray for real, on this machine: a private local instance, a multi-node cluster, node loss, placement."""
import json
import os
import time

import numpy as np
import psutil
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
cluster_utils = pytest.importorskip("ray.cluster_utils", reason="Ray's cluster_utils are not available")

import pipeline  # noqa: E402
from pipeline import kernels  # noqa: E402
from pipeline.errors import ConfigError, WorkerError  # noqa: E402
from pipeline.ray_backend import RayExecutor  # noqa: E402
from pipeline.outputs import checksum
from pipeline.runner import resolve  # noqa: E402
from pipeline.sources.factory import open_source as make_source  # noqa: E402
from pipeline.sources.base import Work  # noqa: E402

SLOW = {"batches": 16, "rows": 8, "cols": 4, "kernel": "faulty", "kernel.params.sleep": 0.2}
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


pytestmark = pytest.mark.ray_daemons  # the cluster lives for the module; tests check what they must


@pytest.fixture(scope="module")
def cluster():
    """A head that hosts no actor (0 CPUs) and worker nodes of 1 CPU each, all on this machine.

    Node death is noticed by GCS health checks; they are made quick here (0.5 s x 3) so that a killed
    node is declared dead within seconds, as a cluster's config would set them."""
    c = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
    try:
        yield c
    finally:
        c.shutdown()


def worker_nodes(c, k):
    """Make sure k worker nodes (1 CPU each) are alive; returns them."""
    alive = [n for n in c.worker_nodes if n.remaining_processes_alive()]
    while len(alive) < k:
        alive.append(c.add_node(num_cpus=1))
    return alive


def cfg_for(c, **kw):
    return resolve(None, {"workers": 2, "threads_per_worker": 1, "progress": False, "backend": "ray",
                          "ray_address": c.address, **SLOW, **kw})


def clean_checksum(**kw):
    return pipeline.run(workers=0, progress=False, threads_per_worker=1, **dict(SLOW, **kw)).summary["checksum"]


@pytest.mark.timeout(120)
def test_private_instance_listens_on_loopback_only(monkeypatch):
    """When the pipeline starts Ray itself, it starts its own (whatever RAY_ADDRESS says), every Ray
    process listens on 127.0.0.1 only, and there is no dashboard."""
    assert not ray.is_initialized()
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # a cluster this machine "belongs to": not joined
    cfg = resolve(None, {"workers": 1, "threads_per_worker": 1, "progress": False, "backend": "ray"})
    ex = RayExecutor(cfg, kernels.spec_for("sum", {}))
    try:
        ex.start()
        assert ex.owns_ray and ex.notes == []
        pids = {p.pid for p in psutil.Process().children(recursive=True)}
        listening = [(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name())
                     for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids]
        assert listening, "no Ray process found listening"
        assert all(ip in LOOPBACK for ip, _, _ in listening), listening
        # Ray's API-server process runs anyway, without the dashboard's modules and web UI
        assert ray._private.worker.get_dashboard_url() == "" and 8265 not in {p for _, p, _ in listening}
    finally:
        ex.close()
    assert not ray.is_initialized()


@pytest.mark.timeout(120)
def test_multi_node_run_spreads_actors_and_matches_local(cluster):
    """Two actors on a cluster of 1-CPU nodes run on two nodes; workers name them; checksum as local."""
    worker_nodes(cluster, 2)
    s = pipeline.run(workers=2, backend="ray", ray_address=cluster.address, progress=False,
                     threads_per_worker=1, **SLOW).summary
    assert s["checksum"] == clean_checksum()
    assert s["handoff"]["transport"] == "built by the actors" and s["handoff"]["put_bytes"] == 0
    nodes = {w["node"] for w in s["workers"] if w["batches"]}
    assert len(nodes) == 2 and nodes <= {n.node_id for n in cluster.worker_nodes}
    assert all(w["device"] == "cpu" and w["ip"] for w in s["workers"])


@pytest.mark.timeout(120)
def test_node_loss_resubmits_on_remaining_nodes(cluster):
    """A node killed mid-run: its batches finish on the remaining nodes, same checksum, cause names it."""
    nodes = worker_nodes(cluster, 3)
    cfg = cfg_for(cluster, batches=24)
    results, victim = {}, None
    with RayExecutor(cfg, kernels.spec_for("faulty", {"sleep": 0.2})) as ex:
        for o in ex.stream(Work.of(make_source(cfg.source))):
            results[o.index] = o.result
            if len(results) == 3:
                victim = o.info["node"]
                cluster.remove_node(next(n for n in nodes if n.node_id == victim), allow_graceful=False)
        info = ex.worker_info()
        restarts = ex.restarts
    assert checksum(results[i] for i in range(24)) == clean_checksum(batches=24)
    assert len(restarts) == 1 and restarts[0]["node"] == victim and restarts[0]["batch"] is None
    assert f"node {victim[:12]} went away" in restarts[0]["cause"]
    # the victim computed the batches yielded so far and at most what the run's window let it start before
    # the consumer took the third (how many exactly depends on the consumer's wake-up latency: a busy
    # machine holds more for reordering); the remaining nodes did the rest
    on_victim = sum(w["batches"] for w in info if w["node"] == victim)
    assert on_victim <= 3 + 2 * cfg.in_flight()
    assert sum(w["batches"] for w in info if w["node"] != victim) >= 24 - on_victim


@pytest.mark.timeout(120)
def test_losing_every_capable_node_fails_fast(cluster):
    """When no alive node can host the actors any more, the run ends with a WorkerError, not a hang."""
    nodes = worker_nodes(cluster, 2)
    cfg = cfg_for(cluster, batches=40)
    t0 = None
    with RayExecutor(cfg, kernels.spec_for("faulty", {"sleep": 0.2})) as ex:
        with pytest.raises(WorkerError, match="cannot be restarted: no alive node has what it needs"):
            for i, _ in enumerate(ex.stream(Work.of(make_source(cfg.source)))):
                if i == 2:
                    t0 = time.monotonic()
                    for n in nodes:
                        cluster.remove_node(n, allow_graceful=False)
    assert time.monotonic() - t0 < 30


@pytest.mark.timeout(120)
def test_cuda_on_a_cluster_without_gpus_is_a_config_error(cluster):
    """--device cuda on a GPU-less cluster fails at once (ConfigError naming its resources), never waits."""
    worker_nodes(cluster, 1)
    ex = RayExecutor(cfg_for(cluster, device="cuda"), kernels.spec_for("sum", {}))
    try:
        with pytest.raises(ConfigError, match=r"has no GPU \(\d+ alive node\(s\); CPU \d+, GPU 0"):
            ex.start()
        assert ex.actors == []
    finally:
        ex.close()


def manifest(d):
    with open(os.path.join(d, "manifest.jsonl")) as f:
        return {r["batch"]: r for r in map(json.loads, f)}


@pytest.mark.timeout(240)
def test_actors_build_npy_input_and_write_the_output(cluster, tmp_path):
    """.npy input on 2 nodes: the actors build (0 bytes put by the driver) and write the output dir (the same
    files and checksum as the local backend's); a killed actor's batch is built again elsewhere; a rerun
    resumes the actor-written directory, computing only the missing batches."""
    worker_nodes(cluster, 2)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((40, 6), dtype=np.float32))
    kw = dict(input=str(tmp_path / "x.npy"), rows=4, threads_per_worker=1, progress=False, keep_results=False)
    local = pipeline.run(workers=0, kernel="sum", output=str(tmp_path / "local"), **kw).summary
    ray_kw = dict(kw, workers=2, backend="ray", ray_address=cluster.address, output=str(tmp_path / "ray"),
                  kernel="faulty", **{"kernel.params.crash_on": [3]})  # faulty computes exactly like sum
    s = pipeline.run(**ray_kw).summary
    assert s["checksum"] == local["checksum"] and s["completed"] == 10 and s["failed"] == []
    assert s["handoff"]["put_bytes"] == 0 and s["handoff"]["written_by"] == "actors" and s["notes"] == []
    assert len(s["restarts"]) >= 1
    mine, theirs = manifest(tmp_path / "ray"), manifest(tmp_path / "local")
    assert sorted(mine) == list(range(10))
    assert [(r["file"], r["sha256"]) for _, r in sorted(mine.items())] == \
           [(r["file"], r["sha256"]) for _, r in sorted(theirs.items())]
    actor_pids = {w["pid"] for w in s["workers"]}
    assert {r["pid"] for r in mine.values()} <= actor_pids and os.getpid() not in actor_pids
    assert not [n for n in os.listdir(tmp_path / "ray") if n.startswith(".tmp-")]
    for i in (5, 7):
        os.unlink(tmp_path / "ray" / f"batch-{i:06d}.npy")
    s = pipeline.run(**ray_kw).summary
    assert s["skipped"] == 8 and s["checksum"] == local["checksum"]
    assert sum(w["batches"] for w in s["workers"]) == 2 and sorted(manifest(tmp_path / "ray")) == list(range(10))


@pytest.mark.timeout(120)
def test_input_only_on_the_drivers_machine_is_a_config_error(cluster, tmp_path):
    """Input the driver has (its map is open) but the actors' nodes don't: one-line ConfigError (exit 2)
    naming the path and the node, before any batch is built."""
    worker_nodes(cluster, 1)
    path = tmp_path / "only-here.npy"
    np.save(path, np.zeros((8, 4), np.float32))
    cfg = cfg_for(cluster, input=str(path), workers=1)
    src = make_source(cfg.source)
    src.batch(0)  # the driver's map is open
    os.unlink(path)  # from now on only the driver has it
    with RayExecutor(cfg, kernels.spec_for("sum", {})) as ex:
        with pytest.raises(ConfigError, match=rf"^--input {path}: not found on node [0-9.]+ \(Ray actor of "
                                              rf"worker 0\); every node .* --set run.ray_build=driver$"):
            next(iter(ex.stream(Work(iter(src), src))))
