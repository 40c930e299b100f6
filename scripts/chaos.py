"""The chaos run of docs/faults.md: 5,000 batches of ``faulty`` (sleep=0.02), 3 workers, a SIGKILL to a
random worker every 0.5-1.5 s; a clean run and a run under the kills, for spawn and for forkserver.

    python scripts/chaos.py            # about 5 minutes on 2 cores (needs psutil: the [test] extra)
"""
import os
import random
import signal
import threading
import time

import psutil

import pipeline

RUN = dict(kernel="faulty", batches=5000, rows=16, cols=8, progress=False, threads_per_worker=1,
           **{"kernel.params.sleep": 0.02})


def victims() -> list:
    """Live workers: spawn's children, or the forkserver's (its own command line, our grandchildren)."""
    me, out = os.getpid(), []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if "multiprocessing.spawn" in cmd or ("multiprocessing.forkserver" in cmd and p.ppid() != me):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def killer(stop: threading.Event, every: float, rng: random.Random, count: list) -> None:
    while not stop.wait(every * rng.uniform(0.5, 1.5)):
        v = victims()
        if v:
            try:
                rng.choice(v).send_signal(signal.SIGKILL)
                count[0] += 1
            except psutil.NoSuchProcess:
                pass


if __name__ == "__main__":
    for method in ("spawn", "forkserver"):
        t = time.perf_counter()
        clean = pipeline.run(workers=3, start_method=method, **RUN).summary
        tc = time.perf_counter() - t
        stop, count = threading.Event(), [0]
        th = threading.Thread(target=killer, args=(stop, 1.0, random.Random(1), count), daemon=True)
        t = time.perf_counter()
        th.start()
        try:
            s = pipeline.run(workers=3, start_method=method, max_attempts=10, **RUN).summary
        finally:
            stop.set()
            th.join()
        tk = time.perf_counter() - t
        print(f"{method}: clean {tc:.1f} s ({clean['batches_per_s']:.1f}/s); chaos {tk:.1f} s ({s['batches_per_s']:.1f}/s, "
              f"{s['batches_per_s'] / clean['batches_per_s']:.0%} of clean), kills {count[0]}, restarts {len(s['restarts'])}, "
              f"failed {len(s['failed'])}, checksum equal {s['checksum'] == clean['checksum']}", flush=True)
