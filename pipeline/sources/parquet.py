"""Parquet input: a ``.parquet`` file, a directory of them, or a glob, read a row group at a time.

 --input PATH   a file; a directory (every ``*.parquet`` / ``.parq`` / ``.pq`` file under it, hidden and
                ``_``-prefixed names skipped, sorted by path); or a glob (``data/*.parquet``, sorted)
 --columns a,b  the columns of a batch (default: every numeric, bool and fixed-size-list column that
                is not in --keep-columns)
 --batch-size B rows per batch (default 1024): batch k is rows kB .. kB+B-1 of the files one after the
                other, crossing row-group and file boundaries: the same batches whatever reads them

A batch is a dict of arrays, one per column: a number or bool column is ``(B,)``; a fixed-size list
``(B, D)`` (nested ones ``(B, D1, D2)``); a list column whose rows all have D values ``(B, D)`` (D from the
first row). Everything the metadata shows is checked when the source opens, in the main, before a worker
starts, as a ``ConfigError`` (exit 2) naming the file and the column: a missing or non-numeric column (a
string or binary one: carry it to the output with ``--keep-columns`` instead), files whose columns differ,
a file that is no Parquet or is truncated. What only the data shows (a null, a list row of another length,
a damaged page) fails that batch with a ``SampleError`` naming the file, the column and the row, under
``faults.on_error``.

NOTE [ Row groups ]
``fill`` reads the row groups that batch k overlaps with ``ParquetFile.read_row_group`` (the selected
columns only; pyarrow releases the GIL while it decodes, so build threads read in parallel) and copies
their rows straight into the slot's views. A row group read is kept in a small cache that the build
threads of a process share (``CACHE`` row groups, least recently used out; a group being read is read once,
the other threads wait for it), so consecutive batches in one row group cost one read. Memory is the slots
plus at most ``CACHE`` row groups of the selected columns: never a whole file (write files with row groups
of a few tens of MB: ``pyarrow.parquet.write_table(..., row_group_size=...)``). Files are opened lazily, one
per thread, so the source pickles small (build processes, Ray actors) and reopens them where it lands.
"""
from __future__ import annotations

import glob
import hashlib
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..config import SourceConfig
from ..errors import ConfigError, SampleError
from ..fields import Layout
from .base import Batch, Indexed

PARQUET_EXTS = (".parquet", ".parq", ".pq")
DEFAULT_BATCH_SIZE = 1024
CACHE = 4  # row groups kept per process (NOTE [ Row groups ])
EXTRA = "Parquet needs pyarrow: pip install -e '.[parquet]' (or pip install pyarrow)"


def pyarrow():
    """``(pyarrow, pyarrow.parquet, pyarrow.compute)``, or the ConfigError naming the extra."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(EXTRA) from None
    return pa, pq, pc


@dataclass(frozen=True)
class Column:
    """How one Arrow column becomes one field: its numpy dtype and the shape of one row."""
    name: str
    dtype: str  # numpy dtype.str
    dims: tuple  # () for a number; (D,) for a list; (D1, D2) for nested fixed-size lists
    ragged: bool  # a variable-size list: every row must have dims[0] values (checked per batch)
    arrow: str  # the Arrow type, for messages and the identity


def _problem(t) -> str | None:
    """Why Arrow type ``t`` can't be a field (None: it can)."""
    pa, _, _ = pyarrow()
    while pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    if pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t):
        return None
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) \
            or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return f"{t} is not numeric: computing needs numbers (carry it to the output with --keep-columns)"
    return f"{t} is not a number, bool or list of them: cast it (pyarrow.compute.cast) to a numeric type"


def _column(name: str, t, first_len) -> Column:
    arrow = str(t)
    """The Column for an Arrow type already accepted by ``_problem``; ``first_len()`` gives D for a
    variable-size list (the first row's length)."""
    pa, _, _ = pyarrow()
    dims, ragged = [], False
    while True:
        if pa.types.is_fixed_size_list(t):
            dims.append(t.list_size)
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            if dims or ragged or not (pa.types.is_boolean(t.value_type) or pa.types.is_integer(t.value_type)
                                      or pa.types.is_floating(t.value_type)):
                raise ConfigError(f"column {name!r}: {t}: only one level of variable-size list is read; "
                                  f"write it as fixed-size lists (pyarrow.list_(type, D))")
            dims.append(first_len())
            ragged = True
        else:
            break
        t = t.value_type
    dtype = np.dtype(np.bool_) if pa.types.is_boolean(t) else np.dtype(t.to_pandas_dtype())
    return Column(name, dtype.str, tuple(dims), ragged, arrow)


