"""Child processes: ONE lifecycle for workers and build processes alike.

  start    a pipe and a relay pipe per child; started deaf to SIGINT (``start_deaf``), under the thread
           cap, with no phantom ``__main__.__file__``; under forkserver the server preloads what the
           children import (torch), so each child forks from it in tens of milliseconds
  in it    ``child_setup``: fd 1 and 2 to the relay, SIGINT ignored, a watchdog thread that cleans up and
           exits once the main is gone; ``pipe_broke`` when its pipe to the main breaks
  ended    ``Children.died``: joined, its pipe closed, the cause named (``signal_name`` and ``likely``);
           a death before it was ready counts toward ``faults.max_attempts`` deaths in a row, and the last
           of those fails the run with one line (NOTE [ Restarts while starting ] in local/executor.py)
  close    ``Children.stop``: a polite None, a grace period, then SIGTERM, then SIGKILL

NOTE [ Shutdown ]
Children ignore SIGINT: Ctrl-C reaches the whole process group, and the main decides what happens (stop
handing out work, stop the children, clean up). A watchdog thread checks twice a second that the main is
alive, as PyTorch's DataLoader workers do; if it died (even by SIGKILL, which no ``daemon`` flag covers)
the child unlinks the main's shared-memory rings and exits, also when a kernel is stuck. A child whose
pipe to the main breaks does the same once the main is gone (a zombie counts: a SIGKILLed main is one
until its parent reaps it), whatever its own parent: under forkserver that is the server, not the main.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from .. import devices, outputs
from ..errors import WorkerError
from .ring import alive, remove_stale


@dataclass
class Child:
    rank: int
    process: object  # multiprocessing's Process
    conn: object  # the main's end of its duplex pipe
    pid: int | None = None
    ready: bool = False  # it said READY: set up
    started: float = 0.0  # when it was started (perf_counter): its start-up, in a trace


class Children:
    """The children of one kind (``kind``: "worker" or "build process"), started with ``target(rank, conn,
    out, main_pid, ring_dir, *args)`` as ``make(rank, process, conn)`` records."""

    def __init__(self, ctx, kind: str, name: str, target: Callable, relay, threads: int, ring_dir: str,
                 make: type = Child):
        self.ctx, self.kind, self.name, self.target = ctx, kind, name, target
        self.relay, self.threads, self.ring_dir, self.make = relay, threads, ring_dir, make
        self.failed_starts: dict[int, list[str]] = {}  # rank -> how its starts ended, in a row

    def start(self, rank: int, *args):
        parent, child = self.ctx.Pipe(duplex=True)
        out = self.relay.pipe()  # the child's stdout and stderr
        p = self.ctx.Process(target=self.target, name=f"pipeline-{self.name}-{rank}", daemon=True,
                             args=(rank, child, out, os.getpid(), self.ring_dir, *args))
        try:
            with devices.thread_env(self.threads), _no_phantom_main_file():
                start_deaf(self.ctx, p)
        finally:
            out.close()  # the child holds its own copy: the relay sees EOF when the child exits
        child.close()
        c = self.make(rank, p, parent)
        c.started = time.perf_counter()
        return c

    def came_up(self, c: Child) -> None:
        """``c`` said READY: its deaths while starting are forgiven."""
        c.ready = True
        self.failed_starts.pop(c.rank, None)

    def died(self, c: Child, limit: int) -> str:
        """``c`` is gone (or of no use: killed here): joined, its pipe closed; why it ended. A death before
        it was ready is the ``limit``-th in a row of its rank: WorkerError, one line with how each ended."""
        if c.process.is_alive():  # its pipe broke while it lives on
            c.process.kill()
        c.process.join()
        c.conn.close()
        cause = signal_name(c.process.exitcode) + likely(c.process.exitcode)
        if not c.ready:
            causes = self.failed_starts.setdefault(c.rank, [])
            causes.append(cause)
            if len(causes) >= limit:
                raise WorkerError(f"{self.kind} {c.rank} (pid {c.process.pid}) died while starting, "
                                  f"{len(causes)} times in a row (faults.max_attempts): {'; '.join(causes)}"
                                  f"{_start_hint(c.process.exitcode)}")
        return cause

    def stop(self, children: list, graceful: bool = True, grace: float = 2.0) -> None:
        """Stop ``children``: politely (None), then by force; nothing is left running."""
        for c in children:
            if graceful and c.process.is_alive():
                try:
                    c.conn.send(None)
                except OSError:
                    pass
        deadline = time.monotonic() + (grace if graceful else 0.0)
        for c in children:
            c.process.join(max(0.0, deadline - time.monotonic()))
        for c in children:
            if c.process.is_alive():
                c.process.terminate()
        for c in children:
            c.process.join(1.0)
            if c.process.is_alive():
                c.process.kill()
                c.process.join()
            c.conn.close()


def _start_hint(exitcode: int | None) -> str:
    main = sys.modules.get("__main__")
    if exitcode == 1 and getattr(main, "__file__", None) and not getattr(main, "__spec__", None):
        return (f"; its error is printed above. If it says 'bootstrapping phase', "
                f"{os.path.basename(main.__file__)} calls pipeline at import time: spawn re-imports "
                f"the main script in every child, so put the call under `if __name__ == \"__main__\":`")
    return "; its error, if any, is printed above"


def signal_name(exitcode: int | None) -> str:
    if exitcode is None:
        return "unknown"
    if exitcode < 0:
        try:
            return f"{signal.Signals(-exitcode).name}({exitcode})"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def likely(exitcode: int | None) -> str:
    """The likely cause of a child's end by a signal, as loky names it."""
    return {-9: " (killed: out of memory, or kill -9)", -11: " (segmentation fault in native code)",
            -6: " (aborted)"}.get(exitcode or 0, "")


