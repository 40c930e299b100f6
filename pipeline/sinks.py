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
_BATCH = re.compile(r"^batch-\d{6,}\.np[yz]$")
FORMAT = 1


def batch_name(index: int, several: bool = False) -> str:
    """``batch-000123.npy``, or ``.npz`` for a result of several arrays (a tuple or dict)."""
    return f"batch-{index:06d}.{'npz' if several else 'npy'}"


def identity(source, spec) -> dict:
    """What every result depends on (never the worker count, backend or device: see DESIGN.md)."""
    src = source.identity() if hasattr(source, "identity") else {"kind": type(source).__name__}
    return _plain({"format": FORMAT, "source": src, "kernel": {"name": spec.name, "params": spec.params,
                                                     **({"precision": spec.precision}
                                                        if spec.precision != "fp32" else {})}})


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

    def __init__(self, path: str, ident: dict, overwrite: bool = False):
        self.path = os.path.abspath(path)
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
        ours = [n for n in names if _BATCH.match(n) or n in (MANIFEST, SUMMARY)]
        old = self._read_run() if RUN in names and not overwrite else None
        if overwrite:  # manifest first: a kill part-way leaves batch files that nothing vouches for
            _remove(self._join(MANIFEST))
            _remove(self._join(SUMMARY))
            self._atomic_write(RUN, json.dumps(ident, indent=1, sort_keys=True) + "\n")
            for n in ours:
                _remove(self._join(n))
            old = ident
        elif old is None and ours:
            raise ConfigError(f"--output {self.path}: holds pipeline output but no {RUN}, so it cannot be "
                              f"resumed; use --overwrite to replace it, or another --output")
        elif old is not None and old != ident:
            raise ConfigError(f"--output {self.path}: written by a different config "
                              f"({differences(old, ident)}); use --overwrite to replace its results, or "
                              f"another --output")
        if old is None:
            self._atomic_write(RUN, json.dumps(ident, indent=1, sort_keys=True) + "\n")
        _remove(self._join(SUMMARY))  # summary.json is there only once a run has finished
        records = self._verified()
        self._records, self.restored = records, sorted(records)
        self._atomic_write(MANIFEST, "".join(json.dumps(r) + "\n" for _, r in sorted(records.items())))
        try:
            self._manifest_fd = os.open(self._join(MANIFEST), os.O_WRONLY | os.O_APPEND)
        except OSError as e:
            raise _error(f"cannot open {self._join(MANIFEST)}", e) from None

    def _read_run(self):
        try:
            with open(self._join(RUN)) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--output {self.path}: unreadable {RUN} ({e}); use --overwrite to replace "
                              f"the directory's results") from None

    def _verified(self) -> dict[int, dict]:
        """Manifest lines whose file exists with the recorded sha256 (the last line per batch wins)."""
        records: dict[int, dict] = {}
        try:
            with open(self._join(MANIFEST), "rb") as f:
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
            if name not in (batch_name(i), batch_name(i, True)):
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
        r = self._records[index]
        path = self._join(r["file"])
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
        several = isinstance(result, (tuple, dict))
        name = batch_name(index, several)
        final, tmp = self._join(name), self._join(f"{TMP}{os.getpid()}-{name}")
        members = outputs.arrays(result) if several else []
        try:
            with open(tmp, "wb") as f:
                out = _Hashing(f)
                if several:
                    _savez(out, members)
                else:
                    np.lib.format.write_array(out, np.asarray(result), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException as e:
            _remove(tmp)
            if isinstance(e, OSError):
                raise _error(f"cannot write {final}", e) from None
            raise
        seconds = sum(info.get(k, 0.0) for k in ("stage_s", "compute_s", "d2h_s"))
        if several:
            shapes = {"kind": "dict" if isinstance(result, dict) else "tuple",
                      "arrays": {k: {"shape": list(np.shape(a)), "dtype": np.asarray(a).dtype.str}
                                 for k, a in members}}
        else:
            shapes = {"shape": list(np.shape(result)), "dtype": np.asarray(result).dtype.str}
        record = {"batch": index, "file": name, **shapes, "sha256": out.sha.hexdigest(), "bytes": out.n,
                  "pid": info.get("pid"), "device": info.get("device"), "seconds": round(seconds, 6),
                  **(extra or {})}
        line = (json.dumps(record) + "\n").encode()
        try:
            while line:
                line = line[os.write(self._manifest_fd, line):]
            os.fsync(self._manifest_fd)
        except OSError as e:
            raise _error(f"cannot append to {self._join(MANIFEST)}", e) from None

    def finish(self, summary: dict) -> None:
        """``DIR/summary.json`` (atomically); then release the directory."""
        try:
            self._atomic_write(SUMMARY, json.dumps(summary, indent=1, default=str) + "\n")
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


def open_output(run_cfg, source, spec) -> OutputDir:
    """The output directory of ``run_cfg.output`` (``--output``), checked against this run's identity."""
    return OutputDir(run_cfg.output, identity(source, spec), run_cfg.overwrite)
