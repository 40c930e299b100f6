"""The contracts between rooms (contracts.py): every implementation has every member of its Protocol."""
import inspect

import numpy as np
import pytest

from pipeline import contracts
from pipeline.config import Config, SourceConfig
from pipeline.kernels import spec_for
from pipeline.local.buildproc import _Ring
from pipeline.local.executor import LocalExecutor
from pipeline.local.ring import SlotReader, SlotRing
from pipeline.sources.factory import open_source


def members(protocol) -> set[str]:
    """A Protocol's attributes and methods, as written in contracts.py."""
    own = set(getattr(protocol, "__annotations__", {}))
    own |= {n for n, v in vars(protocol).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}
    return own | ({"__len__"} if "__len__" in vars(protocol) else set())


def missing(obj, protocol) -> set[str]:
    return {m for m in members(protocol) if not hasattr(obj, m)}


def test_local_executor_is_an_executor():
    """LocalExecutor has every member runner may call, before it starts (no worker is started here)."""
    ex = LocalExecutor(Config(), spec_for("sum", {}))
    assert missing(ex, contracts.Executor) == set() and isinstance(ex, contracts.Executor)


def test_ray_executor_is_an_executor():
    """RayExecutor's members, read from the class and its __init__ (Ray is not started)."""
    pytest.importorskip("ray")
    from pipeline.ray_backend import RayExecutor
    source = inspect.getsource(RayExecutor)
    attrs = {m for m in members(contracts.Executor) if not hasattr(RayExecutor, m)}
    assert {a for a in attrs if f"self.{a} =" not in source and f"self.{a}: " not in source} == set()


@pytest.mark.parametrize("kind", ["synthetic", "npy", "dataset", "parquet", "images"])
def test_every_source_kind_is_a_build_source(kind, tmp_path):
    """The factory's every kind opens a source with every BuildSource member; it pickles (build processes,
    Ray actors get a copy)."""
    import cloudpickle
    if kind == "synthetic":
        cfg = SourceConfig(batches=2, rows=4, cols=3)
    elif kind == "npy":
        np.save(tmp_path / "a.npy", np.zeros((8, 3), np.float32))
        cfg = SourceConfig(kind="npy", path=str(tmp_path / "a.npy"), rows=4)
    elif kind == "dataset":
        cfg = SourceConfig(kind="dataset", object="test_contracts:TEN", batch_size=4)
    elif kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"x": np.arange(8.0)}), tmp_path / "t.parquet")
        cfg = SourceConfig(kind="parquet", path=str(tmp_path / "t.parquet"), batch_size=4)
    else:
        PIL = pytest.importorskip("PIL.Image")
        (tmp_path / "im").mkdir()
        PIL.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "im" / "a.png")
        cfg = SourceConfig(kind="images", path=str(tmp_path / "im"), image_size=4)
    src = open_source(cfg)
    assert missing(src, contracts.BuildSource) == set() and isinstance(src, contracts.BuildSource)
    again = cloudpickle.loads(cloudpickle.dumps(src))
    assert again.batch(0).layout == src.batch(0).layout


TEN = [np.full(2, i, np.float32) for i in range(10)]


def test_every_ring_is_a_ring(tmp_path):
    """The main's ring, a build process's view of it (and a Ray actor's slots) are Rings."""
    ring = SlotRing(2, 4096, str(tmp_path))
    try:
        view = _Ring(SlotReader(ring.path, ring.slot_bytes))
        for r in (ring, view):
            assert missing(r, contracts.Ring) == set() and isinstance(r, contracts.Ring)
        view.reader.close()
    finally:
        ring.close()
    pytest.importorskip("ray")
    from pipeline.ray_backend.actor import _ActorRun
    assert {"view", "slot_bytes"} <= {n for n in dir(_ActorRun)} | {"slot_bytes"}
    assert "self.slot_bytes =" in inspect.getsource(_ActorRun.__init__)
