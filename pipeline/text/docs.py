"""Documents: where the text comes from. Every reader is a sequence of documents, ``texts(ids)`` giving
each document's text or a ``Bad`` (why it can't be one), ``keep_rows(ids)`` its ``--keep-columns`` as a
pyarrow Table, ``where(i)`` naming it in messages (row, file, column).

  ListTexts    strings the caller gives (``source=["...", ...]``, or a dataset whose samples are strings)
  RowTexts     JSON Lines (one object per line) or CSV (a header row): ``text_column`` (default ``text``)
  FolderTexts  a folder of ``.txt`` files (any depth, sorted by path), one document each, UTF-8
  ParquetTexts a string column of Parquet files (row groups read as the numeric source reads them)

The text never goes to a worker: the build threads tokenize it (``text.source``) and only the tokens are
written into the slots.
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np

from ..errors import ConfigError

DEFAULT_COLUMN = "text"
TEXT_EXTS = (".jsonl", ".ndjson", ".csv")


def has_txt(path: str) -> bool:
    """A directory with a .txt file at its top (a folder of documents)."""
    try:
        return os.path.isdir(path) and any(n.lower().endswith(".txt") for n in os.listdir(path))
    except OSError:
        return False


class Bad(str):
    """Why a document can't be tokenized (a null, not a string, invalid UTF-8, empty)."""


def checked(value, where: str) -> str:
    """A document's text, or ``Bad`` saying what is wrong with it."""
    if value is None:
        return Bad(f"{where}: null; fill it, drop the row, or --bad-samples skip")
    if not isinstance(value, str):
        return Bad(f"{where}: a {type(value).__name__}, not a string; write text, or --bad-samples skip")
    if not value.strip():
        return Bad(f"{where}: an empty document; drop it, or --bad-samples skip")
    return value


class ListTexts:
    def __init__(self, items, what: str = "source"):
        self.items, self.what = items, what

    def __len__(self):
        return len(self.items)

    def where(self, i: int) -> str:
        return f"{self.what}: document {i}"

    def texts(self, ids) -> list[str]:
        return [checked(self.items[int(i)], self.where(int(i))) for i in ids]

    def identity(self) -> dict:
        return {"type": "texts", "documents": len(self.items)}

    def keep_rows(self, ids, names):
        raise ConfigError("keep_columns are carried from files (--input), not from strings given as source=")


class RowTexts:
    """JSON Lines or CSV, read whole when the source opens (the text of a corpus; the tokens are not kept)."""

    def __init__(self, path: str, column: str, keep: list[str]):
        self.path, self.column = path, column or DEFAULT_COLUMN
        csv_file = path.lower().endswith(".csv")
        rows = []
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ConfigError(f"--input {path}: {e.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise ConfigError(f"--input {path}: invalid UTF-8 at line {line} (byte {e.start}); write it as "
                              f"UTF-8") from None
        if csv_file:
            reader = csv.DictReader(text.splitlines())
            rows = list(reader)
            names = reader.fieldnames or []
        else:
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise ConfigError(f"--input {path}: line {n} is not JSON ({e}); one object per line") from None
                if not isinstance(obj, dict):
                    raise ConfigError(f"--input {path}: line {n} is a {type(obj).__name__}, not an object")
                rows.append(obj)
            names = list(rows[0]) if rows else []
        if not rows:
            raise ConfigError(f"--input {path}: no documents; nothing to compute")
        for c in [self.column, *keep]:
            if c not in names:
                flag = "--text-column" if c == self.column else "--keep-columns"
                raise ConfigError(f"--input {path}: no column {c!r} ({flag}); its columns: {', '.join(names)}")
        self.rows, self.keep = rows, keep
        self.line = "row" if csv_file else "line"

    def __len__(self):
        return len(self.rows)

    def where(self, i: int) -> str:
        return f"{self.path}: {self.line} {i + 1 if self.line == 'line' else i}, column {self.column!r}"

    def texts(self, ids) -> list[str]:
        return [checked(self.rows[int(i)].get(self.column), self.where(int(i))) for i in ids]

    def identity(self) -> dict:
        st = os.stat(self.path)
        return {"type": "text rows", "path": os.path.abspath(self.path), "size": st.st_size,
                "mtime_ns": st.st_mtime_ns, "column": self.column}

    def keep_rows(self, ids, names):
        import pyarrow as pa
        return pa.table({c: [self.rows[int(i)].get(c) for i in ids] for c in names})


