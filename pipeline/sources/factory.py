"""The one place that decides which source a run reads, and opens it.

  infer_kind(cfg)    the kind ``--input PATH`` or ``--source NAME`` names, decided once (``runner.resolve``
                     fixes it in the config): a glob, a ``.parquet`` file or a directory of them is
                     Parquet; a directory of images (and no ``.npy``) is images; other paths are arrays
                     (``.npy``, ``.npz``, a directory of ``.npy``); ``--source`` is a dataset
  open_source(cfg)   the source of that kind (checked in the main before any worker starts), or of the
                     caller's own ``source=`` object: a map-style dataset, a pyarrow Table, an iterable

A new input kind is one opener here (``OPENERS``), its module beside this one, and its name in
``config.CHOICES["source.kind"]``. pyarrow and Pillow are imported only for their kinds (the
``[parquet]`` and ``[images]`` extras).
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

from ..config import SourceConfig
from ..errors import ConfigError
from ..images.folder import kind_of, open_images
from .arrays import open_arrays
from .datasets import FromIterable, MapSource, is_map_style, load_dataset
from .parquet import DEFAULT_BATCH_SIZE, TableRows, is_parquet, open_parquet
from .parquet_ragged import open_parquet_rows
from .plan import Sequences
from ..text.docs import TEXT_EXTS, has_txt
from ..text.source import open_text
from .synthetic import Synthetic


def infer_kind(cfg: SourceConfig) -> str:
    """``cfg.kind``, or for the default (synthetic) the kind its ``path`` or ``object`` names."""
    if cfg.kind != "synthetic":
        return cfg.kind
    if cfg.path:
        if cfg.text_column or cfg.path.lower().endswith(TEXT_EXTS) or (cfg.tokenizer and has_txt(cfg.path)):
            return "text"  # (Parquet documents: --text-column names their column)
        if is_parquet(cfg.path):
            return "parquet"
        found = kind_of(cfg.path)  # a directory with images, or .npy files, or neither
        if found == "images" or (found is None and os.path.isdir(cfg.path) and not cfg.key):
            return "images"  # (one with neither: the images' opener says it has neither)
        return "npy"
    if cfg.object:
        return "dataset"
    return "text" if cfg.tokenizer or cfg.text_column else "synthetic"


def _dataset(cfg: SourceConfig, collate: Callable | None):
    if cfg.tokenizer:
        ds = load_dataset(cfg.object, cfg.params)
        if _texts(ds):  # a dataset of documents
            return open_text(cfg, ds)
    src = MapSource(load_dataset(cfg.object, cfg.params), cfg.batch_size, cfg.drop_last, collate,
                    Sequences.of(cfg))
    src.ref = (cfg.object, dict(cfg.params))
    return src


SEQUENCES = ("dataset", "parquet", "text")  # the kinds whose samples may have their own length

OPENERS = {  # kind -> (source config, collate) -> source
    "synthetic": lambda cfg, collate: Synthetic(cfg),
    "npy": lambda cfg, collate: open_arrays(cfg),
    "parquet": lambda cfg, collate: open_parquet_rows(cfg, open_parquet(cfg)),
    "images": lambda cfg, collate: open_images(cfg),
    "dataset": _dataset,
}


def open_source(cfg: SourceConfig, items: Iterable | None = None, collate: Callable | None = None):
    """The batches of ``cfg`` (its kind as ``infer_kind`` decided it), or of the caller's ``items``. A
    map-style dataset (``__len__``, ``__getitem__``) builds batch k on its own, on any build thread or
    process; an iterable is drawn in order."""
    kind = infer_kind(cfg)
    if cfg.decode == "device" and (items is not None or kind != "images"):
        what = "source= objects" if items is not None else f"source.kind = {kind!r}"
        raise ConfigError(f"source.decode = 'device' (--decode device) is for a folder of images (--input DIR), "
                          f"not for {what}: leave it at 'main'")
    if cfg.params and kind != "dataset":
        raise ConfigError("source.params are for source.object (a callable that makes the dataset), not for "
                          "source= objects" if items is not None else
                          f"source.params ({', '.join(cfg.params)}) are keyword arguments for source.object "
                          f"(--source NAME), and none is given")
    seq = Sequences.of(cfg)
    if seq.asked and items is None and kind not in SEQUENCES:
        raise ConfigError(f"ragged, max_length, max_tokens and order are for samples of their own length: a "
                          f"dataset (source= or --source), Parquet list columns or text; not for "
                          f"source.kind = {kind!r}")
    if kind == "text" and (items is None or _texts(items)):
        if collate is not None:
            raise ConfigError("text is tokenized, padded and grouped by the pipeline itself: leave out collate=")
        return open_text(cfg, items)
    if items is not None:
        return _from_items(cfg, items, collate)
    if kind == "dataset":
        return _dataset(cfg, collate)
    if collate is not None or (cfg.batch_size and kind not in ("parquet", "images")):
        raise ConfigError("batch_size and collate are for a dataset (source= or --source), Parquet input or "
                          f"an image folder, not for {'--input files' if cfg.path else 'synthetic batches'}")
    if kind == "npy":
        for key, flag in (("columns", "--columns"), ("keep_columns", "--keep-columns")):
            if getattr(cfg, key):
                raise ConfigError(f"{flag} (source.{key}) is for Parquet input (a .parquet file, a directory "
                                  f"or a glob of them), not --input {cfg.path}")
    return OPENERS[kind](cfg, collate)


def _from_items(cfg: SourceConfig, items, collate: Callable | None):
    """The caller's ``source=``: a pyarrow Table, a map-style dataset, or an iterable of batches."""
    if _is_table(items):  # map-style: a dict of columns per row
        if cfg.keep_columns:
            raise ConfigError("keep_columns are carried from Parquet input files (--input), not from a "
                              "pyarrow Table given as source=: add them to the kernel's outputs instead")
        return MapSource(TableRows(items, cfg.columns), cfg.batch_size or DEFAULT_BATCH_SIZE, cfg.drop_last,
                         collate, Sequences.of(cfg))
    if cfg.columns or cfg.keep_columns:
        raise ConfigError("columns and keep_columns are for Parquet input (--input) or a pyarrow Table, not "
                          f"for a {type(items).__name__} given as source=")
    if is_map_style(items):
        if _texts(items):
            raise ConfigError("the samples are strings: text needs a tokenizer (tokenizer=PATH, --tokenizer, or a "
                              "transformers:DIR / sentence-transformers:DIR kernel)")
        return MapSource(items, cfg.batch_size, cfg.drop_last, collate, Sequences.of(cfg))
    if Sequences.of(cfg).asked:
        raise ConfigError(f"ragged, max_length, max_tokens and order group the samples of a map-style dataset "
                          f"(__len__ and __getitem__); a {type(items).__name__} is drawn as whole batches")
    if cfg.batch_size or collate is not None:
        raise ConfigError(f"batch_size and collate group the samples of a map-style dataset (__len__ "
                          f"and __getitem__); a {type(items).__name__} is drawn as batches, one item each")
    return FromIterable(items)


def _texts(items) -> bool:
    """A map-style dataset whose samples are strings (documents)."""
    try:
        return is_map_style(items) and len(items) > 0 and isinstance(items[0], str)
    except Exception:  # noqa: BLE001 - its own error comes when it is read as a dataset
        return False


def _is_table(obj) -> bool:
    """A pyarrow Table or RecordBatch (checked without importing pyarrow)."""
    return type(obj).__module__.startswith("pyarrow") and type(obj).__name__ in ("Table", "RecordBatch")
