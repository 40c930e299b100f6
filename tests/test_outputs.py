"""The kernel contract: what a kernel may return, several outputs end to end, where worker prints go."""
import collections
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline
from pipeline import kernels, outputs, sinks
from pipeline.cli import main
from pipeline.errors import KernelError
from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
WHERE = "kernel 'k', batch 3"


# -- user kernels (imported by name in the workers: ``test_outputs:Dicty``) -----------------------------------
class Dicty:
    """Several outputs: a dict of arrays of different shapes and dtypes (or a tuple, with as_tuple)."""

    def setup(self, device, as_tuple=False, bf16=False):
        self.as_tuple, self.bf16 = as_tuple, bf16

    def __call__(self, x):
        out = {"logits": x * 2 + 1, "emb": x.sum(1), "pos": (x > 0).sum(1) > 2, "n": kernels.current["index"]}
        if self.bf16:
            out["bf16"] = (x * 2).to(torch.bfloat16)
        return tuple(out.values()) if self.as_tuple else out


class NoneOn:
    """Returns None at the batches in ``on`` (every batch when empty), else the row sums."""

    def setup(self, device, on=()):
        self.on = set(on)

    def __call__(self, x):
        if not self.on or kernels.current["index"] in self.on:
            return None
        return x.sum(1)


class Chatty:
    """Prints (Python and native) and warns on every batch, the batch index in the warning's text."""

    def setup(self, device):
        pass

    def __call__(self, x):
        i = kernels.current["index"]
        print(f"chatty print batch {i}")
        os.write(1, f"chatty native batch {i}\n".encode())
        warnings.warn(f"chatty warning batch {i}")
        return x.sum(1)


class LastWords:
    """On batch 1's first attempt: writes to stderr, then dies without cleaning up (``os._exit``)."""

    def setup(self, device):
        pass

    def __call__(self, x):
        if kernels.current["index"] == 1 and kernels.current["attempt"] == 1:
            sys.stderr.write("last words of batch 1\n")
            os._exit(3)
        return x.sum(1)


def same(a, b) -> bool:
    """Equal structure, keys, dtypes, shapes and bytes."""
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return type(b) is tuple and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
            and a.tobytes() == b.tobytes())


# -- host_result: good returns ---------------------------------------------------------------------------------
Pair = collections.namedtuple("Pair", "a b")

GOOD = [  # (returned, expected type, expected dtypes)
    (torch.arange(4, dtype=torch.float32), np.ndarray, ["float32"]),
    (torch.tensor([True, False]), np.ndarray, ["bool"]),
    (torch.ones(2, dtype=torch.bfloat16), np.ndarray, ["float32"]),
    (torch.ones(2).to(torch.float8_e4m3fn), np.ndarray, ["float32"]),
    (torch.ones(3, requires_grad=True) * 2, np.ndarray, ["float32"]),
    (torch.ones(3, dtype=torch.complex64).conj(), np.ndarray, ["complex64"]),
    (np.arange(3, dtype=np.int16), np.ndarray, ["int16"]),
    (np.ma.masked_array([1.0, 2.0]), np.ndarray, ["float64"]),
    (7, np.ndarray, ["int64"]),
    (2.5, np.ndarray, ["float64"]),
    (True, np.ndarray, ["bool"]),
    (np.float32(1.5), np.ndarray, ["float32"]),
    ((torch.ones(2), np.zeros(3, np.uint8)), tuple, ["float32", "uint8"]),
    (Pair(torch.ones(1), 3), tuple, ["float32", "int64"]),
    ({"logits": torch.ones(2, 2), "emb": np.zeros(1)}, dict, ["float32", "float64"]),
]


@pytest.mark.parametrize("y, kind, dtypes", GOOD, ids=lambda v: None)
def test_host_result_accepts_the_contract(y, kind, dtypes):
    """Tensors and arrays of numeric or bool dtypes, numbers, tuples and dicts of them become host numpy."""
    got = outputs.host_result(y, where=WHERE)
    assert type(got) is kind
    arrs = [a for _, a in outputs.arrays(got)]
    assert [str(a.dtype) for a in arrs] == dtypes and all(type(a) is np.ndarray for a in arrs)
    if isinstance(y, dict):
        assert list(got) == list(y)


