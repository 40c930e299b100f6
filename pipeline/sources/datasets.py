"""Your data: a map-style dataset (samples into rows, NOTE [ Samples ]), or an iterable of batches.

``MapSource`` groups a dataset's samples into batches (batch k holds samples kB .. kB+B-1), writing each
sample straight into its row of the slot; ``FromIterable`` draws a caller's iterable of whole batches in
order; ``load_dataset`` makes ``source.object`` (``--source NAME``) from its name.
"""
from __future__ import annotations

import importlib
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import ConfigError, SampleError
from ..fields import Layout, copy_into, fields, flatten
from .base import Batch, Indexed, Source
from .plan import RESULT_ROWS, Plan, Sequences, checked_lengths, make_plan
from .ragged import RaggedSamples, find_ragged, probe


class FromIterable(Source):
    """The caller's own batches, drawn in order on one thread: arrays (numpy or CPU tensors), or tuples or
    dicts of them, each checked by the handoff rule."""

    def __init__(self, items: Iterable):
        self.items = items
        self.max_nbytes = None
        try:
            self.n = len(items)  # type: ignore[arg-type]
        except TypeError:
            self.n = None

    def __len__(self) -> int:
        if self.n is None:
            raise TypeError("source has no length")
        return self.n

    def identity(self) -> dict:
        """The caller's arrays can't be fingerprinted cheaply: resuming trusts that they are the same."""
        return {"kind": "python iterable", "batches": self.n}

    def __iter__(self) -> Iterator[Batch]:
        for i, item in enumerate(self.items):
            arr = fields(item, f"source batch {i}")
            layout = Layout.of(arr)
            yield Batch(i, layout, lambda out, a=arr: copy_into(out, a), layout.nbytes)


def is_map_style(obj) -> bool:
    """A map-style dataset: ``__len__`` and ``__getitem__`` (torch's Dataset, a list, a Hugging Face
    ``datasets.Dataset``); torch's IterableDataset inherits a ``__getitem__`` that raises, so it is not."""
    if not (hasattr(obj, "__len__") and hasattr(obj, "__getitem__")) or isinstance(obj, (str, bytes, dict)):
        return False
    import sys
    torch = sys.modules.get("torch")
    return not (torch is not None and isinstance(obj, torch.utils.data.IterableDataset))


