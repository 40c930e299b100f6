"""The shared-memory slot ring that makes a handoff cost one memcpy.

NOTE [ Slot ring ]
One shared-memory file of ``count`` slots, allocated once and reused for every batch (and every run on
the same workers). Build threads write a batch straight into a free slot and the main sends a small
descriptor; the worker views the slot without copying. Which slots are free is the run's business
(local/slots.py, NOTE [ Slot release ]). The file lives in ``handoff.dir`` (/dev/shm) under a name that
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

import numpy as np

from .. import devices
from ..config import RING_DIR
from ..errors import ConfigError
from ..wire import Descriptor

SHM_DIR = RING_DIR  # the default handoff.dir
RING_PREFIX = "pipeline-"
RING_NAME = re.compile(r"^pipeline-(\d+)-[0-9a-f]{8}$")
ALIGN = 4096
MIB = 1 << 20
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOMEM)
NOT_HERE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EOPNOTSUPP)


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
        self.name = f"{RING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
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
            if m is None or (int(m.group(1)) != dead and alive(int(m.group(1)))):
                continue
            path = os.path.join(directory, name)
            try:
                if stat.S_ISREG(os.lstat(path).st_mode):
                    os.unlink(path)
                    removed.append(name)
            except OSError:
                pass
    return removed


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


def alive(pid: int) -> bool:
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
