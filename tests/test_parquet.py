"""Parquet in (columns, lists, batches across row groups and files, bad tables) and out (parts, manifest,
resume, keep-columns, pyarrow.dataset), a pyarrow.Table as source, the missing [parquet] extra."""
import builtins
import json
import os
import pickle
import sys

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install -e '.[parquet]')")
import pyarrow.dataset as ds  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import pipeline  # noqa: E402
from pipeline.cli import main  # noqa: E402
from pipeline.config import SourceConfig  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from pipeline.sources.factory import open_source
from pipeline.sources.parquet import is_parquet  # noqa: E402
from pipeline.runner import resolve  # noqa: E402

QUIET = dict(progress=False, threads_per_worker=1)
N = 50


def vectors(values, d):
    return pa.FixedSizeListArray.from_arrays(pa.array(values), d)


def table(n=N, start=0):
    i = np.arange(start, start + n)
    return pa.table({"id": i, "x": (i * 0.5).astype(np.float32), "flag": i % 3 == 0,
                     "v": vectors(np.arange(start * 4, (start + n) * 4, dtype=np.float32), 4),
                     "name": [f"row{k}" for k in i]})


def write(path, t, row_group_size=7):
    pq.write_table(t, path, row_group_size=row_group_size)
    return str(path)


def two_files(tmp_path):
    """50 rows in two files (30 + 20), row groups of 7: batches cross both kinds of boundary."""
    d = tmp_path / "in"
    d.mkdir()
    write(d / "a.parquet", table(30))
    write(d / "b.parquet", table(20, start=30))
    return d


def src(path, **kw):
    return open_source(SourceConfig(kind="parquet", path=str(path), **kw))


def rows(source) -> dict:
    got = [b.array() for b in source]
    return {k: np.concatenate([g[k] for g in got]) for k in got[0]}


def test_kind_follows_the_input_path(tmp_path):
    """--input of a .parquet file, a directory of them or a glob is Parquet; a .npy stays npy."""
    d = two_files(tmp_path)
    np.save(tmp_path / "a.npy", np.zeros((2, 2)))
    assert is_parquet(str(d)) and is_parquet(str(d / "a.parquet")) and is_parquet(str(d / "*.parquet"))
    assert resolve(None, {"input": str(d)}).source.kind == "parquet"
    assert resolve(None, {"input": str(tmp_path / "a.npy")}).source.kind == "npy"


def test_default_columns_and_shapes(tmp_path):
    """Default: every numeric, bool and fixed-size-list column (not strings); numbers (B,), lists (B, D)."""
    s = src(two_files(tmp_path), batch_size=8)
    b = s.batch(0).array()
    assert list(b) == ["id", "x", "flag", "v"] and len(s) == 7
    assert b["id"].shape == (8,) and b["v"].shape == (8, 4) and b["flag"].dtype == np.bool_
    assert b["v"].dtype == np.float32 and s.batch(6).array()["id"].shape == (2,)


def test_batches_cross_row_groups_and_files(tmp_path):
    """Batches of 8 rows over row groups of 7 and two files read every row once, in order."""
    got = rows(src(two_files(tmp_path), batch_size=8))
    want = pa.concat_tables([table(30), table(20, start=30)])
    assert np.array_equal(got["id"], np.arange(N))
    assert np.array_equal(got["v"], np.arange(N * 4, dtype=np.float32).reshape(N, 4))
    assert np.array_equal(got["flag"], want.column("flag").to_numpy())


def test_column_selection_and_glob(tmp_path):
    """--columns picks columns in their order; a glob picks files (sorted)."""
    d = two_files(tmp_path)
    got = rows(src(d / "*.parquet", columns=["v", "id"], batch_size=16))
    assert list(got) == ["v", "id"] and np.array_equal(got["id"], np.arange(N))


def test_list_columns_of_equal_length(tmp_path):
    """A variable-size list column whose rows all have D values is (B, D); a nested fixed list is 3-D."""
    t = pa.table({"l": pa.array([[i, i + 1, i + 2] for i in range(10)], pa.list_(pa.int32())),
                  "m": vectors(vectors(np.arange(40, dtype=np.float64), 2), 2)})
    got = rows(src(write(tmp_path / "l.parquet", t, 4), batch_size=3, columns=["l", "m"]))
    assert got["l"].shape == (10, 3) and got["l"].dtype == np.int32 and got["l"][4].tolist() == [4, 5, 6]
    assert got["m"].shape == (10, 2, 2) and got["m"][1, 1, 0] == 6


