"""``run``, ``imap`` and ``Pipeline``: config + source + kernel -> a stream of results, a summary.

``Pipeline`` holds the workers (local processes or Ray actors) with the kernel set up, for as many
``run``/``imap`` calls as wanted; ``pipeline.run`` and ``pipeline.imap`` are one-shot pipelines. Results
stream: ``imap`` yields them, ``run`` folds them into a checksum, a progress bar, an output directory and
(unless told not to) a list, so memory holds only the batches in flight (local/dispatch.py, NOTE [ Supervisor ]).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from . import devices, kernels
from .text import models as text_models
from .compute import Computer
from .config import FIXED, Config, load_config, override_key
from .contracts import Executor, Outcome
from .errors import ConfigError, PackedError
from .fields import to_host
from .sinks import open_output
from .sources.base import Work, length
from .sources.factory import infer_kind, open_source
from .summary import Tally


@dataclass
class RunResult:
    summary: dict
    # in batch order: numpy arrays, or tuples or dicts of them for kernels with several outputs (None for a
    # failed batch); [] when not kept
    results: list = field(default_factory=list)


def resolve(config: Config | str | os.PathLike | None, overrides: dict[str, Any]) -> Config:
    """A Config from a path, a Config or defaults, plus ``run()``-style overrides (``config.OVERRIDES``
    names, or dotted keys), its source's kind decided (``sources.factory.infer_kind``)."""
    dotted, origins = {}, {}
    for name, value in overrides.items():
        key, origin = override_key(name)
        dotted[key], origins[key] = value, origin
    if isinstance(config, Config):
        cfg = config.replace(**dotted) if dotted else config
    else:
        cfg = load_config(config, dotted, origins)
    text_dir = text_models.model_dir(cfg.kernel.name)
    if text_dir and not cfg.source.tokenizer:  # a text kernel's model directory has its tokenizer
        cfg = cfg.replace(**{"source.tokenizer": text_dir})
    kind = infer_kind(cfg.source)
    return cfg.replace(**{"source.kind": kind}) if kind != cfg.source.kind else cfg


