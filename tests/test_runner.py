"""pipeline.run: serial vs parallel, determinism, results, the Python API, kernel errors."""
import numpy as np
import pytest
import torch

import pipeline
from pipeline.outputs import checksum
from conftest import TINY, workers_alive


class SetupCounter:
    """A user kernel that reports how often its setup ran in this process, and torch's thread cap."""
    setups = 0

    def setup(self, device, scale=1):
        SetupCounter.setups += 1
        self.scale = scale

    def __call__(self, x):
        return torch.tensor([SetupCounter.setups, torch.get_num_threads(), self.scale])


@pytest.mark.timeout(90)
def test_user_kernel_by_import_path_set_up_once_per_worker():
    """'module:Class' kernels: setup runs once per worker with the params; workers honour the thread cap."""
    r = pipeline.run(kernel="test_runner:SetupCounter", workers=2, **{"kernel.params.scale": 7},
                     **dict(TINY, batches=8))
    assert [list(x) for x in r.results] == [[1, 1, 7]] * 8
    assert len({w["pid"] for w in r.summary["workers"]}) == 2


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kernel", ["sum", "matmul", "fft", "mlp", "faulty"])
def test_parallel_matches_serial_bit_for_bit(kernel):
    """Every kernel: 2 workers give the serial checksum, and results in batch order."""
    serial = pipeline.run(kernel=kernel, workers=0, **TINY)
    par = pipeline.run(kernel=kernel, workers=2, **TINY)
    assert par.summary["checksum"] == serial.summary["checksum"]
    assert len(par.results) == 4
    for a, b in zip(serial.results, par.results):
        assert a.tobytes() == b.tobytes()
    assert sum(w["batches"] for w in par.summary["workers"]) == 4


def test_results_are_right():
    """Serial results equal the kernel applied with numpy (sum, fft) and have the right shapes."""
    src = [np.arange(12, dtype=np.float32).reshape(3, 4)]
    assert np.array_equal(pipeline.run(source=src, kernel="sum", workers=0, progress=False).results[0],
                          [6, 22, 38])
    r = pipeline.run(kernel="fft", workers=0, **TINY).results[0]
    x = pipeline.run(kernel="sum", workers=0, **TINY)
    assert r.shape == (16, 5) and x.results[0].shape == (16,)


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int32", "uint8", "int8"])
def test_dtypes(dtype):
    """Every accepted dtype computes (serially here; the transport is dtype-agnostic)."""
    r = pipeline.run(dtype=dtype, kernel="matmul", workers=0, **TINY)
    assert r.summary["completed"] == 4 and np.isfinite(r.results[0]).all()


def test_synthetic_is_a_function_of_seed_and_index():
    """Batches depend on (seed, index) only: a different seed changes the checksum."""
    a = pipeline.run(kernel="sum", workers=0, **TINY).summary["checksum"]
    b = pipeline.run(kernel="sum", workers=0, seed=1, **TINY).summary["checksum"]
    assert a != b and a == pipeline.run(kernel="sum", workers=0, **TINY).summary["checksum"]


@pytest.mark.timeout(90)
def test_source_and_callable_kernel_with_workers():
    """A caller's source (numpy and CPU tensors) with a lambda kernel sent by value to 2 workers."""
    src = [np.full((3, 2), i, np.float32) for i in range(3)] + [torch.ones(3, 2)]
    scale = 3.0
    r = pipeline.run(source=src, kernel=lambda x: x.sum(1) * scale, workers=2, progress=False)
    assert [x.tolist() for x in r.results] == [[0] * 3, [6] * 3, [12] * 3, [6] * 3]
    assert r.summary["handoff"]["pickled_fallbacks"] == 0


