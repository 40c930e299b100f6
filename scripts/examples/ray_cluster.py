"""A Ray cluster on this machine: a head that hosts no worker and two worker nodes of 1 CPU each, so the
pipeline's two workers (Ray actors) run on two nodes; the results equal the local serial baseline's.

  python scripts/examples/ray_cluster.py

Needs the [ray] extra. `ray.cluster_utils.Cluster` starts and stops every process itself (nothing else on
the machine is touched). For the same recipe with the `ray` CLI, token authentication and a node killed
mid-run, see scripts/ray_cluster_demo.py and docs/ray.md.
"""
from ray import cluster_utils

import pipeline

JOB = dict(kernel="fft", batches=12, rows=128, cols=64, threads_per_worker=1, progress=False)

if __name__ == "__main__":
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        r = pipeline.run(backend="ray", ray_address=cluster.address, workers=2, **JOB)
    finally:
        cluster.shutdown()
    s = r.summary
    for w in s["workers"]:
        print(f"worker {w['rank']}: pid {w['pid']} on node {w['node'][:12]} ({w['ip']}), {w['batches']} batches")
    nodes = {w["node"] for w in s["workers"] if w["batches"]}
    serial = pipeline.run(workers=0, **JOB)
    assert len(nodes) == 2, f"two nodes expected, used {len(nodes)}"
    assert s["checksum"] == serial.summary["checksum"], "the Ray backend must give the serial baseline's results"
    print("OK: two nodes, the same checksum as workers=0")
