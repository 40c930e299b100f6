"""Parquet list columns whose rows differ in length: each row a sample of its own length.

A variable-size list column (``pyarrow.list_(type)``) whose rows don't all have one length is ragged (NOTE
[ Ragged fields ]): the files are read as a map-style dataset, ``ParquetRows``, batched by ``MapSource``
with its plan (NOTE [ Batch plans ]), each row's length read from the list offsets when the source opens
(one read of the list columns, the GIL released while pyarrow decodes), so ``order = "length"`` and the
token budget need nothing more. Rows are read a row group at a time through the same cache as fixed-size
batches (NOTE [ Row groups ]), sized to hold a sorting window's row groups, so a batch of rows from all over
a window costs no re-read. Several ragged columns of one file must agree row by row (``input_ids`` and
``attention_mask``); a null fails its batch naming the file, the column and the row.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .datasets import MapSource
from .parquet import CACHE, DEFAULT_BATCH_SIZE, ParquetSource, _Cache, pyarrow, row_values
from .plan import WINDOW, Sequences


def list_lengths(ps: ParquetSource) -> np.ndarray | None:
    """Each row's length over the variable-size list columns of ``ps`` (None without one), -1 for a null row
    (its batch fails when built, naming it); ConfigError if two of them differ on a row."""
    _, _, pc = pyarrow()
    names = [c.name for c in ps.columns if c.ragged]
    if not names:
        return None
    parts = []
    for g in range(len(ps.groups)):
        t = ps._read(g, names)
        per = []
        for name in names:
            col = t.column(name)
            per.append(pc.fill_null(pc.list_value_length(col), -1).to_numpy(zero_copy_only=False).astype(np.int64))
        for name, other in zip(names[1:], per[1:]):
            bad = np.flatnonzero((other != per[0]) & (other >= 0) & (per[0] >= 0))
            if bad.size:
                r = int(bad[0])
                raise ConfigError(f"{_where(ps, g, r, name)}: {int(other[r])} values where column {names[0]!r} has "
                                  f"{int(per[0][r])}; the ragged columns of a row share one length")
        parts.append(per[0])
    return np.concatenate(parts)


def _where(ps: ParquetSource, g: int, row: int, name: str) -> str:
    fi = ps.groups[g][0]
    return f"{ps.files[fi]}: column {name!r}, row {int(ps.starts[g]) - ps.file_starts[fi] + row}"


class ParquetRows:
    """The rows of Parquet files as a map-style dataset: sample i is a dict of its columns' values (a list
    row as a 1-D array), with ``lengths()`` from the list offsets; ``__getitems__`` reads each row group once."""

    def __init__(self, ps: ParquetSource, lengths: np.ndarray):
        self.ps, self._lengths = ps, lengths
        smallest = int(np.diff(ps.starts).min())
        self.capacity = max(CACHE, -(-WINDOW // max(1, smallest)) + 1)
        self.__setstate__(self.__dict__)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_rows"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._rows = _Cache(self.capacity)

    def __len__(self) -> int:
        return self.ps.total_rows

    def lengths(self) -> np.ndarray:
        return self._lengths

    def identity(self) -> dict:
        return self.ps.identity()

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, ids: list) -> list[dict]:
        ps = self.ps
        ids = np.asarray(ids, np.int64)
        groups = np.searchsorted(ps.starts, ids, side="right") - 1
        out: list = [None] * len(ids)
        names = [c.name for c in ps.columns]
        for g in np.unique(groups):
            g = int(g)
            at = np.flatnonzero(groups == g)
            local = ids[at] - int(ps.starts[g])
            table = self._rows.get(g, lambda: ps._read(g, names)).take(local)
            cols = [row_values(table.column(k), c, lambda r, name: f"{_where(ps, g, int(local[r]), name)}")
                    for k, c in enumerate(ps.columns)]
            for j, pos in enumerate(at):
                out[pos] = {c.name: col[j] for c, col in zip(ps.columns, cols)}
        return out

    def keep_rows(self, ids) -> object:
        return keep_rows(self.ps, ids)


def keep_rows(ps: ParquetSource, ids) -> object:
    """The ``--keep-columns`` of rows ``ids`` as a pyarrow Table, in that order."""
    pa, _, _ = pyarrow()
    ids = np.asarray(ids, np.int64)
    groups = np.searchsorted(ps.starts, ids, side="right") - 1
    parts, where = [], []
    for g in np.unique(groups):
        g = int(g)
        at = np.flatnonzero(groups == g)
        parts.append(ps._keep_cache.get(g, lambda: ps._read(g, ps.keep)).take(ids[at] - int(ps.starts[g])))
        where.append(at)
    table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    return table.take(np.argsort(np.concatenate(where), kind="stable"))


class ParquetRagged(MapSource):
    """Parquet rows with ragged list columns, batched by their plan; ``keep_table`` gives each batch's
    ``--keep-columns`` in its rows' order."""

    def __init__(self, ps: ParquetSource, lengths: np.ndarray, batch_size: int, drop_last: bool, seq: Sequences):
        super().__init__(ParquetRows(ps, lengths), batch_size, drop_last, None, seq)
        self.keep = ps.keep

    def identity(self) -> dict:
        return {**super().identity(), "dataset": self.dataset.identity()}

    def keep_table(self, index: int):
        return self.dataset.keep_rows(self.sample_ids(index))


def open_parquet_rows(cfg, ps: ParquetSource):
    """``ps`` itself, or its rows as samples of their own length when a list column's rows vary in length
    (or the config asks for a plan)."""
    seq = Sequences.of(cfg)
    lengths = list_lengths(ps)
    if lengths is None:
        if seq.asked:
            raise ConfigError(f"--input {cfg.path}: ragged, max_length, max_tokens and order are for list "
                              f"columns whose rows differ in length, and the columns read "
                              f"({', '.join(c.name + ' ' + c.arrow for c in ps.columns)}) have none")
        return ps
    known = lengths[lengths >= 0]
    if not seq.asked and (not known.size or known.min() == known.max()):
        return ps  # every list row has one length: fixed-size batches (a null fails its batch)
    lengths = np.where(lengths >= 0, lengths, 1)  # (a null row: its batch fails when built, naming it)
    return ParquetRagged(ps, lengths, cfg.batch_size or (0 if seq.max_tokens else DEFAULT_BATCH_SIZE),
                         cfg.drop_last, seq)
