"""Text as samples of their own length: documents tokenized on the build threads, only tokens in the slots.

``TextRows`` is a map-style dataset over documents (``text.docs``): ``__getitems__`` tokenizes a chunk
of documents in one ``encode_batch`` call (Rust, the GIL released) and gives each sample as
``{"input_ids": int64 (L,), "attention_mask": int64 (L,)}``, plus ``valid`` (bool) with
``bad_samples = "skip"``; ``lengths()`` are the token counts, found when the source opens (NOTE
[ Batch plans ]). ``TextSource`` batches it (``MapSource``: ragged fields, ``order = "length"`` by
default, the token budget, results in input order) and carries the kept columns to the output.

A document that can't be text (a null, not a string, invalid UTF-8, empty) fails its batch with a
``SampleError`` naming its row or file and column (``faults.on_error`` applies), or with
``bad_samples = "skip"`` becomes the empty document with ``valid`` False, listed in the summary's
``bad_samples``. A document longer than ``max_length`` tokens is cut (its special tokens kept) and counted
in the summary's ``sequences.truncated``.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..errors import ConfigError, SampleError
from ..sources.datasets import MapSource
from ..sources.plan import Sequences
from .docs import Bad, open_texts
from .tokens import Tokens


class TextRows:
    def __init__(self, docs, tokens: Tokens, skip: bool):
        self.docs, self.tokens, self.skip = docs, tokens, skip
        counts, bad = [], {}
        n = len(docs)
        for lo in range(0, n, 8192):  # the token counts, a chunk of documents at a time (not kept)
            texts = docs.texts(range(lo, min(n, lo + 8192)))
            good = [t if not isinstance(t, Bad) else "" for t in texts]
            c = tokens.count(good)
            for j, t in enumerate(texts):
                if isinstance(t, Bad):
                    bad[lo + j] = str(t)
                    c[j] = tokens.empty
            counts.append(c)
        full = np.concatenate(counts)
        self.truncated = int((full > tokens.max_length).sum())
        self._lengths = np.maximum(np.minimum(full, tokens.max_length), 1)
        self.bad = bad

    def __len__(self):
        return len(self.docs)

    def lengths(self) -> np.ndarray:
        return self._lengths

    def identity(self) -> dict:
        return {**self.docs.identity(), "tokenizer": self.tokens.file, "max_length": self.tokens.max_length}

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, ids) -> list[dict]:
        texts = self.docs.texts(ids)
        out = []
        for i, t in zip(ids, texts):
            if isinstance(t, Bad) and not self.skip:
                raise SampleError(str(t))
        encoded = self.tokens.encode([t if not isinstance(t, Bad) else "" for t in texts])
        for (ids_, mask), t in zip(encoded, texts):
            if not len(ids_):  # (a tokenizer without special tokens, on an empty document)
                ids_, mask = np.zeros(1, np.int64), np.zeros(1, np.int64)
            sample = {"input_ids": ids_, "attention_mask": mask}
            if self.skip:
                sample["valid"] = np.bool_(not isinstance(t, Bad))
            out.append(sample)
        return out


class TextSource(MapSource):
    """Documents batched as tokens (``TextRows`` under ``MapSource``), with the kept columns and the bad
    documents for the summary."""

    probe = False  # the token fields are ragged by construction

    def __init__(self, rows: TextRows, batch_size: int, seq: Sequences, keep: list[str]):
        self.keep = keep
        seq = Sequences(("input_ids", "attention_mask"), seq.max_length or rows.tokens.max_length,
                        seq.max_tokens, seq.order, seq.pad_multiple, seq.pad_values, seq.on_long)
        super().__init__(rows, batch_size, False, None, seq)

    def keep_table(self, index: int):
        return self.dataset.docs.keep_rows(self.sample_ids(index), self.keep)

    def report(self) -> dict:
        out = super().report()
        out["sequences"]["truncated"] = self.dataset.truncated
        out["sequences"]["documents"] = len(self.dataset)
        if self.dataset.bad:
            out["bad_samples"] = [{"sample": i, "cause": why} for i, why in sorted(self.dataset.bad.items())]
        return out


def open_text(cfg, items=None, tokenizer: str = "", model_dir: str | None = None) -> TextSource:
    """The text source of ``cfg`` (``--input``, or the caller's strings), tokenized with ``--tokenizer``
    (or the text kernel's model directory)."""
    docs = open_texts(cfg, items)
    if cfg.max_length and cfg.max_length < 2:
        raise ConfigError(f"source.max_length = {cfg.max_length}: a document needs room for its special tokens")
    path = cfg.tokenizer or tokenizer
    tokens = Tokens(path, cfg.max_length, model_dir or (path if os.path.isdir(path) else None))
    rows = TextRows(docs, tokens, cfg.bad_samples == "skip")
    seq = Sequences.of(dataclasses.replace(cfg, kind="text"))  # (order "auto": by length)
    batch_size = cfg.batch_size or (0 if seq.max_tokens else 64)
    return TextSource(rows, batch_size, seq, list(cfg.keep_columns))
