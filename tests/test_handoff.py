"""The handoff rule and the slot ring."""
import os
import pickle

import numpy as np
import pytest
import torch

import pipeline
from pipeline.handoff import SHM_DIR, SlotReader, SlotRing, remove_stale, to_host
from conftest import TINY


def test_handoff_error_is_pickling_error():
    """HandoffError is a PipelineError and a pickle.PicklingError."""
    assert issubclass(pipeline.HandoffError, pickle.PicklingError)
    assert issubclass(pipeline.HandoffError, pipeline.PipelineError)


@pytest.mark.parametrize("make, fragment", [
    (lambda: torch.empty(2, 3, device="meta"), "device 'meta'"),
    (lambda: torch.ones(2, 3, requires_grad=True) * 2, "non-leaf"),
])
def test_to_host_refuses(make, fragment):
    """Device tensors and non-leaf grad tensors are refused, naming where and what to do."""
    with pytest.raises(pipeline.HandoffError, match=fragment) as e:
        to_host({"w": [1, make()]}, "kernel param")
    assert "kernel param.w[1]" in str(e.value)
    assert ".numpy()" in str(e.value)


def test_to_host_converts_cpu_tensors():
    """CPU tensors (leaf with grad too) are handed over as numpy."""
    out = to_host({"a": torch.arange(3), "b": torch.ones(2, requires_grad=True)}, "p")
    assert isinstance(out["a"], np.ndarray) and isinstance(out["b"], np.ndarray)


@pytest.mark.parametrize("bad", ["meta", "nonleaf"])
@pytest.mark.timeout(60)
def test_run_refuses_bad_source(bad):
    """run(source=...) raises HandoffError for a meta or non-leaf tensor, with the batch index."""
    t = torch.empty(4, 8, device="meta") if bad == "meta" else torch.ones(4, 8, requires_grad=True) + 1
    with pytest.raises(pipeline.HandoffError, match="source batch 1"):
        pipeline.run(source=[np.ones((4, 8), np.float32), t], kernel="sum", workers=1, progress=False)


@pytest.mark.parametrize("bad", ["meta", "nonleaf"])
def test_run_refuses_bad_params(bad):
    """Kernel params holding a meta or non-leaf tensor raise HandoffError naming the param."""
    t = torch.empty(2, device="meta") if bad == "meta" else torch.ones(2, requires_grad=True) * 3
    with pytest.raises(pipeline.HandoffError, match="kernel param.weights"):
        pipeline.run(kernel="sum", workers=1, **{"kernel.params.weights": t}, **TINY)


def test_slot_ring_reuses_and_views_without_copy():
    """put/view round-trips through shared memory; the reader sees the main's writes in place."""
    ring = SlotRing(2, 100)
    try:
        a = np.arange(20, dtype=np.float32).reshape(4, 5)
        d = ring.put(a)
        reader = SlotReader(ring.name, ring.slot_bytes)
        v = reader.view(d)
        assert np.array_equal(v, a) and d.strides == (20, 4)
        ring.view(d.slot, a.shape, a.dtype)[0, 0] = 99  # written by the main, seen by the reader
        assert v[0, 0] == 99
        ring.release(d.slot)
        assert sorted(ring.free) == [0, 1]
        del v
    finally:
        ring.close()
    assert not os.path.exists(ring.path)


def test_remove_stale_clears_dead_mains_only():
    """Segments named after a dead pid are removed; ours stay."""
    dead = os.path.join(SHM_DIR, "pipeline-999999999-dead")
    open(dead, "wb").close()
    ring = SlotRing(1, 10)
    try:
        removed = remove_stale()
        assert "pipeline-999999999-dead" in removed and os.path.exists(ring.path)
    finally:
        ring.close()
