"""``run``, ``imap`` and ``Pipeline``: config + source + kernel -> a stream of results, a summary.

``Pipeline`` holds the workers (local processes or Ray actors) with the kernel set up, for as many
``run``/``imap`` calls as wanted; ``pipeline.run`` and ``pipeline.imap`` are one-shot pipelines. Results
stream: ``imap`` yields them, ``run`` folds them into a checksum, a progress bar, an output directory and
(unless told not to) a list, so memory holds only the batches in flight (executor.py, NOTE [ Supervisor ]).
"""
from __future__ import annotations

import difflib
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from tqdm import tqdm

from . import devices, kernels
from .config import Config, load_config
from .errors import ConfigError
from .handoff import to_host
from .executor import Outcome
from .outputs import checksum, checksum_update  # noqa: F401 - checksum: pipeline.runner.checksum, as before
from .sinks import open_output
from .sources import FromIterable, Indexed, MapSource, Synthetic, Work, is_map_style, length, load_dataset

# CLI names accepted as ``run(**overrides)`` and on the command line, and the config keys they set.
OVERRIDES = {
    "workers": "workers.count", "batches": "source.batches", "rows": "source.rows",
    "cols": "source.cols", "dtype": "source.dtype", "seed": "source.seed", "kernel": "kernel.name",
    "device": "workers.device", "start_method": "workers.start_method",
    "threads_per_worker": "workers.threads", "build_threads": "workers.build_threads", "progress": "run.progress",
    "in_flight": "handoff.in_flight", "slot_mb": "handoff.slot_mb", "pinned": "handoff.pinned",
    "max_attempts": "faults.max_attempts", "batch_timeout_s": "faults.batch_timeout_s",
    "on_error": "faults.on_error", "precision": "kernel.precision", "input": "source.path", "input_key": "source.key", "output": "run.output",
    "overwrite": "run.overwrite", "backend": "run.backend", "ray_address": "run.ray_address", "ray_build": "run.ray_build",
    "source_object": "source.object", "batch_size": "source.batch_size", "drop_last": "source.drop_last",
    "build_processes": "workers.build_processes", "columns": "source.columns",
    "keep_columns": "source.keep_columns", "output_format": "run.output_format",
    "image_size": "source.image_size", "resize": "source.resize", "layout": "source.layout",
    "bad_samples": "source.bad_samples", "decode": "source.decode",
}
FLAGS = {"source_object": "--source"}  # where a CLI flag is not the override's name
# What the workers were started with: a call on a running Pipeline can't change it.
FIXED = ("kernel.", "workers.count", "workers.device", "workers.start_method", "workers.threads",
         "handoff.pinned", "run.backend", "run.ray_address")


@dataclass
class RunResult:
    summary: dict
    # in batch order: numpy arrays, or tuples or dicts of them for kernels with several outputs (None for a
    # failed batch); [] when not kept
    results: list = field(default_factory=list)


def resolve(config: Config | str | os.PathLike | None, overrides: dict[str, Any]) -> Config:
    """A Config from a path, a Config or defaults, plus ``run()``-style overrides (CLI names)."""
    dotted, origins = {}, {}
    for name, value in overrides.items():
        key = OVERRIDES.get(name, name if "." in name else None)
        if key is None:
            close = difflib.get_close_matches(name, OVERRIDES, n=1, cutoff=0.7)
            raise ConfigError(f"unknown setting '{name}' (did you mean {close[0]}?)" if close else
                              f"unknown setting '{name}' (known: {', '.join(OVERRIDES)}, "
                              f"or a dotted key such as source.rows)")
        flag = FLAGS.get(name, f"--{name.replace('_', '-')}")
        dotted[key], origins[key] = value, flag if name in OVERRIDES else f"--set {key}"
    if isinstance(config, Config):
        cfg = config.replace(**dotted) if dotted else config
    else:
        cfg = load_config(config, dotted, origins)
    if cfg.source.path and cfg.source.kind == "synthetic":  # --input PATH implies a file source
        from .images import kind_of  # a folder of images (and no .npy files) is read as images
        from .readers import is_parquet
        kind = "parquet" if is_parquet(cfg.source.path) else "images" if kind_of(cfg.source.path) == "images" else "npy"
        cfg = cfg.replace(**{"source.kind": kind})
    if cfg.source.object and cfg.source.kind == "synthetic":  # --source NAME: a dataset
        cfg = cfg.replace(**{"source.kind": "dataset"})
    return cfg


