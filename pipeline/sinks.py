"""Results on disk: an output directory written batch by batch, atomically, that a rerun resumes.

 DIR/run.json          what the results depend on: the source's identity (synthetic settings, or the input
                       path, key, rows and a size+mtime fingerprint) and the kernel's name and params
 DIR/batch-000123.npy  batch 123's result: written to a hidden temp file in DIR, fsynced, then renamed
 DIR/batch-000123.npz  the same for a kernel with several outputs (a tuple or dict of arrays): one .npz per
                       batch (``np.savez``), members named by dict key, or "0", "1"... for a tuple
 DIR/manifest.jsonl    one line per finished batch, appended and fsynced once its file is in place:
                       batch, file, shape, dtype, sha256 (of the file's bytes), bytes, pid, device, seconds;
                       for a .npz: "kind" (tuple or dict) and "arrays" ({name: {shape, dtype}}, in order)
 DIR/summary.json      the run's summary, written atomically when the run finishes (absent while it runs)

With ``run.output_format = "parquet"`` (``--output-format parquet``) batch k is ``DIR/part-00000k.parquet``
instead: one table per batch, a column per kernel output (``output`` for a single array, ``0``, ``1``... for
a tuple, the keys of a dict; a 2-D output is a fixed-size list column), then the ``--keep-columns`` of the
batch's input rows; written, renamed, fsynced and listed in the manifest exactly as above. The bookkeeping
files are then ``_run.json``, ``_manifest.jsonl`` and ``_summary.json`` (a leading ``_``, as Spark's
``_SUCCESS``): ``pyarrow.dataset.dataset(DIR)``, pandas and DuckDB read DIR as one table and skip them.

Resume keeps nothing in memory: ``restored`` is the sorted list of verified batch indices (each file is
streamed through sha256, not loaded), and ``load(index)`` reads one result back when it is wanted.

NOTE [ Resume ]
A batch is done when the manifest has its line AND its file's sha256 matches that line. The file is renamed
into place before its line is appended, so a kill at any moment (SIGKILL, power loss) leaves at worst a file
without a line (computed again and replaced), a torn last line (dropped), or a hidden temp file (removed).
On open, the manifest is rewritten with the verified lines only, one per batch, so appends start on a clean
line and no batch is listed twice; the verified batches are never handed to a worker, and read back one at
a time with ``load`` (the results and checksum are those of an uninterrupted run). A DIR written with a different run.json is
refused (ConfigError) unless ``overwrite``, which deletes its batch files, manifest and summary first. An
exclusive lock (flock on DIR) keeps two runs out of one directory. Failures to write (not a directory,
permissions, a full disk) raise OutputError naming the path, after removing the temp file.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import zipfile

import numpy as np

from . import outputs
from .errors import ConfigError, OutputError

try:
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None

RUN, MANIFEST, SUMMARY = "run.json", "manifest.jsonl", "summary.json"
TMP = ".tmp-"  # hidden: a directory of .npy files read as input skips it
_BATCH = re.compile(r"^(batch-\d{6,}\.np[yz]|part-\d{6,}\.parquet)$")
NAMES = {"npy": (RUN, MANIFEST, SUMMARY), "parquet": (f"_{RUN}", f"_{MANIFEST}", f"_{SUMMARY}")}
FORMAT = 1


def batch_name(index: int, several: bool = False) -> str:
    """``batch-000123.npy``, or ``.npz`` for a result of several arrays (a tuple or dict)."""
    return f"batch-{index:06d}.{'npz' if several else 'npy'}"


def part_name(index: int) -> str:
    """``part-000123.parquet``: batch 123's result with ``--output-format parquet``."""
    return f"part-{index:06d}.parquet"


def identity(source, spec, output_format: str = "npy", keep: list | None = None) -> dict:
    """What every result depends on (never the worker count, backend or device: docs/architecture.md); the output
    format and the kept columns for Parquet output (an npy identity is as it was before Parquet, so older
    output directories still resume)."""
    src = source.identity()
    out = {"output": {"format": output_format, "keep_columns": list(keep or [])}} \
        if output_format != "npy" else {}
    return _plain({"format": FORMAT, "source": src, **out,
                   "kernel": {"name": spec.name, "params": spec.params,
                              **({"precision": spec.precision} if spec.precision != "fp32" else {})}})