class FolderTexts:
    def __init__(self, path: str):
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [os.path.join(root, n) for n in names if n.lower().endswith(".txt") and not n.startswith(".")]
        if not files:
            raise ConfigError(f"--input {path}: no .txt files (one document each) in the folder")
        self.path, self.files = path, sorted(files)

    def __len__(self):
        return len(self.files)

    def where(self, i: int) -> str:
        return self.files[i]

    def texts(self, ids) -> list[str]:
        out = []
        for i in ids:
            f = self.files[int(i)]
            try:
                with open(f, "rb") as fh:
                    raw = fh.read()
                out.append(checked(raw.decode("utf-8"), f))
            except UnicodeDecodeError as e:
                out.append(Bad(f"{f}: invalid UTF-8 at byte {e.start}; write it as UTF-8, or --bad-samples skip"))
            except OSError as e:
                out.append(Bad(f"{f}: {e.strerror}"))
        return out

    def identity(self) -> dict:
        sizes = [os.stat(f).st_size for f in self.files]
        return {"type": "text folder", "path": os.path.abspath(self.path), "files": len(self.files),
                "bytes": int(sum(sizes))}

    def keep_rows(self, ids, names):
        import pyarrow as pa
        if list(names) != ["path"]:
            raise ConfigError("a folder of .txt files keeps one column: --keep-columns path (each file's path)")
        return pa.table({"path": [os.path.relpath(self.files[int(i)], self.path) for i in ids]})


class ParquetTexts:
    """A string column of Parquet files, through the numeric source's row groups (NOTE [ Row groups ])."""

    def __init__(self, ps, column: str):
        from ..sources.plan import WINDOW
        self.ps, self.column = ps, column
        # (order = "length" reads rows from all over a window: keep the window's row groups)
        ps.cache_groups = max(4, -(-WINDOW // max(1, int(np.diff(ps.starts).min()))) + 1)
        ps.__setstate__(ps.__getstate__())

    def __len__(self):
        return self.ps.total_rows

    def where(self, i: int) -> str:
        ps = self.ps
        g = int(np.searchsorted(ps.starts, i, side="right")) - 1
        fi = ps.groups[g][0]
        return f"{ps.files[fi]}: column {self.column!r}, row {i - ps.file_starts[fi]}"

    def texts(self, ids) -> list[str]:
        ps = self.ps
        ids = np.asarray(ids, np.int64)
        groups = np.searchsorted(ps.starts, ids, side="right") - 1
        out: list = [None] * len(ids)
        for g in np.unique(groups):
            g = int(g)
            at = np.flatnonzero(groups == g)
            col = ps._cache.get(g, lambda: ps._read(g, [self.column])).column(0)
            values = col.take(ids[at] - int(ps.starts[g])).to_pylist()
            for pos, v in zip(at, values):
                out[pos] = checked(v, self.where(int(ids[pos])))
        return out

    def identity(self) -> dict:
        return {**self.ps.identity(), "text_column": self.column}

    def keep_rows(self, ids, names):
        from ..sources.parquet_ragged import keep_rows
        return keep_rows(self.ps, ids)


def open_texts(cfg, items=None):
    """The documents of ``cfg`` (``--input``: a .jsonl/.csv file, a folder of .txt, Parquet with
    ``--text-column``), or of the caller's strings."""
    from ..sources.parquet import is_parquet, list_files
    if items is not None:
        return ListTexts(items)
    path = cfg.path
    if not path:
        raise ConfigError("text needs documents: --input FILE.jsonl|.csv|.parquet|DIR (of .txt), or source= a "
                          "list of strings")
    if is_parquet(path):
        from ..sources.parquet import pyarrow
        pyarrow()
        column = cfg.text_column or DEFAULT_COLUMN
        return ParquetTexts(_text_parquet(list_files(path), path, column, list(cfg.keep_columns)), column)
    if os.path.isdir(path):
        if cfg.keep_columns and list(cfg.keep_columns) != ["path"]:
            raise ConfigError("a folder of .txt files keeps one column: --keep-columns path (each file's path)")
        return FolderTexts(path)
    if path.lower().endswith(TEXT_EXTS):
        return RowTexts(path, cfg.text_column, list(cfg.keep_columns))
    if not os.path.exists(path):
        raise ConfigError(f"--input {path}: no such file or directory")
    raise ConfigError(f"--input {path}: text comes from .jsonl, .csv or .parquet files or a folder of .txt files")


def _text_parquet(files, path, column, keep):
    """A ParquetSource over one string column (the numeric checks don't apply to it)."""
    from ..sources.parquet import Column, ParquetSource, pyarrow
    pa, _, _ = pyarrow()

    class TextParquet(ParquetSource):
        def _choose(self, columns, schemas):
            first = schemas[0]
            for c in [column, *keep]:
                if first.get_field_index(c) < 0:
                    flag = "--text-column" if c == column else "--keep-columns"
                    raise ConfigError(f"--input {files[0]}: no column {c!r} ({flag}); its columns: "
                                      f"{', '.join(f'{x.name} ({x.type})' for x in first)}")
            t = first.field(column).type
            if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
                raise ConfigError(f"--input {files[0]}: column {column!r} is {t}, not a string column "
                                  f"(--text-column)")
            return [Column(column, "|O", (), False, str(t))]

    return TextParquet(files, path, [column], keep, 1)
