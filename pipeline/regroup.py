"""Results back in input order when the batches were not (NOTE [ Input order ]).

NOTE [ Input order ]
With ``order = "length"`` or a token budget, batch k holds samples from anywhere in a window of the input
(NOTE [ Batch plans ]). Whatever the order, what the caller gets is in input order: ``Regroup`` takes each
computed batch's rows (each output row-aligned with the batch's samples) and hands out result j, samples
jR .. jR+R-1 (R: ``batch_size``, or ``plan.RESULT_ROWS`` with a token budget alone), as soon as all of its
rows are in (in j order for ``run`` and ``imap``, as completed for ``imap(ordered=False)``). The checksum,
``run()``'s results and ``imap`` see these results, so they are the same for any plan of the same samples
up to the kernel's arithmetic. Memory holds the rows of results not yet complete: at most a window of
samples plus the batches in flight. A failed batch (``on_error = "skip"``) makes each result it touches
None. The output directory keeps one part per computed batch, each with its rows' sample indices
(``sinks``, a ``sample`` member or column); ``read_output(DIR)`` reads it back in input order.
"""
from __future__ import annotations

import numpy as np

from .errors import KernelError
from .fields import flatten, like


class Regroup:
    """Rows of computed batches -> results of ``size`` consecutive samples, in input order."""

    def __init__(self, source, size: int, ordered: bool = True):
        self.source, self.size, self.ordered = source, size, ordered
        self.samples = source.samples
        self.pending: dict[int, list] = {}  # result j -> [rows in, failed?, [(positions, rows of outputs)]]
        self.ready: dict[int, object] = {}  # complete results not yet handed out (ordered)
        self.next = 0

    @staticmethod
    def of(source, ordered: bool = True) -> "Regroup | None":
        size = source.regrouping() if hasattr(source, "regrouping") else None
        return Regroup(source, size, ordered) if size else None

    def add(self, index: int, result) -> list[tuple[int, object]]:
        """Batch ``index``'s result (None: failed): the results now complete, as (j, result)."""
        ids = self.source.sample_ids(index)
        if result is not None:
            for name, a in zip(_names(result), flatten(result)):
                if np.ndim(a) == 0 or len(a) != len(ids):
                    raise KernelError(f"batch {index}: output {name} has shape {np.shape(a)} for {len(ids)} "
                                      f"samples; with order = 'length' or max_tokens each output must have one "
                                      f"row per sample (rows go back to input order): return (B, ...) arrays")
        done = []
        chunk = ids // self.size
        for j in np.unique(chunk):
            j = int(j)
            sel = np.flatnonzero(chunk == j)
            entry = self.pending.setdefault(j, [0, False, []])
            entry[0] += len(sel)
            if result is None:
                entry[1] = True
            else:
                entry[2].append((ids[sel] - j * self.size, [a[sel] for a in flatten(result)], result))
            if entry[0] == min(self.size, self.samples - j * self.size):
                del self.pending[j]
                done.append((j, None if entry[1] else _join(entry[2], entry[0])))
        if not self.ordered:
            return done
        self.ready.update(done)
        out = []
        while self.next in self.ready:
            out.append((self.next, self.ready.pop(self.next)))
            self.next += 1
        return out


def _join(pieces: list, rows: int):
    """One result of ``rows`` samples from its pieces (positions, arrays per output, a result for structure)."""
    first = pieces[0][1]
    outs = [np.empty((rows, *a.shape[1:]), a.dtype) for a in first]
    for pos, arrays, _ in pieces:
        for o, a in zip(outs, arrays):
            o[pos] = a
    return like(pieces[0][2], outs)


def _names(result) -> list[str]:
    if isinstance(result, dict):
        return [repr(k) for k in result]
    return [str(i) for i in range(len(result))] if isinstance(result, tuple) else ["(the array)"]