class MapSource(Indexed):
    """A map-style dataset: batch ``k`` holds samples ``kB .. kB+B-1`` (``batch_size`` B; the last batch
    shorter, or dropped with ``drop_last``), or, without a batch size, item ``k`` is batch ``k``.

    NOTE [ Samples ]
    The first sample fixes each field's shape and dtype (``Layout``), so a batch's layout is known before
    it is built and every sample is written straight into its row of the slot: no list of samples, no
    collate allocation, no second copy. A batch is built in contiguous chunks of rows (``fill_rows``),
    which idle build threads share (NOTE [ Builders ]); within a chunk the loop per sample is a fetch, a
    type/shape/dtype check and one assignment per field. ``__getitems__(indices)`` (torch's batched
    fetch), when the dataset has it, is called once per chunk instead. A sample that raises, or does not
    fit its field, fails its batch with a ``SampleError`` naming the sample, the batch and the field
    (the dataset's exception as ``__cause__``); ``faults.on_error`` applies. With ``collate`` (a list of
    samples -> one batch) the samples are fetched, collated on the build thread, and the batch is copied
    into the slot: its layout is known once built (the first batch, built when the source opens, sizes
    the slots), and so it is without a batch size, where each item is a whole batch that may differ in
    shape from the others.
    """

    def __init__(self, dataset, batch_size: int = 0, drop_last: bool = False, collate: Callable | None = None,
                 seq: Sequences | None = None):
        if not is_map_style(dataset):
            raise ConfigError(f"source: a {type(dataset).__name__} is not a map-style dataset: it needs "
                              f"__len__ and __getitem__(i) (torch.utils.data.Dataset, a list, a Hugging Face "
                              f"datasets.Dataset), or pass an iterable of batches")
        self.dataset, self.collate, self.drop_last = dataset, collate, bool(drop_last)
        self.seq = seq = seq or Sequences()
        self.samples = len(dataset)
        self.batch_size = int(batch_size) or None
        if seq.asked and collate is not None:
            raise ConfigError("ragged, max_length, max_tokens and order = 'length' pad and group the samples "
                              "themselves; leave out collate=")
        if seq.plans and drop_last:
            raise ConfigError("drop_last drops the last batch of samples in input order; with order = 'length' "
                              "or max_tokens the batches are regrouped: leave drop_last off")
        b = self.batch_size or 1
        self.n = self.samples // b if drop_last else -(-self.samples // b)
        if self.n == 0:
            raise ConfigError(f"source: the dataset has {self.samples} sample(s)"
                              + (f", fewer than one batch of {b} (drop_last)" if self.samples else "")
                              + "; nothing to compute")
        self.batched = hasattr(dataset, "__getitems__") and (self.batch_size is not None or seq.max_tokens > 0)
        self.sample_layout = None
        self.ragged: RaggedSamples | None = None
        self.plan: Plan | None = None
        self.lengths = None
        if (self.batch_size is not None or seq.max_tokens) and collate is None:
            first = self._checked(self._first_sample(), 0, 0)
            self.sample_layout = Layout.of(first)
            layouts = (probe(first, self.samples, lambda i: fields(self._get(0, [i])[0], f"sample {i}"))
                       if self.probe else [self.sample_layout])
            ragged = find_ragged(layouts, seq.ragged)
            if any(ragged):
                self._open_ragged(RaggedSamples(self.sample_layout, ragged, seq))
            elif seq.plans or seq.max_length:
                key = "order = 'length'" if seq.order == "length" else "max_tokens" if seq.max_tokens else "max_length"
                raise ConfigError(f"source: {key} is for samples of their own length, and every field of the "
                                  f"samples compared has one shape ({self.sample_layout.describe()}); declare the "
                                  f"ragged fields (source.ragged / --ragged NAME) or leave {key} out")
            else:
                self.full_layout = self.sample_layout.rows(self.batch_size)
                self.max_nbytes = self.full_layout.nbytes
        elif seq.asked:
            raise ConfigError("ragged, max_length, max_tokens and order group samples into batches: give "
                              "batch_size (or max_tokens)")
        else:  # the first batch sizes the slots; larger ones travel pickled
            self.max_nbytes = Layout.of(self._produce(0)).nbytes

    probe = True  # compare a few samples for ragged fields when the dataset opens (an image folder: no)

    def _open_ragged(self, ragged: RaggedSamples) -> None:
        """Samples with ragged fields (NOTE [ Ragged fields ]): a plan when their lengths are known."""
        seq, self.ragged = self.seq, ragged
        own = getattr(self.dataset, "lengths", None)
        got = own() if callable(own) else None
        if got is not None:
            self.lengths = checked_lengths(got, self.samples, f"{type(self.dataset).__name__}.lengths()")
        if self.lengths is None:
            if seq.plans:
                key = "order = 'length'" if seq.order == "length" else "max_tokens"
                raise ConfigError(f"source: {key} needs each sample's length before it is built: give the "
                                  f"dataset a lengths() method that returns one int per sample (the length of "
                                  f"its ragged fields {', '.join(repr(n) for n in ragged.names)}), or use "
                                  f"order = 'input' without max_tokens")
            self.max_nbytes = (ragged.layout(self.batch_size, seq.width(seq.max_length)).nbytes
                               if seq.max_length else Layout.of(self._produce(0)).nbytes)
            return
        self.plan = make_plan(self.lengths, seq, self.batch_size or 0, self.drop_last)
        self.n = self.plan.n
        self.max_nbytes = max(ragged.layout(self.plan.rows(k), int(self.plan.widths[k])).nbytes
                              for k in range(self.n))

    ref: tuple | None = None  # (source.object, source.params) when it was made from its name

    def _first_sample(self):
        """The sample whose fields fix the layout (a subclass that knows it may skip the fetch)."""
        return self._fetch(0, 0, 1)[0]

    def __reduce__(self):
        """To a build process: a dataset made from its name is made again there from the name; any other
        travels by value (cloudpickle)."""
        if self.ref is not None:
            return _from_ref, (*self.ref, self.batch_size or 0, self.drop_last, self.collate, self.seq)
        return object.__reduce__(self)

    def identity(self) -> dict:
        """The dataset's own ``identity()`` when it has one; else its type and length (resume then trusts
        that the data is the same)."""
        own = getattr(self.dataset, "identity", None)
        ds = own() if callable(own) else {"type": f"{type(self.dataset).__module__}."
                                                  f"{type(self.dataset).__qualname__}", "samples": self.samples}
        return {"kind": "dataset", "dataset": ds, "batch_size": self.batch_size, "drop_last": self.drop_last,
                **({"collate": getattr(self.collate, "__qualname__", repr(self.collate))} if self.collate else {}),
                **({"sequences": {"fields": self.ragged.names, **_jsonable(self.seq)}} if self.ragged else {})}

    def rows_of(self, index: int) -> int:
        if self.plan is not None:
            return self.plan.rows(index)
        b = self.batch_size or 1
        return min(b, self.samples - index * b)

    def sample_ids(self, index: int) -> np.ndarray:
        """The dataset indices of batch ``index``'s rows, in row order."""
        if self.plan is not None:
            return self.plan.ids(index)
        b = self.batch_size or 1
        return np.arange(index * b, index * b + self.rows_of(index))

    def regrouping(self) -> int | None:
        """The samples per result when the batches are not the input's consecutive groups (sorted by length,
        or cut by a token budget) and their rows must be put back in input order (NOTE [ Input order ]);
        None when batch k is samples kB .. kB+B-1."""
        return None if self.plan is None else self.plan.regrouping(self.batch_size or RESULT_ROWS)

    def report(self) -> dict:
        """The summary's ``sequences``: padding share, samples cut to max_length (NOTE [ Ragged fields ])."""
        if self.ragged is None:
            return {}
        out = {"fields": self.ragged.names, "order": self.seq.order, "batches": self.n}
        if self.lengths is not None:
            out.update(self.plan.tokens(self.lengths, self.seq.max_length))
        else:
            out["truncated"] = self.ragged.truncated  # counted by this process's build threads
        return {"sequences": out}

    def batch(self, index: int) -> Batch:
        if self.sample_layout is None or (self.ragged is not None and self.plan is None):
            return Batch(index, None, None, 0, produce=lambda: self._produce(index))
        rows = self.rows_of(index)
        if self.ragged is not None:
            layout = self.ragged.layout(rows, int(self.plan.widths[index]))
            fill_rows = lambda out, lo, hi: self._write_ragged(out, index, lo, hi)  # noqa: E731
        else:
            layout = self.sample_layout.rows(rows) if rows != self.batch_size else self.full_layout
            fill_rows = lambda out, lo, hi: self._write(out, index, lo, hi)  # noqa: E731
        return Batch(index, layout, lambda out: fill_rows(out, 0, rows), layout.nbytes, rows, fill_rows)

    # -- fetching ----------------------------------------------------------------------------------------
    def _fetch(self, index: int, lo: int, hi: int) -> list:
        """Samples ``lo .. hi`` of batch ``index``."""
        if self.plan is not None:
            return self._get(index, [int(i) for i in self.plan.ids(index)[lo:hi]])
        base = index * (self.batch_size or 1)
        return self._get(index, list(range(base + lo, base + hi)))

    def _get(self, index: int, ids: list) -> list:
        """Samples ``ids`` (of batch ``index``): one ``__getitems__`` call when the dataset has it, else one
        ``__getitem__`` each; SampleError naming the sample(s) if the dataset raises."""
        try:
            if self.batched:
                got = self.dataset.__getitems__(ids)
                if len(got) != len(ids):
                    raise ValueError(f"__getitems__ returned {len(got)} samples for {len(ids)} indices")
                return got
            get = self.dataset.__getitem__
            return [get(i) for i in ids]
        except Exception as e:  # noqa: BLE001 - the dataset's error: its batch fails, naming the samples
            what = _span(ids)
            if not self.batched and len(ids) > 1:
                what = self._culprit(ids) or what
            why = str(e) if isinstance(e, SampleError) else f"{type(e).__name__}: {e}"  # (ours: named already)
            raise SampleError(f"{what} (batch {index}): {why}") from e

    def _culprit(self, ids: list) -> str | None:
        """Which sample of ``ids`` raises (fetched again one by one: the error path only)."""
        for i in ids:
            try:
                self.dataset[i]
            except Exception:  # noqa: BLE001
                return f"sample {i}"
        return None

    def _produce(self, index: int):
        """Batch ``index`` built apart (collate, or an item that is a whole batch), as numpy fields."""
        if self.batch_size is None:
            item = self._fetch(index, 0, 1)[0]
            return fields(item, f"source batch {index}")
        samples = self._fetch(index, 0, self.rows_of(index))
        if self.ragged is not None:  # lengths unknown before the samples are built: padded apart, then copied
            base = index * self.batch_size
            checked = [self._checked(s, index, j) for j, s in enumerate(samples)]
            lengths = [self.ragged.length_of(s, f"sample {base + j} (batch {index})") for j, s in enumerate(checked)]
            out = self.ragged.layout(len(samples), self.seq.width(max(lengths))).empty()
            self.ragged.truncated += self.ragged.write(out, checked, 0, lambda j: f"sample {base + j} (batch {index})")
            return out
        try:
            batch = self.collate(samples)
        except Exception as e:  # noqa: BLE001 - the caller's collate: the batch fails, naming it
            raise SampleError(f"batch {index}: collate {getattr(self.collate, '__qualname__', '')} raised "
                              f"{type(e).__name__}: {e}") from e
        return fields(batch, f"batch {index} (from collate)")

    def _write(self, views, index: int, lo: int, hi: int) -> None:
        """Samples ``lo .. hi`` of batch ``index`` into their rows of every field (NOTE [ Samples ]): each
        field's values written in one numpy call when every sample has the field's shape and dtype
        exactly, else one sample at a time, which converts, checks and names what does not fit."""
        samples = self._fetch(index, lo, hi)
        layout = self.sample_layout
        outs = [o[lo:hi] for o in flatten(views)]
        columns = [samples] if layout.kind == "array" else _columns(samples, layout)
        if columns is not None and all(_put(o, col, shape, np.dtype(d))
                                       for o, col, shape, d in zip(outs, columns, layout.shapes, layout.dtypes)):
            return
        try:
            for j, sample in enumerate(samples):
                for o, a in zip(outs, flatten(self._checked(sample, index, lo + j))):
                    o[j] = a
        except SampleError:
            raise
        except Exception as e:  # noqa: BLE001 - the dataset's values: its batch fails, naming the sample
            base = index * self.batch_size
            raise SampleError(f"sample {base + lo + j} (batch {index}): {type(e).__name__}: {e}") from e

    def _write_ragged(self, views, index: int, lo: int, hi: int) -> None:
        """Samples ``lo .. hi`` of planned batch ``index`` into their padded rows (NOTE [ Ragged fields ])."""
        ids = self.plan.ids(index)[lo:hi]
        samples = [self._checked(s, index, lo + j) for j, s in enumerate(self._fetch(index, lo, hi))]
        self.ragged.write(views, samples, lo, lambda j: f"sample {ids[j]} (batch {index})", self.lengths[ids])

    def _checked(self, sample, index: int, row: int):
        """``sample`` as numpy fields that fit the first sample's layout, or SampleError saying what
        differs and how to fix it."""
        i = int(self.plan.ids(index)[row]) if self.plan is not None else index * (self.batch_size or 1) + row
        where = f"sample {i} (batch {index})"
        s = fields(sample, where)
        if self.sample_layout is None:
            return s
        if self.ragged is not None:
            self.ragged.check(s, where)
            return s
        got, want = Layout.of(s), self.sample_layout
        if (got.kind, got.keys, len(got.shapes)) != (want.kind, want.keys, len(want.shapes)):
            raise SampleError(f"{where}: {got.describe()} where sample 0 had {want.describe()}; every sample "
                              f"must have the same fields: fix __getitem__, or pass collate=")
        for name, gs, gd, ws, wd in zip(want.names, got.shapes, got.dtypes, want.shapes, want.dtypes):
            if gs != ws or gd != wd:
                field = f", field {name!r}" if name else ""
                raise SampleError(f"{where}{field}: shape {gs} {np.dtype(gd)} where sample 0 had {ws} "
                                  f"{np.dtype(wd)}; every sample of a field must have one shape and dtype: "
                                  f"pad or cast in __getitem__, or pass collate="
                                  + (", or declare it ragged (source.ragged / --ragged) if its length varies"
                                     if gd == wd and len(gs) == len(ws) and gs[1:] == ws[1:] and gs else ""))
        return s


