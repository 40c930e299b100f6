"""Samples of their own length in a slot: which fields are ragged, a batch's layout, samples written into
their padded rows with their lengths.

NOTE [ Ragged fields ]
A field is ragged when its samples differ in length along their first axis, the other axes and the dtype
fixed (found by comparing a few samples spread over the dataset when it opens, or declared with
``source.ragged``). All the ragged fields of a sample share its length (``input_ids`` and
``attention_mask``). A batch of them is padded to its own width (``plan.Sequences.width``) with each field's
pad value, and the kernel gets each row's length as one more field, ``lengths`` (int64, ``(B,)``): a dict
sample gains the key ``"lengths"``, a tuple gains it as its last field, and a single array becomes the tuple
``(padded, lengths)``. The batch's layout is known before it is built (its rows and width come from the
plan, NOTE [ Batch plans ]), so build threads still write each sample straight into its rows of the slot,
the padding included: no collate, no second copy; the layout travels with each batch to the worker.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError, SampleError
from ..fields import Layout, flatten
from .plan import Sequences

LENGTHS = "lengths"  # the field that holds each row's length (NOTE [ Ragged fields ])
PROBES = 16  # samples compared when a dataset opens, to find its ragged fields


def probe(first, samples: int, get) -> list[Layout]:
    """The layouts of sample 0 (``first``) and of up to PROBES samples spread over ``samples`` (``get(i)``:
    sample i as numpy fields), those of the same structure only."""
    layouts = [Layout.of(first)]
    for i in sorted(set(np.linspace(0, samples - 1, min(samples, PROBES)).astype(int)) - {0}):
        try:
            lay = Layout.of(get(int(i)))
        except Exception:  # noqa: BLE001 - its own batch will fail, naming it
            continue
        if (lay.kind, lay.keys, len(lay.shapes)) == (layouts[0].kind, layouts[0].keys, len(layouts[0].shapes)):
            layouts.append(lay)
    return layouts


def find_ragged(layouts: list[Layout], declared: tuple) -> list[bool]:
    """Per field of ``layouts[0]``: ragged or not. ``layouts``: a few samples' layouts (the same structure);
    ``declared``: the names the config gives (checked against the fields)."""
    first = layouts[0]
    names = ["array"] if first.kind == "array" else first.names  # (a sample that is one array: "array")
    if declared:
        unknown = [d for d in declared if d not in names]
        if unknown:
            raise ConfigError(f"source.ragged = {list(declared)}: no field {unknown[0]!r}; the samples' fields: "
                              f"{', '.join(repr(n) for n in names)}")
        for n, s in zip(names, first.shapes):
            if n in declared and not s:
                raise ConfigError(f"source.ragged: field {n!r} is a scalar (shape ()); a ragged field has a "
                                  f"first axis of varying length")
        return [n in declared for n in names]
    out = []
    for i, shape in enumerate(first.shapes):  # (a probe of other axes or dtype: its own batch fails, naming it)
        alike = {lay.shapes[i][0] for lay in layouts if len(lay.shapes[i]) == len(shape) and shape
                 and lay.shapes[i][1:] == shape[1:] and lay.dtypes[i] == first.dtypes[i]}
        out.append(len(alike) > 1)
    return out


class RaggedSamples:
    """How samples with ragged fields lie in a batch (NOTE [ Ragged fields ])."""

    def __init__(self, sample: Layout, ragged: list[bool], seq: Sequences):
        self.sample, self.ragged, self.seq = sample, ragged, seq
        if sample.kind == "dict" and LENGTHS in sample.keys:
            raise ConfigError(f"the samples have a field {LENGTHS!r}, the name the lengths of a ragged batch "
                              f"take (NOTE [ Ragged fields ]): rename it in __getitem__")
        for name in seq.pad_values:
            if name not in sample.names or not ragged[sample.names.index(name)]:
                raise ConfigError(f"source.pad_values: {name!r} is not a ragged field (ragged: "
                                  f"{', '.join(repr(n) for n, r in zip(sample.names, ragged) if r)})")
        self.pads = [seq.pad_values.get(n, 0) for n in sample.names]
        self.names = [n for n, r in zip(sample.names, ragged) if r]
        self.truncated = 0  # samples cut to max_length here (build threads in this process)

    def layout(self, rows: int, width: int) -> Layout:
        """The batch layout of ``rows`` samples padded to ``width``, with the lengths field."""
        shapes = [(rows, width, *s[1:]) if r else (rows, *s) for s, r in zip(self.sample.shapes, self.ragged)]
        shapes.append((rows,))
        dtypes = [*self.sample.dtypes, np.dtype(np.int64).str]
        if self.sample.kind == "dict":
            return Layout.make("dict", (*self.sample.keys, LENGTHS), shapes, dtypes)
        return Layout.make("tuple", (), shapes, dtypes)

    def length_of(self, sample, where: str) -> int:
        """The length of a sample (numpy fields): its ragged fields' first axis, which they must share."""
        arrays = flatten(sample)
        got = {n: a.shape[0] for n, a, r in zip(self.sample.names, arrays, self.ragged) if r and a.ndim}
        if len(set(got.values())) > 1:
            raise SampleError(f"{where}: the ragged fields differ in length ({', '.join(f'{_n(n)}: {m}' for n, m in got.items())}); "
                              f"the ragged fields of a sample share one length: make them equal in __getitem__")
        return next(iter(got.values()), 0)

    def check(self, sample, where: str) -> None:
        """SampleError, one line, for a sample that does not fit: its structure, a field's dtype or axes,
        or a ragged field of length 0."""
        got = Layout.of(sample)
        want = self.sample
        if (got.kind, got.keys, len(got.shapes)) != (want.kind, want.keys, len(want.shapes)):
            raise SampleError(f"{where}: {got.describe()} where sample 0 had {want.describe()}; every sample "
                              f"must have the same fields: fix __getitem__")
        for name, gs, gd, ws, wd, r in zip(want.names, got.shapes, got.dtypes, want.shapes, want.dtypes,
                                           self.ragged):
            field = f", field {name!r}" if name else ""
            if gd != wd:
                raise SampleError(f"{where}{field}: dtype {np.dtype(gd)} where sample 0 had {np.dtype(wd)}; "
                                  f"cast it in __getitem__")
            if r and (len(gs) != len(ws) or gs[1:] != ws[1:]):
                raise SampleError(f"{where}{field}: shape {gs} where a ragged field's samples are (length, "
                                  f"{', '.join(map(str, ws[1:]))}{',' if len(ws) == 2 else ''}) (sample 0: {ws}); "
                                  f"only the first axis may vary: fix __getitem__")
            if r and gs[0] == 0:
                raise SampleError(f"{where}{field}: length 0; a sample needs at least one value: drop it "
                                  f"from the dataset (or give it one pad value)")
            if not r and gs != ws:
                raise SampleError(f"{where}{field}: shape {gs} where sample 0 had {ws}; only the ragged fields "
                                  f"({', '.join(repr(n) for n in self.names)}) may vary in length: pad it in "
                                  f"__getitem__, or declare it ragged (source.ragged / --ragged)")

    def write(self, views, samples: list, lo: int, where, expect=None) -> int:
        """``samples`` (numpy fields, checked) into rows ``lo ..`` of ``views`` (a batch in ``layout``),
        padded, with their lengths; returns how many were cut to the batch's width. ``expect``: the lengths
        the plan used (a ``lengths()`` that disagrees is the dataset's error); ``where(j)`` names sample j."""
        outs = flatten(views)
        width = next((o.shape[1] for o, r in zip(outs, self.ragged) if r), 0)
        cut = 0
        for j, s in enumerate(samples):
            arrays = flatten(s)
            n = self.length_of(s, where(j))
            if expect is not None and n != expect[j]:
                raise SampleError(f"{where(j)}: lengths() says {int(expect[j])} but its ragged fields have "
                                  f"{n} values; make lengths() return each sample's length as built")
            if n > width:
                if self.seq.on_long == "fail" or not self.seq.max_length:
                    bound = f"max_length {self.seq.max_length}" if self.seq.max_length else f"the batch's width {width}"
                    raise SampleError(f"{where(j)}: length {n} is over {bound} (on_long = 'fail'); raise "
                                      f"--max-length, cut it in __getitem__, or set --on-long truncate")
                cut += 1
            m = min(n, width)
            for o, a, r, pad in zip(outs, arrays, self.ragged, self.pads):
                if r:
                    o[lo + j, :m] = a[:m]
                    o[lo + j, m:] = pad
                else:
                    o[lo + j] = a
            outs[-1][lo + j] = m
        return cut


def _n(name: str) -> str:
    return repr(name) if name else "array"
