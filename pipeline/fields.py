"""Batches of several arrays ("fields"), how one batch lies in one slot, and the host-only rule.

A batch (or a sample of a map-style dataset) is one array, a tuple of arrays, or a dict of arrays with
non-empty ``str`` keys: ``{"input_ids": ..., "attention_mask": ...}``, ``(image, label)``. Arrays may be
numpy arrays, CPU tensors or numbers; ``fields`` turns each into numpy under the handoff rule, naming the
field (``batch 3, field 'mask': a torch.Tensor on device 'cuda:0' ...``).

NOTE [ Layout ]
``Layout`` is the structure (one array, a tuple, a dict and its keys) and, per field, its shape, dtype and
offset in the slot: the fields one after the other, each aligned to ``FIELD_ALIGN`` bytes. It is fixed
before a batch is built (for a dataset: by its first sample, times the batch size), so that build threads
write each sample straight into its row of each field (``views``), and it travels to the worker in the
slot's descriptor (a few dozen bytes), which views the same regions without a copy and hands the kernel the
same structure, each field a tensor on its device. Everything that handles a batch (slots, the handoff
rule, the pickled fallback, kernels, Ray) goes through ``flatten`` / ``rebuild`` here, so a single array is
just the structure with one field and no name.

NOTE [ Handoff ]
Only host data crosses the process boundary. ``to_host`` checks everything handed to a worker before it
is sent: a tensor on a non-CPU device, or a non-leaf tensor that requires grad, raises ``HandoffError``.
Torch would not stop it: on Linux a spawn pool passes a CUDA tensor through CUDA IPC silently (the child
can't send it back and the parent must outlive it), a fork child dies and the pool hangs, and Windows has
no CUDA IPC at all (docs/handoff.md, the measured facts).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .errors import HandoffError


def to_host(obj: Any, where: str) -> Any:
    """``obj`` with every CPU tensor turned into numpy; HandoffError for device or autograd tensors.

    Walks dicts, lists and tuples, so kernel params are checked as deeply as batches.
    """
    torch = _torch_if_loaded()
    if torch is not None and isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            raise HandoffError(
                f"{where}: a torch.Tensor on device '{obj.device}' (shape {tuple(obj.shape)}) cannot be "
                f"handed to a worker; only host data crosses the process boundary. Pass "
                f"`t.cpu().numpy()` from the main process; the worker moves it to its device."
            )
        if obj.requires_grad and obj.grad_fn is not None:
            raise HandoffError(
                f"{where}: a non-leaf torch.Tensor that requires grad (grad_fn "
                f"{type(obj.grad_fn).__name__}) cannot be handed to a worker: autograd does not cross "
                f"processes. Pass `t.detach().cpu().numpy()`."
            )
        return obj.detach().numpy()
    if isinstance(obj, dict):
        return {k: to_host(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v, f"{where}[{i}]") for i, v in enumerate(obj))
    return obj


def as_batch(obj: Any, where: str) -> np.ndarray:
    """A batch from a caller's source as a numpy array (checked by ``to_host``)."""
    arr = to_host(obj, where)
    if not isinstance(arr, np.ndarray):
        try:
            arr = np.asarray(arr)
        except Exception as e:  # noqa: BLE001 - any conversion failure is the caller's input
            raise HandoffError(f"{where}: cannot turn {type(obj).__name__} into a numpy array: {e}") from None
    if arr.dtype.hasobject:
        raise HandoffError(f"{where}: object arrays are not batches (dtype {arr.dtype}); "
                           f"pass a numeric array")
    return arr


def _torch_if_loaded():
    return sys.modules.get("torch")


FIELD_ALIGN = 256  # bytes: every field starts on a boundary that DMA engines and SIMD loads like
WIRE_BYTES = 16 << 10  # results with no field larger than this travel as raw bytes (``to_wire``)


