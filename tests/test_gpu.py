"""On a CUDA GPU: device per rank, DMA straight from the slots, copy/compute overlap, sharing a GPU, faults,
precision, memory, slot safety. Every test here is marked ``gpu`` and skips cleanly without CUDA."""
import numpy as np
import pytest
import torch

import pipeline
from pipeline.cli import main
from conftest import TINY

pytestmark = pytest.mark.gpu
GPU = dict(TINY, rows=256, cols=128, batches=12)


def cpu_ref(kernel="matmul", **kw):
    return pipeline.run(kernel=kernel, workers=0, device="cpu", **{**GPU, **kw}).results


@pytest.mark.timeout(180)
def test_device_per_rank_and_several_workers_share_a_gpu():
    """auto: rank r on cuda:r % GPUs; 3 workers on the GPUs there are, results equal to the CPU's."""
    n = torch.cuda.device_count()
    r = pipeline.run(kernel="matmul", workers=3, device="auto", **dict(GPU, batches=48))
    ready = [w for w in r.summary["workers"] if w["device"]]  # a worker may not be up before a short job ends
    assert ready and all(w["device"] == f"cuda:{w['rank'] % n}" for w in ready)
    for a, b in zip(cpu_ref(), r.results):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.timeout(180)
def test_host_to_device_straight_from_registered_slots():
    """With handoff.pinned the ring is registered with CUDA: every copy ran from a slot, nothing pickled."""
    s = pipeline.run(kernel="sum", workers=2, device="cuda", **GPU).summary
    h = s["handoff"]
    assert h["h2d_from_slot"] is True and h["pickled_fallbacks"] == 0 and h["h2d_gbps"]
    assert not [n for n in s["notes"] if "could not be registered" in n]


@pytest.mark.timeout(180)
def test_no_slot_rewritten_before_its_copy_completes():
    """Slots go back after the copy (CUDA event): a tiny ring, many batches, every input intact."""
    r = pipeline.run(kernel="test_stream:SeedCheck", workers=2, device="cuda", in_flight=2, build_threads=2,
                     **{"kernel.params.sleep": 0.005}, **dict(TINY, batches=60))
    assert r.summary["completed"] == 60 and r.summary["failed"] == []


def test_next_copy_overlaps_the_current_kernel():
    """The next batch's copy (side stream) completes while the current kernel still runs (CUDA events)."""
    from pipeline.compute import Stager
    dev = torch.device("cuda", 0)
    st = Stager(dev, pinned=True)
    a = np.random.rand(4096, 1024).astype(np.float32)
    x = st.ready(st.start(a))
    done = torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(200_000_000)  # a long kernel on the compute stream
    nxt = st.start(a)  # the next batch's copy, issued meanwhile
    done.record()
    torch.cuda.synchronize()
    assert nxt.end.elapsed_time(done) > 0, "the copy ended after the kernel: no overlap"
    assert x.device == dev


@pytest.mark.timeout(180)
def test_out_of_memory_names_the_device_and_the_worker_carries_on():
    """A kernel out of GPU memory fails its batch (on_error=skip) naming device and free/total; no restart."""
    s = pipeline.run(kernel="faulty", workers=1, device="cuda", on_error="skip",
                     **{"kernel.params.oom_on": [2]}, **GPU).summary
    assert [f["batch"] for f in s["failed"]] == [2] and s["restarts"] == [] and s["completed"] == 11
    assert "out of memory on cuda:0" in s["failed"][0]["cause"] and "GiB free of" in s["failed"][0]["cause"]


@pytest.mark.timeout(180)
def test_forkserver_workers_use_cuda_and_a_crashed_one_is_replaced():
    """forkserver with torch preloaded in the server (which never touches CUDA): forked workers set up CUDA
    themselves, a killed one is replaced by another fork, and the results equal the CPU's."""
    r = pipeline.run(kernel="faulty", workers=2, device="cuda", start_method="forkserver",
                     **{"kernel.params.crash_on": [1]}, **GPU)
    assert len(r.summary["restarts"]) == 1
    assert all(w["device"].startswith("cuda") for w in r.summary["workers"] if w["device"])
    for a, b in zip(cpu_ref(kernel="sum"), r.results):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.timeout(180)