def is_parquet(path: str) -> bool:
    """Whether ``--input PATH`` names Parquet: a glob, a ``.parquet`` file, or a directory that holds
    Parquet files (at any depth) and no ``.npy`` file at its top."""
    if not path:
        return False
    if glob.has_magic(path):
        return True
    if path.lower().endswith(PARQUET_EXTS):
        return True
    if os.path.isdir(path):
        try:
            names = os.listdir(path)
        except OSError:
            return False
        if any(n.endswith(".npy") for n in names):
            return False
        for _, _, files in os.walk(path):
            if any(f.lower().endswith(PARQUET_EXTS) for f in files):
                return True
    return False


def list_files(path: str) -> list[str]:
    """The Parquet files ``--input PATH`` names, in their fixed order (sorted paths)."""
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise ConfigError(f"--input {path}: the glob matches no file")
        return files
    if os.path.isdir(path):
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
            files += [os.path.join(root, n) for n in names
                      if n.lower().endswith(PARQUET_EXTS) and not n.startswith((".", "_"))]
        if not files:
            raise ConfigError(f"--input {path}: the directory has no .parquet files")
        return sorted(files)
    if not os.path.exists(path):
        raise ConfigError(f"--input {path}: no such file or directory")
    return [path]


def _open(path: str):
    _, pq, _ = pyarrow()
    import pyarrow as pa
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ConfigError(f"--input {path}: not a readable Parquet file ({type(e).__name__}: {e}); it may be "
                          f"truncated or corrupt: write it again, or leave it out of --input") from None


def open_parquet(cfg: SourceConfig) -> "ParquetSource":
    if not cfg.path:
        raise ConfigError("source.kind = 'parquet' needs source.path (--input PATH): a .parquet file, a "
                          "directory or a glob of them")
    if cfg.key:
        raise ConfigError(f"--input {cfg.path}: --input-key {cfg.key!r} is only for .npz files")
    pyarrow()
    return ParquetSource(list_files(cfg.path), cfg.path, list(cfg.columns), list(cfg.keep_columns),
                         cfg.batch_size or DEFAULT_BATCH_SIZE, cfg.drop_last)


def _default_columns(schema) -> list[str]:
    """Every column that is a number, a bool or a fixed-size list of them."""
    pa, _, _ = pyarrow()
    return [f.name for f in schema if not pa.types.is_list(f.type) and not pa.types.is_large_list(f.type)
            and _problem(f.type) is None]