def _span(ids: list) -> str:
    if len(ids) == 1:
        return f"sample {ids[0]}"
    if list(ids) == list(range(ids[0], ids[0] + len(ids))):
        return f"samples {ids[0]}..{ids[-1]}"
    return f"samples {', '.join(map(str, ids[:4]))}{', ...' if len(ids) > 4 else ''}"


def _jsonable(seq: Sequences) -> dict:
    return {"max_length": seq.max_length, "max_tokens": seq.max_tokens, "order": seq.order,
            "pad_multiple": seq.pad_multiple, "pad_values": dict(seq.pad_values), "on_long": seq.on_long}


def _from_ref(ref: str, params: dict, batch_size: int, drop_last: bool, collate, seq=None) -> MapSource:
    src = MapSource(load_dataset(ref, params), batch_size, drop_last, collate, seq)
    src.ref = (ref, params)
    return src


def load_object(path: str, key: str):
    """The object ``package.module:name`` names (``name`` may be dotted); ConfigError naming ``key``."""
    module, colon, name = path.partition(":")
    if not colon or not module or not name:
        raise ConfigError(f"{key} = '{path}': expected 'package.module:name'")
    try:
        obj = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{key} = '{path}': cannot import module '{module}': "
                          f"{type(e).__name__}: {e}") from None
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{key} = '{path}': module '{module}' has no attribute "
                              f"'{name}'") from None
    return obj