# -- in the child -----------------------------------------------------------------------------------------
def child_setup(out, main_pid: int, ring_dir: str) -> None:
    """A child's first steps: fd 1 and 2 to the relay (NOTE [ Worker output ] in outputs.py), SIGINT
    ignored (it was born with SIGINT blocked: ``start_deaf``), the watchdog (NOTE [ Shutdown ])."""
    outputs.worker_stdio(out)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    threading.Thread(target=watchdog, args=(main_pid, ring_dir), daemon=True).start()


def watchdog(main_pid: int, ring_dir: str) -> None:
    """A child's thread: when the main is gone (even by SIGKILL), unlink its rings and exit."""
    ppid = os.getppid()
    while True:
        time.sleep(0.5)
        if os.getppid() != ppid or not alive(main_pid):
            remove_stale(ring_dir, dead=main_pid)  # ours, and any other dead main's
            os._exit(1)


def pipe_broke(main_pid: int, ring_dir: str, wait: float = 1.0) -> None:
    """A child's pipe to the main broke: if the main is gone, unlink its rings (and any other dead main's).
    Looked at for ``wait`` s: a dying process closes its pipes a moment before it is a zombie. The child's
    parent is no sign: a forkserver's workers are the server's children, and the server may outlive the
    main by a moment."""
    deadline = time.monotonic() + wait
    while alive(main_pid):
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)
    remove_stale(ring_dir, dead=main_pid)


# -- starting one ---------------------------------------------------------------------------------------------
@contextmanager
def _sigint_blocked():
    """Start children deaf to SIGINT, so that a Ctrl-C while a worker is still importing torch doesn't print
    its traceback: the main alone handles Ctrl-C (NOTE [ Shutdown ]). SIGINT is blocked (the mask survives
    fork and exec; works from any thread) and, from the main thread, also ignored (an ignored signal stays
    ignored across exec, and Python then installs no KeyboardInterrupt handler). The child ignores SIGINT
    itself, then unblocks it."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    handler = None
    if threading.current_thread() is threading.main_thread():
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        if handler is not None:
            signal.signal(signal.SIGINT, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start_deaf(ctx, p) -> None:
    """Start child ``p`` deaf to SIGINT (``_sigint_blocked``). Under forkserver only the server's own start
    is: a child's start waits until the server has imported what it preloads (torch: seconds, the first
    time), and a Ctrl-C meanwhile is the main's (ignored there, it was lost, and the run went on)."""
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver
        with _sigint_blocked():
            forkserver.ensure_running()
        p.start()
        return
    with _sigint_blocked():
        p.start()


@contextmanager
def _no_phantom_main_file():
    """Hide a ``__main__.__file__`` that is no file (``python -`` sets '<stdin>') while starting a child.

    Spawn re-runs the parent's main script in the child from ``__main__.__file__``; for '<stdin>' the child
    dies with FileNotFoundError before it gets to its entry point. Without ``__file__`` the child skips that
    step, as it does for notebooks and ``python -c``; kernels defined there travel by value anyway.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    phantom = path is not None and getattr(main, "__spec__", None) is None and not os.path.isfile(path)
    if phantom:
        del main.__file__
    try:
        yield
    finally:
        if phantom:
            main.__file__ = path