class ParquetSource(Indexed):
    """Rows of Parquet files in batches of ``batch_size``: batch k is built on its own (any thread, build
    process or Ray actor) from the row groups it overlaps (NOTE [ Row groups ])."""

    def __init__(self, files: list[str], path: str, columns: list[str], keep: list[str], batch_size: int,
                 drop_last: bool = False):
        self.files, self.path, self.keep, self.batch_size = files, path, keep, batch_size
        groups, schemas, digest = [], [], hashlib.sha256()
        for i, f in enumerate(files):
            pf = _open(f)
            try:
                meta = pf.metadata
                schemas.append(pf.schema_arrow)
                groups += [(i, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
            finally:
                pf.close()
            st = os.stat(f)
            digest.update(f"{os.path.relpath(f, os.path.dirname(os.path.abspath(path)) or '/')}:"
                          f"{st.st_size}:{st.st_mtime_ns}\n".encode())
        self.columns = self._choose(columns, schemas)
        self.groups = [(fi, g) for fi, g, rows in groups if rows]
        counts = [rows for _, _, rows in groups if rows]
        self.starts = np.cumsum([0] + counts)  # global row where each (non-empty) row group starts
        self.file_starts = {}
        for (fi, _), s in zip(self.groups, self.starts):
            self.file_starts.setdefault(fi, int(s))
        self.total_rows = int(self.starts[-1])
        if not self.total_rows:
            raise ConfigError(f"--input {path}: no rows in {len(files)} file(s); nothing to compute")
        self.n = self.total_rows // batch_size if drop_last else -(-self.total_rows // batch_size)
        if not self.n:
            raise ConfigError(f"--input {path}: {self.total_rows} rows, fewer than one batch of {batch_size} "
                              f"(drop_last)")
        self.layout = self._layout(batch_size)
        self.max_nbytes = self.layout.nbytes
        self._id = {"kind": "parquet", "path": os.path.abspath(path), "files": len(files),
                    "rows": self.total_rows, "stat_sha256": digest.hexdigest(), "batch_size": batch_size,
                    "drop_last": bool(drop_last), "columns": {c.name: c.arrow for c in self.columns}}
        self.__setstate__(self.__dict__)

    # -- opening: the metadata, checked ------------------------------------------------------------
    def _choose(self, columns: list[str], schemas: list) -> list[Column]:
        first = schemas[0]
        names = columns or [c for c in _default_columns(first) if c not in self.keep]
        if not columns and not names:
            raise ConfigError(f"--input {self.files[0]}: no numeric, bool or fixed-size-list column "
                              f"(columns: {_describe(first)}); choose some with --columns")
        for c in names + self.keep:
            if first.get_field_index(c) < 0:
                flag = "--keep-columns" if c in self.keep and c not in names else "--columns"
                raise ConfigError(f"--input {self.files[0]}: no column {c!r} ({flag}); its columns: "
                                  f"{_describe(first)}")
        for c in set(names) & set(self.keep):
            raise ConfigError(f"column {c!r} is in both --columns and --keep-columns: a kept column is "
                              f"carried to the output as it is, not computed; name it in one of them")
        for c in names:
            problem = _problem(first.field(c).type)
            if problem:
                raise ConfigError(f"--input {self.files[0]}: column {c!r}: {problem}")
        for f, schema in zip(self.files[1:], schemas[1:]):
            if not columns and [c for c in _default_columns(schema) if c not in self.keep] != names:
                raise ConfigError(f"--input {f}: its numeric columns ({', '.join(_default_columns(schema))}) "
                                  f"differ from those of {self.files[0]} ({', '.join(names)}); the files "
                                  f"must share a schema: write them alike, or choose with --columns")
            for c in names + self.keep:
                i = schema.get_field_index(c)
                if i < 0:
                    raise ConfigError(f"--input {f}: no column {c!r}, which {self.files[0]} has; the files "
                                      f"must share a schema: write them alike, or leave {f} out")
                if schema.field(i).type != first.field(c).type:
                    raise ConfigError(f"--input {f}: column {c!r} is {schema.field(i).type} there but "
                                      f"{first.field(c).type} in {self.files[0]}; the files must share a "
                                      f"schema: cast it when writing")
        return [_column(c, first.field(c).type, lambda c=c: self._first_length(c)) for c in names]

    def _first_length(self, name: str) -> int:
        """D of a variable-size list column: the length of its first row (read from its first row group)."""
        _, _, pc = pyarrow()
        for f in self.files:
            pf = _open(f)
            try:
                for g in range(pf.metadata.num_row_groups):
                    if pf.metadata.row_group(g).num_rows:
                        col = pf.read_row_group(g, columns=[name], use_threads=False).column(0)
                        first = col.slice(0, 1)
                        if first.null_count:
                            raise ConfigError(f"--input {f}: column {name!r}, row 0 is null: the list "
                                              f"length is taken from the first row; fill or drop nulls")
                        return int(pc.list_value_length(first).to_numpy(zero_copy_only=False)[0])
            finally:
                pf.close()
        return 0

    def _layout(self, rows: int) -> Layout:
        return Layout.make("dict", [c.name for c in self.columns], [(rows, *c.dims) for c in self.columns],
                           [c.dtype for c in self.columns])

    def identity(self) -> dict:
        return self._id

    def __getstate__(self):  # picklable: files and caches are reopened where it lands
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_keep_cache", "_local")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._cache = _Cache(getattr(self, "cache_groups", CACHE))
        self._keep_cache = _Cache(2)
        self._local = threading.local()

    # -- batches -------------------------------------------------------------------------------------
    def rows_of(self, index: int) -> tuple[int, int]:
        lo = index * self.batch_size
        return lo, min(lo + self.batch_size, self.total_rows)

    def batch(self, index: int) -> Batch:
        lo, hi = self.rows_of(index)
        layout = self.layout if hi - lo == self.batch_size else self._layout(hi - lo)
        return Batch(index, layout, lambda views: self._fill(views, index, lo, hi), layout.nbytes)

    def _pieces(self, lo: int, hi: int, cache, columns: list[str]):
        """(row in the batch, row group table slice) covering rows lo .. hi, in order."""
        pos = lo
        while pos < hi:
            g = int(np.searchsorted(self.starts, pos, side="right")) - 1
            start, stop = int(self.starts[g]), int(self.starts[g + 1])
            m = min(hi, stop) - pos
            table = cache.get(g, lambda: self._read(g, columns))
            yield pos - lo, g, table.slice(pos - start, m)
            pos += m

    def _read(self, g: int, columns: list[str]):
        """Row group ``g``'s ``columns``: one read, the GIL released while pyarrow decodes."""
        fi, rg = self.groups[g]
        local = self._local
        if getattr(local, "file", None) != fi:
            old = getattr(local, "pf", None)
            if old is not None:
                old.close()
            local.pf, local.file = None, None
            local.pf, local.file = _open(self.files[fi]), fi
        try:
            return local.pf.read_row_group(rg, columns=columns, use_threads=False)
        except Exception as e:  # noqa: BLE001 - a damaged page: that batch fails, naming the file
            raise SampleError(f"{self.files[fi]}: cannot read row group {rg} ({type(e).__name__}: {e}); "
                              f"the file is damaged: write it again") from e

    def _fill(self, views: dict, index: int, lo: int, hi: int) -> None:
        for at, g, part in self._pieces(lo, hi, self._cache, [c.name for c in self.columns]):
            fi = self.groups[g][0]
            first = lo + at - self.file_starts[fi]  # the slice's first row within its file
            where = lambda row, c: (f"{self.files[fi]}: column {c!r}, row {first + row} "  # noqa: E731
                                    f"(batch {index})")
            for i, c in enumerate(self.columns):
                out = views[c.name][at:at + len(part)]
                put(out, part.column(i), c, where)

    def keep_table(self, index: int):
        """The ``--keep-columns`` of batch ``index``'s rows, as a pyarrow Table (read by the main, for the
        output: never sent to a worker)."""
        pa, _, _ = pyarrow()
        lo, hi = self.rows_of(index)
        parts = [p for _, _, p in self._pieces(lo, hi, self._keep_cache, self.keep)]
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]


def _describe(schema) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


def put(out: np.ndarray, col, c: Column, where) -> None:
    """Arrow (chunked) array ``col`` into ``out`` (its rows of a slot's field); SampleError naming the row
    (``where(row, name)``) for a null, or a list row of another length than the field's."""
    _, _, pc = pyarrow()
    pos = 0
    for chunk in getattr(col, "chunks", [col]):
        n = len(chunk)
        if chunk.null_count:
            row = int(np.flatnonzero(chunk.is_null().to_numpy(zero_copy_only=False))[0])
            raise SampleError(f"{where(pos + row, c.name)}: null; a computed column must have no nulls: fill "
                              f"them (pyarrow.compute.fill_null) or drop those rows, or leave the column out "
                              f"(--columns)")
        values = chunk
        for depth in range(len(c.dims)):
            if c.ragged and depth == 0:
                lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
                bad = np.flatnonzero(lengths != c.dims[0])
                if bad.size:
                    r = int(bad[0])
                    raise SampleError(f"{where(pos + r, c.name)}: a list of {int(lengths[r])} values where the "
                                      f"column's first row has {c.dims[0]}; every row of a list column must "
                                      f"have one length: pad or cut the lists, or write them as fixed-size "
                                      f"lists")
            values = values.flatten()
            if values.null_count:
                row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
                row //= max(1, math.prod(c.dims[:depth + 1]))
                raise SampleError(f"{where(pos + row, c.name)}: a null inside the list; a computed column "
                                  f"must have no nulls: fill them (pyarrow.compute.fill_null)")
        arr = values.to_numpy(zero_copy_only=False)
        out[pos:pos + n] = arr.reshape(n, *c.dims)
        pos += n


def row_values(col, c: Column, where) -> list:
    """One column of rows taken from a row group: a list per row (numpy), or one value per row."""
    col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise SampleError(f"{where(row, c.name)}: null; a computed column must have no nulls: fill them "
                          f"(pyarrow.compute.fill_null) or drop those rows")
    if not c.ragged:
        arr = col
        for _ in c.dims:
            arr = arr.flatten()
        return list(arr.to_numpy(zero_copy_only=False).astype(c.dtype, copy=False).reshape(len(col), *c.dims))
    values = col.flatten()
    if values.null_count:
        raise SampleError(f"{where(0, c.name)}: a null inside a list; fill them (pyarrow.compute.fill_null)")
    flat = values.to_numpy(zero_copy_only=False).astype(c.dtype, copy=False)
    offsets = col.offsets.to_numpy() - col.offsets[0].as_py()
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(col))]


