"""Who builds a Ray run's batches and who writes its output (NOTE [ Actor builds ] in ray_backend/__init__.py)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets

from ..config import Config
from ..errors import ConfigError
from ..sinks import TMP
from ..sources.base import Work
from ..sources.datasets import MapSource
from .cluster import START_WAIT_S, ray


def plan(ex, work: Work, cfg: Config) -> tuple:
    """Who builds this run's batches (NOTE [ Actor builds ]): ``compute``'s extra arguments (the run
    key and the source's ObjectRef) when the actors do, () when the driver does (a note in ``ex.run_notes``
says why). ``ex``: the RayExecutor, whose actors are asked."""
    ex.figures.update(transport="ray object store", put_bytes=0, source_bytes=0, written_by="driver")
    src = work.source
    mode = cfg.run.ray_build
    if mode == "driver":
        ex.run_notes.append("run.ray_build = 'driver': the driver builds every batch and puts it in the "
                              "object store")
        return ()
    why = None
    if src is None:
        why = ("the source is drawn in order (an iterable of batches), so the driver builds every batch and "
               "puts it in the object store; a map-style dataset, synthetic batches or files are built by "
               "the actors")
    else:
        import cloudpickle
        sink, keep = work.sink, work.keep
        output = (sink.spec() if sink is not None else None)
        threads = cfg.workers.build_threads or 2
        try:
            payload = cloudpickle.dumps((src, output, keep, threads, os.getcwd()))
        except Exception as e:  # noqa: BLE001 - a lock, an open file, a generator in the dataset
            name = type(src.dataset if isinstance(src, MapSource) else src).__name__
            why = (f"the source ({name}) can't be pickled ({type(e).__name__}: {str(e)[:80]}), so the driver "
                   f"builds every batch and puts it in the object store")
    if why is not None:
        if mode == "actors":
            raise ConfigError(f"run.ray_build = 'actors': {why}; use run.ray_build = 'auto'")
        ex.run_notes.append(why)
        return ()
    args = (hashlib.sha1(payload).hexdigest(), [ray.put(payload)])
    answers = _placement(ex, cfg, sink, args)
    why = next((w for _, _, _, w in answers if w), None)
    if why is not None:
        why = (f"the actors can't load the source ({why[:120]}), so the driver builds every batch and puts "
               f"it in the object store; make what defines it importable on every node")
        if mode == "actors":
            raise ConfigError(f"run.ray_build = 'actors': {why}")
        ex.run_notes.append(why)
        return ()
    blind = sorted({who[4] for who, _, sees, _ in answers if not sees}) if sink is not None else []
    if blind:
        ex.run_notes.append(f"--output {sink.path} is not visible to the actors on {', '.join(blind)}: "
                              f"their results come back and the driver writes them")
        payload = cloudpickle.dumps((src, None, keep, threads, os.getcwd()))
        args = (hashlib.sha1(payload).hexdigest(), [ray.put(payload)])
    elif output is not None:
        ex.figures["written_by"] = "actors"
    ex.figures.update(transport="built by the actors", source_bytes=len(payload))
    return args

def _placement(ex, cfg: Config, sink, args: tuple) -> list[tuple]:
    """Every actor's answer to ``check``: ConfigError naming the node when one lacks the input; the
    others say whether they see the output directory (a probe file in it) and opened the source."""
    paths = [os.path.abspath(cfg.source.path)] if cfg.source.path else []
    probe = os.path.join(sink.path, f"{TMP}probe-{secrets.token_hex(4)}") if sink is not None else None
    if probe:
        with open(probe, "w"):
            pass
    try:
        answers = []
        for ref in [a.check.remote(paths, probe, *args) for a in ex.actors]:
            try:
                answers.append(ray.get(ref, timeout=START_WAIT_S))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                    ray.exceptions.GetTimeoutError):
                continue  # lost meanwhile: the run notices and restarts it
    finally:
        if probe:
            with contextlib.suppress(OSError):
                os.unlink(probe)
    for who, missing, _, _ in answers:
        if missing:
            raise ConfigError(f"--input {missing[0]}: not found on node {who[4]} (Ray actor of worker "
                              f"{who[0]}); every node must see the input at the same path (shared storage, "
                              f"or a copy on each node), or let the driver build: --set run.ray_build=driver")
    return answers
