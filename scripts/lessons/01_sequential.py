"""Lesson 1: one process runs its work one step after the other.

Two "plans", A and B, each try three times and sleep between tries. Called one
after the other in a single process, the total time is about the sum of the two
plans' times, and their output never interleaves: all of A, then all of B.

The tutorial (section 1) says this too, and it holds on Linux / Python 3.11.
(Its plans sleep 1 s per try; here 0.2 s, to keep the lesson fast.)
"""

import sys
import time

TRIES = 3
NAP = 0.2  # seconds per try


def plan(name, log):
    for i in range(TRIES):
        log.append(name)
        print(f"  plan {name}, try {i + 1}")
        time.sleep(NAP)


def main():
    print("Lesson 1: sequential plans in one process")
    log = []
    start = time.perf_counter()
    plan("A", log)
    plan("B", log)
    total = time.perf_counter() - start

    expected = 2 * TRIES * NAP
    print(f"total {total:.2f} s; sum of the plans' times {expected:.2f} s")
    print(f"order of tries: {''.join(log)}")

    failures = []
    if not expected * 0.95 <= total <= expected + 1.0:
        failures.append(f"total {total:.2f} s is not about the sum {expected:.2f} s")
    if log != ["A"] * TRIES + ["B"] * TRIES:
        failures.append(f"tries interleaved: {log}")
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print(f"OK: sequential plans take the sum of their times ({total:.2f} s ~ {expected:.2f} s), A before B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
