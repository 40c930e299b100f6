"""Lesson 5: the parent waits for its non-daemon children before it exits.

A script starts a child that writes a file after a delay, prints "plan A done"
and reaches its end at once. Its process does not end there: at interpreter
exit, multiprocessing's exit handler joins every non-daemon child, so the
script's process returns only after the child has written its file.

The tutorial (section 5) says this, and it holds on Linux / Python 3.11. The
truth adds one detail: the waiting is done by Python's exit handler
(`multiprocessing.util._exit_function`), not by the operating system. A parent
that ends with `os._exit()` skips that handler, returns at once, and leaves the
child running on as an orphan.
"""

import os
import subprocess
import sys
import tempfile
import textwrap
import time

DELAY = 0.8  # seconds the child sleeps before writing its file

SCRIPT = textwrap.dedent("""
    import multiprocessing, os, sys, time

    def plan_b(path, delay):
        time.sleep(delay)
        with open(path, "w") as f:
            f.write(str(os.getpid()))

    if __name__ == "__main__":
        child = multiprocessing.Process(target=plan_b, args=(sys.argv[1], {delay}))
        child.start()
        print("plan A done", flush=True)
        if sys.argv[2] == "os._exit":
            os._exit(0)
        # the end of the script: the exit handler joins the child
""").format(delay=DELAY)


def run_parent(tmp, how):
    script = os.path.join(tmp, "parent.py")
    marker = os.path.join(tmp, f"child-{how}.txt")
    with open(script, "w") as f:
        f.write(SCRIPT)
    # stdout to a file, not a pipe: an orphaned child would hold a pipe open.
    with open(os.path.join(tmp, f"out-{how}.txt"), "w+") as out:
        start = time.monotonic()
        proc = subprocess.run([sys.executable, script, marker, how], stdout=out,
                              stderr=subprocess.STDOUT, timeout=30)
        elapsed = time.monotonic() - start
        existed = os.path.exists(marker)
        out.seek(0)
        output = out.read().strip()
    return proc.returncode, elapsed, existed, output, marker


def main():
    print("Lesson 5: the parent waits for non-daemon children")
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        code, elapsed, existed, output, _ = run_parent(tmp, "normal")
        print(f"  normal end: parent printed {output!r}, returned {code} after {elapsed:.2f} s; "
              f"child's file there on return: {existed}")
        if code != 0 or output != "plan A done":
            failures.append(f"parent script failed: exit code {code}, output {output!r}")
        if not existed:
            failures.append("the parent returned before its child wrote the file")
        if elapsed < DELAY:
            failures.append(f"parent returned after {elapsed:.2f} s, before the child's {DELAY} s delay")

        code, elapsed, existed, output, marker = run_parent(tmp, "os._exit")
        print(f"  os._exit(0): parent returned {code} after {elapsed:.2f} s; "
              f"child's file there on return: {existed}")
        if existed:
            failures.append("os._exit did not skip the wait for the child")
        deadline = time.monotonic() + 20
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)  # the orphan finishes on its own
        orphan_done = os.path.exists(marker)
        time.sleep(0.05)  # let it finish writing and exit before the tempdir goes
        print(f"  ...the orphaned child still wrote its file afterwards: {orphan_done}")
        if not orphan_done:
            failures.append("the orphaned child never wrote its file")

    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print(f"OK: the parent's interpreter waited {DELAY} s for its non-daemon child "
          "(and os._exit skips that wait)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