def _plain(obj):
    """``obj`` as it reads back from JSON (tuples become lists; arrays become a digest)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_jsonable))


def _jsonable(o):
    if isinstance(o, np.ndarray):
        return {"ndarray": o.dtype.str, "shape": list(o.shape),
                "sha256": hashlib.sha256(np.ascontiguousarray(o).tobytes()).hexdigest()}
    if isinstance(o, np.generic):
        return o.item()
    return repr(o)


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(old: dict, new: dict) -> str:
    a, b = _flat(old), _flat(new)
    short = lambda v: (r if len(r := json.dumps(v)) <= 40 else r[:37] + "...")  # noqa: E731
    return ", ".join(f"{k}: {short(a.get(k))} -> {short(b.get(k))}"
                     for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def _error(what: str, e: OSError) -> OutputError:
    hint = {errno.ENOSPC: " (free some space, or choose another --output)",
            errno.EACCES: " (check permissions, or choose another --output)",
            errno.EROFS: " (read-only file system: choose another --output)"}.get(e.errno, "")
    err = OutputError(f"{what}: {e.strerror or e}{hint}")
    err.errno = e.errno  # (strerror and filename stay unset: they would replace the message in str())
    return err


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Hashing:
    """A write-only file wrapper that hashes what goes through it (numpy writes the .npy through it)."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.n += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _savez(f, members) -> None:
    """What ``np.savez`` writes (an uncompressed zip of ``NAME.npy`` members), to a stream, never pickling;
    any key works (``np.savez(f, **d)`` would clash with its own ``file`` and ``allow_pickle`` arguments)."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, a in members:
            with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(a), allow_pickle=False)


class OutputDir:
    """One run's output directory: verified resume state on open, then ``write`` per batch, ``finish``."""

    def __init__(self, path: str, ident: dict, overwrite: bool = False, output_format: str = "npy",
                 keep=None, samples=None):
        self.path = os.path.abspath(path)
        self.format = output_format
        self.kept_from = keep  # Parquet output: the source, whose ``keep_table(index)`` adds --keep-columns
        self.samples = samples  # the source, when each part carries its rows' sample indices (NOTE [ Input order ])
        self.RUN, self.MANIFEST, self.SUMMARY = NAMES[output_format]
        self._dir_fd: int | None = None
        self._manifest_fd: int | None = None
        self.restored: list[int] = []  # verified batch indices, sorted (``load`` reads one back)
        self._records: dict[int, dict] = {}
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise OutputError(f"--output {self.path}: exists and is not a directory")
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise _error(f"cannot create output directory {self.path}", e) from None
        try:
            self._lock()
            self._prepare(ident, overwrite)
        except BaseException:
            self.close()
            raise

    def _join(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _lock(self) -> None:
        if fcntl is None:
            return
        self._dir_fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"--output {self.path}: in use by another run (locked); wait for it to "
                              f"finish or choose another directory") from None

    def _prepare(self, ident: dict, overwrite: bool) -> None:
        names = os.listdir(self.path)
        for n in names:
            if n.startswith(TMP):  # a killed run's half-written file (we hold the lock: nobody else's)
                _remove(self._join(n))
        book = {n for names_ in NAMES.values() for n in names_}
        ours = [n for n in names if _BATCH.match(n) or (n in book and n != self.RUN)]
        other = [run for f, (run, _, _) in NAMES.items() if f != self.format and run in names]
        if other and not overwrite:
            raise ConfigError(f"--output {self.path}: holds results written with --output-format "
                              f"{'parquet' if other[0].startswith('_') else 'npy'} ({other[0]}); use the same "
                              f"--output-format to resume, --overwrite to replace them, or another --output")
        old = self._read_run() if self.RUN in names and not overwrite else None
        if overwrite:  # manifest first: a kill part-way leaves batch files that nothing vouches for
            _remove(self._join(self.MANIFEST))
            _remove(self._join(self.SUMMARY))
            self._atomic_write(self.RUN, json.dumps(ident, indent=1, sort_keys=True) + "\n")
            for n in ours + other:
                _remove(self._join(n))
            old = ident
        elif old is None and ours:
            raise ConfigError(f"--output {self.path}: holds pipeline output but no {self.RUN}, so it cannot be "
                              f"resumed; use --overwrite to replace it, or another --output")
        elif old is not None and old != ident:
            raise ConfigError(f"--output {self.path}: written by a different config "
                              f"({differences(old, ident)}); use --overwrite to replace its results, or "
                              f"another --output")
        if old is None:
            self._atomic_write(self.RUN, json.dumps(ident, indent=1, sort_keys=True) + "\n")
        _remove(self._join(self.SUMMARY))  # summary.json is there only once a run has finished
        records = self._verified()
        self._records, self.restored = records, sorted(records)
        self._atomic_write(self.MANIFEST, "".join(json.dumps(r) + "\n" for _, r in sorted(records.items())))
        try:
            self._manifest_fd = os.open(self._join(self.MANIFEST), os.O_WRONLY | os.O_APPEND)
        except OSError as e:
            raise _error(f"cannot open {self._join(self.MANIFEST)}", e) from None

    def _read_run(self):
        try:
            with open(self._join(self.RUN)) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--output {self.path}: unreadable {self.RUN} ({e}); use --overwrite to replace "
                              f"the directory's results") from None

    def _verified(self) -> dict[int, dict]:
        """Manifest lines whose file exists with the recorded sha256 (the last line per batch wins)."""
        records: dict[int, dict] = {}
        try:
            with open(self._join(self.MANIFEST), "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                r = json.loads(line)
                records[int(r["batch"])] = r
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a killed run, or blank
        good = {}
        for i, r in records.items():
            name = r.get("file")
            if name not in ((part_name(i),) if self.format == "parquet" else (batch_name(i), batch_name(i, True))):
                continue
            try:
                with open(self._join(name), "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()  # streamed, never held whole
            except OSError:
                continue
            if digest == r.get("sha256"):
                good[i] = r
        return good

    def load(self, index: int):
        """Batch ``index``'s result from DIR (an array, or the tuple or dict it was written from)."""
        return unwrap(self._load(index), self._records[index])

    def _load(self, index: int):
        r = self._records[index]
        path = self._join(r["file"])
        if self.format == "parquet":
            return _read_part(path, r)
        try:
            if not r["file"].endswith(".npz"):
                return np.load(path, allow_pickle=False)
            with np.load(path, allow_pickle=False) as z:
                got = {name: z[name] for name in r["arrays"]}
        except (OSError, ValueError, KeyError) as e:
            raise OutputError(f"cannot read {path} back: {e}; rerun with --overwrite to compute it "
                              f"again") from None
        return tuple(got.values()) if r["kind"] == "tuple" else got

    def _atomic_write(self, name: str, text: str) -> None:
        final, tmp = self._join(name), self._join(f"{TMP}{os.getpid()}-{name}")
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as e:
            _remove(tmp)
            raise _error(f"cannot write {final}", e) from None

    # -- per batch -------------------------------------------------------------------------------------
    def write(self, index: int, result, info: dict, extra: dict | None = None) -> None:
        """``DIR/batch-<index>.npy`` (or ``.npz`` for a tuple or dict) atomically, then its manifest line
        (both fsynced), with the source's ``extra`` fields for the batch (an image batch's files)."""
        self.append(self.files().write(index, result, info, extra))

    def files(self) -> "BatchFiles":
        """What writes this directory's batch files (a Ray actor makes its own from ``spec()``)."""
        return BatchFiles(self.path, self.format, self.kept_from, self.samples)

    def spec(self) -> tuple[str, str, bool, bool]:
        """(path, format, keep columns?, sample indices?): enough for ``BatchFiles`` elsewhere, with that
        place's source."""
        return self.path, self.format, self.kept_from is not None, self.samples is not None

    def append(self, record: dict) -> None:
        """A finished batch's manifest line (its file already in place), appended and fsynced."""
        line = (json.dumps(record) + "\n").encode()
        try:
            while line:
                line = line[os.write(self._manifest_fd, line):]
            os.fsync(self._manifest_fd)
        except OSError as e:
            raise _error(f"cannot append to {self._join(self.MANIFEST)}", e) from None

    def sweep(self) -> None:
        """Remove hidden temp files (a writer elsewhere, a Ray actor, that died mid-write left them)."""
        try:
            names = os.listdir(self.path)
        except OSError:
            return
        for n in names:
            if n.startswith(TMP):
                _remove(self._join(n))


    def finish(self, summary: dict) -> None:
        """``DIR/summary.json`` (atomically); then release the directory."""
        try:
            self._atomic_write(self.SUMMARY, json.dumps(summary, indent=1, default=str) + "\n")
        finally:
            self.close()

    def close(self) -> None:
        """Close the manifest and release the lock; safe to call twice."""
        for attr in ("_manifest_fd", "_dir_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                setattr(self, attr, None)
                try:
                    os.close(fd)  # closing the last descriptor releases the flock
                except OSError:
                    pass


class BatchFiles:
    """Batch files of one output directory, written atomically (temp file, fsync, rename), each returned as
    its manifest line: by the run's OutputDir, or by a Ray actor that computed the batch (the driver then
    appends the line). ``kept_from``: the source whose ``keep_table(index)`` adds --keep-columns."""

    def __init__(self, path: str, output_format: str, kept_from=None, samples=None):
        self.path, self.format, self.kept_from, self.samples = path, output_format, kept_from, samples

    def _join(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write(self, index: int, result, info: dict, extra: dict | None = None) -> dict:
        if self.samples is not None:  # each part carries its rows' sample indices (NOTE [ Input order ])
            kind = "dict" if isinstance(result, dict) else "tuple" if isinstance(result, tuple) else "array"
            result = {**{k or "output": a for k, a in outputs.arrays(result)},
                      SAMPLE: np.asarray(self.samples.sample_ids(index), np.int64)}
            extra = {**(extra or {}), "result": kind}
        several = isinstance(result, (tuple, dict))
        name = part_name(index) if self.format == "parquet" else batch_name(index, several)
        members = outputs.arrays(result) if several or self.format == "parquet" else []
        if self.format == "parquet":
            data = _part_bytes(index, members, self.kept_from)
            writer = lambda out: out.write(data)  # noqa: E731
        elif several:
            writer = lambda out: _savez(out, members)  # noqa: E731
        else:
            writer = lambda out: np.lib.format.write_array(out, np.asarray(result), allow_pickle=False)  # noqa: E731
        out = self._write_file(name, writer)
        seconds = sum(info.get(k, 0.0) for k in ("stage_s", "compute_s", "d2h_s"))
        if self.format == "parquet":
            shapes = {"kind": "dict" if isinstance(result, dict) else "tuple" if several else "array",
                      "arrays": {k or "output": {"shape": list(np.shape(a)), "dtype": np.asarray(a).dtype.str}
                                 for k, a in members},
                      **({"keep_columns": list(self.kept_from.keep)} if self.kept_from is not None else {})}
        elif several:
            shapes = {"kind": "dict" if isinstance(result, dict) else "tuple",
                      "arrays": {k: {"shape": list(np.shape(a)), "dtype": np.asarray(a).dtype.str}
                                 for k, a in members}}
        else:
            shapes = {"shape": list(np.shape(result)), "dtype": np.asarray(result).dtype.str}
        return {"batch": index, "file": name, **shapes, "sha256": out.sha.hexdigest(), "bytes": out.n,
                "pid": info.get("pid"), "device": info.get("device"), "seconds": round(seconds, 6),
                **(extra or {})}

    def _write_file(self, name: str, writer) -> "_Hashing":
        """``writer(out)`` into a hidden temp file, fsynced, renamed to DIR/``name``; the bytes hashed. The
        temp name is the writer's pid and a random token: writers on several machines never collide."""
        final = self._join(name)
        tmp = self._join(f"{TMP}{os.getpid()}-{secrets.token_hex(4)}-{name}")
        try:
            with open(tmp, "wb") as f:
                out = _Hashing(f)
                writer(out)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException as e:
            _remove(tmp)
            if isinstance(e, OSError):
                raise _error(f"cannot write {final}", e) from None
            raise
        return out

def open_output(cfg, source, spec) -> OutputDir:
    """The output directory of ``cfg.run.output`` (``--output``), checked against this run's identity."""
    fmt, keep = cfg.run.output_format, list(cfg.source.keep_columns)
    if fmt == "parquet":
        from .sources.parquet import pyarrow
        pyarrow()  # the [parquet] extra, named, before any worker starts
    regroups = getattr(source, "regrouping", None)
    return OutputDir(cfg.run.output, identity(source, spec, fmt, keep), cfg.run.overwrite, fmt,
                     source if keep else None, source if regroups is not None and regroups() else None)


SAMPLE = "sample"  # the member or column that holds each row's sample index (NOTE [ Input order ])


def unwrap(result, record: dict):
    """A part written with its sample indices (``record["result"]``) back as the kernel's result."""
    kind = record.get("result")
    if kind is None:
        return result
    got = {k: v for k, v in result.items() if k != SAMPLE}
    if kind == "array":
        return got["output"]
    return tuple(got.values()) if kind == "tuple" else got


def read_output(path: str):
    """An output directory's results as one table, in input order: for ``npy`` the kernel's structure (an
    array, or a tuple or dict of arrays) with every batch's rows joined; for ``parquet`` a pyarrow Table
    (the kept columns included). Rows written with their sample indices (``order = "length"``,
    ``max_tokens``: NOTE [ Input order ]) are put back in sample order, and for Parquet keep their
    ``sample`` column; failed batches (``on_error = "skip"``) are missing."""
    path = os.path.abspath(path)
    fmt = "parquet" if os.path.exists(os.path.join(path, NAMES["parquet"][1])) else "npy"
    manifest = os.path.join(path, NAMES[fmt][1])
    try:
        with open(manifest) as f:
            records = {}
            for line in f:
                try:
                    r = json.loads(line)
                    records[r["batch"]] = r
                except (ValueError, KeyError):
                    continue  # a torn last line (NOTE [ Resume ])
    except OSError as e:
        raise OutputError(f"read_output({path!r}): no manifest ({e.strerror}); is it an output directory "
                          f"(--output)?") from None
    if not records:
        raise OutputError(f"read_output({path!r}): no batch finished in it yet")
    order = sorted(records)
    if fmt == "parquet":
        from .sources.parquet import pyarrow
        pa, pq, _ = pyarrow()
        table = pa.concat_tables([pq.read_table(os.path.join(path, records[i]["file"])) for i in order])
        return table.sort_by(SAMPLE) if SAMPLE in table.column_names else table
    out = OutputDir.__new__(OutputDir)
    out.path, out.format, out._records = path, fmt, records
    parts = [out._load(i) for i in order]
    ids = np.concatenate([p[SAMPLE] for p in parts]) if records[order[0]].get("result") else None
    parts = [unwrap(p, records[i]) for p, i in zip(parts, order)]
    joined = [np.concatenate([a for _, a in col]) for col in zip(*(outputs.arrays(p) for p in parts))]
    if ids is not None:
        at = np.argsort(ids, kind="stable")
        joined = [a[at] for a in joined]
    first = parts[0]
    if isinstance(first, dict):
        return dict(zip(first, joined))
    return tuple(joined) if isinstance(first, tuple) else joined[0]


def _part_bytes(index: int, members: list, keep) -> bytes:
    """Batch ``index``'s Parquet file: a column per output (2-D and more: fixed-size lists), then the kept
    input columns; OutputError naming the output when it can't be a table of rows."""
    from .sources.parquet import pyarrow
    pa, pq, _ = pyarrow()
    names, arrays = [], []
    for key, a in members:
        a, name = np.ascontiguousarray(a), key or "output"
        if a.ndim == 0 or a.dtype.kind == "c":
            raise OutputError(f"batch {index}: output {name!r} is {'a 0-d array' if a.ndim == 0 else a.dtype}"
                              f", which is no column of rows; return one value or row per input row, or use "
                              f"--output-format npy")
        col = pa.array(a.reshape(-1))
        for d in reversed(a.shape[1:]):
            col = pa.FixedSizeListArray.from_arrays(col, d)
        names.append(name)
        arrays.append(col)
    if keep is not None:
        kept = keep.keep_table(index)
        for name in kept.column_names:
            if name in names:
                raise OutputError(f"batch {index}: output {name!r} has the name of a --keep-columns column; "
                                  f"rename the kernel's output or keep another column")
        names += kept.column_names
        arrays += kept.columns
    lengths = {n: len(a) for n, a in zip(names, arrays)}
    if len(set(lengths.values())) > 1:
        raise OutputError(f"batch {index}: the columns have different lengths ({', '.join(f'{n}: {m}' for n, m in lengths.items())}); "
                          f"a Parquet part is a table: return one row per input row, or use --output-format npy")
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(arrays, names=names), buf)
    return buf.getvalue().to_pybytes()


def _read_part(path: str, r: dict):
    """A Parquet part back as the result it was written from (``r``: its manifest line)."""
    from .sources.parquet import pyarrow
    pa, pq, _ = pyarrow()
    try:
        table = pq.read_table(path, columns=list(r["arrays"]))
        got = {}
        for name, a in r["arrays"].items():
            col = table.column(name).combine_chunks()
            for _ in a["shape"][1:]:
                col = col.flatten()
            got[name] = col.to_numpy(zero_copy_only=False).astype(a["dtype"], copy=False).reshape(a["shape"])
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        raise OutputError(f"cannot read {path} back: {e}; rerun with --overwrite to compute it again") from None
    if r["kind"] == "array":
        return got["output"]
    return tuple(got.values()) if r["kind"] == "tuple" else got
