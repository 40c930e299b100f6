"""A Ray cluster of three nodes on this machine, through the `ray` CLI: run the pipeline on it, then kill
a node in the middle of a run. The recipe of docs/ray.md, runnable and checked.

  python scripts/ray_cluster_demo.py [--port 6391]

Token authentication is on (RAY_AUTH_MODE=token, a fresh RAY_AUTH_TOKEN for every process of the demo),
the head hosts no worker (0 CPUs) and each worker node offers 1 CPU, so two pipeline workers must run on
two nodes. Everything runs under its own --temp-dir, and only the processes that name it are stopped at
the end (`ray stop` would stop every Ray instance on the machine). Exits non-zero if a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

import psutil

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# GCS declares a silent node dead after period x threshold (default 3 s x 5); quicker here, as a cluster
# that wants node loss noticed fast would set it
HEALTH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def sh(cmd: list[str], env: dict, check: bool = True, **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env, check=check, text=True, capture_output=True, cwd=HERE, **kw)


def pipeline_run(address: str, env: dict, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "pipeline", "run", "--backend", "ray", "--ray-address", address,
           "--workers", "2", "--threads-per-worker", "1", "--no-progress", "--json", *extra]
    p = sh(cmd, env, check=False)
    if p.returncode not in (0, 3):
        sys.exit(f"pipeline run failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    return json.loads(p.stdout)


def raylets(temp_dir: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"]
            and p.info["cmdline"][0].endswith("raylet") and temp_dir in " ".join(p.info["cmdline"])]


def stop(temp_dir: str) -> None:
    """Stop this demo's Ray processes only: those whose command line names its temp dir."""
    mine = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    for p in mine:
        p.terminate()
    _, alive = psutil.wait_procs(mine, timeout=10)
    for p in alive:
        p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", default="6391", help="the head's GCS port")
    args = ap.parse_args()
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    temp_dir = tempfile.mkdtemp(prefix="ray-demo-")
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    address = f"127.0.0.1:{args.port}"
    try:
        sh([ray_cli, "start", "--head", "--port", args.port, "--node-ip-address", "127.0.0.1",
            "--num-cpus", "0", "--include-dashboard", "false", "--disable-usage-stats",
            "--temp-dir", temp_dir, "--system-config", json.dumps(HEALTH)], env)
        for _ in range(2):
            sh([ray_cli, "start", "--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1"],
               env)
        print(sh([ray_cli, "status", "--address", address], env).stdout, flush=True)

        s = pipeline_run(address, env, "--batches", "16", "--rows", "256", "--cols", "256")
        local = json.loads(sh([sys.executable, "-m", "pipeline", "run", "--workers", "0", "--batches", "16",
                               "--rows", "256", "--cols", "256", "--no-progress", "--json"], env).stdout)
        print("workers:", json.dumps(s["workers"], indent=1))
        nodes = {w["node"] for w in s["workers"] if w["batches"]}
        print(f"nodes used: {len(nodes)}; checksum equals the local backend's: "
              f"{s['checksum'] == local['checksum']}", flush=True)
        if len(nodes) < 2 or s["checksum"] != local["checksum"]:
            return 1

        # node loss: start a slow run, kill one worker node's raylet (SIGKILL) mid-run, add a spare node
        slow = ["--batches", "60", "--rows", "64", "--cols", "64", "--kernel", "faulty",
                "--param", "sleep=0.25"]
        cmd = [sys.executable, "-m", "pipeline", "run", "--backend", "ray", "--ray-address", address,
               "--workers", "2", "--threads-per-worker", "1", "--no-progress", "--json", *slow]
        print("$", " ".join(cmd), "  # and kill a node's raylet 8 s in", flush=True)
        t0 = time.monotonic()
        run = subprocess.Popen(cmd, env=env, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(8)
        victim = next(p for p in raylets(temp_dir) if "node:__internal_head__" not in " ".join(p.cmdline()))
        print(f"kill -9 {victim.pid}  # a worker node's raylet", flush=True)
        victim.kill()
        sh([ray_cli, "start", "--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1"], env)
        out, err = run.communicate(timeout=300)
        s = json.loads(out)
        clean = json.loads(sh([sys.executable, "-m", "pipeline", "run", "--workers", "0", "--no-progress",
                               "--json", *slow], env).stdout)
        print(f"exit {run.returncode} after {time.monotonic() - t0:.1f} s; restarts:",
              json.dumps(s["restarts"], indent=1))
        print("workers:", json.dumps(s["workers"], indent=1))
        print(f"checksum equals a clean run's: {s['checksum'] == clean['checksum']}")
        return 0 if s["checksum"] == clean["checksum"] and s["restarts"] else 1
    finally:
        stop(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
