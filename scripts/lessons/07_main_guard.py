"""Lesson 7: start methods, and why `if __name__ == "__main__":` matters.

`fork` copies the parent process; `spawn` starts a fresh interpreter that
imports the parent's main module (as `__mp_main__`) and unpickles the target;
`forkserver` forks children from a server process and prepares them like spawn.
So under spawn and forkserver, code at the top level of the main script runs
again in every child, and a script that starts a process at import time,
without the guard, makes each child try to start a process while it is still
bootstrapping.

The tutorial (section 7) says this is a Windows problem, that without the guard
the children would start children "in an endless loop until the computer
crashes", and that Linux uses fork. On Linux / Python 3.11 the truth is: the
problem belongs to the start method, not to Windows: with spawn or forkserver
the same script fails on Linux too. There is no endless loop: the child stops
at once with "RuntimeError: An attempt has been made to start a new process
before the current process has finished its bootstrapping phase" and exit code
1, while the parent carries on (the script can even exit 0). Fork is Linux's
default up to Python 3.13 only: 3.14 makes forkserver the default, and macOS
has defaulted to spawn since 3.8 (the tutorial used 3.7). The guard is needed
wherever the start method is not fork, which is why the pipeline (spawn) needs
it everywhere.
"""

import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import textwrap

BOOTSTRAP = ("An attempt has been made to start a new process before the "
             "current process has finished its bootstrapping phase")

NO_GUARD = textwrap.dedent("""
    import multiprocessing, sys

    def plan_a():
        print("plan A ran in the child", flush=True)

    ctx = multiprocessing.get_context(sys.argv[1])
    child = ctx.Process(target=plan_a)
    child.start()
    child.join(20)
    print("parent: child exit code", child.exitcode, flush=True)
""")

WITH_GUARD = textwrap.dedent("""
    import multiprocessing, sys

    def plan_a():
        print("plan A ran in the child", flush=True)

    if __name__ == "__main__":
        ctx = multiprocessing.get_context(sys.argv[1])
        child = ctx.Process(target=plan_a)
        child.start()
        child.join(20)
        print("parent: child exit code", child.exitcode, flush=True)
""")

# The tutorial's fork/spawn table, one probe per row.
TABLE_PROBE = textwrap.dedent("""
    import multiprocessing, os, sys

    with open(sys.argv[2], "a") as f:          # row 1: who runs the module's top level
        f.write(f"{os.getpid()}\\n")
    DATA = [1, 2, 3]

    def report(queue):                          # row 2: the id of a module-level object
        DATA.append(4)
        queue.put(("report", id(DATA), len(DATA)))

    def call_guarded(queue):                    # row 3: a name defined under the guard
        queue.put(("guarded", plan_c()))

    if __name__ == "__main__":
        def plan_c():
            return "plan C found"

        ctx = multiprocessing.get_context(sys.argv[1])
        queue = ctx.Queue()
        p = ctx.Process(target=report, args=(queue,)); p.start(); p.join(20)
        _, child_id, child_len = queue.get(timeout=20)
        print("same_id", child_id == id(DATA))
        print("parent_len", len(DATA), "child_len", child_len)
        p = ctx.Process(target=plan_c); p.start(); p.join(20)
        print("guarded_target_exitcode", p.exitcode)
""")