def make_executor(cfg: Config, spec) -> Executor:
    """The backend's executor (not started); Ray's only when asked for (its module imports Ray)."""
    if cfg.run.backend == "ray":
        from .ray_backend import RayExecutor
        return RayExecutor(cfg, spec)
    from .local.executor import LocalExecutor
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
        tally = Tally(cfg, length(src), progress=False, source=src, ordered=ordered)
        return Stream(self._outcomes(cfg, src, [], ordered, tally), tally, self)

    def run(self, source: Iterable | None = None, *, keep_results: bool = True, collate: Callable | None = None,
            **overrides) -> RunResult:
        """Every batch through the workers: a summary (checksum, throughput, failures) and the results in
        batch order (``keep_results=False`` keeps none: for jobs bigger than memory, with ``output=``)."""
        cfg = self._call_config(overrides)
        src = self._source(cfg, source, collate)
        sink = open_output(cfg, src, self.spec) if cfg.run.output else None  # before workers start
        done = sorted(sink.restored) if sink else []
        tally = Tally(cfg, length(src), cfg.run.progress, keep_results, sink, skipped=len(done), source=src)
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
        src = open_source(cfg.source, source, collate)
        text_dir = text_models.model_dir(cfg.kernel.name)
        tokens = getattr(getattr(src, "dataset", None), "tokens", None)
        if text_dir and tokens is not None:
            text_models.check_tokens(text_dir, tokens, cfg.source.tokenizer)
        return src

    def _outcomes(self, cfg: Config, src, done: list[int], ordered: bool, tally: Tally) -> Iterator:
        """Every batch of ``src`` not in ``done``, computed; ``tally`` times the run and counts bytes in."""
        skip = set(done)
        total = length(src)
        if total is not None and len(skip) >= total:
            return  # resumed with every batch already in the output directory: no worker to start

        def batches():
            for b in src:
                if b.index not in skip:
                    yield b
        tally.begin(cuda=cfg.workers.count > 0 and devices.on_cuda(cfg.workers.device))
        tally.source = src  # its manifest(i) lines and report() entries (images)
        if cfg.workers.count == 0:
            yield from self._serial(cfg, batches(), tally)
            return
        tally.fresh = self.executor is None or not self.executor.started
        tally.executor = ex = self._executor()
        if ex.relay is not None:
            ex.relay.bar = tally.bar if not tally.bar.disable else None  # workers' prints go above the bar
            tally.relay = ex.relay
        work = Work.of(src, batches(), sink=tally.sink, keep=tally.keep, digests=tally.regroup is None,
                       trace=tally.trace)
        ex.start()  # local: returns at once (start-up overlaps the first builds); Ray: actors up
        yield from ex.stream(work, ordered, settle=not self._one_shot, cfg=cfg)

    def _serial(self, cfg: Config, batches: Iterator, tally: Tally) -> Iterator[Outcome]:
        """``workers = 0``: the same kernel code in this process, under the same thread cap."""
        device = devices.choose(cfg.workers.device, 0)
        me = {"rank": 0, "pid": os.getpid(), "device": str(device)}
        tally.workers = [me]
        trace = tally.trace
        with devices.torch_threads(cfg.threads_per_worker()):
            if self.serial is None:
                self.serial = Computer(self.spec, device, cfg.handoff.pinned)
            self.serial.trace = trace is not None  # NOTE [ Trace ]: one process, every stage on its lanes
            for b in batches:
                t0 = time.perf_counter()
                try:
                    arr = b.array()
                except Exception as e:  # noqa: BLE001 - a sample or file: as with build threads
                    if cfg.faults.on_error != "skip":
                        raise
                    yield Outcome(b.index, None, {}, {"batch": b.index, "cause": f"{type(e).__name__}: {e}",
                                                      "attempts": 1})
                    continue
                t_built = time.perf_counter()
                try:
                    out, timings = self.serial(arr, b.index)
                except Exception as e:  # noqa: BLE001 - as in a worker: on_error decides
                    packed = PackedError.pack(e)
                    if cfg.faults.on_error == "skip":
                        yield Outcome(b.index, None, {}, {"batch": b.index, "cause": packed.text, "attempts": 1})
                        continue
                    raise packed.exception(f"batch {b.index} (main process, device {device})") from None
                if trace is not None:
                    trace.span("build", "build", t0, t_built, b.index)
                    trace.worker(me["pid"], timings.pop("spans"), b.index)
                yield Outcome(b.index, out, {"pid": me["pid"], "device": me["device"], **timings})

    def _summarize(self, cfg: Config, tally: Tally, error: str | None = None) -> dict:
        ex = tally.executor
        notes = ([self.note] if self.note else []) + (list(ex.notes) + list(ex.run_notes) if ex is not None else [])
        summary = tally.summary(self.spec, notes, error)
        tally.write_trace(summary)  # NOTE [ Trace ]: its path in the summary
        return summary


class Stream:
    """What ``imap`` returns: an iterator of ``(index, result)``; ``close()`` (or leaving a ``with`` block,
    or breaking out of a for loop and dropping it) stops the run. ``summary`` is set once it is exhausted."""

    def __init__(self, outcomes: Iterator, tally: Tally, pipeline: Pipeline):
        self._outcomes, self._tally, self._pipeline = outcomes, tally, pipeline
        self.failed = tally.failed
        self.summary: dict | None = None
        self._done = False
        self._given: list = []  # results a batch completed, not yet yielded (NOTE [ Input order ])

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> tuple[int, Any]:
        while not self._given:
            if self._done:
                raise StopIteration
            try:
                out = next(self._outcomes)
                self._given = self._tally.add(out)
            except StopIteration:
                self.summary = self._pipeline._summarize(self._tally.cfg, self._tally)
                self.close()
                raise
            except BaseException:
                self.close(graceful=False)
                raise
        return self._given.pop(0)

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
        tally = Tally(cfg, length(src), progress=False, source=src, ordered=ordered)
        return Stream(p._outcomes(cfg, src, [], ordered, tally), tally, p)
    except BaseException:
        p.close(graceful=False)
        raise
