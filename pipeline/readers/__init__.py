"""File sources: arrays (``.npy`` memory-mapped, one array of a ``.npz``, a directory of ``.npy`` files) in
``arrays.py``, tables (Parquet files, a directory or a glob of them; a ``pyarrow.Table`` in memory) in
``parquet.py``. ``open_source`` picks one by ``source.kind``, which follows the ``--input`` path
(``runner.resolve``): a ``.parquet`` file, a directory holding Parquet files and no ``.npy``, or a glob is
Parquet; anything else is arrays. pyarrow is imported only for Parquet (the ``[parquet]`` extra).
"""
from __future__ import annotations

import glob as _glob
import os

from ..config import SourceConfig
from ..errors import ConfigError
from .arrays import NUMERIC, Header, NpyDir, NpyFile, NpzArray, open_arrays, read_header  # noqa: F401

PARQUET_EXTS = (".parquet", ".parq", ".pq")


def is_parquet(path: str) -> bool:
    """Whether ``--input PATH`` names Parquet: a glob, a ``.parquet`` file, or a directory that holds
    Parquet files (at any depth) and no ``.npy`` file at its top."""
    if not path:
        return False
    if _glob.has_magic(path):
        return True
    if path.lower().endswith(PARQUET_EXTS):
        return True
    if os.path.isdir(path):
        try:
            names = os.listdir(path)
        except OSError:
            return False
        if any(n.endswith(".npy") for n in names):
            return False
        for _, _, files in os.walk(path):
            if any(f.lower().endswith(PARQUET_EXTS) for f in files):
                return True
    return False


def open_source(cfg: SourceConfig):
    """The source for ``cfg.path`` (``--input``), checked in the main before any worker starts."""
    if cfg.kind == "parquet":
        from .parquet import open_parquet
        return open_parquet(cfg)
    from ..images import kind_of, open_images  # a folder of JPEG/PNG/... (images.py)
    if cfg.kind == "images" or (cfg.path and os.path.isdir(cfg.path) and not cfg.key and kind_of(cfg.path) is None):
        return open_images(cfg)  # (a folder with neither images nor .npy files: it says so)
    for key, flag in (("columns", "--columns"), ("keep_columns", "--keep-columns")):
        if getattr(cfg, key):
            raise ConfigError(f"{flag} (source.{key}) is for Parquet input (a .parquet file, a directory or "
                              f"a glob of them), not --input {cfg.path}")
    return open_arrays(cfg)
