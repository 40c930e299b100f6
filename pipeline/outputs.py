"""What a kernel returns, and where a worker's prints go.

The kernel contract (docs/kernels.md):

  a kernel gets      one batch as a torch tensor on its worker's device
  it may return      a tensor or numpy array of a numeric or bool dtype (a Python or numpy number becomes a
                     0-d array), or a tuple or a dict (str keys) of those: several outputs
  the worker hands   numpy arrays on the host, detached, never a view of the batch's slot; bfloat16 and
  back               float8 become float32, complex32 complex64 (numpy has none of them)
  anything else      None, a string, a list, an object array, a nested structure: ``KernelError`` naming the
                     batch, the kernel, what it returned and what it should return; ``faults.on_error``
                     applies as for any kernel exception

``host_result`` applies it (in ``worker.Computer``, so workers, the serial baseline, Ray actors and the
bench's peers all agree); ``checksum``, ``max_rel_diff`` and ``nbytes`` work on results of any shape.

NOTE [ Worker output ]
stdout belongs to the summary (``run --json`` prints one JSON object there). Each local worker's fd 1 and
fd 2 are a pipe of its own (``worker_stdio``; one per worker, so lines never mix mid-line), whose read end
a ``Relay`` thread in the main owns: it copies whole lines to the main's stderr, through ``tqdm.write``
while a progress bar is shown so that the bar stays whole. Native code and libraries writing to fd 1 are
caught too, since the redirection is at the file-descriptor level. The main closes its copy of a write end
as soon as the worker has started, so the pipe ends (EOF) when the worker does; the executor's ``close``
joins the workers and then the relay, which reads every pipe to its end first, so a dying worker's last
words are printed before ``close`` returns. A worker writes a batch's lines before it sends the result, so
the runner's ``Relay.drain()`` (a non-blocking read of every pipe, before the bar counts a result) puts
them above that batch's tick, whichever thread gets there first. In the main,
``stdout_to_stderr`` does the same for the serial baseline and anything else (the CLI's ``run``).
Warnings: ``warnings_once`` shows each (category, file, line) once, whatever its text, so a warning a
kernel raises on every batch is shown once per worker.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import sys
import threading
import warnings
from typing import Any

import numpy as np

from .errors import KernelError

SHOULD = ("a kernel must return a tensor or numpy array of a numeric or bool dtype (or a Python number), "
          "or a tuple or dict (str keys) of those")
_NUMERIC = "biufc"  # bool, int, uint, float, complex


# -- the contract ----------------------------------------------------------------------------------------
def host_result(y: Any, *, where: str, avoid: list | None = None):
    """``y`` as numpy on the host (an array, a tuple or a dict of arrays), or KernelError naming ``where``.

    ``avoid``: the batch's input arrays (its fields, in a reused slot): a result sharing their memory is
    copied.
    """
    if isinstance(y, tuple):
        if not y:
            raise _bad(where, "an empty tuple")
        return tuple(_one(v, where, avoid, f"a tuple whose item {i} is ") for i, v in enumerate(y))
    if isinstance(y, dict):
        if not y:
            raise _bad(where, "an empty dict")
        out = {}
        for k, v in y.items():
            if not isinstance(k, str) or not k:
                raise _bad(where, f"a dict with key {_short(k)} ({type(k).__name__}); keys must be "
                                  f"non-empty strings")
            out[k] = _one(v, where, avoid, f"a dict whose {k!r} is ")
        return out
    return _one(y, where, avoid, "")


def _one(v: Any, where: str, avoid, prefix: str) -> np.ndarray:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(v, torch.Tensor):
        a = _from_tensor(torch, v, where, prefix)
    elif isinstance(v, np.ndarray):
        a = np.asarray(v)  # subclasses (memmap, matrix, masked) become plain arrays
    elif isinstance(v, (bool, int, float, complex, np.generic)):
        a = np.asarray(v)
    else:
        raise _bad(where, prefix + _describe(v))
    if a.dtype.kind not in _NUMERIC:
        label = "a numpy array" if isinstance(v, np.ndarray) else type(v).__name__
        raise _bad(where, f"{prefix}{label} of dtype {a.dtype} ({_short(v)})")
    for b in avoid or ():  # the slot is reused for another batch
        if np.may_share_memory(a, b):
            return a.copy()
    return a


def _from_tensor(torch, t, where: str, prefix: str) -> np.ndarray:
    t = t.detach()
    if t.is_cpu and t.layout == torch.strided and t.dtype not in _widened(torch) and t.dtype != torch.complex32:
        try:  # (the usual case, first: a tiny batch's budget)
            return t.resolve_conj().resolve_neg().numpy()
        except (TypeError, RuntimeError):
            pass  # (numpy can't hold it: the message below)
    if t.device.type == "meta":
        raise _bad(where, f"{prefix}a tensor on device meta (it holds no data)")
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.dtype in _widened(torch):
        t = t.float()
    elif t.dtype == torch.complex32:
        t = t.to(torch.complex64)
    try:
        return t.cpu().resolve_conj().resolve_neg().numpy()
    except (TypeError, RuntimeError) as e:  # quantized and other tensors numpy cannot hold
        raise _bad(where, f"{prefix}a tensor of dtype {t.dtype} that numpy cannot hold ({e})") from None


_WIDEN: tuple = ()


def _widened(torch) -> tuple:
    """Torch dtypes numpy has no match for, computed once: bfloat16 and the float8 types."""
    global _WIDEN
    if not _WIDEN:
        _WIDEN = (torch.bfloat16, *(getattr(torch, n) for n in dir(torch) if n.startswith("float8_")))
    return _WIDEN


def _describe(v: Any) -> str:
    if v is None:
        return "None (did the kernel forget `return`?)"
    if isinstance(v, (tuple, dict)):
        return f"a nested {type(v).__name__} ({_short(v)}); structures hold arrays only"
    if isinstance(v, list):
        return (f"a list of {len(v)} item(s) ({_short(v)}); return a tuple for several outputs, or stack "
                f"them into one tensor")
    return f"{type(v).__name__} {_short(v)}"


def _short(v: Any, limit: int = 60) -> str:
    try:
        r = repr(v)
    except Exception:  # noqa: BLE001 - a repr that fails must not hide the real error
        r = f"<{type(v).__name__}>"
    r = " ".join(r.split())
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _bad(where: str, what: str) -> KernelError:
    e = KernelError(f"{where}: returned {what}; {SHOULD}")
    e.bad_return = True  # a batch's failure, not a usage error (exit 1, not 2); survives pickling
    return e


# -- results of any shape ----------------------------------------------------------------------------------
def arrays(result) -> list[tuple[str, np.ndarray]]:
    """(key, array) pairs of one result: ``""`` for a single array, ``"0"``, ``"1"``... for a tuple."""
    if isinstance(result, dict):
        return list(result.items())
    if isinstance(result, tuple):
        return [(str(i), a) for i, a in enumerate(result)]
    return [("", result)]


def nbytes(result) -> int:
    """Bytes held by one result (0 for a failed batch)."""
    return 0 if result is None else sum(np.asarray(a).nbytes for _, a in arrays(result))


def _hash_array(h, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape};".encode())
    h.update(a.reshape(-1).view(np.uint8))


def batch_digest(index: int, result) -> bytes:
    """sha256 of batch ``index``'s result: dtype, shape and bytes of each array, with its dict key or tuple
    position (a failed batch: its index). Computed where the result is (a Ray actor that writes it)."""
    h = hashlib.sha256()
    if result is None:
        h.update(f"failed:{index};".encode())
    elif isinstance(result, dict):
        h.update(f"dict{len(result)};".encode())
        for k in sorted(result):
            h.update(f"[{json.dumps(k)}]".encode())
            _hash_array(h, result[k])
    elif isinstance(result, tuple):
        h.update(f"tuple{len(result)};".encode())
        for i, a in enumerate(result):
            h.update(f"[{i}]".encode())
            _hash_array(h, a)
    else:
        _hash_array(h, result)
    return h.digest()


def checksum_update(h, index: int, result, digest: bytes | None = None) -> None:
    """Add batch ``index`` to the run's sha256 ``h``: its ``batch_digest`` (given as ``digest`` when it was
    computed elsewhere, so that the result itself need not travel)."""
    h.update(digest if digest is not None else batch_digest(index, result))


def checksum(results) -> str:
    """sha256 over the per-batch digests (``batch_digest``) of every result, in batch order."""
    h = hashlib.sha256()
    for i, r in enumerate(results):
        checksum_update(h, i, r)
    return h.hexdigest()


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return float("inf")
    kind = np.complex128 if "c" in (a.dtype.kind, b.dtype.kind) else np.float64
    a, b = a.astype(kind), b.astype(kind)
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-12)
    return float(np.abs(a - b).max(initial=0.0)) / scale


def max_rel_diff(results: list, ref: list) -> float:
    """Largest |a - b| / max|b| over matching arrays; inf where the structure, keys or shapes differ."""
    if len(results) != len(ref):
        return float("inf")
    worst = 0.0
    for a, b in zip(results, ref):
        if (a is None) != (b is None):
            return float("inf")
        if a is None:
            continue
        if isinstance(a, (dict, tuple)) or isinstance(b, (dict, tuple)):
            if type(a) is not type(b) or len(a) != len(b) or (isinstance(a, dict) and a.keys() != b.keys()):
                return float("inf")
            pairs = [(a[k], b[k]) for k in a] if isinstance(a, dict) else list(zip(a, b))
        else:
            pairs = [(a, b)]
        for x, y in pairs:
            worst = max(worst, _rel(x, y))
    return worst


# -- worker output -------------------------------------------------------------------------------------------
class Relay:
    """The main's ends of the workers' output pipes: a thread copies their lines to the main's stderr.

    ``pipe()`` gives the write end for one worker (a write-only Connection, a Process argument); close it
    in the main once the worker has started. One pipe per worker, so lines from different workers never
    mix mid-line. ``bar`` is the active progress bar (set by the runner), written around with
    ``tqdm.write``. See NOTE [ Worker output ].
    """

    def __init__(self):
        self.bar = None
        self._fds: dict[int, bytes] = {}  # read end -> the unterminated tail of what it sent
        self._lock = threading.Lock()  # guards _fds and _thread
        self._io = threading.Lock()  # one reader at a time: the pump thread or drain()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    def pipe(self):
        """A new pipe whose read end the relay watches; returns its write end (one worker's fd 1 and 2)."""
        from multiprocessing.connection import Connection
        r, w = os.pipe()
        os.set_blocking(r, False)  # the pump and drain() both read: whoever comes second finds it empty
        with self._lock:
            self._fds[r] = b""
            if self._thread is None:
                self._closing.clear()
                self._thread = threading.Thread(target=self._pump, name="pipeline-relay", daemon=True)
                self._thread.start()
        return Connection(w, readable=False)

    def drain(self) -> None:
        """Copy what the workers have written so far, now. A worker writes its prints before it sends the
        batch's result, so the runner calls this before the bar counts a result: a batch's lines come
        above its tick, and all of them above the finished bar."""
        if self._thread is None:
            return
        with self._io:
            with self._lock:
                fds = list(self._fds)
            if fds:
                self._copy(select.select(fds, [], [], 0)[0])

    def close(self, timeout: float = 5.0) -> None:
        """Print whatever the workers wrote, to the end; call after joining them."""
        if self._thread is None:
            return
        self._closing.set()
        self._thread.join(timeout)
        self._thread = None

    def _pump(self) -> None:
        while True:
            closing = self._closing.is_set()
            with self._lock:
                fds = list(self._fds)  # only this thread closes them
            if not fds:
                if closing:
                    return
                self._closing.wait(0.1)
                continue
            ready = select.select(fds, [], [], 0.1)[0]
            if not ready and closing:
                break  # drained; a stray holder of a write end cannot keep us here
            with self._io:
                for fd in self._copy(ready):
                    self._drop(fd)
        with self._io:
            with self._lock:
                left = list(self._fds)
            for fd in left:
                self._drop(fd)

    def _copy(self, ready: list[int]) -> list[int]:
        """Read and print the whole lines of each ready pipe (caller holds ``_io``); returns those at EOF."""
        eof = []
        for fd in ready:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:  # the other reader took it
                continue
            with self._lock:
                *lines, self._fds[fd] = (self._fds[fd] + data).split(b"\n")
            for line in lines:
                self._emit(line)
            if not data:  # EOF: the worker is gone
                eof.append(fd)
        return eof

    def _drop(self, fd: int) -> None:
        with self._lock:
            tail = self._fds.pop(fd, b"")
        if tail:
            self._emit(tail)
        os.close(fd)

    def _emit(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        try:
            bar = self.bar
            if bar is not None and not getattr(bar, "disable", True):
                from tqdm import tqdm
                tqdm.write(text, file=sys.stderr)
            else:
                sys.stderr.write(text + "\n")
                sys.stderr.flush()
        except (OSError, ValueError):  # stderr closed: nothing better to do with a worker's output
            pass


def worker_stdio(writer) -> None:
    """In a worker: fd 1 and fd 2 become the relay pipe; print() goes there line by line (see NOTE)."""
    if writer is None:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os.dup2(writer.fileno(), 1)
    os.dup2(writer.fileno(), 2)
    writer.close()
    sys.stdout = sys.stderr  # line-buffered, in order with stderr


def _once_hook(show, seen: set):
    def showwarning(message, category, filename, lineno, file=None, line=None):
        key = (category, filename, lineno)
        if key in seen:
            return
        seen.add(key)
        show(message, category, filename, lineno, file, line)
    return showwarning


def warn_once() -> None:
    """In a worker: each warning (category, file, line) is shown once, whatever its text."""
    warnings.showwarning = _once_hook(warnings.showwarning, set())


@contextlib.contextmanager
def warnings_once():
    """``warn_once`` for the duration (the serial baseline in the CLI); restores the previous hook."""
    previous = warnings.showwarning
    warnings.showwarning = _once_hook(previous, set())
    try:
        yield
    finally:
        warnings.showwarning = previous


@contextlib.contextmanager
def stdout_to_stderr():
    """fd 1 and ``sys.stdout`` point at stderr for the duration, so that only what the caller prints after
    reaches stdout (kernels in the serial baseline, libraries, native code print to stderr)."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no fd 1 or 2 (an embedding host): the Python-level redirection still applies
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
