"""Computing one batch, the same way everywhere: the local workers, the serial baseline (``--workers 0``),
Ray actors and the bench's peers. ``Computer`` builds the kernel once on its device; each call moves a
batch's host arrays to the device (``Stager``: on CUDA straight from a registered slot, or through pinned
staging buffers, on a side stream), runs the kernel, and returns host numpy arrays (``outputs.host_result``)
and the time of each step.

NOTE [ Splits ]
A kernel call that raises ``torch.OutOfMemoryError`` is run again on the two halves of its batch (views of
the same rows, no copy), recursively, and the halves' outputs are joined row by row (each output must have
one row per input row). The worker then remembers the largest rows x length that ran after the error
(``fit``): a later batch above it is split before it runs, so a budget set too high costs one failed call,
not one per batch. The summary counts the splits (``oom_splits``) and says so in ``notes``. A single row
that does not fit fails its batch as any kernel error does, naming the batch, the row and its length.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from . import devices, fields, kernels, outputs, trace
from .errors import KernelError
from .images import encoded


@dataclass
class Staged:
    """A batch on its way to the device: its tensor(s), and on CUDA the copy's start/end events."""
    x: Any  # a tensor, or a tuple or dict of tensors (the batch's fields)
    start: Any = None
    end: Any = None
    direct: bool = False  # copied straight from a slot registered with CUDA (no staging memcpy)


