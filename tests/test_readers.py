"""File input: .npy (memory-mapped slices), .npz (one array), a directory of .npy files; bad files refused."""
import numpy as np
import pytest

import pipeline
from pipeline.cli import main
from pipeline.config import SourceConfig
from pipeline.sources.arrays import NpyDir, NpyFile, NpzArray
from pipeline.sources.factory import open_source
from pipeline.runner import resolve

QUIET = dict(progress=False, threads_per_worker=1)


def batches(src) -> list:
    return [b.array() for b in src]


def grid(rows=10, cols=3, dtype="float32"):
    return (np.arange(rows * cols) % 97).astype(dtype).reshape(rows, cols)


def open_path(path, rows=4, key=""):
    return open_source(SourceConfig(kind="npy", path=str(path), rows=rows, key=key))


def test_npy_slices_of_rows_last_shorter(tmp_path):
    """A .npy is read as consecutive slices of `rows` along axis 0; the last one is shorter."""
    a = grid(10, 3)
    np.save(tmp_path / "a.npy", a)
    src = open_path(tmp_path / "a.npy", rows=4)
    assert isinstance(src, NpyFile) and len(src) == 3 and src.max_nbytes == 4 * 3 * 4
    got = batches(src)
    assert [g.shape for g in got] == [(4, 3), (4, 3), (2, 3)]
    assert np.array_equal(np.concatenate(got), a)
    assert [b.nbytes for b in src] == [48, 48, 24] and [b.index for b in src] == [0, 1, 2]


def test_npy_is_memory_mapped(tmp_path, monkeypatch):
    """The .npy is opened with mmap_mode='r' and allow_pickle=False."""
    np.save(tmp_path / "a.npy", grid())
    seen = []
    real = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: seen.append(k) or real(*a, **k))
    batches(open_path(tmp_path / "a.npy"))
    assert seen and all(k == {"mmap_mode": "r", "allow_pickle": False} for k in seen)


@pytest.mark.parametrize("dtype", ["float32", ">f8", "<f2", ">i4", "int8", "uint8", "int16", ">u2", "int64",
                                   "bool", "complex64"])
@pytest.mark.parametrize("fortran", [False, True])
def test_numeric_dtypes_orders_and_byte_orders(tmp_path, dtype, fortran):
    """Any numeric dtype, C or Fortran order, either byte order: batches are native and equal the data."""
    a = grid(7, 5, dtype)
    a = np.asfortranarray(a) if fortran else a
    np.save(tmp_path / "a.npy", a)
    src = open_path(tmp_path / "a.npy", rows=3)
    got = batches(src)
    assert all(g.dtype.isnative and g.dtype == np.dtype(dtype).newbyteorder("=") for g in got)
    assert all(g.flags.c_contiguous for g in got)
    assert np.array_equal(np.concatenate(got), a)


def test_get_matches_iteration(tmp_path):
    """get(i) (used by bench's DataLoader mode) gives the same arrays as iterating."""
    np.save(tmp_path / "a.npy", grid(9, 2, ">f4"))
    src = open_path(tmp_path / "a.npy", rows=4)
    assert all(np.array_equal(src.get(i), b) for i, b in enumerate(batches(src)))


def test_one_dimensional_and_three_dimensional(tmp_path):
    """Axis 0 is the batch axis whatever the rank: 1-D and 3-D arrays slice along it."""
    np.save(tmp_path / "v.npy", np.arange(5.0))
    np.save(tmp_path / "t.npy", np.ones((5, 2, 3), np.float32))
    assert [b.layout.shapes[0] for b in open_path(tmp_path / "v.npy", rows=2)] == [(2,), (2,), (1,)]
    assert [b.layout.shapes[0] for b in open_path(tmp_path / "t.npy", rows=4)] == [(4, 2, 3), (1, 2, 3)]