def make_source(cfg, items: Iterable | None = None, collate: Callable | None = None):
    """The batches of ``cfg`` (a SourceConfig): the caller's dataset or iterable, ``source.object``,
    synthetic, or files on disk. A map-style dataset (``__len__``, ``__getitem__``) builds batch k on its
    own, on any build thread or process; an iterable is drawn in order."""
    if cfg.decode == "device" and (items is not None or cfg.object or cfg.kind != "images"):
        what = "source= objects" if items is not None else f"source.kind = {cfg.kind!r}"
        raise ConfigError(f"source.decode = 'device' (--decode device) is for a folder of images (--input DIR), "
                          f"not for {what}: leave it at 'main'")
    if items is None and cfg.object:
        src = MapSource(load_dataset(cfg.object, cfg.params), cfg.batch_size, cfg.drop_last, collate)
        src.ref = (cfg.object, dict(cfg.params))
        return src
    if cfg.params and items is None:
        raise ConfigError(f"source.params ({', '.join(cfg.params)}) are keyword arguments for source.object "
                          f"(--source NAME), and none is given")
    if cfg.params and items is not None:
        raise ConfigError("source.params are for source.object (a callable that makes the dataset), not "
                          "for source= objects")
    if items is not None and _is_table(items):  # a pyarrow Table: map-style, a dict of columns per row
        if cfg.keep_columns:
            raise ConfigError("keep_columns are carried from Parquet input files (--input), not from a "
                              "pyarrow Table given as source=: add them to the kernel's outputs instead")
        from .readers.parquet import TableRows
        return MapSource(TableRows(items, cfg.columns), cfg.batch_size or 1024, cfg.drop_last, collate)
    if items is not None and (cfg.columns or cfg.keep_columns):
        raise ConfigError("columns and keep_columns are for Parquet input (--input) or a pyarrow Table, not "
                          f"for a {type(items).__name__} given as source=")
    if items is not None:
        if is_map_style(items):
            return MapSource(items, cfg.batch_size, cfg.drop_last, collate)
        if cfg.batch_size or collate is not None:
            raise ConfigError(f"batch_size and collate group the samples of a map-style dataset (__len__ "
                              f"and __getitem__); a {type(items).__name__} is drawn as batches, one item each")
        return FromIterable(items)
    if collate is not None or (cfg.batch_size and cfg.kind not in ("parquet", "images")):
        raise ConfigError("batch_size and collate are for a dataset (source= or --source), Parquet input or "
                          "an image folder, not for "
                          f"{'--input files' if cfg.path else 'synthetic batches'}")
    if cfg.kind == "synthetic":
        return Synthetic(cfg)
    from .readers import open_source
    return open_source(cfg)


def _is_table(obj) -> bool:
    """A pyarrow Table or RecordBatch (checked without importing pyarrow)."""
    return type(obj).__module__.startswith("pyarrow") and type(obj).__name__ in ("Table", "RecordBatch")


def make_executor(cfg: Config, spec):
    """The backend's executor (not started)."""
    if cfg.run.backend == "ray":
        from .ray_backend import RayExecutor
        return RayExecutor(cfg, spec)
    from .executor import LocalExecutor
    return LocalExecutor(cfg, spec)


