"""The host-only rule, and the shared-memory slot ring that makes a handoff cost one memcpy.

NOTE [ Handoff ]
Only host data crosses the process boundary. ``to_host`` checks everything handed to a worker before it
is sent: a tensor on a non-CPU device, or a non-leaf tensor that requires grad, raises ``HandoffError``.
Torch would not stop it: on Linux a spawn pool passes a CUDA tensor through CUDA IPC silently (the child
can't send it back and the parent must outlive it), a fork child dies and the pool hangs, and Windows has
no CUDA IPC at all (DESIGN.md, "Measured facts").

NOTE [ Slot ring ]
One shared-memory file of ``count`` slots, allocated once and reused for every batch (and every run on
the same workers). Build threads write a batch straight into a free slot and the main sends a small
descriptor; the worker views the slot without copying. Which slots are free is the run's business
(executor.py, NOTE [ Slot release ]). The file lives in /dev/shm under a name that carries
the main's pid (``pipeline-<pid>-<token>``): it is unlinked when the run ends by any path; workers unlink
it when they notice that the main died (SIGKILL); and ``remove_stale`` clears files of dead mains.
We use a plain file rather than ``multiprocessing.shared_memory`` because on Python 3.11/3.12 attaching
to a segment registers it with the resource tracker, which then warns about "leaked" segments or unlinks
them early.
"""
from __future__ import annotations

import mmap
import os
import secrets
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import HandoffError

SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
PREFIX = "pipeline-"
ALIGN = 4096


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
    import sys
    return sys.modules.get("torch")


@dataclass(frozen=True)
class Descriptor:
    """What travels to the worker for a slot batch: a few dozen bytes, whatever the batch size."""
    slot: int
    shape: tuple
    dtype: str
    strides: tuple


class SlotRing:
    """``count`` reusable slots of ``slot_bytes`` each in one shared-memory file (main side)."""

    def __init__(self, count: int, slot_bytes: int):
        self.count = count
        self.slot_bytes = max(ALIGN, -(-slot_bytes // ALIGN) * ALIGN)
        self.name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.path = os.path.join(SHM_DIR, self.name)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, self.count * self.slot_bytes)
            self._mm = mmap.mmap(fd, self.count * self.slot_bytes)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)

    def describe(self, slot: int, view: np.ndarray) -> Descriptor:
        return Descriptor(slot, tuple(view.shape), view.dtype.str, view.strides)

    def view(self, slot: int, shape: tuple, dtype) -> np.ndarray:
        return slot_view(self._mm, self.slot_bytes, slot, shape, dtype)

    def close(self) -> None:
        """Unmap and unlink; safe to call twice. Views handed out earlier must be dropped first."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive; the mapping goes with the process
                pass
            self._mm = None


def slot_view(buf, slot_bytes: int, slot: int, shape: tuple, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(buf, dtype=dtype, count=count, offset=slot * slot_bytes).reshape(shape)


class SlotReader:
    """The worker's side of the ring: maps the file once, views slots without copying.

    On CUDA it also registers the mapping with the driver (``cudaHostRegister``: pinned in place), so that
    host-to-device copies run straight from the slot at full bandwidth, with no staging memcpy.
    """

    def __init__(self, path: str, slot_bytes: int):
        self.path = path
        self.slot_bytes = slot_bytes
        self.registered = False
        fd = os.open(self.path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, 0)
        finally:
            os.close(fd)

    def view(self, d: Descriptor) -> np.ndarray:
        return slot_view(self._mm, self.slot_bytes, d.slot, d.shape, d.dtype)

    def _address(self) -> int:
        return np.frombuffer(self._mm, dtype=np.uint8).ctypes.data

    def register(self) -> str | None:
        """Pin the mapping for DMA; None when it worked, else why not (the caller falls back to staging)."""
        import torch
        try:
            rc = torch.cuda.cudart().cudaHostRegister(self._address(), len(self._mm), 0)
        except Exception as e:  # noqa: BLE001 - no cudart binding, or it refused the call
            return f"{type(e).__name__}: {e}"
        rc = int(getattr(rc, "value", rc))
        if rc != 0:
            return f"cudaHostRegister returned error {rc}"
        self.registered = True
        return None

    def close(self) -> None:
        """Unregister (before unmapping: the driver must not keep pinning pages that are gone), unmap."""
        if self.registered:
            import torch
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaHostUnregister(self._address())
            self.registered = False
        try:
            self._mm.close()
        except BufferError:  # a view is still alive; the mapping goes with the process
            pass


def remove_rings_of(pid: int) -> None:
    """Unlink every ring file of main ``pid`` (a worker whose main died: mapped by it or not yet)."""
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(f"{PREFIX}{pid}-")]
    except OSError:
        return
    for name in names:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except OSError:
            pass


def remove_stale() -> list[str]:
    """Unlink ring files left by mains that no longer run (a SIGKILLed main whose workers died too)."""
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(PREFIX):
            continue
        try:
            pid = int(name[len(PREFIX):].split("-")[0])
        except ValueError:
            continue
        if not _alive(pid):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