class _Cache:
    """Row groups read, shared by the threads of one process: each is read once while it is kept."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.lock = threading.Lock()
        self.entries: OrderedDict = OrderedDict()

    def get(self, key, read):
        with self.lock:
            entry = self.entries.get(key)
            mine = entry is None
            if mine:
                entry = self.entries[key] = _Entry()
                while len(self.entries) > self.capacity:
                    self.entries.popitem(last=False)  # a thread still reading it keeps its own reference
            else:
                self.entries.move_to_end(key)
        if mine:
            try:
                entry.table = read()
            except BaseException as e:
                entry.error = e
                with self.lock:
                    if self.entries.get(key) is entry:
                        del self.entries[key]  # tried again next time (a retry of the batch)
            finally:
                entry.done.set()
        else:
            entry.done.wait()
        if entry.error is not None:
            raise entry.error
        return entry.table


class _Entry:
    def __init__(self):
        self.done = threading.Event()
        self.table = None
        self.error = None


class TableRows:
    """A ``pyarrow.Table`` (or RecordBatch) as a map-style dataset for ``MapSource``: sample i is a dict of
    its ``columns``' values (numpy), and ``__getitems__`` (a chunk of rows) converts each column once."""

    def __init__(self, table, columns: list[str] | None = None):
        pa, _, _ = pyarrow()
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        names = list(columns or _default_columns(table.schema))
        if not names:
            raise ConfigError(f"source: the pyarrow Table has no numeric, bool or fixed-size-list column "
                              f"({_describe(table.schema)}); choose some with columns=[...]")
        for c in names:
            if table.schema.get_field_index(c) < 0:
                raise ConfigError(f"source: the pyarrow Table has no column {c!r}; its columns: "
                                  f"{_describe(table.schema)}")
            problem = _problem(table.schema.field(c).type)
            if problem:
                raise ConfigError(f"source: the pyarrow Table's column {c!r}: {problem}")
        self.table = table.select(names)
        self.cols = [_column(c, self.table.schema.field(c).type, lambda c=c: self._length(c)) for c in names]

    def _length(self, name: str) -> int:
        _, _, pc = pyarrow()
        first = self.table.column(name).slice(0, 1)
        return int(pc.list_value_length(first).to_numpy(zero_copy_only=False)[0]) if len(first) else 0

    def identity(self) -> dict:
        return {"type": "pyarrow.Table", "rows": self.table.num_rows, "schema": str(self.table.schema)}

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.__getitems__([i % len(self)])[0]

    def lengths(self) -> np.ndarray | None:
        """Each row's length when a list column's rows differ in length (samples of their own length)."""
        _, _, pc = pyarrow()
        ragged = [c.name for c in self.cols if c.ragged]
        if not ragged:
            return None
        return pc.list_value_length(self.table.column(ragged[0])).to_numpy(zero_copy_only=False).astype(np.int64)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        if any(c.ragged for c in self.cols):  # rows of their own length: one array per row
            part = self.table.take(np.asarray(indices, np.int64))
            cols = [row_values(part.column(k), c, lambda r, name: f"source: row {indices[r]}, column {name!r}")
                    for k, c in enumerate(self.cols)]
            return [{c.name: col[j] for c, col in zip(self.cols, cols)} for j in range(len(indices))]
        lo, hi = min(indices), max(indices) + 1
        part = self.table.slice(lo, hi - lo)
        arrays = {}
        for i, c in enumerate(self.cols):
            out = np.empty((hi - lo, *c.dims), c.dtype)
            put(out, part.column(i), c, lambda row, name: f"source: row {lo + row}, column {name!r}")
            arrays[c.name] = out
        return [{k: a[i - lo] for k, a in arrays.items()} for i in indices]