class Pipeline:
    """Workers with the kernel set up, kept for as many runs as wanted::

        with pipeline.Pipeline("configs/cpu-ci.toml", kernel="matmul", workers=4) as p:
            p.run(batches=16).summary["checksum"]
            for i, r in p.imap(source=my_arrays):
                ...

    The workers start when the Pipeline is made (their start-up overlaps whatever you do next) and stop
    at ``close()`` (or the end of the ``with`` block). Each call may change the source, the output, the
    fault settings and the slots; the kernel, its params, the device and the number of workers are those
    the workers were started with (a call that asks for others is refused with a ConfigError: make
    another Pipeline).
    """

    def __init__(self, config: Config | str | os.PathLike | None = None, *, kernel: str | Callable | None = None,
                 **overrides):
        self._open(config, kernel, overrides)
        if self.cfg.workers.count:
            self._executor().start()

    def _open(self, config, kernel, overrides) -> None:
        if isinstance(kernel, str):
            overrides["kernel"] = kernel
        self.cfg = resolve(config, overrides)
        # (on Ray the cluster's devices count, not this machine's: RayExecutor.start checks them)
        self.note = devices.check(self.cfg.workers.device) if self.cfg.run.backend == "local" else None
        params = to_host(dict(self.cfg.kernel.params), "kernel param")
        self.spec = kernels.spec_for(kernel if callable(kernel) else self.cfg.kernel.name, params,
                                     self.cfg.kernel.precision)
        self.executor = None
        self.serial = None  # the kernel in this process, for workers = 0
        self.closed = False
        self._one_shot = False  # run()/imap(): the workers go with the run, nothing to settle after it

    @classmethod
    def _lazy(cls, config, kernel, overrides) -> "Pipeline":
        """A one-shot pipeline whose workers start with its first batch (none if nothing is left to do)."""
        p = cls.__new__(cls)
        p._open(config, kernel, overrides)
        return p

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close(graceful=exc[0] is None)

    def close(self, graceful: bool = True) -> None:
        """Stop the workers and remove the shared memory; safe to call twice."""
        self.closed = True
        if self.executor is not None:
            ex, self.executor = self.executor, None
            ex.close(graceful=graceful)

    def _executor(self):
        if self.closed:
            raise ConfigError("this Pipeline is closed; make a new one")
        if self.executor is None:
            self.executor = make_executor(self.cfg, self.spec)
        return self.executor

    def _call_config(self, overrides: dict) -> Config:
        cfg = resolve(self.cfg, overrides) if overrides else self.cfg
        old, new = _flat(self.cfg.to_dict()), _flat(cfg.to_dict())
        for key in sorted(set(old) | set(new)):
            if key.startswith(FIXED) and old.get(key) != new.get(key):
                raise ConfigError(f"{key} = {new.get(key)!r}: this Pipeline's workers run with "
                                  f"{old.get(key)!r}; make a new Pipeline for a different kernel, device or "
                                  f"worker count")
        return cfg

    # -- the stream ----------------------------------------------------------------------------------
    def imap(self, source: Iterable | None = None, *, ordered: bool = True, collate: Callable | None = None,
             **overrides) -> "Stream":
        """``(index, result)`` for every batch, in batch order (``ordered``) or as they complete. A batch that
        failed (``on_error = "skip"``, or quarantined) comes as ``(index, None)``; ``stream.failed`` says
        why. Memory stays bounded whatever the consumer does: a slow one slows the workers."""
        cfg = self._call_config(overrides)
        if cfg.run.output:
            raise ConfigError("imap yields the results to you; write them with run(output=...) instead")
        src = self._source(cfg, source, collate)
        tally = Tally(cfg, length(src), progress=False)
        return Stream(self._outcomes(cfg, src, [], ordered, tally), tally, self)

    def run(self, source: Iterable | None = None, *, keep_results: bool = True, collate: Callable | None = None,
            **overrides) -> RunResult:
        """Every batch through the workers: a summary (checksum, throughput, failures) and the results in
        batch order (``keep_results=False`` keeps none: for jobs bigger than memory, with ``output=``)."""
        cfg = self._call_config(overrides)
        src = self._source(cfg, source, collate)
        sink = open_output(cfg, src, self.spec) if cfg.run.output else None  # before workers start
        done = sorted(sink.restored) if sink else []
        tally = Tally(cfg, length(src), cfg.run.progress, keep_results, sink, skipped=len(done))
        outcomes = self._outcomes(cfg, src, done, True, tally)
        try:
            for out in _merged(outcomes, done, sink):
                tally.add(out)
            summary = self._summarize(cfg, tally)
            if sink is not None:
                sink.finish(summary)  # DIR/summary.json: the run finished
        except BaseException as e:  # the summary so far travels with the error (``--json`` prints it)
            outcomes.close()
            if isinstance(e, Exception):
                e.summary = self._summarize(cfg, tally, error=f"{type(e).__name__}: {e}")
            raise
        finally:
            tally.close()
            if sink is not None:
                if cfg.run.backend == "ray":
                    sink.sweep()  # an actor that died mid-write left its temp file (we hold the lock)
                sink.close()  # releases the output directory (a no-op after finish)
        return RunResult(summary, tally.results)

    def _source(self, cfg: Config, source, collate=None):
        given = [what for what, on in (("source=", source is not None), (f"input = {cfg.source.path!r}",
                 cfg.source.path), (f"source.object = {cfg.source.object!r}", cfg.source.object)) if on]
        if len(given) > 1:
            raise ConfigError(f"give one source of batches, not both {' and '.join(given)}")
        if cfg.source.keep_columns and (not cfg.run.output or cfg.run.output_format != "parquet"):
            raise ConfigError("keep_columns (--keep-columns) are carried into Parquet output: add --output DIR "
                              "--output-format parquet")
        return make_source(cfg.source, source, collate)

    def _outcomes(self, cfg: Config, src, done: list[int], ordered: bool, tally: "Tally") -> Iterator:
        """Every batch of ``src`` not in ``done``, computed; ``tally`` times the run and counts bytes in."""
        skip = set(done)
        total = length(src)
        if total is not None and len(skip) >= total:
            return  # resumed with every batch already in the output directory: no worker to start

        def batches():
            for b in src:
                if b.index not in skip:
                    yield b
        tally.begin()
        tally.source = src  # its manifest(i) lines and report() entries, when it has them (images)
        if cfg.workers.count == 0:
            yield from self._serial(cfg, batches(), tally)
            return
        tally.fresh = self.executor is None or not self.executor.started
        tally.executor = ex = self._executor()
        if getattr(ex, "relay", None) is not None:
            ex.relay.bar = tally.bar if not tally.bar.disable else None  # workers' prints go above the bar
            tally.relay = ex.relay
        work = Work(batches(), src if isinstance(src, Indexed) else None, getattr(src, "max_nbytes", None),
                    tally.sink, tally.keep, digests=True)
        ex.start()  # local: returns at once (start-up overlaps the first builds); Ray: actors up
        yield from ex.stream(work, ordered, settle=not self._one_shot, cfg=cfg)

    def _serial(self, cfg: Config, batches: Iterator, tally: "Tally") -> Iterator[Outcome]:
        """``workers = 0``: the same kernel code in this process, under the same thread cap."""
        from .executor import remote_error
        from .worker import Computer, pack_error
        device = devices.choose(cfg.workers.device, 0)
        me = {"rank": 0, "pid": os.getpid(), "device": str(device)}
        tally.workers = [me]
        with devices.torch_threads(cfg.threads_per_worker()):
            if self.serial is None:
                self.serial = Computer(self.spec, device, cfg.handoff.pinned)
            for b in batches:
                try:
                    arr = b.array()
                except Exception as e:  # noqa: BLE001 - a sample or file: as with build threads
                    if cfg.faults.on_error != "skip":
                        raise
                    yield Outcome(b.index, None, {}, {"batch": b.index, "cause": f"{type(e).__name__}: {e}",
                                                      "attempts": 1})
                    continue
                try:
                    out, timings = self.serial(arr, b.index)
                except Exception as e:  # noqa: BLE001 - as in a worker: on_error decides
                    packed = pack_error(e)
                    if cfg.faults.on_error == "skip":
                        yield Outcome(b.index, None, {}, {"batch": b.index, "cause": packed[1], "attempts": 1})
                        continue
                    raise remote_error(packed, f"batch {b.index} (main process, device {device})") from None
                yield Outcome(b.index, out, {"pid": me["pid"], "device": me["device"], **timings})

    def _summarize(self, cfg: Config, tally: "Tally", error: str | None = None) -> dict:
        note = self.note
        ex = tally.executor
        notes = ([note] if note else []) + (list(getattr(ex, "notes", [])) + list(getattr(ex, "run_notes", []))
                                            if ex else [])
        return tally.summary(self.spec, notes, error)


