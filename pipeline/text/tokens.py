"""Tokenizing on the build threads with Hugging Face ``tokenizers`` (Rust: it releases the GIL, and
``encode_batch`` spreads a chunk of documents over its own threads).

``--tokenizer PATH``: a ``tokenizer.json``, or a directory that has one (a model's). ``max_length``
defaults to the model's (``max_position_embeddings`` in its ``config.json``, less the padding offset some
models keep), else the tokenizer's truncation setting, else 512. The whole corpus is tokenized once when
the source opens, for the token counts only (``order = "length"`` and the token budget need them before
any batch is built; the tokens are not kept), and again, a batch's chunk at a time, on the build threads.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..errors import ConfigError

EXTRA = "text needs Hugging Face tokenizers and transformers: pip install -e '.[text]'"
CHUNK = 1024  # documents per encode_batch call when counting tokens


def tokenizers_module():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(EXTRA) from None
    return tokenizers


def tokenizer_file(path: str) -> str:
    """The ``tokenizer.json`` that ``--tokenizer PATH`` names; ConfigError, one line, if there is none."""
    if not path:
        raise ConfigError("text needs a tokenizer: --tokenizer PATH (a tokenizer.json, or a model directory "
                          "with one), or a transformers:DIR / sentence-transformers:DIR kernel that has one")
    if os.path.isdir(path):
        f = os.path.join(path, "tokenizer.json")
        if not os.path.exists(f):
            raise ConfigError(f"--tokenizer {path}: the directory has no tokenizer.json (a fast tokenizer's "
                              f"file: tokenizer.save_pretrained(DIR) writes it)")
        return f
    if not os.path.exists(path):
        raise ConfigError(f"--tokenizer {path}: no such file or directory")
    return path


def model_config(path: str) -> dict:
    """A model directory's ``config.json`` (a sentence-transformers directory: its Transformer module's)."""
    for d in (path, *_module_dirs(path)):
        f = os.path.join(d, "config.json")
        if os.path.exists(f):
            with open(f) as fh:
                try:
                    return json.load(fh)
                except ValueError:
                    raise ConfigError(f"{f}: not valid JSON") from None
    return {}


def _module_dirs(path: str) -> list[str]:
    f = os.path.join(path, "modules.json")
    if not os.path.exists(f):
        return []
    with open(f) as fh:
        return [os.path.join(path, m.get("path", "")) for m in json.load(fh)]


def default_max_length(model_dir: str | None, tok) -> int:
    cfg = model_config(model_dir) if model_dir and os.path.isdir(model_dir) else {}
    if cfg.get("max_position_embeddings"):
        offset = 2 if cfg.get("model_type") in ("roberta", "xlm-roberta", "camembert") else 0
        return int(cfg["max_position_embeddings"]) - offset
    trunc = tok.truncation
    return int(trunc["max_length"]) if trunc else 512


class Tokens:
    """A tokenizer from a ``tokenizer.json``: ``encode(texts)`` -> (ids, mask) per document, truncated to
    ``max_length``; ``count(texts)`` -> the untruncated lengths. Pickles as its file's text (build
    processes, Ray actors)."""

    def __init__(self, path: str, max_length: int = 0, model_dir: str | None = None):
        tk = tokenizers_module()
        self.file = tokenizer_file(path)
        try:
            self.tok = tk.Tokenizer.from_file(self.file)
        except Exception as e:  # noqa: BLE001 - a file that isn't a tokenizer: one line
            raise ConfigError(f"--tokenizer {path}: not a tokenizers file ({type(e).__name__}: {e})") from None
        self.max_length = max_length or default_max_length(model_dir, self.tok)
        self._ready()

    def _ready(self) -> None:
        """Two copies: one that counts (no truncation), one that cuts at max_length (special tokens kept)."""
        tk = tokenizers_module()
        self.tok.no_padding()
        self.tok.no_truncation()
        self.cut = tk.Tokenizer.from_str(self.tok.to_str())
        self.cut.enable_truncation(self.max_length)
        self.empty = len(self.tok.encode("").ids)
        self.vocab = self.tok.get_vocab_size(with_added_tokens=True)

    def __getstate__(self):
        return {"file": self.file, "max_length": self.max_length, "json": self.tok.to_str()}

    def __setstate__(self, state):
        tk = tokenizers_module()
        self.file, self.max_length = state["file"], state["max_length"]
        self.tok = tk.Tokenizer.from_str(state["json"])
        self._ready()

    def count(self, texts: list[str]) -> np.ndarray:
        """Each document's token count, untruncated (special tokens included)."""
        out = []
        for lo in range(0, len(texts), CHUNK):
            out += [len(e.ids) for e in self.tok.encode_batch(texts[lo:lo + CHUNK])]
        return np.asarray(out, np.int64)

    def encode(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(input_ids, attention_mask) per document, int64, truncated to max_length (special tokens kept)."""
        return [(np.asarray(e.ids, np.int64), np.asarray(e.attention_mask, np.int64))
                for e in self.cut.encode_batch(texts)]