def test_the_source_pickles_small_and_rereads(tmp_path):
    """The source pickles without its open files or cache and reads the same batches where it lands."""
    s = src(two_files(tmp_path), batch_size=8)
    s.batch(0).array()
    blob = pickle.dumps(s)
    assert len(blob) < 4000
    again = pickle.loads(blob)
    assert np.array_equal(again.batch(3).array()["v"], s.batch(3).array()["v"])


def test_a_row_group_is_read_once_for_consecutive_batches(tmp_path, monkeypatch):
    """Consecutive batches in one row group read it once (the cache of row groups)."""
    t = table(40)
    s = src(write(tmp_path / "a.parquet", t, 40), batch_size=5)
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, *a, **k: reads.append(a) or real(self, *a, **k))
    rows(s)
    assert len(reads) == 1


@pytest.mark.timeout(240)
def test_same_results_serial_threads_processes_workers(tmp_path):
    """Serial, build threads, build processes and workers give the checksum of the serial run."""
    d = str(two_files(tmp_path))
    base = dict(input=d, batch_size=8, kernel="sum", **QUIET)
    ref = pipeline.run(workers=0, **base).summary["checksum"]
    for kw in (dict(workers=1, build_threads=3), dict(workers=1, build_processes=1), dict(workers=2)):
        assert pipeline.run(**kw, **base).summary["checksum"] == ref, kw


BAD_META = [
    ("string column", dict(columns=["name"]), "column 'name': string is not numeric"),
    ("missing column", dict(columns=["nope"]), "no column 'nope'"),
    ("missing keep column", dict(keep_columns=["nope"]), "no column 'nope' (--keep-columns)"),
]


@pytest.mark.parametrize("what,kw,message", BAD_META, ids=[b[0] for b in BAD_META])
def test_bad_columns_are_config_errors(tmp_path, what, kw, message):
    """A string, binary or missing column is a ConfigError naming the file and the column."""
    with pytest.raises(ConfigError, match="a.parquet") as e:
        src(two_files(tmp_path), **kw)
    assert message in str(e.value)


def test_files_with_different_schemas(tmp_path):
    """Files whose selected columns differ in type (or are missing) are refused, naming both files."""
    d = tmp_path / "in"
    d.mkdir()
    write(d / "a.parquet", table(10))
    write(d / "b.parquet", table(10).set_column(1, "x", pa.array(np.arange(10))))
    with pytest.raises(ConfigError, match=r"b.parquet: column 'x' is int64 there but float in .*a.parquet"):
        src(d, columns=["x"])
    write(d / "b.parquet", table(10).drop_columns(["x"]))
    with pytest.raises(ConfigError, match=r"b.parquet: its numeric columns"):
        src(d)