class Stream:
    """What ``imap`` returns: an iterator of ``(index, result)``; ``close()`` (or leaving a ``with`` block,
    or breaking out of a for loop and dropping it) stops the run. ``summary`` is set once it is exhausted."""

    def __init__(self, outcomes: Iterator, tally: "Tally", pipeline: Pipeline):
        self._outcomes, self._tally, self._pipeline = outcomes, tally, pipeline
        self.failed = tally.failed
        self.summary: dict | None = None
        self._done = False

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> tuple[int, Any]:
        if self._done:
            raise StopIteration
        try:
            out = next(self._outcomes)
        except StopIteration:
            self.summary = self._pipeline._summarize(self._tally.cfg, self._tally)
            self.close()
            raise
        except BaseException:
            self.close(graceful=False)
            raise
        self._tally.add(out)
        return out.index, out.result

    def close(self, graceful: bool = True) -> None:
        """Stop the run; a one-shot ``pipeline.imap`` also stops its workers and removes the shared memory."""
        if self._done:
            return
        self._done = True
        self._outcomes.close()
        self._tally.close()
        if self._pipeline._one_shot:
            self._pipeline.close(graceful)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close(graceful=exc[0] is None)

    def __del__(self):
        try:
            self.close(graceful=False)
        except Exception:  # noqa: BLE001 - at interpreter exit, modules may be half torn down
            pass


