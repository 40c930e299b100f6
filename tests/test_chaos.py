"""Chaos: workers killed at random, while they compute and while they start, change nothing but the time."""
import os
import random
import signal
import threading
import time

import psutil
import pytest

import pipeline
from conftest import ours, workers_of

RUN = dict(kernel="faulty", batches=480, rows=16, cols=8, progress=False, threads_per_worker=1,
           **{"kernel.params.sleep": 0.01})


class Killer(threading.Thread):
    """Every ``every`` seconds (jittered), SIGKILL one live worker at random, ``kills`` times at most."""

    def __init__(self, every: float, kills: int, seed: int, after: float = 0.0):
        super().__init__(daemon=True)
        self.every, self.left, self.rng, self.after = every, kills, random.Random(seed), after
        self.done = threading.Event()
        self.killed = 0

    def run(self):
        if self.done.wait(self.after):
            return
        while self.left and not self.done.wait(self.every * self.rng.uniform(0.5, 1.5)):
            victims = workers_of(os.getpid())  # (workers and build processes)
            if victims:
                try:
                    self.rng.choice(victims).send_signal(signal.SIGKILL)
                    self.killed += 1
                    self.left -= 1
                except psutil.NoSuchProcess:
                    pass


@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed, after, method", [(1, 0.0, "spawn"), (2, 3.0, "spawn"), (3, 0.0, "forkserver")])
def test_random_kills_every_third_of_a_second_change_nothing(seed, after, method):
    """A kill every ~0.3 s (ten in all) from the start, or once workers compute (their replacements are
    killed while starting too), under spawn and forkserver: the clean run's checksum, nothing failed,
    nothing left behind."""
    clean = pipeline.run(workers=0, **RUN).summary["checksum"]
    killer = Killer(every=0.3, kills=10, seed=seed, after=after)
    t0 = time.monotonic()
    killer.start()
    try:
        s = pipeline.run(workers=3, max_attempts=10, start_method=method, **RUN).summary
    finally:
        killer.done.set()
        killer.join()
    assert s["checksum"] == clean and s["failed"] == [] and s["completed"] == 480
    assert len(s["restarts"]) >= killer.killed - 1 >= 1  # (the last kill may hit a worker as the run ends)
    assert time.monotonic() - t0 < 150
    assert ours() == set()