def test_host_result_values_detach_and_widen():
    """Values survive: a grad tensor is detached, bfloat16 widened exactly, a number becomes a 0-d array."""
    t = torch.tensor([1.5, -2.0], requires_grad=True) * 2
    assert outputs.host_result(t, where=WHERE).tolist() == [3.0, -4.0]
    assert outputs.host_result(torch.tensor([0.5, 3.0], dtype=torch.bfloat16), where=WHERE).tolist() == [0.5, 3.0]
    z = outputs.host_result(7, where=WHERE)
    assert z.shape == () and z.item() == 7


def test_host_result_never_a_view_of_the_input_slot():
    """A result sharing memory with the input is copied; any other result is handed back without a copy."""
    slot = np.arange(12, dtype=np.float32).reshape(3, 4)
    x = torch.from_numpy(slot)
    got = outputs.host_result({"same": x, "rows": x[1:], "np": slot[:, 0]}, where=WHERE, avoid=[slot])
    assert not any(np.may_share_memory(a, slot) for a in got.values())
    assert np.array_equal(got["rows"], slot[1:])
    fresh = np.zeros(5)
    assert np.may_share_memory(outputs.host_result(fresh, where=WHERE, avoid=[slot]), fresh)


# -- host_result: bad returns ------------------------------------------------------------------------------------
BAD = [  # (returned, what the message says it returned)
    (None, "returned None (did the kernel forget `return`?)"),
    ("hello", "returned str 'hello'"),
    ([torch.ones(1), "x"], "returned a list of 2 item(s)"),
    (np.array([1, None], dtype=object), "returned a numpy array of dtype object"),
    (np.array(["a", "b"]), "returned a numpy array of dtype <U1"),
    (np.array(["2026-01-01"], dtype="datetime64[D]"), "returned a numpy array of dtype datetime64[D]"),
    (2 ** 70, "returned int of dtype object"),
    (object(), "returned object <object object at"),
    ((torch.ones(1), None), "returned a tuple whose item 1 is None"),
    ({"a": torch.ones(1), "b": "text"}, "returned a dict whose 'b' is str 'text'"),
    ({"a": (torch.ones(1),)}, "returned a dict whose 'a' is a nested tuple"),
    ({1: torch.ones(1)}, "returned a dict with key 1 (int); keys must be non-empty strings"),
    ({"": torch.ones(1)}, "returned a dict with key '' (str)"),
    ((), "returned an empty tuple"),
    ({}, "returned an empty dict"),
    (torch.ones(2, device="meta"), "returned a tensor on device meta (it holds no data)"),
]


@pytest.mark.parametrize("y, said", BAD, ids=lambda v: None)
def test_host_result_rejects_anything_else(y, said):
    """Anything outside the contract: a one-line KernelError naming where, what came back, what should."""
    with pytest.raises(KernelError) as e:
        outputs.host_result(y, where=WHERE)
    msg = str(e.value)
    assert msg.startswith(f"{WHERE}: {said}") and "\n" not in msg
    assert msg.endswith(outputs.SHOULD) and isinstance(e.value, TypeError) and e.value.bad_return


# -- checksum, max_rel_diff, nbytes ---------------------------------------------------------------------------------
def test_checksum_covers_keys_positions_and_structure():
    """The same bytes as an array, a tuple, a dict, under another key or position give other checksums."""
    a, b = np.zeros(3, np.float32), np.ones(3, np.float32)
    variants = [[a], [(a,)], [{"x": a}], [{"y": a}], [(a, b)], [(b, a)], [{"x": a, "y": b}],
                [{"x": b, "y": a}], [None], [a, None], [a.view(np.int32)]]
    sums = [outputs.checksum(v) for v in variants]
    assert len(set(sums)) == len(sums)
    assert outputs.checksum([{"x": a, "y": b}]) == outputs.checksum([{"y": b, "x": a}])  # dicts are unordered


