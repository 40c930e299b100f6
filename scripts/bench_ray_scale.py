"""Ray without a funnel, measured: driver-built vs actor-built Ray runs, and the local backend, at 2 workers.

A local 3-node ``ray.cluster_utils.Cluster`` on this machine (a head that hosts no actor, two 1-CPU worker
nodes). Two workloads: the 32 MB handoff one (``configs/bench-handoff.toml``: 8192 x 1024 float32, ``sum``,
fewer batches so that it finishes in a minute or two) and tiny synthetic batches (16 x 16, ``sum``), where
the driver's fixed cost per batch shows. For each run, on a Pipeline whose actors are already up (a warm-up
run first): the driver's CPU time per batch (``time.process_time`` of this process: every thread of it,
Ray's own included), the bytes the driver put into the object store per batch (batch data; the pickled
source, once per run, apart), throughput, and whether the checksum equals the local backend's. Writes one
JSON file (default ``docs/bench/ray_scale.json``) and prints it.

    python scripts/bench_ray_scale.py [--batches 48] [--small 2000] [--out docs/bench/ray_scale.json]
"""
import argparse
import datetime
import json
import os
import platform
import tempfile
import time

import pipeline

HANDOFF = dict(rows=8192, cols=1024, dtype="float32", kernel="sum", device="cpu")
SMALL = dict(rows=16, cols=16, dtype="float32", kernel="sum", device="cpu")
COMMON = dict(workers=2, threads_per_worker=1, progress=False)


def measure(p, label: str, batches: int, **call) -> dict:
    """One run on ``p`` (actors or workers already up): wall, driver CPU and bytes put, per batch."""
    t0, c0 = time.perf_counter(), time.process_time()
    s = p.run(batches=batches, keep_results=False, **call).summary
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    handoff = s["handoff"] or {}
    out = {"mode": label, "batches": batches, "wall_s": round(wall, 3), "batches_per_s": round(batches / wall, 2),
           "driver_cpu_ms_per_batch": round(cpu / batches * 1000, 3),
           "put_bytes_per_batch": round(handoff.get("put_bytes", 0) / batches, 1) if "put_bytes" in handoff else None,
           "source_bytes": handoff.get("source_bytes"), "transport": handoff.get("transport"),
           "written_by": handoff.get("written_by"), "restarts": len(s["restarts"]), "checksum": s["checksum"],
           "notes": s["notes"]}
    print(json.dumps(out), flush=True)
    return out


def workload(cluster, name: str, shape: dict, batches: int, output_too: bool) -> dict:
    runs = []
    with pipeline.Pipeline(**COMMON, **shape) as p:  # the local backend, the reference
        p.run(batches=4, keep_results=False)
        runs.append(measure(p, "local", batches))
    with pipeline.Pipeline(**COMMON, **shape, backend="ray", ray_address=cluster.address) as p:
        p.run(batches=4, keep_results=False)  # actors up and the run path warm
        p.run(batches=4, keep_results=False, ray_build="driver")
        runs.append(measure(p, "ray driver-built", batches, ray_build="driver"))
        runs.append(measure(p, "ray actor-built", batches))
        if output_too:
            with tempfile.TemporaryDirectory(dir=os.getcwd()) as d:  # a filesystem every node sees
                runs.append(measure(p, "ray actor-built, actors write --output", batches,
                                    output=os.path.join(d, "out")))
    by = {r["mode"]: r for r in runs}
    local, drv, act = by["local"], by["ray driver-built"], by["ray actor-built"]
    return {"workload": name, **shape, "runs": runs,
            "checksums_equal": len({r["checksum"] for r in runs}) == 1,
            "actor_vs_driver_built": round(act["batches_per_s"] / drv["batches_per_s"], 2),
            "actor_built_vs_local": round(act["batches_per_s"] / local["batches_per_s"], 2),
            "batches_per_s_one_driver_steers": round(1000 / act["driver_cpu_ms_per_batch"])
            if act["driver_cpu_ms_per_batch"] else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=48, help="32 MB batches per run (default 48)")
    ap.add_argument("--small", type=int, default=2000, help="16 x 16 batches per run (default 2000)")
    ap.add_argument("--out", default="docs/bench/ray_scale.json")
    a = ap.parse_args()
    import ray
    from ray import cluster_utils
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        handoff = workload(cluster, "handoff 32 MB", HANDOFF, a.batches, output_too=True)
        small = workload(cluster, "small 16x16", SMALL, a.small, output_too=False)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    act_h = {r["mode"]: r for r in handoff["runs"]}
    act_s = {r["mode"]: r for r in small["runs"]}["ray actor-built"]
    goals = {
        "actor_built_puts_0_batch_bytes": all(r["put_bytes_per_batch"] == 0 for w in (handoff, small)
                                              for r in w["runs"] if r["mode"].startswith("ray actor")),
        "driver_cpu_per_batch_le_1ms (small, actor-built)": act_s["driver_cpu_ms_per_batch"] <= 1.0,
        "actor_built_ge_2.5x_driver_built (handoff)": handoff["actor_vs_driver_built"] >= 2.5,
        "actor_built_ge_60pct_local (handoff)": handoff["actor_built_vs_local"] >= 0.6,
        "checksums_equal": handoff["checksums_equal"] and small["checksums_equal"],
    }
    report = {"what": "scripts/bench_ray_scale.py: Ray driver-built vs actor-built vs local backend, 2 workers, "
                      "local 3-node ray.cluster_utils.Cluster (head 0 CPUs + two 1-CPU nodes), one run each",
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "ray": ray.__version__},
              "workloads": [handoff, small], "goals": goals,
              "driver_cpu_ms_per_batch_actor_written_handoff":
                  act_h.get("ray actor-built, actors write --output", {}).get("driver_cpu_ms_per_batch")}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(json.dumps({"goals": goals, "handoff": {k: handoff[k] for k in ("actor_vs_driver_built", "actor_built_vs_local")},
                      "small_driver_cpu_ms": act_s["driver_cpu_ms_per_batch"]}))


if __name__ == "__main__":
    main()
