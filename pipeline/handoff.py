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
(executor.py, NOTE [ Slot release ]). The file lives in ``handoff.dir`` (/dev/shm) under a name that
carries the main's pid (``pipeline-<pid>-<token>``): it is unlinked when the run ends by any path; workers
unlink it when they notice that the main died (SIGKILL); and ``remove_stale`` clears files of dead mains.
We use a plain file rather than ``multiprocessing.shared_memory`` because on Python 3.11/3.12 attaching
to a segment registers it with the resource tracker, which then warns about "leaked" segments or unlinks
them early.

NOTE [ Small /dev/shm ]
Docker gives a container 64 MB of /dev/shm. A sparse ring file bigger than that is created without
complaint, and the first write past the free space kills the main with SIGBUS (exit 135). So
``open_ring`` reserves the ring's space when it creates it (``posix_fallocate``): a shortage is an
error there, and it is handled there. First the memory check: a ring that would take more than half of
the memory this process may use (cgroup limit, or MemAvailable) gets fewer slots, or is refused. Then
the ring goes to ``handoff.dir`` with all its slots; if they don't fit, with as many as fit there (at
least 2; fewer batches in flight); else to a file in the temp dir on disk (the page cache holds it, and
workers still map it without a copy); else ConfigError, one line with the sizes and the fix. The
free-space estimate keeps 1/16 of the filesystem (at most 64 MiB) for others (NCCL, Ray, semaphores).
Each choice other than the first adds a note to the run's summary.
"""
from __future__ import annotations

import errno
import mmap
import os
import re
import secrets
import stat
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import devices
from .config import RING_DIR
from .errors import ConfigError, HandoffError

SHM_DIR = RING_DIR  # the default handoff.dir
PREFIX = "pipeline-"
RING_NAME = re.compile(r"^pipeline-(\d+)-[0-9a-f]{8}$")
ALIGN = 4096
MIB = 1 << 20
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOMEM)
NOT_HERE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EOPNOTSUPP)


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
    layout: Any  # fields.Layout: the structure, and each field's shape, dtype and offset in the slot


class SlotRing:
    """``count`` reusable slots of ``slot_bytes`` each in one file in ``directory`` (main side).

    The file's space is reserved at once (``posix_fallocate``): OSError(ENOSPC) here, never SIGBUS on a
    later write. ``open_ring`` picks the directory and the count.
    """

    def __init__(self, count: int, slot_bytes: int, directory: str = SHM_DIR):
        self.count = self.requested = count
        self.asked_dir = directory
        self.slot_bytes = aligned(slot_bytes)
        self.directory = os.path.abspath(directory)
        self.name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.path = os.path.join(self.directory, self.name)
        self._mm = None
        self._views: dict = {}  # slot -> (layout, views, descriptor): see ``view``
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.count * self.slot_bytes)
            self._mm = mmap.mmap(fd, self.count * self.slot_bytes)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)

    def view(self, slot: int, layout):
        """Slot ``slot``'s fields in ``layout`` (views to fill), and their descriptor for the worker; kept
        per slot, so that the next batch of the same layout in that slot (every batch of most sources)
        costs a lookup, not a view per field."""
        kept = self._views.get(slot)
        if kept is None or kept[0] is not layout:
            kept = self._views[slot] = (layout, layout.views(self._mm, slot * self.slot_bytes),
                                        Descriptor(slot, layout))
        return kept[1], kept[2]

    def close(self) -> None:
        """Unmap and unlink; safe to call twice. Views handed out earlier must be dropped first."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._views.clear()
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive; the mapping goes with the process
                pass
            self._mm = None


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

    def view(self, d: Descriptor):
        """The batch's fields (an array, or a tuple or dict of arrays), views of its slot."""
        return d.layout.views(self._mm, d.slot * self.slot_bytes)

    def _address(self) -> int:
        return np.frombuffer(self._mm, dtype=np.uint8).ctypes.data

    def register(self) -> str | None:
        """Pin the mapping for DMA; None when it worked, else why not (the caller falls back to staging).
        Only a ring in memory (tmpfs) is registered: one on disk (a small /dev/shm's fallback) is copied
        through pinned staging buffers."""
        import torch
        fs = _fs_type(self.path)
        if fs not in ("tmpfs", "ramfs", "hugetlbfs"):
            return f"the ring is on {fs or 'an unknown file system'}, not in memory"
        cudart = torch.cuda.cudart()
        try:
            rc = cudart.cudaHostRegister(self._address(), len(self._mm), 0)
        except Exception as e:  # noqa: BLE001 - no cudart binding, or it refused the call
            return f"{type(e).__name__}: {e}"
        rc = int(getattr(rc, "value", rc))
        if rc != 0:
            cudart.cudaGetLastError()  # clear it: torch would report it at the next kernel launch
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