def test_checksum_is_a_digest_of_batch_digests_and_delegated():
    """The checksum is sha256 over each batch's digest (dtype, shape, bytes; a failed batch its index), so a
    digest computed where the result is (a Ray actor) stands for it; runner.checksum is outputs.checksum."""
    from pipeline.outputs import checksum
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    one = hashlib.sha256(f"{a.dtype.str}{a.shape};".encode() + a.tobytes()).digest()
    h = hashlib.sha256(one + hashlib.sha256(b"failed:1;").digest())
    assert checksum([a, None]) == h.hexdigest() and checksum is outputs.checksum
    assert outputs.batch_digest(0, a) == one
    g = hashlib.sha256()
    outputs.checksum_update(g, 0, None, digest=one)
    outputs.checksum_update(g, 1, None)
    assert g.hexdigest() == h.hexdigest()


def test_max_rel_diff_on_structures():
    """max_rel_diff compares structures array by array; different keys, kinds or lengths are inf."""
    from pipeline.outputs import max_rel_diff
    ref = [{"a": np.array([1.0, 2.0]), "b": np.array([4.0])}, (np.array([1.0]), np.array([True]))]
    near = [{"a": np.array([1.0, 2.0]), "b": np.array([4.4])}, (np.array([1.0]), np.array([True]))]
    assert max_rel_diff(ref, ref) == 0.0 and max_rel_diff(near, ref) == pytest.approx(0.1)
    assert max_rel_diff([{"a": ref[0]["a"], "c": ref[0]["b"]}, ref[1]], ref) == float("inf")
    assert max_rel_diff([tuple(ref[0].values()), ref[1]], ref) == float("inf")
    assert max_rel_diff([ref[0], ref[1][:1]], ref) == float("inf")
    assert max_rel_diff([ref[0], None], ref) == float("inf") and max_rel_diff(ref[:1], ref) == float("inf")
    assert max_rel_diff([np.array([1j, 2])], [np.array([1j, 2.2])]) == pytest.approx(0.2 / 2.2)
    assert max_rel_diff is outputs.max_rel_diff


def test_nbytes():
    """nbytes adds up every array of a result; a failed batch holds none."""
    assert outputs.nbytes({"a": np.zeros(3, np.float32), "b": np.zeros(2)}) == 28
    assert outputs.nbytes((np.zeros(1, np.int8),)) == 1 and outputs.nbytes(None) == 0


# -- several outputs end to end ---------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
@pytest.mark.parametrize("as_tuple", [False, True])
def test_several_outputs_two_workers_equal_serial(as_tuple):
    """A kernel returning a dict (or tuple) of arrays: 2 workers give serial's structures and checksum."""
    kw = dict(TINY, **{"kernel.params.as_tuple": as_tuple})
    serial = pipeline.run(kernel="test_outputs:Dicty", workers=0, **kw)
    par = pipeline.run(kernel="test_outputs:Dicty", workers=2, **kw)
    assert par.summary["checksum"] == serial.summary["checksum"]
    assert len(par.results) == 4 and all(same(a, b) for a, b in zip(serial.results, par.results))
    first = par.results[2]
    assert type(first) is (tuple if as_tuple else dict)
    if not as_tuple:
        assert list(first) == ["logits", "emb", "pos", "n"] and first["n"].item() == 2
        assert first["pos"].dtype == bool and first["logits"].shape == (16, 8)


@pytest.mark.gpu
@pytest.mark.timeout(180)
def test_gpu_several_outputs_and_bfloat16_match_cpu():
    """On CUDA workers a dict kernel with a bfloat16 output comes back as on the CPU (bf16 as float32)."""
    kw = dict(TINY, rows=256, cols=64, **{"kernel.params.bf16": True})
    cpu = pipeline.run(kernel="test_outputs:Dicty", workers=0, device="cpu", **kw)
    gpu = pipeline.run(kernel="test_outputs:Dicty", workers=2, device="cuda", **kw)
    ready = [w for w in gpu.summary["workers"] if w["device"]]  # one may not be up before a short job ends
    assert ready and all(w["device"].startswith("cuda") for w in ready)
    assert outputs.max_rel_diff(gpu.results, cpu.results) < 1e-5
    assert gpu.results[0]["bf16"].dtype == np.float32 and gpu.results[0]["pos"].dtype == bool