@pytest.mark.parametrize("damage", ["truncated", "not parquet"])
def test_corrupt_or_truncated_file_exits_2(tmp_path, damage, capsys):
    """A truncated file, or one that is no Parquet: exit 2, one line naming the file; nothing unpickled."""
    p = tmp_path / "a.parquet"
    write(p, table(10))
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2] if damage == "truncated" else pickle.dumps({"x": 1}))
    assert main(["run", "--input", str(p), "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a.parquet: not a readable Parquet file" in err


@pytest.mark.parametrize("case", ["null", "null in list"])
def test_data_problems_fail_that_batch_under_on_error(tmp_path, case):
    """A null list row fails its batch (SampleError naming file, column and row); skip goes on. (List rows of
    other lengths are samples of their own length: tests/test_sequences.py.)"""
    values = [[float(i)] * 3 for i in range(12)]
    if case == "null":
        values[9] = None
    else:
        values[9] = [1.0, None, 2.0]
    p = write(tmp_path / "a.parquet", pa.table({"l": pa.array(values, pa.list_(pa.float32()))}), 5)
    with pytest.raises(Exception, match=r"a.parquet: column 'l', row 9 \(batch 2\)"):
        pipeline.run(input=p, columns=["l"], batch_size=4, workers=0, kernel="sum", **QUIET)
    r = pipeline.run(input=p, columns=["l"], batch_size=4, workers=0, kernel="sum", on_error="skip", **QUIET)
    assert [f["batch"] for f in r.summary["failed"]] == [2] and r.summary["completed"] == 2
    assert "SampleError" in r.summary["failed"][0]["cause"]


@pytest.mark.timeout(120)
def test_data_problem_with_workers_fails_only_that_batch(tmp_path):
    """With workers and build threads, the null's batch fails under on_error = skip; the others complete."""
    x = pa.array([float(i) if i != 13 else None for i in range(20)], pa.float64())
    p = write(tmp_path / "a.parquet", pa.table({"x": x}), 6)
    r = pipeline.run(input=p, batch_size=4, workers=1, kernel="sum", on_error="skip", **QUIET)
    assert [f["batch"] for f in r.summary["failed"]] == [3] and "row 13" in r.summary["failed"][0]["cause"]


def test_keep_columns_need_parquet_in_and_out(tmp_path, capsys):
    """--keep-columns without Parquet output, or with .npy input: exit 2 with one line."""
    d = str(two_files(tmp_path))
    np.save(tmp_path / "a.npy", np.zeros((4, 2), np.float32))
    out = str(tmp_path / "out")
    assert main(["run", "--input", d, "--keep-columns", "name", "--workers", "0", "--no-progress"]) == 2
    assert "--output-format parquet" in capsys.readouterr().err
    assert main(["run", "--input", str(tmp_path / "a.npy"), "--keep-columns", "name", "--output", out,
                 "--output-format", "parquet", "--workers", "0", "--no-progress"]) == 2
    assert "is for Parquet input" in capsys.readouterr().err


def manifest(out):
    return [json.loads(line) for line in (out / "_manifest.jsonl").read_text().splitlines()]


def test_parquet_out_reads_back_as_one_table(tmp_path):
    """One part per batch; the manifest has each file's sha256; pyarrow.dataset reads DIR as one table."""
    import hashlib
    out = tmp_path / "out"
    r = pipeline.run(input=str(two_files(tmp_path)), columns=["v", "x"], batch_size=16, workers=0,
                     kernel="sum", output=str(out), output_format="parquet", keep_columns=["id", "name"],
                     **QUIET)
    names = sorted(os.listdir(out))
    assert names == ["_manifest.jsonl", "_run.json", "_summary.json"] + [f"part-{i:06d}.parquet" for i in range(4)]
    for rec in manifest(out):
        assert rec["sha256"] == hashlib.sha256((out / rec["file"]).read_bytes()).hexdigest()
    t = ds.dataset(str(out)).to_table()
    assert t.column_names == ["v", "x", "id", "name"] and t.num_rows == N
    assert t.column("id").to_pylist() == list(range(N)) and t.column("name")[7].as_py() == "row7"
    assert np.allclose(t.column("v").to_numpy(), np.concatenate([b["v"] for b in r.results]))
    assert json.loads((out / "_run.json").read_text())["output"] == {"format": "parquet",
                                                                    "keep_columns": ["id", "name"]}


def test_output_names_and_2d_outputs(tmp_path):
    """A single array output is column 'output'; a tuple's are '0', '1'; a 2-D output is a fixed-size list."""
    p = write(tmp_path / "a.parquet", pa.table({"x": np.arange(12, dtype=np.float32)}), 5)

    def two(batch):
        x = batch["x"]
        return x * 2, np.stack([x, x + 1], axis=1)

    def one(batch):
        return batch["x"] + 1

    for kernel, columns in ((one, ["output"]), (two, ["0", "1"])):
        out = tmp_path / f"out-{kernel.__name__}"
        r = pipeline.run(input=p, batch_size=5, workers=0, kernel=kernel, output=str(out),
                         output_format="parquet", **QUIET)
        t = ds.dataset(str(out)).to_table()
        assert t.column_names == columns and t.num_rows == 12
        again = pipeline.run(input=p, batch_size=5, workers=0, kernel=kernel, output=str(out),
                             output_format="parquet", **QUIET)
        assert again.summary["skipped"] == 3 and again.summary["checksum"] == r.summary["checksum"]
    assert pa.types.is_fixed_size_list(t.schema.field("1").type)


def test_resume_after_a_partial_run(tmp_path):
    """After a run that wrote some parts (a part lost, a temp file left), a rerun computes only the rest;
    the results and checksum equal an uninterrupted run's."""
    d, out = str(two_files(tmp_path)), tmp_path / "out"
    kw = dict(input=d, batch_size=8, workers=0, kernel="sum", output=str(out), output_format="parquet",
              keep_columns=["name"], **QUIET)
    full = pipeline.run(**kw)
    os.unlink(out / "part-000003.parquet")
    (out / "part-000005.parquet").write_bytes(b"torn")
    (out / ".tmp-1-part-000006.parquet").write_bytes(b"half")
    (out / "_summary.json").unlink()
    again = pipeline.run(**kw)
    assert again.summary["skipped"] == 5 and again.summary["checksum"] == full.summary["checksum"]
    assert all(np.array_equal(a["v"], b["v"]) for a, b in zip(full.results, again.results))
    assert not any(n.startswith(".tmp-") for n in os.listdir(out))
    assert ds.dataset(str(out)).to_table().column("name").to_pylist() == [f"row{i}" for i in range(N)]


def test_other_format_or_keep_columns_is_refused(tmp_path):
    """An output DIR written as npy is refused for --output-format parquet (and other keep-columns too)."""
    d, out = str(two_files(tmp_path)), tmp_path / "out"
    kw = dict(input=d, batch_size=16, workers=0, kernel="sum", output=str(out), **QUIET)
    pipeline.run(**kw)
    with pytest.raises(ConfigError, match="--output-format npy"):
        pipeline.run(output_format="parquet", **kw)
    pipeline.run(output_format="parquet", overwrite=True, **kw)
    assert not (out / "run.json").exists() and (out / "_run.json").exists()
    with pytest.raises(ConfigError, match="keep_columns"):
        pipeline.run(output_format="parquet", keep_columns=["id"], columns=["v"], **kw)


def test_cli_parquet_in_and_out(tmp_path, capsys):
    """The command line: --input DIR --columns --batch-size --output --output-format --keep-columns."""
    d, out = str(two_files(tmp_path)), tmp_path / "out"
    assert main(["run", "--input", d, "--columns", "v,x", "--batch-size", "10", "--workers", "0",
                 "--kernel", "sum", "--output", str(out), "--output-format", "parquet",
                 "--keep-columns", "id", "--no-progress", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["batches"] == 5 and s["config"]["source"]["columns"] == ["v", "x"]
    assert ds.dataset(str(out)).to_table().num_rows == N


def test_a_pyarrow_table_as_source(tmp_path):
    """A pyarrow Table given as source= is map-style: batches of its columns, as from the same file."""
    t = table(30)
    p = write(tmp_path / "a.parquet", t)
    from_file = pipeline.run(input=p, batch_size=8, workers=0, kernel="sum", **QUIET)
    from_table = pipeline.run(source=t, batch_size=8, workers=0, kernel="sum", **QUIET)
    assert from_table.summary["checksum"] == from_file.summary["checksum"]
    picked = pipeline.run(source=t, columns=["v"], workers=0, kernel="sum", **QUIET)
    assert list(picked.results[0]) == ["v"] and picked.results[0]["v"].shape == (30,)
    with pytest.raises(ConfigError, match="column 'name': string is not numeric"):
        pipeline.run(source=t, columns=["name"], workers=0, **QUIET)


def test_without_pyarrow_names_the_extra(tmp_path, monkeypatch, capsys):
    """Without pyarrow, a Parquet input exits 2 naming the [parquet] extra."""
    p = write(tmp_path / "a.parquet", table(5))
    real = builtins.__import__

    def no_pyarrow(name, *a, **k):
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    for m in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.delitem(sys.modules, m)
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    assert main(["run", "--input", p, "--workers", "0", "--no-progress"]) == 2
    assert "pip install -e '.[parquet]'" in capsys.readouterr().err


@pytest.mark.ray_daemons
@pytest.mark.timeout(300)
def test_ray_backend_parquet_in_and_out(tmp_path):
    """--backend ray reads Parquet and writes Parquet parts with the local backend's checksum."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    from conftest import local_ray
    d = str(two_files(tmp_path))
    kw = dict(input=d, batch_size=16, kernel="sum", output_format="parquet", keep_columns=["id"], **QUIET)
    ref = pipeline.run(workers=0, output=str(tmp_path / "local"), **kw).summary["checksum"]
    with local_ray(2):
        r = pipeline.run(workers=1, backend="ray", output=str(tmp_path / "ray"), **kw)
    assert r.summary["checksum"] == ref
    assert ds.dataset(str(tmp_path / "ray")).to_table().column("id").to_pylist() == list(range(N))
