"""Lesson 4: process ids: `os.getpid()` and `os.getppid()`.

Each child process gets its own, unique pid from the operating system, and
`os.getppid()` in a child returns the pid of the process that started it: both
children of one parent report the same ppid, the parent's pid. `Process.pid` in
the parent is the same number the child sees as `os.getpid()`.

The tutorial (section 4) says this, and it holds on Linux / Python 3.11.
"""

import multiprocessing
import os
import sys


def report_ids(name, queue):
    queue.put((name, os.getpid(), os.getppid()))


def main():
    print("Lesson 4: pids and parent pids")
    parent = os.getpid()
    print(f"  parent: pid {parent}, its own parent (the shell or test runner) {os.getppid()}")
    queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=report_ids, args=(name, queue)) for name in "AB"]
    for proc in procs:
        proc.start()
    reports = {}
    for _ in procs:
        name, pid, ppid = queue.get(timeout=20)
        reports[name] = (pid, ppid)
    for proc in procs:
        proc.join(timeout=20)

    failures = []
    for name, proc in zip("AB", procs):
        pid, ppid = reports[name]
        print(f"  child {name}: os.getpid() {pid}, os.getppid() {ppid}, Process.pid seen by parent {proc.pid}")
        if ppid != parent:
            failures.append(f"child {name}'s ppid {ppid} is not the parent's pid {parent}")
        if pid != proc.pid:
            failures.append(f"child {name} reports pid {pid}, parent sees {proc.pid}")
    pids = {pid for pid, _ in reports.values()}
    if len(pids) != 2 or parent in pids:
        failures.append(f"pids are not distinct: parent {parent}, children {sorted(pids)}")

    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print(f"OK: each child has its own pid ({', '.join(str(p) for p in sorted(pids))}) "
          f"and the parent's pid {parent} as ppid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