class Tally:
    """A run's results folded as they arrive, in batch order: checksum, counts, failures, bar, output dir."""

    def __init__(self, cfg: Config, total: int | None, progress: bool, keep: bool = False, sink=None,
                 skipped: int = 0):
        self.cfg, self.keep, self.sink, self.skipped = cfg, keep, sink, skipped
        self.results: list = []
        self.failed: list[dict] = []
        self.sha = hashlib.sha256()
        self.n = self.completed = self.bytes_in = 0
        self.per_pid: dict[int, int] = {}
        self.workers: list[dict] = []
        self.executor = None
        self.source = None
        self.relay = None  # the local executor's Relay: drained before the bar moves
        self.fresh = False  # the workers started with this run: their start-up is part of it
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=total, unit="batch", file=sys.stderr, dynamic_ncols=True,
                        disable=not progress or not sys.stderr.isatty(), initial=skipped)

    def begin(self) -> None:
        self.t0 = time.perf_counter()

    def add(self, out) -> None:
        """One batch's outcome (in batch order when the checksum is to mean anything)."""
        if out.failure is not None:
            self.failed.append(out.failure)
        else:
            self.completed += 1
            self.bytes_in += out.info.get("h2d_bytes", 0)  # the batch's bytes, all fields (not restored ones)
            pid = out.info.get("pid")
            if pid is not None:
                self.per_pid[pid] = self.per_pid.get(pid, 0) + 1
            if out.info.get("bad_samples") and hasattr(self.source, "record_bad"):  # decoded by a worker
                self.source.record_bad(out.info["bad_samples"])
            if "record" in out.info:  # written by the Ray actor that computed it: its manifest line
                self.sink.append(out.info["record"])
            elif self.sink is not None and not out.info.get("restored"):
                extra = getattr(self.source, "manifest", None)
                self.sink.write(out.index, out.result, out.info, extra(out.index) if extra else None)
        checksum_update(self.sha, out.index, out.result, out.info.get("digest"))
        self.n = max(self.n, out.index + 1)
        if self.keep:
            self.results.extend([None] * (out.index + 1 - len(self.results)))
            self.results[out.index] = out.result
        if not out.info.get("restored"):
            if self.relay is not None and not self.bar.disable:
                self.relay.drain()  # what the worker printed for this batch, above its tick
            self.bar.update(1)

    def close(self) -> None:
        if self.relay is not None:
            self.relay.drain()
        self.bar.close()

    def summary(self, spec, notes: list[str], error: str | None) -> dict:
        cfg, ex = self.cfg, self.executor
        wall = time.perf_counter() - self.t0
        ran = self.n - self.skipped  # batches this run handled (the rest were loaded back from --output)
        workers = [dict(w, batches=self.per_pid.get(w["pid"], 0))
                   for w in (ex.worker_info() if ex is not None else self.workers)]
        breakdown = getattr(ex, "breakdown", None) if ex else None
        done = self.completed - self.skipped
        if breakdown and done > 0:
            breakdown = {k.replace("_s", "_ms"): round(v / done * 1000, 3) for k, v in breakdown.items()}
        startup = ex.startup_s if ex is not None and self.fresh else 0.0
        ready = getattr(ex, "ready_s", None) if ex is not None and self.fresh else 0.0
        return {
            "batches": self.n,
            "completed": self.completed,
            "bytes_in": self.bytes_in,
            "wall_s": round(wall, 4),
            "startup_s": round(startup, 4),
            "workers_ready_s": round(ready, 4) if ready else None,
            "skipped": self.skipped,
            "batches_per_s": round(ran / wall, 3) if wall else None,
            "steady_batches_per_s": round(ran / (wall - startup), 3) if wall > startup else None,
            "mb_per_s": round(self.bytes_in / wall / 1e6, 3) if wall and self.bytes_in else None,
            "checksum": self.sha.hexdigest(),
            "main_pid": os.getpid(),
            "device": ",".join(sorted({w["device"] for w in workers if w.get("device")})),
            "kernel": spec.name,
            "precision": spec.precision,
            "threads_per_worker": cfg.threads_per_worker(),
            "workers": workers,
            "restarts": list(getattr(ex, "restarts", [])) if ex else [],
            "failed": self.failed,
            "handoff": getattr(ex, "figures", None) or None if ex else None,
            "breakdown_ms_per_batch": breakdown or None,
            "notes": notes,
            "error": error,
            "output": self.sink.path if self.sink else None,
            "config": cfg.to_dict(),
            **(self.source.report() if hasattr(self.source, "report") else {}),  # images: classes, bad_samples
        }


