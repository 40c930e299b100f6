"""Lesson 3: passing arguments to a child: `args`, `kwargs`, and the one-element tuple.

`Process(target=f, args=(3, "Holmes"))` calls `f(3, "Holmes")` in the child;
`kwargs={"num": 3, "name": "Zhuge Liang"}` calls `f(num=3, name="Zhuge Liang")`.

The pitfall (tutorial section 3): `args=("abc")` is not a tuple, the brackets
only group, so it is the string "abc". The tutorial says "what is passed is then
not a tuple"; on Linux / Python 3.11 the truth is more precise: `Process` calls
`tuple(args)`, which turns the string into ('a', 'b', 'c'), so the child calls
`f('a', 'b', 'c')` and fails there with a TypeError (the parent only sees exit
code 1 and a traceback on stderr). A non-iterable such as `args=(3)` fails
earlier, in the parent, when the Process is created. The fix: `args=("abc",)`.
"""

import multiprocessing
import sys
import time


def plan(num, name, log):
    for _ in range(num):
        log.put(f"{name} runs plan A")
        time.sleep(0.01)


def greet(word):
    return f"hello {word}"


def echo(*args, **kwargs):
    return (args, kwargs)


class ReportingProcess(multiprocessing.Process):
    """A Process that sends its target's result or exception back through a pipe.

    The exception is re-raised after reporting, so the child still fails as a
    plain Process would: traceback on stderr and exit code 1.
    """

    def __init__(self, conn, **kwargs):
        super().__init__(**kwargs)
        self._conn = conn

    def run(self):
        try:
            result = self._target(*self._args, **self._kwargs)
        except BaseException as exc:
            self._conn.send(("error", f"{type(exc).__name__}: {exc}"))
            raise
        self._conn.send(("ok", result))


def run_reporting(target, **kwargs):
    """Run target in a child; return (exit code, what the child reported)."""
    receiver, sender = multiprocessing.Pipe(duplex=False)
    proc = ReportingProcess(sender, target=target, **kwargs)
    proc.start()
    sender.close()
    report = receiver.recv() if receiver.poll(20) else ("nothing", None)
    proc.join(timeout=20)
    return proc.exitcode, report


def main():
    print("Lesson 3: args, kwargs and the one-element tuple")
    failures = []

    def expect(what, actual, wanted):
        shown = "as expected" if actual == wanted else f"EXPECTED {wanted!r}"
        print(f"  {what}: {actual!r} ({shown})")
        if actual != wanted:
            failures.append(f"{what}: got {actual!r}, expected {wanted!r}")

    # args and kwargs, as in the tutorial.
    log = multiprocessing.Queue()
    a = multiprocessing.Process(target=plan, args=(2, "Holmes", log))
    b = multiprocessing.Process(target=plan, kwargs={"num": 2, "name": "Zhuge Liang", "log": log})
    a.start(), b.start()
    lines = sorted(log.get(timeout=20) for _ in range(4))
    a.join(timeout=20), b.join(timeout=20)
    expect("args=(2, 'Holmes', q) and kwargs={'num': 2, 'name': 'Zhuge Liang', ...} ran",
           lines, sorted(["Holmes runs plan A"] * 2 + ["Zhuge Liang runs plan A"] * 2))

    # The brackets alone do not make a tuple.
    expect('type of ("abc")', type(("abc")).__name__, "str")
    expect('type of ("abc",)', type(("abc",)).__name__, "tuple")

    # What the child receives with args=("abc"): three one-letter arguments.
    code, report = run_reporting(echo, args=("abc"))
    expect('args=("abc"): the child was called with', report, ("ok", (("a", "b", "c"), {})))

    # So a one-parameter target fails in the child (its traceback appears on stderr).
    print('  starting greet with args=("abc"); the child will print a traceback:', flush=True)
    code, report = run_reporting(greet, args=("abc"))
    expect('args=("abc"): child exit code', code, 1)
    expect('args=("abc"): child raised', report,
           ("error", "TypeError: greet() takes 1 positional argument but 3 were given"))

    # The fix: a trailing comma.
    code, report = run_reporting(greet, args=("abc",))
    expect('args=("abc",): child exit code', code, 0)
    expect('args=("abc",): child returned', report, ("ok", "hello abc"))

    # A non-iterable fails at once, in the parent.
    try:
        multiprocessing.Process(target=greet, args=(3))
        raised = None
    except TypeError as exc:
        raised = f"TypeError: {exc}"
    expect("Process(args=(3)) in the parent raised", raised,
           "TypeError: 'int' object is not iterable")

    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print('OK: args=("abc") passes three arguments (TypeError in the child, exit code 1); '
          'args=("abc",) passes one')
    return 0


if __name__ == "__main__":
    sys.exit(main())