@pytest.mark.timeout(90)
def test_kernel_exception_carries_type_batch_pid_device_and_traceback():
    """A worker's exception reaches the caller as its type, naming batch, pid, device; cause = traceback."""
    with pytest.raises(RuntimeError) as e:
        pipeline.run(kernel="faulty", workers=2, device="cpu", **{"kernel.params.raise_on": [2]}, **TINY)
    msg = str(e.value)
    assert "batch 2" in msg and "worker pid" in msg and "device cpu" in msg
    assert "raise_on batch 2" in msg
    assert "Traceback" in str(e.value.__cause__) and "faulty" in str(e.value.__cause__)
    assert e.value.summary["error"].startswith("RuntimeError")


def test_unknown_kernel_and_bad_import():
    """Unknown kernel names and bad import paths are ConfigErrors naming the kernel."""
    with pytest.raises(pipeline.ConfigError, match="unknown kernel"):
        pipeline.run(kernel="nope", workers=0, **TINY)
    with pytest.raises(pipeline.ConfigError, match="cannot import module 'no_such_mod'"):
        pipeline.run(kernel="no_such_mod:f", workers=0, **TINY)
    with pytest.raises(pipeline.ConfigError, match="has no attribute 'nope'"):
        pipeline.run(kernel="pipeline.kernels:nope", workers=0, **TINY)


def test_unknown_override():
    """run() rejects unknown keyword settings by name."""
    with pytest.raises(pipeline.ConfigError, match=r"unknown setting 'wrokers' \(did you mean workers\?\)"):
        pipeline.run(wrokers=2)
    with pytest.raises(pipeline.ConfigError, match=r"unknown setting 'bogus' \(known: workers, batches,"):
        pipeline.run(bogus=2)


def test_fork_refused():
    """start_method fork is refused with the reason."""
    with pytest.raises(pipeline.ConfigError, match="Cannot re-initialize CUDA"):
        pipeline.run(start_method="fork", **TINY)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_cuda_without_cuda():
    """--device cuda without CUDA is a ConfigError; auto falls back to the CPU with a note."""
    with pytest.raises(pipeline.ConfigError, match="CUDA is not available"):
        pipeline.run(device="cuda", **TINY)
    s = pipeline.run(device="auto", workers=0, **TINY).summary
    assert s["device"] == "cpu" and "no CUDA GPU" in s["notes"][0]


@pytest.mark.timeout(90)
def test_forkserver_accepted():
    """forkserver works and agrees with serial."""
    a = pipeline.run(kernel="sum", workers=1, start_method="forkserver", **TINY).summary["checksum"]
    assert a == pipeline.run(kernel="sum", workers=0, **TINY).summary["checksum"]


def thread_caps(x):
    """A kernel that reports the thread cap its worker runs under: torch's, and the environment's."""
    import os
    return torch.tensor([torch.get_num_threads(), int(os.environ["OMP_NUM_THREADS"])])


def forkservers() -> list:
    """This process's forkserver (the stdlib's, a direct child; zombies of earlier tests skipped)."""
    import psutil
    found = []
    for p in psutil.Process().children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "multiprocessing.forkserver" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.mark.timeout(120)
def test_forkserver_preloads_torch_and_workers_keep_their_own_thread_cap():
    """forkserver: the server imports the worker module (torch) once and workers fork from it; each run's
    thread cap still reaches its workers (torch's and the environment's), though the server's is the
    first run's; a worker killed mid-run is replaced by a fork of the same server."""
    a = pipeline.run(kernel=thread_caps, workers=1, start_method="forkserver", **dict(TINY, threads_per_worker=1))
    assert [list(x) for x in a.results] == [[1, 1]] * TINY["batches"]
    servers = forkservers()
    assert len(servers) == 1
    with open(f"/proc/{servers[0].pid}/maps") as f:
        assert "libtorch" in f.read()  # (spawn-started workers import it each; here the server has it)
    b = pipeline.run(kernel=thread_caps, workers=1, start_method="forkserver", **dict(TINY, threads_per_worker=2))
    assert [list(x) for x in b.results] == [[2, 2]] * TINY["batches"]
    c = pipeline.run(kernel="faulty", workers=2, start_method="forkserver", **{"kernel.params.crash_on": [1]},
                     **TINY)
    assert len(c.summary["restarts"]) == 1 and forkservers() == servers
    assert c.summary["checksum"] == pipeline.run(kernel="sum", workers=0, **TINY).summary["checksum"]