def _fs_type(path: str) -> str | None:
    """The type of the file system ``path`` is on (from /proc/self/mounts: the longest mount point)."""
    path = os.path.realpath(path)
    best, kind = "", None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                    best, kind = mount, parts[2]
    except OSError:
        return None
    return kind


def remove_stale(*directories: str, dead: int | None = None) -> list[str]:
    """Unlink ring files left by mains that no longer run (a SIGKILLed main whose workers died too), in
    ``directories``, the default handoff.dir and the temp dir (where a ring goes when shared memory is
    short). Only regular files named exactly like a ring are touched: the temp dir is everybody's.
    ``dead``: a main known to be gone (a worker's, even while it is an unreaped zombie)."""
    removed = []
    seen = set()
    for directory in (*directories, SHM_DIR, tempfile.gettempdir()):
        directory = os.path.realpath(directory)
        if directory in seen:
            continue
        seen.add(directory)
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            m = RING_NAME.match(name)
            if m is None or (int(m.group(1)) != dead and _alive(int(m.group(1)))):
                continue
            path = os.path.join(directory, name)
            try:
                if stat.S_ISREG(os.lstat(path).st_mode):
                    os.unlink(path)
                    removed.append(name)
            except OSError:
                pass
    return removed


def watchdog(main_pid: int, ring_dir: str) -> None:
    """A child's thread (worker or build process): when the main is gone (even by SIGKILL), unlink its
    rings and exit (NOTE [ Shutdown ] in worker.py)."""
    import time
    ppid = os.getppid()
    while True:
        time.sleep(0.5)
        if os.getppid() != ppid or not _alive(main_pid):
            remove_stale(ring_dir, dead=main_pid)  # ours, and any other dead main's
            os._exit(1)


