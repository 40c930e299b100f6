"""What every source is made of: ``Batch`` records, the ``Source`` and ``Indexed`` bases, a run's ``Work``.

Every batch is a deterministic function of (config, batch index). A source yields ``Batch`` records: the
index, the layout (each field's shape and dtype), and ``fill(out)``, which writes the batch into arrays
the caller provides (a shared-memory slot, usually), so the main process spends one pass over the memory
per batch and allocates nothing. Making the record is cheap; ``fill`` is the work, and build threads run
it in parallel (NOTE [ Builders ] in local/builders.py).

A source that can build batch ``i`` on its own has ``batch(i)`` (``Indexed``: synthetic, files,
map-style datasets; a ``BuildSource``, contracts.py): a lost batch is built again from it, so its slot
can be reused as soon as a worker has copied it to the device, and build processes and Ray actors build
from a copy of it. The caller's own iterable can only be drawn from in order, one thread at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from ..fields import Layout


@dataclass
class Batch:
    """One batch to build: ``fill(views)`` writes it into views in ``layout`` (a slot's). ``rows`` > 0: it
    may instead be built a chunk at a time, ``fill_rows(views, lo, hi)`` for rows lo..hi, on several
    threads at once. ``layout`` None: known only once built, by ``produce()`` (a collate function, a
    dataset item that is a whole batch), whose fields are then copied into the slot."""
    index: int
    layout: Layout | None
    fill: Callable | None
    nbytes: int  # layout.nbytes (0 while unknown)
    rows: int = 0
    fill_rows: Callable | None = None
    produce: Callable | None = None

    def array(self):
        """The batch as new arrays (an array, or a tuple or dict of them), built apart from the slots."""
        if self.layout is None:
            return self.produce()
        out = self.layout.empty()
        self.fill(out)
        return out


class Source:
    """What a run asks of every source besides its batches; the defaults say nothing more."""

    max_nbytes: int | None = None  # the largest batch's bytes, when known before building (sizes the slots)

    def identity(self) -> dict:
        return {"kind": type(self).__name__}

    def manifest(self, index: int) -> dict:
        """Extra fields of batch ``index``'s manifest line (an image batch's files)."""
        return {}

    def report(self) -> dict:
        """Extra entries of the run's summary (an image folder's classes and bad files)."""
        return {}

    def learned(self, index: int) -> dict:
        """What building batch ``index`` here found out, for the copy where the summary is made (a Ray
        actor built it): given to that copy's ``learn``."""
        return {}

    def learn(self, found: dict) -> None:
        pass

    def record_bad(self, bad: dict) -> None:
        """Samples found bad where the batch was decoded (a worker): {sample: why}."""


class Indexed(Source):
    """A source of ``n`` batches, each built on its own by ``batch(i)``: any thread, any order."""

    n: int

    def __len__(self) -> int:
        return self.n

    def batch(self, index: int) -> Batch:
        raise NotImplementedError

    def get(self, index: int):
        """Batch ``index`` as new arrays (the bench's DataLoader mode builds them in its workers)."""
        return self.batch(index).array()

    def __iter__(self) -> Iterator[Batch]:
        return map(self.batch, range(self.n))


class Work:
    """The batches of one run for an executor: an iterator of ``Batch`` in batch order, with the ``source``
    when it can build batch i on its own (``source.batch(i)``: rebuilds, build processes, Ray actors), the
    largest batch's size when it is known, and the run's output directory (``sink``, an OutputDir, or
    None) and whether the caller keeps the results (``keep``): a Ray actor may write its results itself;
    ``digests``: the caller checksums them, so each is digested where it is computed (off the main)."""

    def __init__(self, batches: Iterable[Batch], source: Indexed | None = None, max_nbytes: int | None = None,
                 sink=None, keep: bool = True, digests: bool = False, trace=None):
        self._it = iter(batches)
        self.trace = trace  # the run's trace.Recorder, or None (NOTE [ Trace ] in trace.py)
        self.source, self.max_nbytes = source, max_nbytes
        self.sink, self.keep = sink, keep
        self.digests = digests  # the caller checksums the results: workers digest each (outputs.batch_digest)

    @classmethod
    def of(cls, source: Source, batches: Iterable[Batch] | None = None, **kw) -> "Work":
        """The Work of ``source`` (or of ``batches`` drawn from it): the source itself goes with it when it
        builds batch i on its own; ``kw``: ``sink``, ``keep``, ``digests``, ``trace``."""
        return cls(source if batches is None else batches, source if isinstance(source, Indexed) else None,
                   source.max_nbytes, **kw)

    def __iter__(self) -> Iterator[Batch]:
        return self._it  # (itself: one call less per batch)

    def __next__(self) -> Batch:
        return next(self._it)


def length(source) -> int | None:
    try:
        return len(source)
    except TypeError:
        return None