def run_script(tmp, name, text, *args):
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(text)
    proc = subprocess.run([sys.executable, path, *args], capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, " ".join(proc.stderr.split())


def main():
    print("Lesson 7: start methods and the __main__ guard")
    failures = []

    def check(ok, message):
        if not ok:
            failures.append(message)
        return ok

    # The start-method table, by OS.
    here = {"linux": "Linux", "darwin": "macOS", "win32": "Windows"}.get(sys.platform, sys.platform)
    v = sys.version_info[:2]
    expected = {
        "Linux": (["fork", "spawn", "forkserver"], "forkserver" if v >= (3, 14) else "fork"),
        "macOS": (["spawn", "fork", "forkserver"], "spawn" if v >= (3, 8) else "fork"),
        "Windows": (["spawn"], "spawn"),
    }
    methods = multiprocessing.get_all_start_methods()
    default = multiprocessing.get_start_method()
    print(f"  start methods by OS (Python {v[0]}.{v[1]}):")
    print(f"  {'OS':8} {'methods':26} {'default':40} checked")
    notes = {"Linux": "fork up to 3.13, forkserver from 3.14",
             "macOS": "spawn since 3.8 (fork before)",
             "Windows": "spawn (the only one)"}
    for os_name, (want_methods, want_default) in expected.items():
        if os_name == here:
            ok = check(sorted(methods) == sorted(want_methods) and default == want_default,
                       f"{os_name}: methods {methods}, default {default}; expected "
                       f"{want_methods}, {want_default}")
            mark = f"here: {methods}, default {default!r} -> {'yes' if ok else 'NO'}"
        else:
            mark = "not here (from the docs)"
        print(f"  {os_name:8} {', '.join(want_methods):26} {notes[os_name]:40} {mark}")

    with tempfile.TemporaryDirectory() as tmp:
        # The guard: every start method available here, without and with it.
        print("  a script that starts a process at import time:")
        for method in methods:
            code, out, err = run_script(tmp, "no_guard.py", NO_GUARD, method)
            ran = "plan A ran in the child" in out
            child_code = re.search(r"child exit code (-?\d+|None)", out)
            child_code = child_code.group(1) if child_code else "?"
            bootstrap = BOOTSTRAP in err
            print(f"    {method:10} no guard:   child ran plan A: {ran!s:5}  child exit code {child_code:>2}  "
                  f"bootstrapping RuntimeError: {bootstrap!s:5} script exit code {code}")
            if method == "fork":
                check(ran and child_code == "0" and not bootstrap,
                      f"fork without the guard: child ran {ran}, exit code {child_code}, error {bootstrap}")
            else:
                check(not ran and child_code == "1" and bootstrap and "RuntimeError" in err,
                      f"{method} without the guard: expected the bootstrapping RuntimeError in the "
                      f"child; got child ran {ran}, exit code {child_code}, stderr {err[-300:]!r}")
            code, out, err = run_script(tmp, "with_guard.py", WITH_GUARD, method)
            ran = "plan A ran in the child" in out and "child exit code 0" in out
            print(f"    {method:10} with guard: child ran plan A: {ran!s:5}  script exit code {code}")
            check(ran and code == 0, f"{method} with the guard failed: {out!r} {err[-300:]!r}")

        # The tutorial's fork/spawn table, checked row by row.
        print("  the tutorial's table (fork | spawn), checked here:")
        rows = {}
        for method in ("fork", "spawn"):
            imports = os.path.join(tmp, f"imports-{method}.txt")
            code, out, err = run_script(tmp, "table.py", TABLE_PROBE, method, imports)
            with open(imports) as f:
                runs = len(f.read().split())
            fields = dict(re.findall(r"(\w+) (\S+)", out))
            rows[method] = {
                "imports": runs > 1,
                "same_id": fields.get("same_id") == "True",
                "guarded": fields.get("guarded_target_exitcode") == "0",
                "copied": fields.get("parent_len") == "3" and fields.get("child_len") == "4",
                "guard_error": "Can't get attribute 'plan_c'" in err,
            }
        f, s = rows["fork"], rows["spawn"]
        yn = {True: "YES", False: "NO"}
        print(f"    child imports the main module at start:        fork {yn[f['imports']]:3} | spawn {yn[s['imports']]}")
        print(f"    a variable's id() is the same as in the parent: fork {yn[f['same_id']]:3} | spawn {yn[s['same_id']]}")
        why = " (AttributeError: Can't get attribute)" if s["guard_error"] else ""
        print(f"    child can use names defined under the guard:    fork {yn[f['guarded']]:3} | spawn {yn[s['guarded']]}{why}")
        print(f"    (both: the child's change to that variable is not seen by the parent: "
              f"fork {yn[f['copied']]} | spawn {yn[s['copied']]})")
        check(not f["imports"] and s["imports"], f"row 1 (import at start) wrong: {rows}")
        check(f["same_id"] and not s["same_id"], f"row 2 (same id) wrong: {rows}")
        check(f["guarded"] and not s["guarded"] and s["guard_error"], f"row 3 (guarded names) wrong: {rows}")
        check(f["copied"] and s["copied"], f"children share the parent's variable: {rows}")

    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print(f"OK: without the guard spawn/forkserver children fail with the bootstrapping RuntimeError "
          f"(fork does not); default start method here {default!r}; the tutorial's table holds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
