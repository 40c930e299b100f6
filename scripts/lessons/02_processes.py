"""Lesson 2: two processes started together run at the same time.

Plans A and B each run in their own `multiprocessing.Process`. Both are started,
then joined: the total is about the longer plan's time, not the sum.

The tutorial (section 2) says that `time.sleep()` is what "switches" from one
child process to the other, like threads taking turns. On Linux / Python 3.11
the truth is that child processes are independent OS processes, scheduled
preemptively (and in parallel, given several cores): they do not need to sleep
to let each other run. This lesson shows it with two busy plans that never
sleep: their running times still overlap. (The tutorial also never calls
`join()`; here the parent joins both children, which is how it waits for them.)
"""

import multiprocessing
import os
import sys
import time

TRIES = 3
NAP = 0.2  # seconds per try


def sleepy_plan(name, nap, queue):
    for _ in range(TRIES):
        queue.put((name, time.monotonic()))
        time.sleep(nap)


def busy_plan(name, seconds, queue):
    """Spin the CPU, never sleeping; report start and end times."""
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds:
        n += 1
    queue.put((name, start, time.monotonic(), n))


def run_pair(target, args_a, args_b, expected_items):
    queue = multiprocessing.Queue()
    a = multiprocessing.Process(target=target, args=("A", *args_a, queue))
    b = multiprocessing.Process(target=target, args=("B", *args_b, queue))
    start = time.monotonic()
    a.start()
    b.start()
    a.join(timeout=30)
    b.join(timeout=30)
    total = time.monotonic() - start
    items = []
    try:
        for _ in range(expected_items):
            items.append(queue.get(timeout=5))
    except Exception:  # queue.Empty: a child died; reported through its exit code
        pass
    return total, items, (a.exitcode, b.exitcode)


def main():
    print("Lesson 2: two processes started together")
    failures = []

    # Part 1: the tutorial's sleeping plans, B twice as long as A.
    total, items, codes = run_pair(sleepy_plan, (NAP,), (2 * NAP,), 2 * TRIES)
    longest, summed = TRIES * 2 * NAP, TRIES * 3 * NAP
    order = "".join(name for name, _ in sorted(items, key=lambda it: it[1]))
    print(f"sleeping plans: total {total:.2f} s; longest plan {longest:.2f} s; sum {summed:.2f} s")
    print(f"order of tries (by time): {order}")
    if codes != (0, 0):
        failures.append(f"children exit codes {codes}")
    if not longest * 0.95 <= total < summed * 0.9:
        failures.append(f"total {total:.2f} s is not about the longest plan ({longest:.2f} s)")
    if order.startswith("AAA") or order.startswith("BBB"):
        failures.append(f"tries did not interleave: {order}")

    # Part 2: busy plans that never sleep still run at the same time.
    busy = 0.3
    total, items, codes = run_pair(busy_plan, (busy,), (busy,), 2)
    spans = {name: (start, end) for name, start, end, _ in items}
    print(f"busy plans (no sleep): total {total:.2f} s for two plans of {busy:.2f} s each "
          f"(CPUs available: {len(os.sched_getaffinity(0))})")
    if codes != (0, 0) or set(spans) != {"A", "B"}:
        failures.append(f"busy children failed: exit codes {codes}, reports {sorted(spans)}")
    else:
        (a0, a1), (b0, b1) = spans["A"], spans["B"]
        overlap = min(a1, b1) - max(a0, b0)
        print(f"their running times overlap by {overlap:.2f} s: no sleep needed to 'switch'")
        if overlap <= 0:
            failures.append("busy plans did not overlap in time")

    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print("OK: two processes run concurrently (total ~ the longest plan, not the sum), "
          "with or without sleep")
    return 0


if __name__ == "__main__":
    sys.exit(main())