def load_dataset(ref: str, params: dict):
    """``source.object``: a map-style dataset, or a class or function that returns one (called with
    ``source.params``); ConfigError, one line, for a name that does not import or an object that is not
    a dataset."""
    import inspect
    obj = load_object(ref, "source.object")
    if inspect.isclass(obj) or (callable(obj) and not is_map_style(obj)):
        try:
            obj = obj(**params)
        except Exception as e:  # noqa: BLE001 - the caller's constructor: one line, its own words
            raise ConfigError(f"source.object = {ref!r}: calling it with {params or 'no params'} raised "
                              f"{type(e).__name__}: {e}") from e
    elif params:
        raise ConfigError(f"source.object = {ref!r} is a {type(obj).__name__}, not a callable: "
                          f"source.params ({', '.join(params)}) have nothing to go to")
    if not is_map_style(obj):
        raise ConfigError(f"source.object = {ref!r} gave a {type(obj).__name__}, which is not a map-style "
                          f"dataset: it needs __len__ and __getitem__(i) (torch.utils.data.Dataset, a list, "
                          f"a Hugging Face datasets.Dataset)")
    return obj


_SCALAR_KIND = {int: "i", float: "f", bool: "b"}


def _put(out: np.ndarray, values: list, shape: tuple, dtype: np.dtype) -> bool:
    """Write ``values`` (one per row) into ``out`` in one numpy call if every one is exactly of the
    field's shape and dtype (arrays or tensors; Python numbers of the field's kind for a scalar field);
    False to let the caller go sample by sample."""
    try:
        if not shape:
            kinds = {type(v) for v in values}
            if len(kinds) == 1 and _SCALAR_KIND.get(next(iter(kinds))) == dtype.kind:
                out[...] = values
                return True
            if kinds <= {np.ndarray} | {type(dtype.type(0))} and {v.dtype for v in values} == {dtype}:
                out[...] = values
                return True
            return False
        # (the rows' lengths here; numpy checks the rest: every value has the field's number of dimensions
        # and its dimensions after the first, or concatenate raises; casting="no": exactly its dtype)
        if set(map(len, values)) != {shape[0]}:
            return False
        np.concatenate(values, out=out.reshape(-1, *shape[1:]), casting="no")
        return True
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return False


def _columns(samples: list, layout: Layout) -> list | None:
    """The samples' values field by field (a list per field), when every sample has the layout's
    structure; else None."""
    n = len(layout.shapes)
    if layout.kind == "dict":
        if not all(type(s) is dict and len(s) == n for s in samples):
            return None
        try:
            return [[s[k] for s in samples] for k in layout.keys]
        except KeyError:
            return None
    if not all(type(s) is tuple and len(s) == n for s in samples):
        return None
    return [list(col) for col in zip(*samples)]