def aligned(slot_bytes: int) -> int:
    """A slot's size: ``slot_bytes`` rounded up to whole pages, one page at least."""
    return max(ALIGN, -(-slot_bytes // ALIGN) * ALIGN)


def open_ring(count: int, slot_bytes: int, directory: str) -> tuple[SlotRing, list[str]]:
    """The slot ring for ``count`` batches in flight, and notes on what it had to give up: fewer slots,
    or a file on disk instead of shared memory. ConfigError (one line: sizes and fix) when no place
    holds even two slots. See NOTE [ Small /dev/shm ]."""
    slot = aligned(slot_bytes)
    wanted, least = count, min(2, count)
    notes: list[str] = []
    count = _within_memory(count, slot, least, notes)
    places = [os.path.abspath(directory)]
    tmp = os.path.abspath(tempfile.gettempdir())
    if not _same_place(tmp, places[0]):
        places.append(tmp)
    tried = []
    for place in places:
        ring, why = _ring_in(place, count, slot, least)
        if ring is None:
            tried.append(f"{place} {why}")
            continue
        ring.requested, ring.asked_dir = wanted, directory  # the executor keeps it while it asks for these
        if ring.count < count:
            notes.append(f"handoff: {place} has room for {ring.count} of {count} slots of {_size(slot)} "
                         f"({_size(_free(place))} free after them): {ring.count} batches in flight; "
                         f"{_fix(count * slot)} would hold all {count}")
        if place != places[0]:
            notes.append(f"handoff: {tried[0]}, {least} slots of {_size(slot)} need "
                         f"{_size(least * slot)}; the slot ring is a file in {place} instead (the page "
                         f"cache holds it, workers still map it without a copy, but it may be written "
                         f"to disk); {_fix(count * slot)} keeps it in shared memory")
        return ring, notes
    raise ConfigError(
        f"handoff: no room for the slot ring: it needs {count} x {_size(slot)} = {_size(count * slot)} "
        f"(at least {least} x {_size(slot)} = {_size(least * slot)}), but {' and '.join(tried)}; "
        f"give the container more shared memory ({_fix(count * slot)}), set handoff.dir to a bigger "
        f"filesystem, or use smaller batches "
        f"(handoff.slot_mb, --rows) or fewer in flight (--in-flight)")


def _within_memory(count: int, slot: int, least: int, notes: list[str]) -> int:
    """``count``, or fewer slots (``least`` at fewest) so that the ring takes at most half of the
    memory this process may use; ConfigError when even ``least`` slots would take more."""
    known = devices.memory_available()
    if known is None:
        return count
    avail, source = known
    fits = (avail // 2) // slot
    if fits >= count:
        return count
    if fits >= least:
        notes.append(f"handoff: {count} slots of {_size(slot)} would take more than half of the "
                     f"{_size(avail)} this process may use ({source}): {fits} slots, {fits} batches "
                     f"in flight")
        return fits
    raise ConfigError(
        f"handoff: a slot ring of {least} x {_size(slot)} = {_size(least * slot)} would take more than "
        f"half of the {_size(avail)} this process may use ({source}); use smaller batches "
        f"(handoff.slot_mb, --rows) or give the container more memory (docker run --memory=...)")


def _ring_in(place: str, count: int, slot: int, least: int) -> tuple[SlotRing | None, str]:
    """A ring of ``count`` slots in ``place``, or of as many as fit (``least`` at fewest); else None
    and why not, for the error message."""
    n = min(count, max(0, _free(place) - _reserve(place)) // slot)
    while n >= least:
        try:
            return SlotRing(n, slot, place), ""
        except OSError as e:
            if e.errno in NOT_HERE:
                return None, f"cannot hold it ({os.strerror(e.errno)})"
            if e.errno not in NO_ROOM:
                raise
        n = min(n - 1, max(0, _free(place) - _reserve(place)) // slot)  # someone else took space
    free, keep = _free(place), _reserve(place)
    return None, f"has {_size(free)} free" + (f" (keeping {_size(keep)} for others)" if keep else "")


def _free(place: str) -> int:
    try:
        st = os.statvfs(place)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _reserve(place: str) -> int:
    """Space left to others sharing the filesystem: 1/16 of it, at most 64 MiB."""
    try:
        st = os.statvfs(place)
    except OSError:
        return 0
    return min(st.f_blocks * st.f_frsize // 16, 64 * MIB)


def _same_place(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a == b


def _fix(ring_bytes: int) -> str:
    """The docker flag that would hold a ring of ``ring_bytes`` with room to spare (a power of two)."""
    mib = 64
    while mib * MIB < ring_bytes * 5 // 4:
        mib *= 2
    return f"docker run --shm-size={mib // 1024}g" if mib >= 1024 else f"docker run --shm-size={mib}m"


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _alive(pid: int) -> bool:
    """Process ``pid`` runs (a zombie does not: it died and waits for its parent to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def pipe_broke(main_pid: int, ring_dir: str, wait: float = 1.0) -> None:
    """A child's pipe to the main broke: if the main is gone, unlink its rings (and any other dead main's).
    Looked at for ``wait`` s: a dying process closes its pipes a moment before it is a zombie. The child's
    parent is no sign: a forkserver's workers are the server's children, and the server may outlive the
    main by a moment."""
    import time
    deadline = time.monotonic() + wait
    while _alive(main_pid):
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)
    remove_stale(ring_dir, dead=main_pid)
