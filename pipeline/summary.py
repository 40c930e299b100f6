"""A run's results folded as they arrive, in batch order: the checksum, counts, failures, the progress
bar, the output directory; and the summary (``run --json`` prints it whole)."""
from __future__ import annotations

import hashlib
import os
import sys
import time

from tqdm import tqdm

from . import verdict
from .config import Config
from .contracts import Executor
from .outputs import checksum_update
from .regroup import Regroup
from .sources.base import Source
from .trace import Recorder


class Tally:
    """A run's results folded as they arrive, in batch order: checksum, counts, failures, bar, output dir."""

    def __init__(self, cfg: Config, total: int | None, progress: bool, keep: bool = False, sink=None,
                 skipped: int = 0, source: Source | None = None, ordered: bool = True):
        self.cfg, self.keep, self.sink, self.skipped = cfg, keep, sink, skipped
        self.results: list = []
        self.failed: list[dict] = []
        self.sha = hashlib.sha256()
        self.n = self.completed = self.bytes_in = 0
        self.per_pid: dict[int, int] = {}
        self.workers: list[dict] = []
        self.executor: Executor | None = None
        self.source: Source | None = source
        self.regroup = Regroup.of(source, ordered) if source is not None else None  # NOTE [ Input order ]
        self.splits = self.split_batches = 0  # kernel calls split for device memory (NOTE [ Splits ])
        self.fit: int | None = None
        self.relay = None  # the local executor's Relay: drained before the bar moves
        self.fresh = False  # the workers started with this run: their start-up is part of it
        self.write_s = 0.0  # writing the output directory (NOTE [ Verdict ])
        self.trace = Recorder(cfg.run.trace) if cfg.run.trace else None  # NOTE [ Trace ]
        self.traced: str | None = None  # where the trace was written
        self.gpu: verdict.GpuSampler | None = None
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=total, unit="batch", file=sys.stderr, dynamic_ncols=True,
                        disable=not progress or not sys.stderr.isatty(), initial=skipped)

    def begin(self, cuda: bool = False) -> None:
        """The run starts (``cuda``: its workers compute on GPUs, sampled through NVML when it is there)."""
        self.t0 = time.perf_counter()
        if cuda and self.gpu is None:
            self.gpu = verdict.GpuSampler()

    def add(self, out) -> list:
        """One batch's outcome (in batch order when the checksum is to mean anything); returns the results
        the caller now gets, as (index, result): the batch itself, or with a regrouping
        (NOTE [ Input order ]) the input-order results it completed."""
        if out.failure is not None:
            self.failed.append(out.failure)
            if self.trace is not None:
                self.trace.instant("failed", "consumer", out.index, out.failure.get("attempts", 1),
                                   args={"cause": str(out.failure.get("cause", out.failure.get("raise")))[:200]})
        else:
            self.completed += 1
            self.bytes_in += out.info.get("h2d_bytes", 0)  # the batch's bytes, all fields (not restored ones)
            pid = out.info.get("pid")
            if pid is not None:
                self.per_pid[pid] = self.per_pid.get(pid, 0) + 1
            if out.info.get("bad_samples"):  # found where the batch was decoded (a worker)
                self.source.record_bad(out.info["bad_samples"])
            if out.info.get("splits"):
                self.splits += out.info["splits"]
                self.split_batches += 1
                self.fit = min(self.fit or out.info["fit"], out.info["fit"])
            if "record" in out.info:  # written by the Ray actor that computed it: its manifest line
                self.sink.append(out.info["record"])
            elif self.sink is not None and not out.info.get("restored"):
                t0 = time.perf_counter()
                self.sink.write(out.index, out.result, out.info, self.source.manifest(out.index) or None)
                self.write_s += time.perf_counter() - t0
                if self.trace is not None:
                    self.trace.span("write", "consumer", t0, time.perf_counter(), out.index)
        self.n = max(self.n, out.index + 1)
        if not out.info.get("restored"):
            if self.relay is not None and not self.bar.disable:
                self.relay.drain()  # what the worker printed for this batch, above its tick
            self.bar.update(1)
        if self.regroup is None:
            given = [(out.index, out.result)]
            checksum_update(self.sha, out.index, out.result, out.info.get("digest"))
        else:
            given = self.regroup.add(out.index, out.result)
            for j, r in given:
                checksum_update(self.sha, j, r, None)
        if self.keep:
            for j, r in given:
                self.results.extend([None] * (j + 1 - len(self.results)))
                self.results[j] = r
        return given

    def close(self) -> None:
        if self.relay is not None:
            self.relay.drain()
        self.bar.close()
        self.write_trace(None)  # (a run that ended without a summary: interrupted, or an imap closed early)
        if self.gpu is not None:
            self.gpu.stop()

    def write_trace(self, summary: dict | None) -> None:
        """The trace file, once (NOTE [ Trace ] in trace.py); its path goes in ``summary["trace"]``."""
        if self.trace is not None and self.traced is None:
            self.traced = self.trace.write(summary)
            if summary is not None:
                summary["trace"] = self.traced
                if self.trace.dropped:
                    summary["notes"].append(f"trace: {self.trace.dropped} events over the first {self.trace.capacity} "
                                            f"were dropped (NOTE [ Trace ]): trace a shorter run")

    def summary(self, spec, notes: list[str], error: str | None) -> dict:
        cfg, ex = self.cfg, self.executor
        wall = time.perf_counter() - self.t0
        ran = self.n - self.skipped  # batches this run handled (the rest were loaded back from --output)
        workers = [dict(w, batches=self.per_pid.get(w["pid"], 0))
                   for w in (ex.worker_info() if ex is not None else self.workers)]
        breakdown = ex.breakdown if ex is not None else None
        if breakdown and self.write_s:
            breakdown = dict(breakdown, write_s=self.write_s)
        done = self.completed - self.skipped
        if breakdown and done > 0:
            breakdown = {k.replace("_s", "_ms"): round(v / done * 1000, 3) for k, v in breakdown.items()}
        startup = ex.startup_s if ex is not None and self.fresh else 0.0
        ready = ex.ready_s if ex is not None and self.fresh else 0.0
        s = {
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
            "restarts": list(ex.restarts) if ex is not None else [],
            "failed": self.failed,
            "handoff": (ex.figures or None) if ex is not None else None,
            "breakdown_ms_per_batch": breakdown or None,
            "notes": notes + list(getattr(self.source, "notes", ())) + ([f"{self.split_batches} batch(es) split in halves {self.splits} time(s) in all after "
                               f"running out of device memory (NOTE [ Splits ]); the workers then split batches "
                               f"over {self.fit} rows x length before running them: a smaller max_tokens or "
                               f"batch_size avoids the failed calls"] if self.splits else []),
            **({"oom_splits": self.splits} if self.splits else {}),
            "error": error,
            "output": self.sink.path if self.sink else None,
            "config": cfg.to_dict(),
            **(self.source.report() if self.source is not None else {}),  # images: classes, bad_samples
        }
        gpu = self.gpu.stop() if self.gpu is not None else None
        self.gpu = None
        s["bottleneck"] = verdict.bottleneck(s, ex.gil if ex is not None else None, gpu)  # NOTE [ Verdict ]
        return s