def _merged(outcomes: Iterator, done: list[int], sink) -> Iterator:
    """The run's outcomes in batch order, with the batches already in the output directory read back from
    it one at a time, where they belong (NOTE [ Resume ] in sinks.py)."""
    d = 0
    for out in outcomes:
        while d < len(done) and done[d] < out.index:
            yield Outcome(done[d], sink.load(done[d]), {"restored": True})
            d += 1
        yield out
    for i in done[d:]:
        yield Outcome(i, sink.load(i), {"restored": True})


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix == "kernel." and k == "params" and not v):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run(config: Config | str | os.PathLike | None = None, *, source: Iterable | None = None,
        kernel: str | Callable | None = None, keep_results: bool = True, collate: Callable | None = None,
        **overrides) -> RunResult:
    """Run the pipeline once. ``source``: a map-style dataset (``__len__`` and ``__getitem__``: samples,
    grouped by ``batch_size=B``, or whole batches without it) or an iterable of batches in batch order; a
    batch or sample is an array (numpy, a CPU tensor) or a tuple or dict of them. ``collate``: a list of
    samples -> one batch, for samples that need it. ``kernel``: a built-in name, ``package.module:name`` or
    a callable; ``overrides``: CLI names (``workers=2``). ``keep_results=False``: the summary only (results
    streamed to ``output=`` or dropped)."""
    p = Pipeline._lazy(config, kernel, overrides)
    p._one_shot = True
    ok = False
    try:
        r = p.run(source, keep_results=keep_results, collate=collate)
        ok = True
        return r
    finally:
        p.close(graceful=ok)


def imap(config: Config | str | os.PathLike | None = None, *, source: Iterable | None = None,
         kernel: str | Callable | None = None, ordered: bool = True, collate: Callable | None = None,
         **overrides) -> Stream:
    """``(index, result)`` for every batch, streamed (see ``Pipeline.imap``); the workers stop when the
    stream is exhausted or closed::

        for i, r in pipeline.imap(kernel="fft", workers=2, batches=1000):
            ...
    """
    p = Pipeline._lazy(config, kernel, overrides)
    p._one_shot = True
    try:
        cfg = p._call_config({})
        if cfg.run.output:
            raise ConfigError("imap yields the results to you; write them with run(output=...) instead")
        src = p._source(cfg, source, collate)
        tally = Tally(cfg, length(src), progress=False)
        return Stream(p._outcomes(cfg, src, [], ordered, tally), tally, p)
    except BaseException:
        p.close(graceful=False)
        raise
