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

    def __init__(self, dataset, batch_size: int = 0, drop_last: bool = False, collate: Callable | None = None):
        if not is_map_style(dataset):
            raise ConfigError(f"source: a {type(dataset).__name__} is not a map-style dataset: it needs "
                              f"__len__ and __getitem__(i) (torch.utils.data.Dataset, a list, a Hugging Face "
                              f"datasets.Dataset), or pass an iterable of batches")
        self.dataset, self.collate, self.drop_last = dataset, collate, bool(drop_last)
        self.samples = len(dataset)
        self.batch_size = int(batch_size) or None
        b = self.batch_size or 1
        self.n = self.samples // b if drop_last else -(-self.samples // b)
        if self.n == 0:
            raise ConfigError(f"source: the dataset has {self.samples} sample(s)"
                              + (f", fewer than one batch of {b} (drop_last)" if self.samples else "")
                              + "; nothing to compute")
        self.batched = hasattr(dataset, "__getitems__") and self.batch_size is not None
        self.sample_layout = None
        if self.batch_size is not None and collate is None:
            first = self._checked(self._first_sample(), 0, 0)
            self.sample_layout = Layout.of(first)
            self.full_layout = self.sample_layout.rows(self.batch_size)
            self.max_nbytes = self.full_layout.nbytes
        else:  # the first batch sizes the slots; larger ones travel pickled
            self.max_nbytes = Layout.of(self._produce(0)).nbytes

    ref: tuple | None = None  # (source.object, source.params) when it was made from its name

    def _first_sample(self):
        """The sample whose fields fix the layout (a subclass that knows it may skip the fetch)."""
        return self._fetch(0, 0, 1)[0]

    def __reduce__(self):
        """To a build process: a dataset made from its name is made again there from the name; any other
        travels by value (cloudpickle)."""
        if self.ref is not None:
            return _from_ref, (*self.ref, self.batch_size or 0, self.drop_last, self.collate)
        return object.__reduce__(self)

    def identity(self) -> dict:
        """The dataset's own ``identity()`` when it has one; else its type and length (resume then trusts
        that the data is the same)."""
        own = getattr(self.dataset, "identity", None)
        ds = own() if callable(own) else {"type": f"{type(self.dataset).__module__}."
                                                  f"{type(self.dataset).__qualname__}", "samples": self.samples}
        return {"kind": "dataset", "dataset": ds, "batch_size": self.batch_size, "drop_last": self.drop_last,
                **({"collate": getattr(self.collate, "__qualname__", repr(self.collate))} if self.collate else {})}

    def rows_of(self, index: int) -> int:
        b = self.batch_size or 1
        return min(b, self.samples - index * b)

    def batch(self, index: int) -> Batch:
        if self.sample_layout is None:
            return Batch(index, None, None, 0, produce=lambda: self._produce(index))
        rows = self.rows_of(index)
        layout = self.sample_layout.rows(rows) if rows != self.batch_size else self.full_layout
        fill_rows = lambda out, lo, hi: self._write(out, index, lo, hi)  # noqa: E731
        return Batch(index, layout, lambda out: fill_rows(out, 0, rows), layout.nbytes, rows, fill_rows)

    # -- fetching ----------------------------------------------------------------------------------------
    def _fetch(self, index: int, lo: int, hi: int) -> list:
        """Samples ``lo .. hi`` of batch ``index``: one ``__getitems__`` call when the dataset has it, else
        one ``__getitem__`` each; SampleError naming the sample(s) if the dataset raises."""
        base = index * (self.batch_size or 1)
        try:
            if self.batched:
                got = self.dataset.__getitems__(list(range(base + lo, base + hi)))
                if len(got) != hi - lo:
                    raise ValueError(f"__getitems__ returned {len(got)} samples for {hi - lo} indices")
                return got
            get = self.dataset.__getitem__
            return [get(i) for i in range(base + lo, base + hi)]
        except Exception as e:  # noqa: BLE001 - the dataset's error: its batch fails, naming the samples
            what = f"samples {base + lo}..{base + hi - 1}" if hi - lo > 1 else f"sample {base + lo}"
            if not self.batched and hi - lo > 1:
                what = self._culprit(base + lo, base + hi) or what
            why = str(e) if isinstance(e, SampleError) else f"{type(e).__name__}: {e}"  # (ours: named already)
            raise SampleError(f"{what} (batch {index}): {why}") from e

    def _culprit(self, start: int, stop: int) -> str | None:
        """Which sample of ``start .. stop`` raises (fetched again one by one: the error path only)."""
        for i in range(start, stop):
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

    def _checked(self, sample, index: int, row: int):
        """``sample`` as numpy fields that fit the first sample's layout, or SampleError saying what
        differs and how to fix it."""
        i = index * (self.batch_size or 1) + row
        where = f"sample {i} (batch {index})"
        s = fields(sample, where)
        if self.sample_layout is None:
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
                                  f"pad or cast in __getitem__, or pass collate=")
        return s


def _from_ref(ref: str, params: dict, batch_size: int, drop_last: bool, collate) -> MapSource:
    src = MapSource(load_dataset(ref, params), batch_size, drop_last, collate)
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
