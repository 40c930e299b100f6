"""Synthetic batches: uniform random numbers from a generator seeded by (seed, batch index)."""
from __future__ import annotations

import functools
import threading

import numpy as np

from ..config import SourceConfig
from ..fields import Layout
from .base import Batch, Indexed


_rngs = threading.local()
_M64 = (1 << 64) - 1
_GOLD = 0x9E3779B97F4A7C15


_BLOCK = 256  # batches whose seeds are computed together (``_seeds``)


def _seeds(seed: int, block: int) -> list[tuple[int, int]]:
    """PCG64 (state, increment) of batches ``block * _BLOCK`` on: four SplitMix64 outputs each, started
    from (seed, index), computed with numpy for the whole block (uint64 arithmetic wraps, as SplitMix64's)."""
    x = np.uint64((seed * _GOLD) & _M64) + np.arange(block * _BLOCK, (block + 1) * _BLOCK, dtype=np.uint64)
    words = []
    for k in range(1, 5):
        y = x + np.uint64((k * _GOLD) & _M64)
        z = (y ^ (y >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        words.append((z ^ (z >> np.uint64(31))).tolist())
    return [(a << 64 | b, c << 64 | d | 1) for a, b, c, d in zip(*words)]


def rng(seed: int, index: int) -> np.random.Generator:
    """Batch ``index``'s generator: PCG64 (numpy's default, fast in bulk) whose 128-bit state and stream
    are four SplitMix64 outputs started from (seed, index), as generators of the xoshiro family seed
    themselves: a stream per batch for a microsecond or two (``default_rng([seed, index])`` hashes its
    seed, which costs a tiny batch more than its bytes). One generator per thread, set afresh each time;
    the seeds of a block of batches are computed at once and kept for the thread's next batches."""
    local = _rngs.__dict__
    g = local.get("g")
    if g is None:
        g = local["g"] = np.random.Generator(np.random.PCG64(0))
    block = index // _BLOCK
    kept = local.get("seeds")
    if kept is None or kept[0] != seed or kept[1] != block:
        kept = local["seeds"] = (seed, block, _seeds(seed, block))
    state, inc = kept[2][index - block * _BLOCK]
    g.bit_generator.state = {"bit_generator": "PCG64", "has_uint32": 0, "uinteger": 0,
                             "state": {"state": state, "inc": inc}}
    return g


class Synthetic(Indexed):
    """Uniform random batches from ``rng(seed, index)``: same index, same bytes, anywhere."""

    def __init__(self, cfg: SourceConfig):
        self.n = cfg.batches
        self.shape = (cfg.rows, cfg.cols)
        self.dtype = np.dtype(cfg.dtype)
        self.floats = self.dtype in (np.float32, np.float64)  # (decided once: a tiny batch's budget)
        self.seed = cfg.seed
        self.layout = Layout.make("array", (), [self.shape], [self.dtype])
        self.max_nbytes = self.layout.nbytes

    def identity(self) -> dict:
        """What batch i depends on: an output directory written from it is resumed only if this matches."""
        return {"kind": "synthetic", "batches": self.n, "rows": self.shape[0], "cols": self.shape[1],
                "dtype": self.dtype.name, "seed": self.seed, "rng": "splitmix-seeded pcg64"}

    def build(self, index: int, out: np.ndarray) -> None:
        g = rng(self.seed, index)
        if self.floats:
            g.random(dtype=self.dtype, out=out)  # ~4x cheaper than standard_normal
        elif self.dtype == np.float16:
            out[...] = g.random(out.shape, dtype=np.float32)
        else:
            lo, hi = (0, 256) if self.dtype == np.uint8 else (-100, 100)
            out[...] = g.integers(lo, hi, size=out.shape, dtype=self.dtype)

    def batch(self, index: int) -> Batch:
        return Batch(index, self.layout, functools.partial(self.build, index), self.max_nbytes)
