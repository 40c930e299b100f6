"""Which samples go into which batch, for samples of their own length: the settings (``Sequences``) and the
batches they give (``Plan``).

NOTE [ Batch plans ]
A plan is fixed in the main before any batch is built, from the samples' lengths alone (a dataset's
``lengths()``, Parquet list lengths, token counts), so every batch is a function of the config and its index,
as every other batch is: the same batches, padded lengths and checksum for any worker count, build threads
or processes, retries, resume and backend. ``order = "input"`` keeps the samples in order; ``"length"``
sorts them by length (stable: ties keep their input order) within windows of ``WINDOW`` consecutive
samples, so samples of similar length share a batch while the results still to be put back in input order
(runner, NOTE [ Input order ]) stay bounded by a window. Batches are then cut: at ``batch_size`` rows when
it is given, and with a token budget ``max_tokens`` T as soon as one more sample would make rows x padded
length exceed T (a batch always holds at least one sample). A batch's padded length is its longest
sample's, capped at ``max_length``, rounded up to ``pad_multiple`` (and never above ``max_length``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError

WINDOW = 32768  # samples sorted together by order = "length" (NOTE [ Batch plans ])
RESULT_ROWS = 256  # samples per result, in input order, when batches are cut by a token budget alone


@dataclass(frozen=True)
class Sequences:
    """The settings for samples of their own length (``source.*`` keys; docs/data.md)."""
    ragged: tuple = ()  # declared ragged fields ((): found from the samples)
    max_length: int = 0  # 0: no bound (a longer sample is cut, or fails, as on_long says)
    max_tokens: int = 0  # 0: no token budget
    order: str = "input"  # input | length
    pad_multiple: int = 8
    pad_values: dict = field(default_factory=dict)  # field -> pad value (default 0)
    on_long: str = "truncate"  # truncate | fail

    @staticmethod
    def of(cfg) -> "Sequences":
        """From a SourceConfig; ``order = "auto"``: length for text, else input."""
        order = cfg.order if cfg.order != "auto" else ("length" if cfg.kind == "text" else "input")
        return Sequences(tuple(cfg.ragged), cfg.max_length, cfg.max_tokens, order, cfg.pad_multiple,
                         dict(cfg.pad_values), cfg.on_long)

    @property
    def plans(self) -> bool:
        """Whether the batches depend on the lengths (sorted, or cut by a budget)."""
        return self.order == "length" or self.max_tokens > 0

    @property
    def asked(self) -> bool:
        """Whether any setting asks for samples of their own length."""
        return bool(self.ragged) or self.plans or self.max_length > 0

    def width(self, longest: int) -> int:
        """The padded length of a batch whose longest sample has ``longest`` values."""
        if self.max_length:
            longest = min(longest, self.max_length)
        m = max(1, self.pad_multiple)
        w = max(m, -(-longest // m) * m)
        return min(w, self.max_length) if self.max_length else w


def checked_lengths(lengths, samples: int, where: str) -> np.ndarray:
    """A ``lengths()`` result as int64, or ConfigError naming what is wrong with it."""
    try:
        arr = np.asarray(lengths)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{where}: cannot be read as numbers ({type(e).__name__}: {e})") from None
    if arr.ndim != 1 or len(arr) != samples:
        raise ConfigError(f"{where} gave {arr.shape[0] if arr.ndim == 1 else f'shape {arr.shape}'} lengths "
                          f"for {samples} samples: return one int per sample, in sample order")
    if arr.dtype.kind not in "iu":
        raise ConfigError(f"{where} gave {arr.dtype} values: return ints (each sample's length)")
    if len(arr) and arr.min() < 0:
        raise ConfigError(f"{where}: sample {int(np.argmin(arr))} has length {int(arr.min())}: lengths are >= 0")
    return arr.astype(np.int64, copy=False)


class Plan:
    """The batches of a run: batch k holds samples ``ids(k)``, padded to ``widths[k]`` (NOTE [ Batch plans ])."""

    def __init__(self, order: np.ndarray, starts: np.ndarray, widths: np.ndarray):
        self.order, self.starts, self.widths = order, starts, widths
        self.n = len(starts) - 1

    def ids(self, k: int) -> np.ndarray:
        return self.order[self.starts[k]:self.starts[k + 1]]

    def rows(self, k: int) -> int:
        return int(self.starts[k + 1] - self.starts[k])

    def regrouping(self, size: int) -> int | None:
        """``size`` when the batches are not the input's consecutive groups of ``size`` samples (sorted by
        length, or cut by a budget): their rows go back to input order (NOTE [ Input order ]); else None."""
        consecutive = not np.any(self.order[1:] < self.order[:-1])
        if consecutive and np.array_equal(self.starts, np.minimum(np.arange(self.n + 1) * size, len(self.order))):
            return None
        return size

    def tokens(self, lengths: np.ndarray, max_length: int) -> dict:
        """Real and padded tokens of the plan's batches, the padding share, the samples cut to max_length."""
        clipped = np.minimum(lengths, max_length) if max_length else lengths
        padded = int((np.diff(self.starts) * self.widths).sum())
        real = int(clipped[self.order].sum())
        return {"real_tokens": real, "padded_tokens": padded,
                "padding_share": round(1 - real / padded, 4) if padded else 0.0,
                "truncated": int((lengths > max_length).sum()) if max_length else 0}


def make_plan(lengths: np.ndarray, seq: Sequences, batch_size: int, drop_last: bool = False) -> Plan:
    """The plan of ``lengths`` (one per sample) under ``seq`` (NOTE [ Batch plans ])."""
    n = len(lengths)
    clipped = np.minimum(lengths, seq.max_length) if seq.max_length else lengths
    if seq.order == "length":
        order = np.concatenate([lo + np.argsort(clipped[lo:lo + WINDOW], kind="stable")
                                for lo in range(0, n, WINDOW)]) if n else np.zeros(0, np.int64)
    else:
        order = np.arange(n)
    cap = batch_size or n
    starts, widths = [0], []
    i = 0
    while i < n:
        rows, longest = 0, 0
        while i + rows < n and rows < cap:
            nxt = max(longest, int(clipped[order[i + rows]]))
            if rows and seq.max_tokens and (rows + 1) * seq.width(nxt) > seq.max_tokens:
                break
            longest, rows = nxt, rows + 1
        i += rows
        starts.append(i)
        widths.append(seq.width(longest))
    if drop_last and batch_size and len(starts) > 1 and starts[-1] - starts[-2] < batch_size:
        starts.pop()
        widths.pop()
    return Plan(order.astype(np.int64), np.asarray(starts, np.int64), np.asarray(widths, np.int64))
