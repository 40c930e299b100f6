"""Lesson 6: daemon children are terminated when the parent exits.

`proc.daemon = True` before `start()` makes a child that the parent does not
wait for: at interpreter exit, multiprocessing's exit handler terminates
(SIGTERM) every daemon child that is still running, then reaps it.

The tutorial (section 6) says that a daemon "needs time.sleep() to run": with
every sleep commented out, its daemon never printed anything, and it concludes
that sleep gives the daemon the "power" to run by switching processes. On
Linux / Python 3.11 the truth is: the sleep in the parent only keeps the parent
alive. Without it the parent reaches its end at once, and its exit handler
kills the daemon before the child gets to do (almost) any work. A daemon with
no sleep at all runs to the end when the parent lives long enough, e.g. joins
it. With every sleep removed, whether the daemon gets anything done is a race
against the parent's exit, which the parent usually wins.
"""

import os
import subprocess
import sys
import tempfile
import textwrap
import time

TRIES = 10

SCRIPT = textwrap.dedent("""
    import multiprocessing, sys, time

    def plan_b(path, nap):
        with open(path, "a") as f:
            for i in range({tries}):
                f.write(f"plan B try {{i}}\\n")
                f.flush()
                time.sleep(nap)

    if __name__ == "__main__":
        path, child_nap, parent_nap, join = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
        child = multiprocessing.Process(target=plan_b, args=(path, child_nap))
        child.daemon = True
        child.start()
        print(child.pid, flush=True)
        if parent_nap:
            time.sleep(parent_nap)
        if join == "join":
            child.join()
        # the end: the exit handler terminates the daemon if it still runs
""").format(tries=TRIES)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run_case(tmp, name, child_nap, parent_nap, join=False):
    """Run the parent script; return (tries the daemon did, child alive on return, seconds)."""
    script = os.path.join(tmp, "parent.py")
    marker = os.path.join(tmp, f"{name}.txt")
    if not os.path.exists(script):
        with open(script, "w") as f:
            f.write(SCRIPT)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, script, marker, str(child_nap), str(parent_nap), "join" if join else "-"],
        capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"parent script failed ({proc.returncode}): {proc.stderr}")
    child_pid = int(proc.stdout.split()[0])
    alive = pid_alive(child_pid)
    tries = 0
    if os.path.exists(marker):
        with open(marker) as f:
            tries = len(f.read().splitlines())
    return tries, alive, elapsed


def main():
    print("Lesson 6: daemon children die with the parent")
    failures = []

    def check(ok, message):
        if not ok:
            failures.append(message)

    with tempfile.TemporaryDirectory() as tmp:
        # 1. The tutorial's program: the daemon naps 0.1 s per try, the parent sleeps 0.35 s.
        tries, alive, secs = run_case(tmp, "tutorial", 0.1, 0.35)
        print(f"  parent sleeps 0.35 s: the daemon did {tries} of {TRIES} tries; "
              f"still alive when the parent returned ({secs:.2f} s): {alive}")
        check(1 <= tries < TRIES, f"with the parent's sleep the daemon did {tries} tries, expected 1..{TRIES - 1}")
        check(not alive, "the daemon outlived its parent")

        # 2. No sleep in the parent: it exits at once and kills the daemon.
        tries, alive, secs = run_case(tmp, "no_parent_sleep", 0.2, 0)
        print(f"  parent does not sleep: the daemon did {tries} of {TRIES} tries; "
              f"still alive when the parent returned ({secs:.2f} s): {alive}")
        check(tries <= 1, f"without the parent's sleep the daemon still did {tries} tries")
        check(not alive, "the daemon outlived its parent")

        # 3. No sleep anywhere, but the parent joins: the daemon does all its work.
        tries, alive, secs = run_case(tmp, "join", 0, 0, join=True)
        print(f"  no sleep at all, parent joins the daemon: the daemon did {tries} of {TRIES} tries")
        check(tries == TRIES, f"a joined daemon did only {tries} of {TRIES} tries")

        # 4. The tutorial's experiment, every sleep removed: a race with the parent's exit.
        results = [run_case(tmp, f"race{i}", 0, 0)[0] for i in range(5)]
        nothing = sum(1 for n in results if n == 0)
        print(f"  no sleep at all, no join, 5 runs: tries done {results}; "
              f"killed before doing anything in {nothing} of 5 runs (a race, not a rule)")
        check(all(0 <= n <= TRIES for n in results), f"impossible try counts {results}")

    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print("OK: a daemon is terminated when its parent exits; it needs a living parent, not sleep")
    return 0


if __name__ == "__main__":
    sys.exit(main())
