"""File sources: a .npy file (memory-mapped), one array of a .npz, or a directory of .npy files.

  .npy        consecutive slices of ``source.rows`` along axis 0 (the last may be shorter), read through a
              read-only memory map: the main copies each slice straight into a shared-memory slot
  .npz        the same, for the array named by ``source.key`` (may be omitted when it holds exactly one);
              numpy cannot memory-map inside a zip, so that array is read into memory when the run starts
  directory   every ``*.npy`` file in it (not hidden ones), sorted by name: one file, one batch

``source.batches`` is ignored (the data says how many batches there are), and so are ``cols``, ``dtype``
and ``seed``; ``rows`` is ignored for a directory. Any numeric dtype (bool, integers, floats, complex), C or
Fortran order (a Fortran file works, but each slice is then a strided gather across the whole file: save C
order for speed); big-endian data is converted to native order as it is copied. Nothing is ever unpickled
(``allow_pickle=False``): object arrays are refused. Everything is checked when the source is opened, in
the main process before any worker starts, by reading the headers only: a missing file, a file that is no
.npy, an object or empty array, a truncated file or a bad key is a ``ConfigError`` naming the file.
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
import zipfile
from dataclasses import dataclass

import numpy as np

from ..config import SourceConfig
from ..errors import ConfigError
from ..fields import Layout
from .base import Batch, Indexed

NUMERIC = "biufc"  # bool, signed, unsigned, float, complex


@dataclass(frozen=True)
class Header:
    shape: tuple
    dtype: np.dtype  # as stored (may be big-endian)
    offset: int  # where the data starts
    size: int  # bytes available from the start of the file or member


def open_arrays(cfg: SourceConfig):
    """The source for ``cfg.path`` (``--input``): NpyFile, NpzArray or NpyDir, checked."""
    path = cfg.path
    if not path:
        raise ConfigError("source.kind = 'npy' needs source.path (--input PATH): a .npy or .npz file, "
                          "or a directory of .npy files")
    if os.path.isdir(path):
        if cfg.key:
            raise _bad(path, f"--input-key {cfg.key!r} is only for .npz files, not a directory")
        return NpyDir(path)
    if not os.path.exists(path):
        raise ConfigError(f"--input {path}: no such file or directory")
    if path.endswith(".npz") or _starts_with(path, b"PK\x03\x04"):  # a zip: what np.savez writes
        return NpzArray(path, cfg.key, cfg.rows)
    if cfg.key:
        raise ConfigError(f"--input {path}: --input-key {cfg.key!r} is only for .npz files")
    return NpyFile(path, cfg.rows)


def _starts_with(path: str, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def _bad(path: str, problem: str) -> ConfigError:
    return ConfigError(f"--input {path}: {problem}")


def read_header(f, size: int, label: str) -> Header:
    """The shape and dtype of the .npy data in ``f`` (at its start), checked; reads the header only."""
    try:
        version = np.lib.format.read_magic(f)
    except ValueError:
        raise _bad(label, "not a .npy file (no NUMPY header)") from None
    try:
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except ValueError as e:
        raise _bad(label, f"unreadable .npy header: {e}") from None
    if dtype.hasobject:
        raise _bad(label, f"object array (dtype {dtype}): refused, pipeline never unpickles "
                          f"(allow_pickle=False); save a numeric array")
    if dtype.kind not in NUMERIC or dtype.fields is not None or dtype.subdtype is not None:
        raise _bad(label, f"dtype {dtype} is not numeric (bool, integer, float or complex)")
    if len(shape) == 0:
        raise _bad(label, "a 0-d array (a scalar) has no rows to batch")
    if math.prod(shape) == 0:
        raise _bad(label, f"empty array (shape {tuple(shape)})")
    head = Header(tuple(shape), dtype, f.tell(), size)
    need = head.offset + math.prod(shape) * dtype.itemsize
    if size < need:
        raise _bad(label, f"truncated: {size} bytes, the header says {need}")
    return head


def _npy_header(path: str) -> Header:
    try:
        with open(path, "rb") as f:
            return read_header(f, os.fstat(f.fileno()).st_size, path)
    except OSError as e:
        raise _bad(path, e.strerror or str(e)) from None


def _stat_id(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


class _Slices(Indexed):
    """Batches that are consecutive ``rows``-high slices along axis 0 of one array."""

    def __init__(self, head: Header, rows: int):
        self.total_rows = head.shape[0]
        self.shape = head.shape
        self.rows = min(rows, self.total_rows)
        self.dtype = head.dtype.newbyteorder("=")  # batches are native; copyto swaps big-endian bytes
        self.n = -(-self.total_rows // self.rows)
        self.row_bytes = math.prod(head.shape[1:]) * head.dtype.itemsize
        self.max_nbytes = self.rows * self.row_bytes
        self._arr = None
        self._lock = threading.Lock()

    def load(self) -> np.ndarray:
        raise NotImplementedError

    def __getstate__(self):  # picklable (bench's DataLoader mode): the array is reopened on demand
        return {k: v for k, v in self.__dict__.items() if k not in ("_arr", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _arr=None, _lock=threading.Lock())

    def _part(self, index: int) -> np.ndarray:
        with self._lock:  # build threads share one map (or one loaded .npz array)
            if self._arr is None:
                self._arr = self.load()
            return self._arr[index * self.rows:(index + 1) * self.rows]

    def batch(self, index: int) -> Batch:
        """Batch ``index``: a slice of the map; its ``fill`` copies it (native order) into a slot."""
        part = self._part(index)
        layout = Layout.make("array", (), [part.shape], [self.dtype])
        return Batch(index, layout, lambda out: np.copyto(out, part), layout.nbytes)


class NpyFile(_Slices):
    """A .npy file, memory-mapped read-only."""

    def __init__(self, path: str, rows: int):
        self.path = path
        super().__init__(_npy_header(path), rows)
        self._id = {"kind": "npy", "path": os.path.abspath(path), "rows": self.rows, **_stat_id(path)}

    def load(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r", allow_pickle=False)

    def identity(self) -> dict:
        return self._id


class NpzArray(_Slices):
    """One array of a .npz file (read into memory at the first batch: numpy cannot map inside a zip)."""

    def __init__(self, path: str, key: str, rows: int):
        self.path = path
        try:
            with zipfile.ZipFile(path) as z:
                members = {n[:-4]: n for n in z.namelist() if n.endswith(".npy")}
                if not members:
                    raise _bad(path, "a .npz with no arrays in it")
                if not key:
                    if len(members) > 1:
                        raise _bad(path, f"holds {len(members)} arrays ({', '.join(sorted(members))}): "
                                         f"choose one with --input-key (source.key)")
                    key = next(iter(members))
                if key not in members:
                    raise _bad(path, f"no array {key!r} (arrays: {', '.join(sorted(members))})")
                info = z.getinfo(members[key])
                with z.open(info) as f:
                    head = read_header(f, info.file_size, f"{path}[{key}]")
        except zipfile.BadZipFile as e:
            raise _bad(path, f"not a .npz file (bad zip: {e})") from None
        except OSError as e:
            raise _bad(path, e.strerror or str(e)) from None
        self.key = key
        super().__init__(head, rows)
        self._id = {"kind": "npz", "path": os.path.abspath(path), "key": key, "rows": self.rows,
                    **_stat_id(path)}

    def load(self) -> np.ndarray:
        with np.load(self.path, allow_pickle=False) as z:
            return z[self.key]

    def identity(self) -> dict:
        return self._id


class NpyDir(Indexed):
    """Every ``*.npy`` file of a directory, sorted by name, one batch each (shapes may differ)."""

    def __init__(self, path: str):
        self.path = path
        try:
            names = sorted(n for n in os.listdir(path)
                           if n.endswith(".npy") and not n.startswith(".")
                           and os.path.isfile(os.path.join(path, n)))
        except OSError as e:
            raise _bad(path, e.strerror or str(e)) from None
        if not names:
            raise _bad(path, "the directory has no .npy files")
        self.files = [os.path.join(path, n) for n in names]
        self.n = len(self.files)
        self.heads = [_npy_header(f) for f in self.files]
        self.max_nbytes = max(math.prod(h.shape) * h.dtype.itemsize for h in self.heads)
        digest = hashlib.sha256()
        for f in self.files:
            st = _stat_id(f)
            digest.update(f"{os.path.basename(f)}:{st['size']}:{st['mtime_ns']}\n".encode())
        self._id = {"kind": "npy dir", "path": os.path.abspath(path), "files": len(self.files),
                    "stat_sha256": digest.hexdigest()}

    def identity(self) -> dict:
        return self._id

    def batch(self, index: int) -> Batch:
        h, path = self.heads[index], self.files[index]
        layout = Layout.make("array", (), [h.shape], [h.dtype.newbyteorder("=")])
        return Batch(index, layout, lambda out: np.copyto(out, np.load(path, mmap_mode="r", allow_pickle=False)),
                     layout.nbytes)