def test_sticky_cuda_error_replaces_the_worker():
    """A real device-side assert: the worker is retired and replaced, the batch retried, results right."""
    s = pipeline.run(kernel="faulty", workers=2, device="cuda", **{"kernel.params.sticky_on": [3]}, **GPU).summary
    assert s["failed"] == [] and s["completed"] == 12 and len(s["restarts"]) == 1
    assert "sticky CUDA error" in s["restarts"][0]["cause"]
    assert s["checksum"] == pipeline.run(kernel="sum", workers=0, device="cuda", **GPU).summary["checksum"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("precision, tol", [("tf32", 1e-2), ("bf16", 3e-2), ("fp16", 1e-2)])
def test_precision_on_cuda_matches_fp32_within_tolerance(precision, tol):
    """tf32/bf16/fp16 on CUDA agree with fp32 on the CPU within that precision's tolerance."""
    r = pipeline.run(kernel="matmul", workers=1, device="cuda", precision=precision, **GPU)
    assert r.summary["precision"] == precision
    for a, b in zip(cpu_ref(), r.results):
        np.testing.assert_allclose(a.astype(np.float32), b, rtol=tol, atol=tol * np.abs(b).max())


@pytest.mark.timeout(240)
def test_gpu_memory_does_not_grow_with_batches():
    """The caching allocator's reservation after 10 batches equals the one after 80 on the same worker."""
    shape = dict(rows=256, cols=128)
    with pipeline.Pipeline(kernel="matmul", workers=1, device="cuda", progress=False) as p:
        a = p.run(batches=10, **shape).summary["workers"][0]["gpu_reserved_mb"]
        b = p.run(batches=80, **shape).summary["workers"][0]["gpu_reserved_mb"]
    assert b <= a * 1.1 + 8, (a, b)


def test_device_beyond_the_visible_gpus_exits_2(capsys):
    """--device cuda:N past the visible GPUs: exit 2, one line naming how many there are."""
    n = torch.cuda.device_count()
    assert main(["run", "--device", f"cuda:{n}", "--batches", "1", "--no-progress"]) == 2
    assert f"only {n} CUDA device(s) visible" in capsys.readouterr().err


def test_cuda_tensors_refused_in_source_and_params():
    """A real CUDA tensor in source or in a kernel param is a HandoffError naming where."""
    with pytest.raises(pipeline.HandoffError, match="source batch 0.*device 'cuda:0'"):
        pipeline.run(source=[torch.ones(2, 2, device="cuda")], kernel="sum", workers=1, progress=False)
    with pytest.raises(pipeline.HandoffError, match="kernel param.w.*device 'cuda:0'"):
        pipeline.run(kernel="sum", workers=1, **{"kernel.params.w": torch.ones(2, device="cuda")}, **TINY)


def double(x):
    """Every field of a dict batch, changed in a way that is exact on any device."""
    return {"x": x["x"] * 2, "label": x["label"] + 1}


def double_on_cuda(x):
    assert all(v.device.type == "cuda" for v in x.values()), {k: v.device for k, v in x.items()}
    return double(x)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("pinned", [True, False])
def test_a_dataset_of_dict_samples_reaches_a_cuda_kernel_as_tensors_on_the_gpu(pinned):
    """Dict samples on CUDA: every field a cuda tensor in the kernel (straight from the registered slot, or
    from pageable memory without pinning), the results exactly the CPU's."""
    from test_datasets import Records
    ds = Records(n=40, width=33)
    ref = pipeline.run(source=ds, batch_size=8, kernel=double, workers=0, device="cpu", progress=False)
    r = pipeline.run(source=ds, batch_size=8, kernel=double_on_cuda, workers=2, device="cuda", progress=False,
                     **{"handoff.pinned": pinned})
    assert r.summary["checksum"] == ref.summary["checksum"]
    assert r.summary["handoff"]["h2d_from_slot"] is pinned