@pytest.mark.timeout(90)
def test_several_outputs_to_npz_then_resume(tmp_path):
    """--output writes one .npz per batch with its sha256; a rerun skips all, with a fresh run's checksum."""
    out = tmp_path / "out"
    kw = dict(TINY, kernel="test_outputs:Dicty", output=str(out))
    r = pipeline.run(workers=2, **kw)
    recs = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(n for n in os.listdir(out) if n.startswith("batch-")) == [f"batch-{i:06d}.npz" for i in range(4)]
    for rec in sorted(recs, key=lambda rec: rec["batch"]):
        path = out / rec["file"]
        assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and rec["kind"] == "dict"
        assert list(rec["arrays"]) == ["logits", "emb", "pos", "n"] and rec["arrays"]["emb"]["shape"] == [16]
        with np.load(path, allow_pickle=False) as z:
            assert same(dict(z), r.results[rec["batch"]])
    again = pipeline.run(workers=2, **kw)
    assert again.summary["skipped"] == 4 and again.summary["workers"] == []
    fresh = pipeline.run(workers=0, **dict(TINY, kernel="test_outputs:Dicty"))
    assert again.summary["checksum"] == r.summary["checksum"] == fresh.summary["checksum"]
    assert all(same(a, b) for a, b in zip(again.results, fresh.results))


def test_tuple_results_resume_as_tuples(tmp_path):
    """A tuple kernel's .npz reads back as a tuple in order; a half-done output dir resumes to the same checksum."""
    out = tmp_path / "out"
    kw = dict(TINY, kernel="test_outputs:Dicty", workers=0, output=str(out), **{"kernel.params.as_tuple": True})
    ref = pipeline.run(**kw)
    (out / "batch-000002.npz").unlink()
    again = pipeline.run(**kw)
    assert again.summary["skipped"] == 3 and again.summary["checksum"] == ref.summary["checksum"]
    assert type(again.results[0]) is tuple and all(same(a, b) for a, b in zip(again.results, ref.results))


def test_resume_verifies_without_loading(tmp_path, monkeypatch):
    """Opening an output dir streams each file through sha256 only: restored is indices, load reads one."""
    out = tmp_path / "out"
    ref = pipeline.run(kernel="test_outputs:Dicty", workers=0, output=str(out), **TINY)
    (out / "summary.json").unlink()
    real = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load during verification"))
    ident = json.loads((out / "run.json").read_text())
    d = sinks.OutputDir(str(out), ident)
    try:
        assert d.restored == [0, 1, 2, 3]
        monkeypatch.setattr(np, "load", real)
        assert same(d.load(1), ref.results[1])
    finally:
        d.close()


# -- bad returns end to end ----------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [0, 2])
def test_none_return_fails_naming_batch_and_kernel(workers):
    """A kernel returning None fails the run with a KernelError naming the batch, the kernel and None."""
    with pytest.raises(KernelError) as e:
        pipeline.run(kernel="test_outputs:NoneOn", workers=workers, **{"kernel.params.on": [2]}, **TINY)
    msg = str(e.value)
    assert "kernel 'test_outputs:NoneOn', batch 2: returned None" in msg and outputs.SHOULD in msg
    assert e.value.summary["error"].startswith("KernelError")


@pytest.mark.timeout(90)
def test_cli_none_return_skip_exits_3_fail_exits_1(capsys):
    """CLI: with --on-error skip the bad batch is listed as failed (exit 3); without, exit 1 in one line."""
    argv = ["run", "--kernel", "test_outputs:NoneOn", "--param", "on=[1]", "--workers", "1", "--batches", "3",
            "--rows", "4", "--cols", "4", "--no-progress", "--threads-per-worker", "1", "--json"]
    assert main([*argv, "--on-error", "skip"]) == 3
    s = json.loads(capsys.readouterr().out)
    assert [f["batch"] for f in s["failed"]] == [1] and s["completed"] == 2
    assert s["failed"][0]["cause"].startswith("KernelError: kernel 'test_outputs:NoneOn', batch 1: returned None")
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["error"].startswith("KernelError")
    assert captured.err.count("\n") == 1 and "batch 1: returned None" in captured.err