class Stager:
    """Host -> device copies: ``non_blocking``, on a copy stream; straight from the slot when the ring is
    registered with CUDA (pinned in place), else through alternating pinned staging buffers.

    NOTE [ Overlap ]
    On CUDA a worker starts the copy of its next batch (when one is already waiting in its pipe) while the
    GPU computes the current one: ``start`` issues the copy on a side stream and records an event;
    ``ready`` makes the compute stream wait for that event (the GPU waits, not the CPU). Two staging
    buffers alternate, so the copy of batch k+1 never overwrites the buffer batch k was copied from; the
    buffer of batch k-1 is free because its result was synchronised before batch k+1 was received. A slot
    copied straight to the device goes back to the main once the copy's end event has completed.
    """

    def __init__(self, device: torch.device, pinned: bool):
        self.device, self.pinned = device, pinned and device.type == "cuda"
        self.bufs: list = [None, None]
        self.turn = 0
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, batch, registered: bool = False) -> Staged:
        """Start the copy of ``batch`` (an array, or a tuple or dict of arrays: each field) to the device."""
        arrays = fields.flatten(batch)  # (a field already on the device, decoded there: passed through)
        xs = [a if isinstance(a, torch.Tensor) else torch.from_numpy(a if a.flags.writeable else a.copy())
              for a in arrays]
        if self.stream is None:
            return Staged(fields.like(batch, xs))
        direct = self.pinned and registered
        if self.pinned and not registered:
            host = [x.device.type == "cpu" for x in xs]
            sizes = [x.numel() * x.element_size() if h else 0 for x, h in zip(xs, host)]
            starts = [0]
            for n in sizes:
                starts.append(starts[-1] + -(-n // fields.FIELD_ALIGN) * fields.FIELD_ALIGN)
            self.turn ^= 1
            if self.bufs[self.turn] is None or self.bufs[self.turn].numel() < starts[-1]:
                self.bufs[self.turn] = torch.empty(starts[-1], dtype=torch.uint8, pin_memory=True)
            staged = []
            for x, o, n, h in zip(xs, starts, sizes, host):
                if h:
                    v = self.bufs[self.turn][o:o + n].view(x.dtype).view(x.shape)
                    v.copy_(x)
                    x = v
                staged.append(x)
            xs = staged
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            start.record(self.stream)
            ys = [x.to(self.device, non_blocking=True) for x in xs]
            end.record(self.stream)
        return Staged(fields.like(batch, ys), start, end, direct)

    def ready(self, h: Staged):
        """The batch's tensors on the device, once the compute stream may read them."""
        if h.end is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(h.end)
            for x in fields.flatten(h.x):
                x.record_stream(current)  # the allocator must not reuse it while the compute stream reads
        return h.x

    @staticmethod
    def seconds(h: Staged) -> float:
        return h.start.elapsed_time(h.end) / 1000 if h.end is not None else 0.0


class Computer:
    """A kernel built once on its device, with its stager: computes one batch, the same way everywhere
    (workers, the serial baseline, Ray actors, the bench's peers)."""

    def __init__(self, spec: kernels.KernelSpec, device: torch.device, pinned: bool):
        self.device, self.name, self.precision = device, spec.name, spec.precision
        self.cuda = device.type == "cuda"
        # (fp32 on the CPU, the usual case, enters no context: a tiny batch's budget)
        self.autocast = spec.precision in ("bf16", "fp16") or (spec.precision == "tf32" and self.cuda)
        self.kernel = kernels.make(spec, device)
        self.stager = Stager(device, pinned)
        self.fit: int | None = None  # the largest rows x length known to fit after running out of memory
        self.splits = 0
        self.trace = False  # send the batch's spans with its timings (NOTE [ Trace ] in trace.py)

    def _run(self, x, index: int, first: int):
        """The kernel on ``x``, split in halves on ``torch.OutOfMemoryError`` (NOTE [ Splits ])."""
        rows, cost = _size(x)
        if self.fit is None or cost <= self.fit or rows <= 1:
            try:
                return self.kernel(x)
            except torch.OutOfMemoryError as e:
                if rows <= 1:
                    width = f", length {cost}" if cost != rows else ""
                    e.args = (f"batch {index}: one row (row {first}{width}) does not fit in device memory"
                              + (f" after {self.splits} split(s)" if self.splits else "")
                              + f": {e.args[0] if e.args else ''}",) + e.args[1:]
                    raise
                self.fit = min(self.fit or cost, max(1, cost // 2))
                del e
                if self.cuda:
                    torch.cuda.empty_cache()
        self.splits += 1
        mid = rows // 2
        lo = self._run(fields.map_fields(lambda t: t[:mid], x), index, first)
        hi = self._run(fields.map_fields(lambda t: t[mid:], x), index, first + mid)
        return _joined(lo, hi, index, mid, rows - mid)

    def start(self, arr, registered: bool = False) -> Staged | None:
        """Start the copy of a batch received ahead (NOTE [ Overlap ]); None for an encoded image batch,
        which ``__call__`` decodes first (images/encoded.py)."""
        return None if encoded.is_encoded(arr) else self.stager.start(arr, registered)

    def __call__(self, arr, index: int = -1, attempt: int = 1, staged: Staged | None = None,
                 meanwhile: Callable[[], None] | None = None,
                 copied: Callable[[], None] | None = None, registered: bool = False) -> tuple[Any, dict]:
        """One batch: host array(s) -> device -> kernel -> host numpy (an array, or a tuple or dict of arrays:
        ``outputs.host_result``, which raises KernelError for anything else), and the time of each step.

        ``staged``: the batch's copy, if it was started earlier (see NOTE [ Overlap ]); ``meanwhile`` runs
        after the kernel is launched and before its result is awaited (starting the next batch's copy);
        ``copied`` is called once the copy to the device has completed, while the kernel may still run;
        ``registered``: ``arr`` lies in memory registered with CUDA (a slot), copied without staging.
        """
        kernels.current.update(index=index, attempt=attempt)
        t0 = time.perf_counter()
        decoded, bad = (encoded.decode_batch(arr, self.device, index) if staged is None and encoded.is_encoded(arr)
                        else (arr, None))
        t_decoded = time.perf_counter()
        h = staged or self.stager.start(decoded, registered)
        x = self.stager.ready(h)
        t1 = time.perf_counter()
        self.splits = 0
        if self.autocast:
            with devices.precision(self.precision, self.device):
                y = self._run(x, index, 0)
        else:
            y = self._run(x, index, 0)
        if copied is not None and h.end is not None:
            h.end.synchronize()  # the copy, not the kernel: nothing reads the host memory any more
            copied()
        if meanwhile is not None:
            meanwhile()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        # validated, on the host, never a view of the slot (it is reused): KernelError for a bad return
        out = outputs.host_result(y, where=f"kernel {self.name!r}, batch {index}", avoid=fields.flatten(arr))
        t3 = time.perf_counter()
        timings = {"h2d_s": self.stager.seconds(h), "h2d_bytes": fields.nbytes(arr), "direct": h.direct,
                   "stage_s": (t1 - t_decoded) if staged is None else 0.0, "compute_s": t2 - t1, "d2h_s": t3 - t2}
        if self.splits:
            timings.update(splits=self.splits, fit=self.fit)
        if bad is not None:  # an encoded image batch (images/encoded.py): decoded here
            timings.update(decode_s=t_decoded - t0, **({"bad_samples": bad} if bad else {}))
        if self.cuda:
            timings["gpu_reserved_mb"] = torch.cuda.memory_reserved(self.device) / 2**20
        if self.trace:  # NOTE [ Trace ] in trace.py: where this batch's time went (trace.Recorder.worker)
            timings["spans"] = (trace.clock(), t0, t_decoded, t1, t2, t3,
                                (bad is not None) | self.cuda << 1 | (staged is not None) << 2, attempt)
        return out, timings


def _size(x) -> tuple[int, int]:
    """(rows, rows x length) of a batch on the device: its first field's first two axes."""
    t = fields.flatten(x)[0]
    rows = int(t.shape[0]) if t.dim() else 1
    return rows, rows * (int(t.shape[1]) if t.dim() >= 2 else 1)


def _joined(a, b, index: int, na: int, nb: int):
    """Two halves' outputs joined row by row (NOTE [ Splits ]); KernelError if they are not row-aligned."""
    xs, ys = fields.flatten(a), fields.flatten(b)
    out = []
    for x, y in zip(xs, ys):
        if not hasattr(x, "shape") or len(x.shape) == 0 or x.shape[0] != na or y.shape[0] != nb:
            raise KernelError(f"batch {index} ran out of device memory and was split in halves, but the kernel's "
                              f"output (shape {tuple(getattr(x, 'shape', ()))} for {na} rows) has no row per "
                              f"input row to join: return (B, ...) outputs, or use smaller batches")
        out.append(torch.cat([x, y]) if isinstance(x, torch.Tensor) else np.concatenate([x, y]))
    return fields.like(a, out)


def cuda_fault(e: BaseException, device: torch.device) -> BaseException:
    """NOTE [ CUDA faults ]
    Out of device memory: the worker frees its cache, the error names the device and its free/total
    memory, and ``on_error`` applies as for any kernel error; the worker carries on. A sticky CUDA error
    (a device-side assert, an illegal address) leaves the process's CUDA context unusable: the worker says
    so (RETIRE) and exits; the main replaces it and retries or quarantines the batch as for a crash. A Ray
    actor replies RETIRE instead of a result, and the main kills it so that Ray restarts it."""
    if isinstance(e, torch.OutOfMemoryError) and device.type == "cuda":
        first = e.args[0] if e.args else ""
        e.args = (f"out of memory on {devices.memory_note(device)} after freeing the cache; the worker "
                  f"carries on (smaller batches, --rows, or fewer workers per GPU): {first}",) + e.args[1:]
    return e
