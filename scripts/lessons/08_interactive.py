"""Lesson 8: functions defined in an interactive `__main__` under spawn.

A spawn child does not inherit the parent's memory: it gets the target function
by reference ("__main__.plan_b") and finds it by re-running the parent's main
script. With no script file to re-run, the child cannot find the function.

The tutorial (section 8) says that in an interactive session (a Jupyter
notebook, on Windows) the child "cannot find the function: B is not defined",
even with the `if __name__ == "__main__":` guard. On Linux / Python 3.11 the
truth is:
- with the spawn start method, from a real interactive session (the REPL, here
  `python -i` reading a pipe) the child fails with "AttributeError: Can't get
  attribute 'plan_b' on <module '__main__' (built-in)>" and exit code 1;
- code fed to `python -` fails differently: `__main__.__file__` is the string
  "<stdin>", so the spawn child tries to re-run a file named "<stdin>" in the
  working directory, and dies with FileNotFoundError before it even looks for
  the function (`python -c` behaves like the REPL: no `__file__`);
- with fork, Linux's default start method up to Python 3.13, the same REPL code
  works: the child is a copy of the parent and already holds the function.

The pipeline's fix: its workers are spawn children too, but a callable passed
as `kernel=` is sent by value (cloudpickle), so a function or closure defined in
`python -` or in the REPL reaches the workers, and its results match the
in-process reference (`workers=0`).
"""

import os
import re
import subprocess
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Written so that it runs the same in a script, `python -` and the REPL (a blank
# line after each top-level block, none inside a block).
STDLIB = textwrap.dedent("""
    import multiprocessing

    def plan_b(queue):
        queue.put("This is plan B!!!")

    if __name__ == "__main__":
        ctx = multiprocessing.get_context("{method}")
        queue = ctx.Queue()
        child = ctx.Process(target=plan_b, args=(queue,))
        child.start()
        child.join(30)
        got = queue.get(timeout=5) if child.exitcode == 0 else None
        print("RESULT", child.exitcode, repr(got), flush=True)

""")

PIPELINE = textwrap.dedent("""
    import numpy as np
    import pipeline

    def make_kernel(factor):
        def kernel(x):
            return x.sum(1) * factor
        return kernel

    if __name__ == "__main__":
        opts = dict(batches=4, rows=8, cols=4, progress=False, threads_per_worker=1)
        try:
            r = pipeline.run(kernel=make_kernel(2), workers=2, **opts)
            ref = pipeline.run(kernel="sum", workers=0, **opts)
            same = len(r.results) == len(ref.results) == 4 and all(np.allclose(a, 2 * b) for a, b in zip(r.results, ref.results))
            print("RESULT", "match" if same else "mismatch", len(r.results), flush=True)
        except Exception as exc:
            print("RESULT", "error", type(exc).__name__, " ".join(str(exc).split())[:300], flush=True)

""")

MODES = {"python -": ["-"], "REPL (python -i)": ["-q", "-i"]}


def feed(code, mode, cwd):
    """Run code fed on stdin to `python -` or the REPL; return (RESULT line, stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, *MODES[mode]], input=code, capture_output=True, text=True,
                          timeout=90, cwd=cwd, env=env)
    found = re.search(r"^RESULT (.*)$", proc.stdout, re.M)
    return (found.group(1) if found else f"no result (exit code {proc.returncode})",
            " ".join(proc.stderr.split()))


def main():
    print("Lesson 8: interactive __main__ and spawn")
    failures = []

    def check(ok, message):
        if not ok:
            failures.append(message)

    with tempfile.TemporaryDirectory() as tmp:
        result, err = feed(STDLIB.format(method="spawn"), "REPL (python -i)", tmp)
        attr = "AttributeError: Can't get attribute 'plan_b'" in err
        print(f"  REPL, spawn: child exit code / result {result}; child raised "
              f"\"AttributeError: Can't get attribute 'plan_b'\": {attr}")
        check(result.startswith("1 ") and attr, f"REPL spawn: expected exit code 1 and Can't get attribute; "
              f"got {result!r}, stderr {err[-300:]!r}")

        result, err = feed(STDLIB.format(method="spawn"), "python -", tmp)
        missing = "FileNotFoundError" in err and "<stdin>" in err
        print(f"  python -, spawn: child exit code / result {result}; child raised "
              f"FileNotFoundError for '<stdin>': {missing}")
        check(result.startswith("1 ") and missing, f"python - spawn: expected exit code 1 and FileNotFoundError "
              f"'<stdin>'; got {result!r}, stderr {err[-300:]!r}")

        result, err = feed(STDLIB.format(method="fork"), "REPL (python -i)", tmp)
        print(f"  REPL, fork: child exit code / result {result}")
        check(result == "0 'This is plan B!!!'", f"REPL fork: expected the child to run; got {result!r} {err[-300:]!r}")

        try:
            import pipeline  # noqa: F401  (only to say clearly why the rest cannot run)
        except ImportError:
            sys.path.insert(0, ROOT)
        try:
            import pipeline  # noqa: F401,F811
        except ImportError as exc:
            print(f"FAIL: the pipeline package cannot be imported ({exc}); its fix cannot be shown")
            return 1
        for mode in MODES:
            result, err = feed(PIPELINE, mode, tmp)
            print(f"  {mode}, pipeline.run(kernel=<closure from __main__>, workers=2) vs workers=0 * 2: {result}")
            hint = ""
            if "<stdin>" in err:
                hint = (" (its spawn workers try to re-run __main__.__file__ == '<stdin>' as a file; the "
                        "pipeline should hide a __main__.__file__ that is not a real file while it starts "
                        "workers, since kernels from __main__ travel by value anyway)")
            check(result == "match 4", f"pipeline from {mode}: {result}{hint}; stderr ends {err[-200:]!r}")

    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print("OK: spawn children cannot find functions from an interactive __main__ (REPL: Can't get attribute; "
          "python -: no file '<stdin>'); fork can; pipeline.run sends such kernels by value and they work")
    return 0


if __name__ == "__main__":
    sys.exit(main())