# -- worker output -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_prints_and_warnings_leave_stdout_to_the_json(workers):
    """run --json with a kernel that prints and warns each batch: stdout parses; stderr has it, warning once."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    p = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--kernel", "test_outputs:Chatty", "--workers", str(workers),
         "--batches", "6", "--rows", "4", "--cols", "4", "--threads-per-worker", "1", "--no-progress", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["completed"] == 6
    for i in range(6):
        assert f"chatty print batch {i}\n" in p.stderr and f"chatty native batch {i}\n" in p.stderr
    busy = [w for w in s["workers"] if w["batches"]]
    assert p.stderr.count("UserWarning: chatty warning batch") == len(busy) >= 1


@pytest.mark.timeout(120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a Linux pty for the progress bar")
def test_worker_prints_go_above_the_progress_bar():
    """With the bar on (stderr a terminal), each worker line clears the bar first and the bar is redrawn."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    p = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "--kernel", "test_outputs:Chatty", "--workers", "2",
         "--batches", "4", "--rows", "4", "--cols", "4", "--threads-per-worker", "1", "--json"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every writer of the terminal is gone
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert p.wait(timeout=100) == 0 and json.loads(p.stdout.read())["completed"] == 4
    p.stdout.close()
    err = b"".join(chunks).decode()
    assert "batch/s]" in err and "4/4" in err  # the bar was drawn, to the end
    for i in range(4):
        assert f"\rchatty print batch {i}\r\n" in err  # on a cleared line, not glued to the bar
    assert "]chatty" not in err and "]/work" not in err


def test_relay_copies_lines_and_drains_on_close(capsys, monkeypatch):
    """The relay prints whole lines per pipe (never mixed), unterminated last ones too, by close's return."""
    relay = outputs.Relay()
    a, b = relay.pipe(), relay.pipe()
    os.write(a.fileno(), b"one from a, ")
    os.write(b.fileno(), b"one from b\ntwo from b")
    os.write(a.fileno(), b"to the end\nthree")
    a.close()
    b.close()
    relay.close()
    assert sorted(capsys.readouterr().err.splitlines()) == ["one from a, to the end", "one from b", "three",
                                                            "two from b"]
    shown = []
    import tqdm
    monkeypatch.setattr(tqdm.tqdm, "write", classmethod(lambda cls, s, file=None, **k: shown.append(s)))
    relay = outputs.Relay()
    relay.bar = tqdm.tqdm(total=1, disable=False, file=sys.stderr)
    w = relay.pipe()
    os.write(w.fileno(), b"above the bar\n")
    w.close()
    relay.close()
    relay.bar.close()
    assert shown == ["above the bar"] and "above the bar" not in capsys.readouterr().err


def test_relay_drain_copies_what_is_written_so_far(capsys, monkeypatch):
    """drain() prints every whole line already in the pipes before it returns, without the pump thread (the
    runner drains before the bar counts a batch: a worker's lines for it come above its tick)."""
    import select as select_module
    real = select_module.select

    def pump_sees_nothing(r, w, x, timeout=None):
        if threading.current_thread().name == "pipeline-relay":
            time.sleep(0.01)
            return [], [], []
        return real(r, w, x, timeout)
    monkeypatch.setattr(outputs.select, "select", pump_sees_nothing)
    relay = outputs.Relay()
    w = relay.pipe()
    os.write(w.fileno(), b"batch 0 says hi\nbatch 1 says")
    relay.drain()
    assert capsys.readouterr().err == "batch 0 says hi\n"  # the unterminated rest waits for its newline
    relay.drain()  # nothing new: no output, no blocking read
    assert capsys.readouterr().err == ""
    os.write(w.fileno(), b" bye\n")
    relay.drain()
    assert capsys.readouterr().err == "batch 1 says bye\n"
    w.close()
    monkeypatch.setattr(outputs.select, "select", real)
    relay.close()
    assert capsys.readouterr().err == ""


@pytest.mark.timeout(90)
def test_dying_workers_last_words_are_printed(capsys):
    """What a worker writes to stderr just before it dies (os._exit) reaches the main's stderr."""
    r = pipeline.run(kernel="test_outputs:LastWords", workers=2, **TINY)
    assert r.summary["completed"] == 4 and len(r.summary["restarts"]) == 1
    assert "last words of batch 1" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_bench_compares_several_outputs_with_serial(capsys):
    """bench with a dict kernel: the pipeline agrees with serial (structures compared array by array)."""
    assert main(["bench", "--quick", "--kernel", "test_outputs:Dicty", "--modes", "serial,pipeline",
                 "--workers-list", "1", "--no-progress"]) == 0
    assert "disagrees" not in capsys.readouterr().err