def test_npz_with_key_and_single_array(tmp_path):
    """A .npz: the array named by --input-key; with exactly one array the key may be omitted."""
    a, b = grid(6, 2), grid(5, 4, "int32")
    np.savez(tmp_path / "two.npz", a=a, b=b)
    np.savez_compressed(tmp_path / "one.npz", only=b)
    src = open_path(tmp_path / "two.npz", rows=2, key="b")
    assert isinstance(src, NpzArray) and src.key == "b" and len(src) == 3
    assert np.array_equal(np.concatenate(batches(src)), b)
    one = open_path(tmp_path / "one.npz", rows=10)
    assert one.key == "only" and np.array_equal(batches(one)[0], b)


def test_directory_one_batch_per_file_sorted(tmp_path):
    """A directory: each .npy file is a batch, in name order; other and hidden files are ignored."""
    d = tmp_path / "in"
    d.mkdir()
    arrays = {"b.npy": grid(3, 2), "a.npy": grid(4, 2, ">f4"), "c.npy": grid(2, 5, "int16")}
    for name, a in arrays.items():
        np.save(d / name, a)
    (d / "notes.txt").write_text("not data")
    (d / ".hidden.npy").write_text("not data either")
    src = open_path(d, rows=1)  # rows is ignored for a directory
    assert isinstance(src, NpyDir) and len(src) == 3
    got = batches(src)
    for g, name in zip(got, ["a.npy", "b.npy", "c.npy"]):
        assert np.array_equal(g, arrays[name]) and g.dtype.isnative
    assert src.max_nbytes == max(a.nbytes for a in arrays.values())


def test_input_implies_npy_kind():
    """Setting input (source.path) turns the synthetic default into the npy reader."""
    cfg = resolve(None, {"input": "x.npy"})
    assert cfg.source.kind == "npy" and cfg.source.path == "x.npy"
    assert resolve(None, {}).source.kind == "synthetic"


def test_run_on_npy_serial_results_and_bytes_in(tmp_path):
    """run(input=...) computes every slice: results equal numpy's, bytes_in is the file's data size."""
    a = grid(10, 3, ">f8")
    np.save(tmp_path / "a.npy", np.asfortranarray(a))
    r = pipeline.run(input=str(tmp_path / "a.npy"), kernel="sum", workers=0, rows=4, batches=99, **QUIET)
    assert r.summary["batches"] == 3 and r.summary["bytes_in"] == a.nbytes
    assert np.allclose(np.concatenate(r.results), a.sum(1))
    assert r.summary["config"]["source"]["kind"] == "npy"


@pytest.mark.timeout(90)
def test_run_on_files_with_workers_matches_serial(tmp_path):
    """Two workers over a big-endian Fortran .npy and over a directory give the serial checksums."""
    np.save(tmp_path / "a.npy", np.asfortranarray(grid(20, 6, ">f4")))
    d = tmp_path / "d"
    d.mkdir()
    for i in range(3):
        np.save(d / f"{i}.npy", grid(4 + i, 6, "int32"))
    for path in (tmp_path / "a.npy", d):
        serial = pipeline.run(input=str(path), kernel="sum", workers=0, rows=8, **QUIET)
        par = pipeline.run(input=str(path), kernel="sum", workers=2, rows=8, **QUIET)
        assert par.summary["checksum"] == serial.summary["checksum"]
        assert par.summary["bytes_in"] == serial.summary["bytes_in"] > 0


def test_source_and_input_together_refused(tmp_path):
    """Both source= and input= is a ConfigError."""
    with pytest.raises(pipeline.ConfigError, match="not both"):
        pipeline.run(source=[np.ones((2, 2))], input="x.npy", kernel="sum", workers=0, progress=False)


def _truncated(p):
    np.save(p, grid(100, 10))
    p.write_bytes(p.read_bytes()[:500])


