"""Samples of their own length: ragged fields padded per batch, plans (order = "length", token budgets),
results back in input order, out-of-memory splits, output parts with sample indices, Parquet list columns."""
import json
import re

import numpy as np
import pytest
import torch

import pipeline
from pipeline.cli import main
from pipeline.errors import ConfigError, KernelError, SampleError
from pipeline.sources.datasets import MapSource
from pipeline.sources.plan import Sequences, make_plan

FAST = dict(progress=False, threads_per_worker=1)


class Docs(torch.utils.data.Dataset):
    """``n`` samples ``{"ids": int64 (L,), "mask": int8 (L,), "doc": int64}`` of lengths 1..``top``; with
    ``lengths()`` unless ``known`` is False; a few samples broken on request."""

    def __init__(self, n=60, top=40, known=True, empty_at=-1, float_at=-1, axis_at=-1, lie_at=-1, seed=0):
        self.L = np.random.default_rng(seed).integers(1, top, n)
        self.known, self.empty_at, self.float_at, self.axis_at, self.lie_at = known, empty_at, float_at, axis_at, lie_at

    def __len__(self):
        return len(self.L)

    def __getitem__(self, i):
        n = 0 if i == self.empty_at else int(self.L[i]) + (1 if i == self.lie_at else 0)
        ids = np.arange(1, n + 1, dtype=np.float32 if i == self.float_at else np.int64)
        if i == self.axis_at:
            ids = ids[:, None]
        return {"ids": ids, "mask": np.ones(n, np.int8), "doc": np.int64(i)}

    def lengths(self):
        if not self.known:
            raise AttributeError("lengths")  # (never called: see __getattribute__)
        return self.L

    def __getattribute__(self, name):
        if name == "lengths" and not object.__getattribute__(self, "known"):
            raise AttributeError(name)
        return object.__getattribute__(self, name)


def sums(b):
    """Per row: the sum of its real ids, its length and its sample number (row-aligned outputs)."""
    return {"s": (b["ids"] * b["mask"]).sum(1), "n": b["lengths"], "doc": b["doc"]}


def sums_widths(b):
    return {**sums(b), "w": torch.full_like(b["doc"], b["ids"].shape[1])}


def oom_above_40(b):
    """Runs out of 'device memory' above 40 rows x length (the CPU stands in for a GPU)."""
    if b["ids"].shape[0] * b["ids"].shape[1] > 40:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
    return sums(b)


def one_per_batch(b):
    return b["ids"].sum()


def joined(results):
    return {k: np.concatenate([r[k] for r in results]) for k in results[0]}