@pytest.mark.timeout(90)
def test_no_worker_left_after_run():
    """After run returns, no child process remains."""
    pipeline.run(kernel="sum", workers=2, **TINY)
    assert workers_alive() == []


def test_summary_fields():
    """The summary carries the documented keys."""
    s = pipeline.run(kernel="sum", workers=0, **TINY).summary
    for k in ("batches", "bytes_in", "wall_s", "batches_per_s", "mb_per_s", "checksum", "main_pid", "device",
              "kernel", "workers", "config", "failed", "restarts", "handoff"):
        assert k in s
    assert s["bytes_in"] == 4 * 16 * 8 * 4 and s["config"]["source"]["rows"] == 16


def test_checksum_covers_dtype_and_shape():
    """The checksum changes with dtype or shape even when the bytes are the same."""
    a = np.zeros(4, np.float32)
    assert checksum([a]) != checksum([a.view(np.int32)]) != checksum([a.reshape(2, 2)])


@pytest.mark.gpu
@pytest.mark.timeout(180)
def test_gpu_workers_compute_on_cuda_and_match_cpu():
    """On CUDA, workers really use cuda and results match the CPU within float tolerance."""
    kw = dict(TINY, rows=256, cols=128, batches=16)  # several per worker: copies overlap compute
    cpu = pipeline.run(kernel="matmul", workers=0, device="cpu", **kw)
    gpu = pipeline.run(kernel="matmul", workers=2, device="cuda", **kw)
    assert all(w["device"].startswith("cuda") for w in gpu.summary["workers"])
    for a, b in zip(cpu.results, gpu.results):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
    assert gpu.summary["handoff"]["h2d_gbps"] is not None


@pytest.mark.gpu
def test_gpu_cuda_tensor_in_source_refused():
    """A real CUDA tensor in source raises HandoffError."""
    with pytest.raises(pipeline.HandoffError, match="device 'cuda:0'"):
        pipeline.run(source=[torch.ones(2, 2, device="cuda")], kernel="sum", workers=1, progress=False)


def test_device_auto_rule():
    """device auto: worker rank r computes on GPU r % GPUs when there are GPUs, else on the CPU."""
    from pipeline import devices
    n = devices.gpu_count()
    got = [str(devices.choose("auto", r)) for r in range(3)]
    assert got == ([f"cuda:{r % n}" for r in range(3)] if n else ["cpu"] * 3)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
def test_precision_runs_every_kernel_call_under_it(precision):
    """kernel.precision: the summary says it; bf16/fp16 autocast changes matmul results within tolerance."""
    kw = dict(TINY, kernel="matmul", workers=0, device="cpu")
    ref = pipeline.run(**kw).results
    r = pipeline.run(precision=precision, **kw)
    assert r.summary["precision"] == precision
    for a, b in zip(r.results, ref):
        assert a.dtype == (np.float16 if precision == "fp16" else np.float32)  # numpy has no bfloat16
        np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-2)
    if precision in ("bf16", "fp16"):
        assert any(not np.array_equal(a, b) for a, b in zip(r.results, ref))


def test_unserialisable_kernel_fails_fast_naming_it():
    """A kernel capturing something cloudpickle can't send (a lock) fails at once with a KernelError."""
    import threading
    lock = threading.Lock()

    def locked_sum(x):
        with lock:
            return x.sum(1)
    with pytest.raises(pipeline.KernelError, match=r"kernel '.*locked_sum' cannot be sent .*lock"):
        pipeline.run(kernel=locked_sum, workers=2, **TINY)


def test_importable_callable_travels_by_name():
    """A callable spawn can import by name is sent as 'module:name', not by value."""
    from pipeline.kernels import Sum, spec_for
    spec = spec_for(Sum, {})
    assert spec.name == "pipeline.kernels:Sum" and spec.payload is None
    assert spec_for(lambda x: x, {}).payload is not None