@dataclass(frozen=True)
class Layout:
    kind: str  # "array" | "tuple" | "dict"
    keys: tuple  # dict keys, in order; () otherwise
    shapes: tuple  # one shape per field
    dtypes: tuple  # one dtype string per field (numpy's ``dtype.str``)
    offsets: tuple  # bytes from the start of the slot
    nbytes: int  # the span of the slot the batch uses, padding included

    @staticmethod
    def make(kind: str, keys: tuple, shapes, dtypes) -> "Layout":
        offsets, end = [], 0
        for shape, dtype in zip(shapes, dtypes):
            end = -(-end // FIELD_ALIGN) * FIELD_ALIGN
            offsets.append(end)
            end += math.prod(shape) * np.dtype(dtype).itemsize
        return Layout(kind, tuple(keys), tuple(tuple(int(d) for d in s) for s in shapes),
                      tuple(np.dtype(d).str for d in dtypes), tuple(offsets), end)

    @staticmethod
    def of(batch) -> "Layout":
        """The layout of a batch already in numpy fields (see ``fields``)."""
        kind, keys, arrays = _parts(batch)
        return Layout.make(kind, keys, [a.shape for a in arrays], [a.dtype for a in arrays])

    def rows(self, n: int) -> "Layout":
        """This (per-sample) layout with a leading dimension of ``n`` rows: a batch of ``n`` samples."""
        return Layout.make(self.kind, self.keys, [(n, *s) for s in self.shapes], self.dtypes)

    @property
    def names(self) -> list[str]:
        """Field names for messages: the dict keys, the tuple positions, or ``[""]`` for one array."""
        if self.kind == "dict":
            return list(self.keys)
        return [str(i) for i in range(len(self.shapes))] if self.kind == "tuple" else [""]

    def views(self, buf, base: int = 0):
        """The batch's fields as numpy views of ``buf`` from byte ``base`` on (a slot), in its structure."""
        arrays = [np.frombuffer(buf, dtype=d, count=math.prod(s), offset=base + o).reshape(s)
                  for s, d, o in zip(self.shapes, self.dtypes, self.offsets)]
        return self.pack(arrays)

    def empty(self):
        """New arrays in this layout (a batch built apart from the slots)."""
        return self.pack([np.empty(s, d) for s, d in zip(self.shapes, self.dtypes)])

    def pack(self, arrays: list):
        """``arrays`` (one per field, in order) in this layout's structure."""
        if self.kind == "dict":
            return dict(zip(self.keys, arrays))
        return tuple(arrays) if self.kind == "tuple" else arrays[0]

    def describe(self) -> str:
        return ", ".join(f"{_label(n) or 'array'} {d} {tuple(s)}"
                         for n, s, d in zip(self.names, self.shapes, self.dtypes))


def to_wire(result) -> tuple | None:
    """A small result (numpy fields: ``outputs.host_result``'s) as its structure and, per field, dtype, shape
    and bytes; None if a field is larger than ``WIRE_BYTES``. Pickling a numpy array costs a few
    microseconds whatever its size (its reduce protocol); bytes cost a fraction of that, on both sides
    of the pipe. ``from_wire`` makes the arrays again (writable, owning their bytes)."""
    kind, keys, arrays = _parts(result)
    items = []
    for a in arrays:
        if a.nbytes > WIRE_BYTES:
            return None
        items.append((a.dtype.str, a.shape, bytearray(np.ascontiguousarray(a))))
    return kind, keys, items


_DTYPES: dict = {}


def from_wire(wire: tuple):
    kind, keys, items = wire
    arrays = []
    for d, shape, buf in items:
        dtype = _DTYPES.get(d)
        if dtype is None:
            dtype = _DTYPES[d] = np.dtype(d)
        arrays.append(np.frombuffer(buf, dtype).reshape(shape))
    if kind == "dict":
        return dict(zip(keys, arrays))
    return tuple(arrays) if kind == "tuple" else arrays[0]


def _label(name: str) -> str:
    return f"field {name!r}" if name else ""


def _parts(batch) -> tuple[str, tuple, list]:
    if isinstance(batch, dict):
        return "dict", tuple(batch), list(batch.values())
    if isinstance(batch, tuple):
        return "tuple", (), list(batch)
    return "array", (), [batch]


def flatten(batch) -> list:
    """The arrays (or tensors) of a batch, in field order."""
    return _parts(batch)[2]


def map_fields(fn: Callable[[Any], Any], batch):
    """``batch`` with ``fn`` applied to each field, in the same structure."""
    if isinstance(batch, dict):
        return {k: fn(v) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(fn(v) for v in batch)
    return fn(batch)


def like(batch, items: list):
    """``items`` (one per field of ``batch``, in order) in ``batch``'s structure."""
    if isinstance(batch, dict):
        return dict(zip(batch, items))
    return tuple(items) if isinstance(batch, tuple) else items[0]


def nbytes(batch) -> int:
    return sum(a.nbytes for a in flatten(batch))


def fields(obj: Any, where: str):
    """A caller's batch or sample as numpy fields (an array, a tuple or a dict of arrays), each checked by
    the handoff rule; HandoffError naming the field for anything that can't cross the process boundary."""
    if isinstance(obj, dict):
        if not obj:
            raise _empty(where, "dict")
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str) or not k:
                raise HandoffError(f"{where}: a dict key {k!r} ({type(k).__name__}); the keys of a batch "
                                   f"must be non-empty strings")
            out[k] = as_batch(v, f"{where}, field {k!r}")
        return out
    if isinstance(obj, tuple):
        if not obj:
            raise _empty(where, "tuple")
        return tuple(as_batch(v, f"{where}, field {i}") for i, v in enumerate(obj))
    return as_batch(obj, where)


def _empty(where: str, what: str) -> HandoffError:
    return HandoffError(f"{where}: an empty {what} holds no arrays; a batch is an array, or a tuple or "
                        f"dict (str keys) of arrays")


def copy_into(views, batch) -> None:
    """Write ``batch`` (numpy fields, the same layout) into ``views``."""
    for dst, src in zip(flatten(views), flatten(batch)):
        np.copyto(dst, src)