def test_ragged_fields_are_found_padded_per_batch_and_given_their_lengths():
    ds = Docs(n=30)
    r = pipeline.run(source=ds, kernel=sums_widths, batch_size=8, workers=0, pad_values={"mask": 0}, **FAST)
    out = joined(r.results)
    assert np.array_equal(out["n"], ds.L) and np.array_equal(out["doc"], np.arange(30))
    assert np.array_equal(out["s"], ds.L * (ds.L + 1) // 2)  # the padding (0) adds nothing
    widths = [int(x["w"][0]) for x in r.results]
    assert widths == [-(-int(ds.L[k * 8:k * 8 + 8].max()) // 8) * 8 for k in range(4)]  # own longest, x8
    seq = r.summary["sequences"]
    assert seq["fields"] == ["ids", "mask"] and seq["real_tokens"] == int(ds.L.sum())
    assert seq["padded_tokens"] == sum(w * len(x["n"]) for w, x in zip(widths, r.results))


def test_a_single_array_sample_becomes_padded_and_lengths():
    ds = [np.arange(n, dtype=np.float32) for n in (3, 9, 1, 4, 12)]
    got = []
    r = pipeline.run(source=ds, kernel=lambda b: (b[0].sum(1), b[1]), batch_size=2, workers=0, pad_multiple=1,
                     **FAST)
    for s, n in r.results:
        got += list(n)
    assert got == [3, 9, 1, 4, 12]


@pytest.mark.timeout(180)
def test_order_length_groups_by_length_and_gives_results_in_input_order():
    ds = Docs(n=200, top=60)
    base = pipeline.run(source=ds, kernel=sums, batch_size=8, workers=0, **FAST)
    srt = pipeline.run(source=ds, kernel=sums, batch_size=8, workers=2, order="length", **FAST)
    assert srt.summary["checksum"] == base.summary["checksum"]  # same rows, same results, input order
    assert len(srt.results) == len(base.results) == 25
    for a, b in zip(base.results, srt.results):
        assert np.array_equal(a["doc"], b["doc"]) and np.array_equal(a["s"], b["s"])
    assert srt.summary["sequences"]["padding_share"] < base.summary["sequences"]["padding_share"] / 3
    budget = pipeline.run(source=ds, kernel=sums, max_tokens=128, workers=2, order="length", build_processes=1,
                          **FAST)
    assert len(budget.results) == 1  # a budget alone: results of RESULT_ROWS (256) samples
    assert np.array_equal(joined(budget.results)["s"], joined(base.results)["s"])
    with pipeline.imap(source=ds, kernel=sums, batch_size=8, workers=2, order="length", ordered=False,
                       **FAST) as s:
        seen = {i: r for i, r in s}
    assert sorted(seen) == list(range(25)) and all(np.array_equal(seen[i]["doc"], base.results[i]["doc"])
                                                   for i in seen)


def test_plans_cut_by_budget_and_cap_and_are_deterministic():
    L = np.random.default_rng(1).lognormal(3.5, 0.8, 5000).astype(np.int64).clip(5, 512)
    seq = Sequences(max_tokens=2048, order="length")
    plan = make_plan(L, seq, 64)
    assert sorted(plan.order.tolist()) == list(range(5000))  # every sample once
    for k in range(plan.n):
        rows, w = plan.rows(k), int(plan.widths[k])
        assert rows <= 64 and w % 8 == 0 and w >= L[plan.ids(k)].max()
        assert rows * w <= 2048 or rows == 1
    again = make_plan(L, seq, 64)
    assert np.array_equal(plan.order, again.order) and np.array_equal(plan.starts, again.starts)
    capped = make_plan(L, Sequences(max_length=100, order="length"), 32)
    assert capped.widths.max() == 100


@pytest.mark.timeout(180)
def test_the_same_batches_for_any_workers_build_processes_and_retries(tmp_path):
    ds = Docs(n=120)
    kw = dict(source=ds, kernel=sums, max_tokens=96, batch_size=16, order="length")
    ref = pipeline.run(workers=0, **kw, **FAST).summary["checksum"]
    assert pipeline.run(workers=2, **kw, **FAST).summary["checksum"] == ref
    assert pipeline.run(workers=1, build_processes=1, **kw, **FAST).summary["checksum"] == ref


def test_order_length_needs_lengths_and_says_which_method():
    with pytest.raises(ConfigError, match=r"lengths\(\) method .*'ids', 'mask'"):
        pipeline.run(source=Docs(known=False), kernel=sums, batch_size=4, order="length", workers=0, **FAST)
    # order = input without lengths: each batch padded apart, then copied into its slot
    r = pipeline.run(source=Docs(n=20, known=False), kernel=sums, batch_size=4, workers=0, **FAST)
    assert np.array_equal(joined(r.results)["n"], Docs(n=20).L)


@pytest.mark.parametrize("bad, match", [
    (dict(empty_at=5), r"sample 5 \(batch \d+\), field 'ids': length 0; .*drop it"),
    (dict(float_at=5), r"sample 5 \(batch \d+\), field 'ids': dtype float32 where sample 0 had int64; cast"),
    (dict(axis_at=5), r"sample 5 \(batch \d+\), field 'ids': shape \(\d+, 1\) where a ragged field's samples"),
    (dict(lie_at=5), r"sample 5 \(batch \d+\): lengths\(\) says \d+ but its ragged fields have \d+ values"),
])
def test_a_bad_sample_is_one_line_naming_sample_field_and_fix(bad, match):
    with pytest.raises(SampleError, match=match) as e:
        pipeline.run(source=Docs(n=20, **bad), kernel=sums, batch_size=4, workers=0, order="length", **FAST)
    assert "\n" not in str(e.value)


def test_over_max_length_is_cut_and_counted_or_fails():
    ds = Docs(n=20, top=40)
    r = pipeline.run(source=ds, kernel=sums, batch_size=4, max_length=16, workers=0, **FAST)
    assert r.summary["sequences"]["truncated"] == int((ds.L > 16).sum()) > 0
    assert np.array_equal(joined(r.results)["n"], np.minimum(ds.L, 16))
    with pytest.raises(SampleError, match=r"sample \d+ \(batch \d+\): length \d+ is over max_length 16 "
                                          r"\(on_long = 'fail'\)"):
        pipeline.run(source=ds, kernel=sums, batch_size=4, max_length=16, on_long="fail", workers=0, **FAST)


@pytest.mark.timeout(180)
def test_out_of_memory_splits_the_batch_and_later_ones_use_what_fit():
    ds = Docs(n=60, top=30)
    ref = pipeline.run(source=ds, kernel=sums, batch_size=8, order="length", workers=0, **FAST)
    r = pipeline.run(source=ds, kernel=oom_above_40, batch_size=8, order="length", workers=2, **FAST)
    assert r.summary["checksum"] == ref.summary["checksum"] and not r.summary["failed"]
    assert r.summary["oom_splits"] > 0
    assert any(re.search(r"split in halves \d+ time\(s\) .* over \d+ rows x length", n) for n in r.summary["notes"])


def test_a_row_that_does_not_fit_fails_its_batch_naming_row_and_length():
    ds = Docs(n=12, top=80, seed=3)
    r = pipeline.run(source=ds, kernel=oom_above_40, batch_size=4, workers=0, pad_multiple=1, on_error="skip",
                     **FAST)
    wide = [k for k in range(3) if ds.L[4 * k:4 * k + 4].max() > 40]
    assert [f["batch"] for f in r.summary["failed"]] == wide and wide
    w = int(ds.L[4 * wide[0]:4 * wide[0] + 4].max())
    assert f"batch {wide[0]}: one row (row 0, length {w}) does not fit in device memory after 2 split(s)" \
        in r.summary["failed"][0]["cause"]


def test_outputs_must_be_row_aligned_to_come_back_in_input_order():
    with pytest.raises(KernelError, match=r"one row per sample"):
        pipeline.run(source=Docs(n=20), kernel=one_per_batch, batch_size=4, order="length", workers=0, **FAST)


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_output_parts_carry_sample_indices_resume_and_read_back_in_input_order(tmp_path, fmt):
    ds = Docs(n=50)
    out = tmp_path / "out"
    kw = dict(source=ds, kernel=sums, batch_size=8, order="length", workers=0, output=str(out),
              output_format=fmt, **FAST)
    first = pipeline.run(**kw)
    manifest = out / ("_manifest.jsonl" if fmt == "parquet" else "manifest.jsonl")
    lines = manifest.read_text().splitlines()
    assert all(json.loads(x)["result"] == "dict" for x in lines)
    manifest.write_text("\n".join(lines[:3]) + "\n")  # as if killed after three batches
    again = pipeline.run(**kw)
    assert again.summary["skipped"] == 3 and again.summary["checksum"] == first.summary["checksum"]
    back = pipeline.read_output(str(out))
    doc = back["doc"] if fmt == "npy" else back.column("doc").to_numpy()
    assert np.array_equal(doc, np.arange(50))
    n = back["n"] if fmt == "npy" else back.column("n").to_numpy()
    assert np.array_equal(n, ds.L)


def write_docs(path, n=80, seed=0, null_at=-1, mismatch_at=-1):
    import pyarrow as pa
    import pyarrow.parquet as pq
    L = np.random.default_rng(seed).integers(1, 30, n)
    ids = [list(range(1, int(x) + 1)) if i != null_at else None for i, x in enumerate(L)]
    mask = [[1] * (int(x) + (1 if i == mismatch_at else 0)) for i, x in enumerate(L)]
    t = pa.table({"ids": pa.array(ids, pa.list_(pa.int64())), "mask": pa.array(mask, pa.list_(pa.int8())),
                  "doc": np.arange(n, dtype=np.int64), "name": [f"d{i}" for i in range(n)]})
    pq.write_table(t, path, row_group_size=16)
    return L


@pytest.mark.timeout(180)
def test_parquet_list_columns_of_their_own_length(tmp_path):
    pytest.importorskip("pyarrow")
    L = write_docs(tmp_path / "d.parquet")
    out = tmp_path / "out"
    r = pipeline.run(input=str(tmp_path / "d.parquet"), columns=["ids", "mask", "doc"], keep_columns=["name"],
                     kernel=sums, max_tokens=96, order="length", workers=2, output=str(out),
                     output_format="parquet", **FAST)
    assert r.summary["sequences"]["fields"] == ["ids", "mask"]
    back = pipeline.read_output(str(out))
    assert back.column("name").to_pylist() == [f"d{i}" for i in range(80)]
    assert np.array_equal(back.column("n").to_numpy(), L)
    assert np.array_equal(back.column("s").to_numpy(), L * (L + 1) // 2)


def test_parquet_ragged_columns_must_agree_and_have_no_nulls(tmp_path):
    pytest.importorskip("pyarrow")
    write_docs(tmp_path / "m.parquet", mismatch_at=21)
    with pytest.raises(ConfigError, match=r"m.parquet: column 'mask', row 21: \d+ values where column 'ids' has"):
        pipeline.run(input=str(tmp_path / "m.parquet"), columns=["ids", "mask"], kernel=sums, workers=0, **FAST)
    write_docs(tmp_path / "n.parquet", null_at=7)
    with pytest.raises(SampleError, match=r"n.parquet: column 'ids', row 7: null"):
        pipeline.run(input=str(tmp_path / "n.parquet"), columns=["ids"], kernel="sum", workers=0, **FAST)
    r = pipeline.run(input=str(tmp_path / "n.parquet"), columns=["ids"], kernel="sum", workers=0, batch_size=8,
                     on_error="skip", **FAST)
    assert [f["batch"] for f in r.summary["failed"]] == [0] and r.summary["completed"] == 9


def test_settings_for_lengths_are_refused_where_they_mean_nothing():
    with pytest.raises(ConfigError, match="not for source.kind = 'synthetic'"):
        pipeline.run(order="length", workers=0, batches=2, rows=4, cols=4, **FAST)
    with pytest.raises(ConfigError, match="every field of the samples compared has one shape"):
        pipeline.run(source=[np.ones(3)] * 4, batch_size=2, order="length", kernel="sum", workers=0, **FAST)
    with pytest.raises(ConfigError, match="leave drop_last off"):
        pipeline.run(source=Docs(), batch_size=4, order="length", drop_last=True, kernel=sums, workers=0, **FAST)
    with pytest.raises(ConfigError, match=r"source.pad_values = .*expected a table of field = number"):
        pipeline.run(source=Docs(), batch_size=4, pad_values={"ids": "x"}, kernel=sums, workers=0, **FAST)
    with pytest.raises(ConfigError, match="'nope' is not a ragged field"):
        pipeline.run(source=Docs(), batch_size=4, pad_values={"nope": 1}, kernel=sums, workers=0, **FAST)
    with pytest.raises(ConfigError, match=r"source.ragged = \['x'\]: no field 'x'"):
        pipeline.run(source=Docs(), batch_size=4, ragged=["x"], kernel=sums, workers=0, **FAST)


def test_a_ragged_field_not_found_by_the_probe_says_how_to_declare_it():
    ds = [np.ones(4, np.float32)] * 30 + [np.ones(6, np.float32)] + [np.ones(4, np.float32)] * 30
    src = MapSource(ds, 8)
    assert src.ragged is None  # the probes all had 4
    with pytest.raises(SampleError, match=r"declare it ragged \(source.ragged / --ragged\)"):
        pipeline.run(source=ds, batch_size=8, kernel="sum", workers=0, **FAST)
    r = pipeline.run(source=ds, batch_size=8, ragged=["array"], kernel=lambda b: b[1], workers=0, **FAST)
    assert np.concatenate(r.results).tolist() == [4] * 30 + [6] + [4] * 30


@pytest.mark.timeout(120)
def test_cli_orders_by_length_with_a_budget(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    write_docs(tmp_path / "d.parquet")
    code = main(["run", "--input", str(tmp_path / "d.parquet"), "--columns", "ids,mask", "--order", "length",
                 "--max-tokens", "128", "--pad-multiple", "4", "--max-length", "20", "--kernel", "sum",
                 "--workers", "0", "--json", "--no-progress"])
    assert code == 0
    s = json.loads(capsys.readouterr().out)
    assert s["sequences"]["order"] == "length" and s["sequences"]["truncated"] > 0
    assert s["config"]["source"]["max_tokens"] == 128
    code = main(["run", "--input", str(tmp_path / "d.parquet"), "--columns", "ids", "--order", "sideways",
                 "--workers", "0"])
    assert code == 2
    assert "source.order = 'sideways' (from --order): must be one of auto, input, length" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_a_real_out_of_memory_on_the_gpu_is_split():
    free, _ = torch.cuda.mem_get_info()
    per_row = free // 6  # three rows fit, a batch of eight does not

    class Big(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"x": np.ones(4 + i % 3, np.float32)}

        def lengths(self):
            return np.array([4 + i % 3 for i in range(16)])

    def hungry(b):
        buf = torch.empty((b["x"].shape[0], per_row), dtype=torch.uint8, device=b["x"].device)
        return b["lengths"] + buf[:, :1].long() * 0

    r = pipeline.run(source=Big(), kernel=hungry, batch_size=8, order="length", workers=1, device="cuda", **FAST)
    assert r.summary["oom_splits"] > 0 and not r.summary["failed"]
    assert np.concatenate(r.results).tolist() == [4 + i % 3 for i in range(16)]