BAD = [
    ("missing.npy", None, "", "no such file or directory"),
    ("empty.npy", lambda p: np.save(p, np.zeros((0, 4), np.float32)), "", "empty array (shape (0, 4))"),
    ("scalar.npy", lambda p: np.save(p, np.float32(3)), "", "0-d array"),
    ("text.npy", lambda p: p.write_text("hello, I am not an array\n"), "", "not a .npy file"),
    ("zero.npy", lambda p: p.write_bytes(b""), "", "not a .npy file"),
    ("objects.npy", lambda p: np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True), "",
     "object array"),
    ("strings.npy", lambda p: np.save(p, np.array(["a", "b"])), "", "not numeric"),
    ("records.npy", lambda p: np.save(p, np.zeros(3, dtype=[("x", "f4"), ("y", "i4")])), "", "not numeric"),
    ("cut.npy", _truncated, "", "truncated"),
    ("two.npz", lambda p: np.savez(p, a=grid(), b=grid()), "", "holds 2 arrays (a, b): choose one with --input-key"),
    ("two.npz", lambda p: np.savez(p, a=grid(), b=grid()), "c", "no array 'c' (arrays: a, b)"),
    ("objs.npz", lambda p: np.savez(p, o=np.array([None], dtype=object)), "", "object array"),
    ("fake.npz", lambda p: p.write_text("not a zip"), "", "not a .npz file"),
    ("plain.npy", lambda p: np.save(p, grid()), "k", "--input-key 'k' is only for .npz files"),
    ("emptydir", lambda p: p.mkdir(), "", "the directory has no .npy files"),
    ("keydir", lambda p: p.mkdir(), "k", "--input-key 'k' is only for .npz files, not a directory"),
    ("baddir", lambda p: (p.mkdir(), np.save(p / "a.npy", grid()), (p / "b.npy").write_text("x")), "",
     "b.npy: not a .npy file"),
]


@pytest.mark.parametrize("name, make, key, fragment", BAD, ids=[f"{b[0]}-{b[3][:16]}" for b in BAD])
def test_bad_input_is_a_config_error_naming_the_file(tmp_path, name, make, key, fragment):
    """Every bad input is a ConfigError at open time whose one-line message names the file and the problem."""
    p = tmp_path / name
    if make:
        make(p)
    with pytest.raises(pipeline.ConfigError) as e:
        open_path(p, key=key)
    msg = str(e.value)
    assert fragment in msg and str(p) in msg and "\n" not in msg


def test_object_array_never_unpickled(tmp_path, monkeypatch):
    """An object .npy is refused from its header: pickle.loads is never called."""
    import pickle
    np.save(tmp_path / "o.npy", np.array([object()], dtype=object), allow_pickle=True)
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(pipeline.ConfigError, match="never unpickles"):
        open_path(tmp_path / "o.npy")


def test_npy_kind_without_path():
    """source.kind = 'npy' without a path says to give --input."""
    with pytest.raises(pipeline.ConfigError, match="needs source.path"):
        open_source(SourceConfig(kind="npy"))


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.write_text("nope"), "not a .npy file"),
    (lambda p: np.save(p, np.array([None], dtype=object), allow_pickle=True), "object array"),
])
def test_cli_bad_input_exit_2_one_line(tmp_path, capsys, make, fragment):
    """On the command line a bad --input exits 2 with one line naming the file, no traceback."""
    p = tmp_path / "x.npy"
    make(p)
    assert main(["run", "--input", str(p), "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert fragment in err and str(p) in err and "Traceback" not in err and err.count("\n") == 1


def test_cli_input_and_key(tmp_path, capsys):
    """--input FILE.npz --input-key KEY runs on that array."""
    np.savez(tmp_path / "d.npz", x=grid(6, 2), y=grid(4, 2))
    rc = main(["run", "--input", str(tmp_path / "d.npz"), "--input-key", "y", "--rows", "3", "--kernel", "sum",
               "--workers", "0", "--no-progress", "--json"])
    import json
    s = json.loads(capsys.readouterr().out)
    assert rc == 0 and s["batches"] == 2 and s["config"]["source"]["key"] == "y"
