"""The contracts between the package's rooms, written down (as SPDL's ``_arena/_protocol.py``).

  Executor     what ``runner`` (and the bench) may call on a backend: local processes (local/executor.py)
               or Ray actors (ray_backend/): start, stream batches in and ``Outcome`` records out, close
  BuildSource  a source that builds batch k on its own (sources/base.py ``Indexed``): on a build thread,
               in a build process or in a Ray actor, from a pickled copy; and what a run reports of it
  Ring         the slots build threads fill: the main's shared-memory ring, a build process's view of it,
               a Ray actor's own slots
  Outcome      one batch's end, as a backend yields it

The package's own objects are typed by these; nothing probes another with ``getattr``/``hasattr``.
``tests/test_contracts.py`` checks that every implementation has every member.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol, runtime_checkable

from .config import Config
from .fields import Layout
from .sources.base import Batch, Work
from .wire import Descriptor


@dataclass
class Outcome:
    """One batch's end: its result, or (``result`` None) the record of why it failed."""
    index: int
    result: Any
    info: dict  # timings, pid, device; "digest", "record" (written by a Ray actor), "bad_samples"
    failure: dict | None = None  # {"batch", "cause", "attempts"}, or {"batch", "raise": error} (on_error fail)


@runtime_checkable
class Executor(Protocol):
    """A backend. ``stream`` may run several times on the same workers (a warm ``Pipeline``)."""
    threads: int  # torch threads per worker
    relay: Any  # outputs.Relay of the workers' prints (None when the workers' output goes elsewhere)
    restarts: list  # every worker that died or was replaced: {"rank", "pid", "cause", "batch", ...}
    notes: list  # for every run of this executor (a ring that had to shrink, ...)
    run_notes: list  # the last run's own
    gil: str | None  # the last run's build held the GIL: the verdict's advice (NOTE [ Verdict ])
    breakdown: dict  # the last run's seconds per stage, summed over its batches
    figures: dict  # the last run's handoff figures (slots, pickled fallbacks, host-to-device rate, ...)
    startup_s: float  # until the first worker could compute
    ready_s: float  # until every worker was ready

    @property
    def started(self) -> bool: ...

    def start(self) -> None: ...

    def stream(self, work: Work, ordered: bool = True, window: int | None = None, settle: bool = True,
               cfg: Config | None = None) -> Iterator[Outcome]: ...

    def worker_info(self) -> list[dict]: ...

    def close(self, graceful: bool = True) -> None: ...


@runtime_checkable
class BuildSource(Protocol):
    """Batches as a function of (config, index), built anywhere: it pickles (small: files are reopened
    where it lands), and ``batch(k)`` is cheap, the work being the batch's ``fill``."""
    n: int
    max_nbytes: int | None  # the largest batch's bytes (sizes the slots; None: not known before building)

    def __len__(self) -> int: ...

    def batch(self, index: int) -> Batch: ...

    def identity(self) -> dict: ...  # what batch i depends on (an output directory resumes only if equal)

    # what a run reports of it (sources.base.Source has empty ones)
    def manifest(self, index: int) -> dict: ...  # extra fields of batch index's manifest line

    def report(self) -> dict: ...  # extra summary entries

    def learned(self, index: int) -> dict: ...  # what building batch index here found out (a Ray actor)

    def learn(self, found: dict) -> None: ...  # ... told to the copy where the summary is made

    def record_bad(self, bad: dict) -> None: ...  # bad samples found where the batch was decoded


@runtime_checkable
class Ring(Protocol):
    """Slots that build threads fill: ``view`` gives slot ``slot``'s fields in ``layout`` to write, and the
    descriptor that names them to whoever reads the slot."""
    slot_bytes: int

    def view(self, slot: int, layout: Layout) -> tuple[Any, Descriptor]: ...
