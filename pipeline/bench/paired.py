"""What an option costs, measured as pairs: runs with and without it on the same warm workers, alternating.

A shared machine's speed drifts by more than a small overhead (a 2-core VM's plain tiny-batch runs moved
between 9,400 and 25,000 batches/s over one day), so two modes timed one after the other (their medians
compared) read anything from +3% to +38% for the same code. Alternating (plain then traced, then traced
then plain, ...) puts each pair side by side, a drift cancels out, and the median of the pairs' ratios,
with a bootstrap interval of that median, says how far noise moves it. ``pipeline bench``'s
``pipeline.trace`` mode and ``scripts/bench_trace.py`` measure ``--trace`` this way.
"""
from __future__ import annotations

import random
import statistics
import time
from typing import Callable


def alternate(once: Callable[[bool], object], pairs: int) -> tuple[list[float], list[float]]:
    """``once(False)`` and ``once(True)`` ``pairs`` times each, alternating which goes first: their seconds,
    paired (the i-th of each list ran side by side)."""
    without, with_ = [], []
    for r in range(pairs):
        for on in ((False, True) if r % 2 == 0 else (True, False)):
            t0 = time.perf_counter()
            once(on)
            (with_ if on else without).append(time.perf_counter() - t0)
    return without, with_


def overhead(without: list[float], with_: list[float], seed: int = 0) -> dict:
    """The median of the pairs' ratios less one, and a 95% bootstrap interval of that median."""
    ratios = [b / a for a, b in zip(without, with_)]
    rng = random.Random(seed)
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    return {"overhead": statistics.median(ratios) - 1, "interval": [boot[50] - 1, boot[1949] - 1],
            "pairs": len(ratios), "ratios": ratios}
